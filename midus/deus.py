"""Avg-DeUS and OpT-DeUS: a new layer between base layers i and i + 1 made from those two layers.

Source: Cao, Wang, Aletras, "Progressive Depth Up-scaling via Optimal Transport" (arXiv 2508.08011)
and its official scripts (github.com/voalmciaf/OpT-DeUS, ``Model/AVG-DeUS.py`` and
``Model/OpT-DeUS.py``), read for the method only; nothing here is copied from them.

- **Avg-DeUS** (the paper's baseline): every parameter of the new layer is the mean of the two
  neighbours' (norms included).
- **OpT-DeUS**: before averaging, the hidden units of layer i + 1 (attention heads, FFN neurons)
  are matched to those of layer i by entropic optimal transport, so that the two weights being
  averaged belong to units that compute similar things (the permutation symmetry of a layer
  otherwise makes the plain average blur unrelated units).

In both, :func:`midus.upscale` then zeroes the new layer's residual writers (o_proj and
down_proj; for Gemma 3 the gain of the norms that end its branches, see
:func:`midus.upscale.residual_writers`; ``identity=True``, the default) so the model is the
identity at insertion, as the official OpT-DeUS script does (``nn.init.zeros_`` of o_proj and
down_proj, citing its Algorithm 1, line 11). [project: the official Avg-DeUS script does not zero
them; ``identity=False`` reproduces that.]

What this module does, with the choices where the paper or its code is silent or where this
project departs from it marked [project]:

- **Which side moves.** Layer i + 1 is aligned to layer i (its units are transported onto layer
  i's unit positions), then ``fused = (W_i + aligned W_{i+1}) / 2``. [project: the issue asks for
  i + 1 onto i; the official script moves layer i onto i + 1. Averaging is symmetric, so only the
  unit order of the result differs.]
- **What is permuted.** Only the units inside a layer, whose order is arbitrary: attention heads
  (rows of q/k/v, columns of o_proj) and FFN neurons (rows of gate/up, columns of down_proj). The
  residual stream is shared by all layers, so its coordinates are never permuted: every input side
  (columns of q/k/v/gate/up) and every norm weight stays in place. [project: the official script
  also transports the hidden dimension, through o_proj's plan, into the post-attention norm and
  the gate/up columns; a permutation of the residual basis is not a symmetry of one layer.]
- **Attention: GQA groups and RoPE pairs.** A unit is a KV group: KV head g with its query heads
  g*G .. g*G + G - 1 (G = heads / KV heads, transformers' ``repeat_kv`` order). Heads move whole,
  so the dimensions inside a head (and so RoPE's rotation pairs, and partial RoPE) are never
  reordered and q/k stay paired. Inside a pair of groups the G query heads are matched exactly
  (``ot.emd``: a permutation; G <= 8 in practice); the cost of a group pair is the Euclidean
  distance between the groups' k, v and matched q weights (biases included); the groups are then
  coupled by Sinkhorn. With one KV head (Gemma 3 270M) only the query heads are matched.
  [project: the official script transports the rows of q, k and v separately, which breaks the
  q/k head pairing and the GQA grouping.]
- **FFN.** A unit is a neuron j: row j of gate_proj and of up_proj (for Phi-3, rows j and I + j
  of the fused gate_up_proj) with their biases; one plan moves both, so the gate and up of a
  neuron stay together. [project: the official script plans gate and up separately.]
- **Cost and plan.** Cost: Euclidean distance between the units' incoming weights (as the
  official ``torch.cdist(W1, W2, p=2)``), shifted to start at 0 and divided by its standard
  deviation, so that ``reg`` is in units of the cost's spread whatever the weights' scale
  [project]; uniform marginals; ``ot.sinkhorn`` (POT) with ``reg`` (default 0.02 [project], see
  :data:`OPT_DEUS_DEFAULTS`) and ``max_iter`` iterations, in float64; the plan's rows are
  renormalised to sum to 1 (an unconverged plan's columns are then a little off uniform; the
  record gives the error).
- **Fuse.** The aligned unit at position a is the barycentric projection
  ``sum_b n * T[a, b] * W_{i+1}[b]`` (rows of n*T sum to 1: a convex combination) [project: the
  official script applies ``T.T @ W`` without the factor n, which scales the aligned layer by
  1/n, so its fused q/k/v/gate/up are about half of one neighbour's: on SmolLM2-135M's layer
  15 the script's ``T.T @ W`` has 0.03% of W's norm]; then the plain mean with
  layer i's unit.
- **After the last layer** (i = L - 1) there is no layer i + 1: the new layer is a copy of layer
  L - 1 (with identity=True, LLaMA Pro's block) [project]; the record says so.
- **Placement.** OpT-DeUS's default is :func:`midus.upscale`'s ``"top-gaps"``: the K gaps
  nearest the top, between layers L-K-1 .. L-1 (32 -> 48 layers in the paper: new layers between
  15|16 ... 30|31, the paper's "top half").

Everything is computed in float64 on the weights' device and cast back to the model's dtype.
Deterministic: no randomness anywhere.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch

__all__ = ["DEUS_METHODS", "AVG_DEUS_DEFAULTS", "OPT_DEUS_DEFAULTS", "check_deus_options", "split_layer",
           "merge_layer", "align_layer", "fuse_layers", "predict_layers"]

DEUS_METHODS = ("avg_deus", "opt_deus")
AVG_DEUS_DEFAULTS: Dict[str, Any] = {
    "identity": True,     # zero the new layer's residual writers (o_proj, down_proj): identity at insertion
}
OPT_DEUS_DEFAULTS: Dict[str, Any] = {
    # [project] entropic regularisation in units of the cost's standard deviation. SmolLM2-135M,
    # FFN of layers 15 -> 16 (1536 neurons): effective partners per neuron 1456 / 342 / 30 / 3.5
    # at reg 0.5 / 0.1 / 0.05 / 0.02, the aligned rows keeping 8% / 36% / 56% / 77% of their norm
    # (a diffuse plan averages many unrelated neurons); at 0.02 the mean matched cost (8.60) is
    # that of the exact matching by ot.emd (8.59; unaligned 9.29). Hence 0.02: close to a
    # permutation, still Sinkhorn.
    "reg": 0.02,
    "max_iter": 2000,     # Sinkhorn iterations (POT's numItermax)
    "identity": True,
}
_DEFAULTS = {"avg_deus": AVG_DEUS_DEFAULTS, "opt_deus": OPT_DEUS_DEFAULTS}


def check_deus_options(method: str, opts: Mapping[str, Any]) -> Dict[str, Any]:
    """Fill the method's defaults and validate. Raises TypeError naming unknown options and
    ValueError naming an option with a bad value."""
    if method not in _DEFAULTS:
        raise ValueError(f"unknown deus method {method!r}; expected one of {', '.join(DEUS_METHODS)}")
    defaults = _DEFAULTS[method]
    unknown = set(opts) - set(defaults)
    if unknown:
        raise TypeError(f"unknown {method} option(s) {sorted(unknown)}; known options: {sorted(defaults)}")
    out = {**defaults, **opts}
    if not isinstance(out["identity"], bool):
        raise ValueError(f"identity must be True or False, got {out['identity']!r}")
    if method == "opt_deus":
        reg = out["reg"]
        if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not math.isfinite(reg) or reg <= 0:
            raise ValueError(f"reg must be a finite number > 0 (entropic regularisation, relative to the mean "
                             f"cost), got {reg!r}")
        it = out["max_iter"]
        if isinstance(it, bool) or not isinstance(it, int) or it < 1:
            raise ValueError(f"max_iter must be a positive int, got {it!r}")
    return out


# ----------------------------------------------------------------------------- layer anatomy

_ATTN = ("q", "k", "v", "o")
_MLP = ("gate", "up", "down")


def _dims(config, params: Mapping[str, torch.Tensor]) -> Tuple[int, int, int]:
    """(heads H, KV heads H_kv, head width d_h) of a decoder layer of ``config``."""
    H = int(config.num_attention_heads)
    Hkv = int(getattr(config, "num_key_value_heads", None) or H)
    o = params["self_attn.o_proj.weight"]
    return H, Hkv, int(o.shape[1]) // H


def split_layer(params: Mapping[str, torch.Tensor], config) -> Dict[str, torch.Tensor]:
    """A decoder layer's parameters in one layout for every family.

    Input: ``dict(layer.named_parameters())`` of a Llama/Mistral/Qwen2/Qwen3/Gemma 3/Phi-3 layer.
    Output keys: ``q.weight`` [H*d_h, d], ``k.weight`` / ``v.weight`` [H_kv*d_h, d], ``o.weight``
    [d, H*d_h], ``gate.weight`` / ``up.weight`` [I, d], ``down.weight`` [d, I], their ``.bias``
    where the layer has one, and every other parameter (norms, q/k norms) under its own name.
    Phi-3's fused ``qkv_proj`` ([q; k; v] rows) and ``gate_up_proj`` ([gate; up] rows, in the
    order of its ``chunk(2)``) are split. Views, not copies. Raises ValueError if the layer has
    neither layout.
    """
    out: Dict[str, torch.Tensor] = {}
    rest = dict(params)
    H, Hkv, dh = _dims(config, params)
    if "self_attn.qkv_proj.weight" in rest:
        for suffix in ("weight", "bias"):
            t = rest.pop(f"self_attn.qkv_proj.{suffix}", None)
            if t is not None:
                q, k, v = t.split([H * dh, Hkv * dh, Hkv * dh], dim=0)
                out.update({f"q.{suffix}": q, f"k.{suffix}": k, f"v.{suffix}": v})
    for name in ("q", "k", "v", "o"):
        for suffix in ("weight", "bias"):
            t = rest.pop(f"self_attn.{name}_proj.{suffix}", None)
            if t is not None:
                out[f"{name}.{suffix}"] = t
    if "mlp.gate_up_proj.weight" in rest:
        for suffix in ("weight", "bias"):
            t = rest.pop(f"mlp.gate_up_proj.{suffix}", None)
            if t is not None:
                gate, up = t.chunk(2, dim=0)
                out.update({f"gate.{suffix}": gate, f"up.{suffix}": up})
    for name in _MLP:
        for suffix in ("weight", "bias"):
            t = rest.pop(f"mlp.{name}_proj.{suffix}", None)
            if t is not None:
                out[f"{name}.{suffix}"] = t
    missing = [k for k in ("q.weight", "k.weight", "v.weight", "o.weight", "gate.weight", "up.weight", "down.weight")
               if k not in out]
    if missing:
        raise ValueError(f"cannot find {missing} in the layer's parameters ({sorted(params)}): not a "
                         f"Llama/Mistral/Qwen/Gemma 3/Phi-3 decoder layer")
    out.update(rest)
    return out


def merge_layer(parts: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`split_layer`: parameters named as in ``like`` (the layer's own names), with
    Phi-3's fused projections concatenated again."""
    out: Dict[str, torch.Tensor] = {}
    for name in like:
        if name.startswith("self_attn.qkv_proj."):
            suffix = name.rsplit(".", 1)[1]
            out[name] = torch.cat([parts[f"{p}.{suffix}"] for p in ("q", "k", "v")], dim=0)
        elif name.startswith("mlp.gate_up_proj."):
            suffix = name.rsplit(".", 1)[1]
            out[name] = torch.cat([parts[f"{p}.{suffix}"] for p in ("gate", "up")], dim=0)
        else:
            key = name
            for p in _ATTN:
                if name.startswith(f"self_attn.{p}_proj."):
                    key = f"{p}.{name.rsplit('.', 1)[1]}"
            for p in _MLP:
                if name.startswith(f"mlp.{p}_proj."):
                    key = f"{p}.{name.rsplit('.', 1)[1]}"
            out[name] = parts[key]
    return out


