"""LESA: learnable depth up-scaling (Yang et al., "LESA: Learnable LLM Layer Scaling-Up", ACL 2025,
arXiv 2502.13794; docs/design.md §3.3). The weights of a layer inserted between base layers i and i + 1
are predicted from those two layers by a small MLP trained on the model's own layer sequence.

For each weight kind (every 2-D parameter name of a layer: q/k/v/o_proj, gate/up/down_proj):

1. SVD (paper sec. 3.1; official code ``train_LESA.ipynb``): the L matrices W_1..W_L [d1, d2] are
   concatenated horizontally, W = [W_1 | ... | W_L] [d1, L*d2] = U S V^T, so that W_l = (U S) V_l
   with V_l [R, d2] the l-th column block of V^T (R = min(d1, L*d2)): layer l's coefficients on a
   basis shared by all layers. Row k of V_l is layer l's coefficient vector on singular direction k.
2. Predictor (paper sec. 3.2): an MLP G (Linear 2*d2 -> h, ReLU, Linear h -> h, ReLU, Linear h -> d2;
   h = 256), one per weight kind, maps [V_{l-1}[k], V_{l+1}[k]] to V_l[k]. Every singular
   direction k of every consecutive triple (l-1, l, l+1), l = 1..L-2, is one training sample (the
   official code's ``prepare_data_sliding_window``). Objective: (1 - lam) * MSE(G(x), y) +
   lam * (||G(x)||_F - ||y||_F)^2 over a mini-batch (the norm term keeps the predictions from
   shrinking towards 0); AdamW, lr 1e-3, batch 64 (code); lam = 5e-5 and 5 epochs (paper text; the
   code uses 5e-4 and 10).
3. Insertion (paper sec. 3.3): the layer between i and i + 1 gets W* = (U S) G([V_i, V_{i+1}]).

Choices of this project, marked [project] (the paper and code do not say, or say otherwise):

- ``rank``: only the top-``rank`` singular directions (rows of V_l, largest singular values first)
  are samples and predictions of G; the remaining directions of the new layer take the mean of the
  two input layers' coefficients, i.e. W* = (U_r S_r) G(...) + (I - U_r U_r^T) (W_a + W_b) / 2.
  ``rank=None`` gives every direction to G, as the official code does. Default 64: on SmolLM2-135M
  (4 held-out interior layers, tests/test_lesa.py) the relative Frobenius error of the predicted
  layers is 1.214-1.219 with rank 64 and 1.216-1.225 with rank=None, which trains about 9x longer
  (copying a neighbour: 1.40-1.43; the neighbours' mean: 1.225).
- Data scaling: G sees the coefficients multiplied by sqrt(L * d2) (entries of unit size on
  average: each row of V^T has unit norm over L*d2 entries) and its output is divided by it.
  Both loss terms scale alike, so the objective's balance is unchanged; only the MLP's conditioning.
- After the last layer (i = L - 1) there is no right neighbour. ``last="extrapolate"`` (default)
  trains a second MLP of the same shape and objective on [V_{l-2}, V_{l-1}] -> V_l and predicts
  the new layer from (L - 2, L - 1), i.e. the "next" layer of the sequence; ``last="copy"`` clones
  layer L - 1 (DUS). The paper inserts only between 15 and 31 of 32 layers, never after the last.
- 1-D parameters (RMSNorm weights, q/k norms, biases): the mean of the two neighbours; after the
  last layer a copy of layer L - 1's. (The official code keeps layer 0's norms in every new layer.)
- Everything is computed in float32 on the parameters' device and cast back to the model dtype;
  the MLPs' init and sample order are seeded from ``seed`` and the kind's index, without touching
  the global RNG (bitwise deterministic on CPU).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from midus_ops.options import OptionsMixin

__all__ = ["LesaOptions", "LESA_DEFAULTS", "check_lesa_options", "predict_layers", "coefficient_blocks"]


@dataclass(frozen=True)
class LesaOptions(OptionsMixin):
    """The options of LESA's layer prediction (immutable; validated on creation). Sources: the
    paper's text (arXiv 2502.13794), its official code, or [project] where neither fixes them.

    Fields: ``rank`` top singular directions predicted by the MLP, None = all (official code)
    [project] 64; ``hidden`` MLP width (paper / code) 256; ``epochs`` (paper text; code: 10) 5;
    ``batch_size`` (code) 64; ``lr`` AdamW, torch's default weight decay 0.01 (code) 1e-3;
    ``norm_weight`` lambda of the norm loss in [0, 1] (paper text; code: 5e-4) 5e-5; ``seed`` 0;
    ``last``: a block after the last layer, "extrapolate" or "copy" [project] "extrapolate".

    Raises ValueError naming the field with a bad value, TypeError for an unknown field
    (:meth:`from_dict`).
    """

    _kind = "lesa"

    rank: Optional[int] = 64
    hidden: int = 256
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    norm_weight: float = 5e-5
    seed: int = 0
    last: str = "extrapolate"

    def __post_init__(self):
        for key in ("hidden", "epochs", "batch_size"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{key} must be a positive int, got {v!r}")
        rank = self.rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"rank must be a positive int or None (all singular directions), got {rank!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        for key in ("lr", "norm_weight"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{key} must be a finite number, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.norm_weight <= 1:
            raise ValueError(f"norm_weight must be in [0, 1], got {self.norm_weight!r}")
        if self.last not in ("extrapolate", "copy"):
            raise ValueError(f"last must be 'extrapolate' or 'copy', got {self.last!r}")


# The dict view of the defaults, for code that reads it.
LESA_DEFAULTS: Dict[str, Any] = LesaOptions().to_dict()


def check_lesa_options(opts: Mapping[str, Any]) -> Dict[str, Any]:
    """Fill the defaults and validate (:class:`LesaOptions`): the options as a dict. Raises TypeError
    naming unknown options, ValueError naming the option with a bad value."""
    return LesaOptions.from_dict(opts).to_dict()


def coefficient_blocks(mats: Sequence[torch.Tensor]):
    """SVD of the horizontal concatenation W [d1, L*d2] of L matrices [d1, d2], in float32.

    Returns (US [d1, R], U [d1, R], V [L, R, d2]) with R = min(d1, L*d2) and mats[l] = US @ V[l]
    (paper sec. 3.1): V[l] is the l-th column block of V^T. Singular directions are ordered by
    decreasing singular value. When d1 <= L*d2 (every real model) U comes from the eigenvectors of
    the Gram matrix W W^T = sum_l W_l W_l^T and S V^T = U^T W, whose rows have norms S: the same
    factors as ``torch.linalg.svd`` (up to signs) at a fraction of its CPU time, and the
    reconstruction U (U^T W) is exact for any conditioning because U is a complete orthonormal basis.
    """
    mats = [m.float() for m in mats]
    L, (d1, d2) = len(mats), mats[0].shape
    if d1 > L * d2:
        U, S, Vh = torch.linalg.svd(torch.cat(mats, dim=1), full_matrices=False)
        return U * S, U, Vh.reshape(Vh.shape[0], L, d2).transpose(0, 1)
    gram = sum(m @ m.T for m in mats)
    U = torch.linalg.eigh(gram).eigenvectors.flip(1)  # eigh sorts ascending
    C = torch.stack([U.T @ m for m in mats])  # [L, R, d2] = S V_l
    S = C.square().sum(dim=(0, 2)).sqrt()
    order = torch.argsort(S, descending=True, stable=True)  # fix ties / rounding in the eigenvalue order
    U, S, C = U[:, order], S[order], C[:, order]
    return U * S, U, C / S.clamp_min(torch.finfo(S.dtype).tiny)[None, :, None]


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, d_out))


def _fit(X: torch.Tensor, Y: torch.Tensor, opts: Dict[str, Any], seed: int) -> nn.Sequential:
    """Train G: X [n, 2*d2] -> Y [n, d2] with the LESA objective (module docstring, step 2)."""
    with torch.random.fork_rng(devices=[]):  # the MLP's init must not touch (or depend on) the global RNG
        torch.manual_seed(seed)
        mlp = _mlp(X.shape[1], opts["hidden"], Y.shape[1]).to(X.device)
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(mlp.parameters(), lr=opts["lr"])
    lam, bs = float(opts["norm_weight"]), opts["batch_size"]
    for _ in range(opts["epochs"]):
        order = torch.randperm(X.shape[0], generator=g).to(X.device)
        for start in range(0, X.shape[0], bs):
            idx = order[start:start + bs]
            out, y = mlp(X[idx]), Y[idx]
            loss = (1 - lam) * nn.functional.mse_loss(out, y) + lam * (out.norm() - y.norm()).square()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return mlp.eval()


def _samples(V: torch.Tensor, r: int, offsets, L: int):
    """Every top-r row of every layer l with both inputs in range is a sample:
    x = [V[l+a][k], V[l+b][k]] [2*d2], y = V[l][k] [d2]. offsets (a, b) = (-1, 1) between, (-2, -1) after."""
    a, b = offsets
    ls = range(-min(a, b, 0), L - max(a, b, 0))
    X = torch.cat([torch.cat([V[l + a, :r], V[l + b, :r]], dim=1) for l in ls])
    Y = torch.cat([V[l, :r] for l in ls])
    return X, Y


@torch.no_grad()
def _predict_kind(mats: List[torch.Tensor], after: Sequence[int], opts: Dict[str, Any],
                  seed: int) -> List[torch.Tensor]:
    """Predicted [d1, d2] matrices (float32) of one weight kind for the new layers after ``after``."""
    L = len(mats)
    US, U, V = coefficient_blocks(mats)
    R = V.shape[1]
    r = R if opts["rank"] is None else min(opts["rank"], R)
    scale = math.sqrt(L * V.shape[2])  # [project] unit-size entries for the MLP
    extrapolate = opts["last"] == "extrapolate"
    need = {"interp": any(i < L - 1 for i in after), "extrap": extrapolate and (L - 1) in after}
    mlps = {}
    with torch.enable_grad():
        if need["interp"]:
            X, Y = _samples(V, r, (-1, 1), L)
            mlps["interp"] = _fit(X * scale, Y * scale, opts, seed)
        if need["extrap"]:
            X, Y = _samples(V, r, (-2, -1), L)
            mlps["extrap"] = _fit(X * scale, Y * scale, opts, seed + 1)
    out = []
    for i in after:
        if i == L - 1 and not extrapolate:
            out.append(mats[i].float().clone())
            continue
        a, b = (i, i + 1) if i < L - 1 else (L - 2, L - 1)
        mlp = mlps["interp" if i < L - 1 else "extrap"]
        top = mlp(torch.cat([V[a, :r], V[b, :r]], dim=1) * scale) / scale  # [r, d2]
        mean = (mats[a].float() + mats[b].float()) / 2
        tail = mean - U[:, :r] @ (U[:, :r].T @ mean)  # the mean's part outside the top-r directions
        out.append(US[:, :r] @ top + tail)
    return out


def predict_layers(layers: Sequence[Mapping[str, torch.Tensor]], after: Sequence[int],
                   **options: Any) -> List[Dict[str, torch.Tensor]]:
    """Predict the parameters of new layers to insert after base layers ``after`` (LESA, module docstring).

    Args:
        layers: L >= 3 per-layer parameter dicts (e.g. ``dict(layer.named_parameters())`` of each
            decoder layer), all with the same names and shapes; 2-D tensors are predicted by the
            per-kind SVD + MLP, 1-D ones (norms, biases) are averaged (or copied after the last layer).
        after: base-layer indices i in [0, L); the new layer j goes between i and i + 1 (after the
            last layer: ``last`` option).
        **options: ``LESA_DEFAULTS`` keys (rank, hidden, epochs, batch_size, lr, norm_weight, seed, last).

    Returns:
        one dict per entry of ``after``, same names and shapes as ``layers[0]``, each tensor with
        the dtype and device of the corresponding base tensor; nothing is shared with ``layers``.

    Raises:
        TypeError / ValueError: bad options (named); ValueError: fewer than 3 layers, ``after``
        out of range, layers with different names/shapes, parameters that are neither 1-D nor 2-D.
    """
    opts = check_lesa_options(options)
    L = len(layers)
    if L < 3:
        raise ValueError(f"lesa needs at least 3 base layers (consecutive triples to train on), got {L}")
    after = list(after)
    bad = [i for i in after if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < L]
    if bad:
        raise ValueError(f"after: layer indices {bad} out of range [0, {L})")
    names = list(layers[0])
    for l, layer in enumerate(layers):
        if list(layer) != names or any(layer[n].shape != layers[0][n].shape for n in names):
            raise ValueError(f"layers[{l}] differs from layers[0] in parameter names or shapes")
    result: List[Dict[str, torch.Tensor]] = [{} for _ in after]
    matrices = [n for n in names if layers[0][n].dim() == 2]
    t0 = time.time()
    for kind, name in enumerate(names):
        ref = layers[0][name]
        if ref.dim() == 2:  # each kind fits its own predictor: tens of seconds on a CPU, so say so
            print(f"[midus] lesa: fitting the predictor of {name} ({matrices.index(name) + 1}/{len(matrices)}, "
                  f"{time.time() - t0:.0f} s so far)", file=sys.stderr, flush=True)
        mats = [layer[name].detach() for layer in layers]
        if ref.dim() == 2:
            preds = _predict_kind(mats, after, opts, seed=opts["seed"] * 1_000_003 + 2 * kind)  # +1: extrapolation
        elif ref.dim() == 1:
            preds = [(mats[i].float() + mats[i + 1].float()) / 2 if i < L - 1 else mats[i].float().clone()
                     for i in after]
        else:
            raise ValueError(f"lesa: parameter {name!r} has {ref.dim()} dimensions; only 1-D and 2-D are handled")
        for j, p in enumerate(preds):
            result[j][name] = p.to(dtype=ref.dtype, device=ref.device)
    return result