# ----------------------------------------------------------------------------- optimal transport

def _ot():
    try:
        import ot
    except ImportError as err:  # pot is in install_requires; say what to install if it is missing
        raise ImportError("method='opt_deus' needs the POT library (`pip install pot`)") from err
    return ot


def _plan(cost: torch.Tensor, reg: float, max_iter: int) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Row-stochastic plan W [n, m] (rows sum to 1) from an entropic OT plan with uniform marginals.

    ``cost`` [n, m] (float64) is shifted to start at 0 and divided by its standard deviation
    first; returns W (T with rows normalised to sum to 1) and facts about T:
    ``partners`` (mean over rows of exp(entropy of the row), 1 for a permutation, m for a uniform
    row) and ``marginal_error`` (largest deviation of T's column sums from 1/m)."""
    ot = _ot()
    n, m = cost.shape
    if n == 1 and m == 1:
        return torch.ones_like(cost), {"partners": 1.0, "marginal_error": 0.0}
    # Shifting a cost leaves the plan unchanged; dividing by its spread makes ``reg`` scale-free
    # (in units of the cost's standard deviation), and the shift keeps exp(-M / reg) from underflowing.
    spread = cost.std() if cost.numel() > 1 else cost.new_zeros(())
    M = (cost - cost.min()) / (spread if spread > 0 else 1.0)
    a = torch.full((n,), 1.0 / n, dtype=cost.dtype, device=cost.device)
    b = torch.full((m,), 1.0 / m, dtype=cost.dtype, device=cost.device)
    with warnings.catch_warnings():  # non-convergence is measured below and recorded, not printed
        warnings.simplefilter("ignore")
        T = ot.sinkhorn(a, b, M, reg, numItermax=max_iter, stopThr=1e-9)
    if not torch.isfinite(T).all() or float(T.sum()) <= 0:
        # Too small a reg for the cost range underflows exp(-M / reg); the log-domain solver does not.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            T = ot.sinkhorn(a, b, M, reg, method="sinkhorn_log", numItermax=max_iter, stopThr=1e-9)
    W = T / T.sum(dim=1, keepdim=True).clamp_min(torch.finfo(T.dtype).tiny)
    entropy = -(W * W.clamp_min(torch.finfo(W.dtype).tiny).log()).sum(dim=1)
    return W, {"partners": float(entropy.exp().mean()), "marginal_error": float((T.sum(0) - 1.0 / m).abs().max())}


def _assignment(cost: torch.Tensor) -> torch.Tensor:
    """Exact matching of a small square cost [G, G] (ot.emd): perm[r] = the column matched to row r."""
    G = cost.shape[0]
    if G == 1:
        return torch.zeros(1, dtype=torch.long, device=cost.device)
    u = torch.full((G,), 1.0 / G, dtype=cost.dtype, device=cost.device)
    P = _ot().emd(u, u, cost)
    return P.argmax(dim=1)


def _unit_features(parts: Mapping[str, torch.Tensor], names: Sequence[str], units: int) -> torch.Tensor:
    """[units, F] float64: each unit's rows of the given weights (and biases), concatenated."""
    cols = []
    for name in names:
        t = parts.get(name)
        if t is not None:
            cols.append(t.detach().to(torch.float64).reshape(units, -1))
    return torch.cat(cols, dim=1)


@torch.no_grad()
def align_layer(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], config, reg: float = 0.02,
                max_iter: int = 2000) -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
    """Layer ``b``'s units transported onto layer ``a``'s (module docstring).

    Args:
        a, b: :func:`split_layer` layouts of two layers of the same config.
        reg, max_iter: Sinkhorn's regularisation (relative to the mean cost) and iterations.

    Returns:
        (aligned, info): ``aligned`` has every key of ``b`` (float64): q/k/v rows, o columns,
        gate/up rows, down columns and the per-unit biases transported; the residual-stream tensors
        (o/down biases, norms) unchanged. ``info``: ``group_partners``, ``ffn_partners`` (effective
        partners per unit of the plans; 1 = a permutation) and ``marginal_error`` (the larger of
        the two plans').
    """
    H, Hkv, dh = _dims(config, {"self_attn.o_proj.weight": a["o.weight"]})
    G = H // Hkv
    d = a["o.weight"].shape[0]
    f64 = {k: v.detach().to(torch.float64) for k, v in b.items()}
    out = dict(f64)

    # Attention. Query heads per group: [Hkv, G, F]; KV heads: [Hkv, F].
    qa = _unit_features(a, ("q.weight", "q.bias"), H).view(Hkv, G, -1)
    qb = _unit_features(b, ("q.weight", "q.bias"), H).view(Hkv, G, -1)
    kva = _unit_features(a, ("k.weight", "k.bias", "v.weight", "v.bias"), Hkv)
    kvb = _unit_features(b, ("k.weight", "k.bias", "v.weight", "v.bias"), Hkv)
    perms = torch.empty(Hkv, Hkv, G, dtype=torch.long, device=qa.device)
    d2 = torch.cdist(kva, kvb).square()
    for ga in range(Hkv):
        for gb in range(Hkv):
            c = torch.cdist(qa[ga], qb[gb]).square()  # [G, G]
            p = _assignment(c)
            perms[ga, gb] = p
            d2[ga, gb] += c[torch.arange(G), p].sum()
    Wg, ginfo = _plan(d2.clamp_min(0).sqrt(), reg, max_iter)  # [Hkv, Hkv]

    def move_heads(t: torch.Tensor, rows_per_head: int, query: bool) -> torch.Tensor:
        """Rows of a [n_heads * rows_per_head, ...] tensor (q/k/v weight or bias) moved to a's heads."""
        if query:
            x = t.reshape(Hkv, G, rows_per_head, *t.shape[1:])
            res = torch.zeros_like(x)
            for ga in range(Hkv):
                for gb in range(Hkv):
                    if Wg[ga, gb] != 0:
                        res[ga] += Wg[ga, gb] * x[gb, perms[ga, gb]]
            return res.reshape(t.shape)
        x = t.reshape(Hkv, -1)
        return (Wg @ x).reshape(t.shape)

    for name in ("q", "k", "v"):
        for suffix in ("weight", "bias"):
            key = f"{name}.{suffix}"
            if key in f64:
                out[key] = move_heads(f64[key], dh, query=name == "q")
    # o_proj's columns belong to the query heads: move them like q's rows.
    out["o.weight"] = move_heads(f64["o.weight"].T.contiguous(), dh, query=True).T.contiguous()
    assert out["o.weight"].shape == (d, H * dh)

    # FFN neurons: gate and up rows (and biases) of neuron j together.
    I = a["gate.weight"].shape[0]
    fa = _unit_features(a, ("gate.weight", "gate.bias", "up.weight", "up.bias"), I)
    fb = _unit_features(b, ("gate.weight", "gate.bias", "up.weight", "up.bias"), I)
    Wf, finfo = _plan(torch.cdist(fa, fb), reg, max_iter)  # [I, I]
    for key in ("gate.weight", "gate.bias", "up.weight", "up.bias"):
        if key in f64:
            out[key] = Wf @ f64[key]
    out["down.weight"] = f64["down.weight"] @ Wf.T
    info = {"group_partners": ginfo["partners"], "ffn_partners": finfo["partners"],
            "marginal_error": max(ginfo["marginal_error"], finfo["marginal_error"])}
    return out, info


@torch.no_grad()
def fuse_layers(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], config, method: str,
                reg: float = 0.02, max_iter: int = 2000) -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
    """The new layer between layers ``a`` (i) and ``b`` (i + 1), before any zeroing.

    Args: ``dict(layer.named_parameters())`` of two decoder layers of ``config``; ``method``
    "avg_deus" (the mean of every parameter) or "opt_deus" (b aligned to a by :func:`align_layer`,
    then the mean). Returns (params named as in ``a``, each with its dtype and device; info: {} for
    avg_deus, :func:`align_layer`'s for opt_deus). Raises ValueError for an unknown method or
    layers whose names or shapes differ.
    """
    if method not in DEUS_METHODS:
        raise ValueError(f"unknown deus method {method!r}; expected one of {', '.join(DEUS_METHODS)}")
    if list(a) != list(b) or any(a[k].shape != b[k].shape for k in a):
        raise ValueError("the two layers differ in parameter names or shapes")
    if method == "avg_deus":
        return {k: ((a[k].double() + b[k].double()) / 2).to(a[k].dtype) for k in a}, {}
    pa, pb = split_layer(a, config), split_layer(b, config)
    aligned, info = align_layer(pa, pb, config, reg=reg, max_iter=max_iter)
    fused = {k: (pa[k].detach().double() + aligned[k]) / 2 for k in pa}
    merged = merge_layer(fused, a)
    return {k: v.to(dtype=a[k].dtype, device=a[k].device) for k, v in merged.items()}, info


def predict_layers(layers: Sequence[Mapping[str, torch.Tensor]], after: Sequence[int], config, method: str,
                   reg: float = 0.02, max_iter: int = 2000) -> Tuple[List[Dict[str, torch.Tensor]], List[dict]]:
    """The new layers to insert after base layers ``after`` (each between i and i + 1).

    Args: ``layers`` the L base layers' ``dict(named_parameters())``; ``after`` indices in [0, L);
    ``method`` "avg_deus" | "opt_deus"; ``reg``/``max_iter`` as in :func:`align_layer`.
    Returns (one parameter dict per entry of ``after``, one record per entry: ``after``,
    ``source`` ("fused (i, i+1)" or "copy of the last layer") and opt_deus' alignment facts).
    After the last layer (i = L - 1) the new layer is a copy of it (module docstring).
    """
    L = len(layers)
    out, records = [], []
    for i in after:
        if not 0 <= i < L:
            raise ValueError(f"after: layer index {i} out of range [0, {L})")
        if i == L - 1:
            out.append({k: v.detach().clone() for k, v in layers[i].items()})
            records.append({"after": i, "source": "copy of the last layer (no layer after it to fuse with)"})
            continue
        params, info = fuse_layers(layers[i], layers[i + 1], config, method, reg=reg, max_iter=max_iter)
        out.append(params)
        records.append({"after": i, "source": f"fused layers {i} and {i + 1}", **info})
    return out, records
