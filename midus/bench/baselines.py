"""The baselines midus is measured against, and the HML op written three ways.

- eager: what a user writes without midus_ops, the "eager reference" of docs/benchmarks.md §1: einsum
  scoring, ``torch.topk`` per half, a cartesian top-k, a gather of [N, H, k, d_z] and an einsum
  projection, in the input's dtype. No tie rule (torch.topk's own), so it is the fast eager
  baseline, not the exact reference.
- reference: ``midus_ops.reference`` (docs/design.md §1.1, §1.2; exact tie rule, fp32 accumulation).
- midus_ops: the public ops (compiled kernels where the device has them, else the reference).
- ``torch.compile`` of the eager version, and ``F.embedding_bag`` for the gather.
- :class:`SwiGLU`: the Llama FFN a memory layer replaces.

:func:`eager_ops` makes the memory layers of a module (a layer, a block or a whole MIDUS model) run
the eager ops, registered as the "eager" implementation of ``midus_ops.layers.MEMORY_OPS`` and
chosen per layer (``ops_implementation``), so they can be timed with the PyTorch a user would
write, in the same process; nothing in ``midus_ops`` is overwritten.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import midus_ops
from midus_ops.layers import register_memory_ops, use_memory_ops
from midus_ops.reference import hive_gather_ref, pk_topk_ref

__all__ = ["pk_topk_eager", "hive_gather_eager", "hive_gather_embedding_bag", "hml_eager", "hml_with", "HML_IMPLS",
           "eager_ops", "SwiGLU", "compiled"]


def pk_topk_eager(q: torch.Tensor, subkeys: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """pk_topk as a user writes it: q [N, H, d_k], subkeys [H, 2, n, d_k/2] -> scores, indices [N, H, k]."""
    n, half = subkeys.shape[2], subkeys.shape[3]
    s1 = torch.einsum("thd,hid->thi", q[..., :half], subkeys[:, 0])
    s2 = torch.einsum("thd,hid->thi", q[..., half:], subkeys[:, 1])
    v1, a = s1.topk(k, dim=-1)
    v2, b = s2.topk(k, dim=-1)
    cand = (v1[..., :, None] + v2[..., None, :]).flatten(-2)
    cand_idx = (a[..., :, None] * n + b[..., None, :]).flatten(-2)
    scores, j = cand.topk(k, dim=-1)
    return scores, cand_idx.gather(-1, j)


def hive_gather_eager(weights: torch.Tensor, indices: torch.Tensor, bank: torch.Tensor,
                      proj: Optional[torch.Tensor] = None, **options) -> torch.Tensor:
    """hive_gather as a user writes it: materialises bank[indices] [N, H, k, d_z]. The keyword
    options of ``midus_ops.hive_gather`` (deterministic, check_indices, ...) are accepted, so the
    layers can call it, and ignored."""
    u = (weights[..., None] * bank[indices]).sum(dim=2)
    return torch.einsum("thz,hzv->thv", u, proj) if proj is not None else u


def hive_gather_embedding_bag(weights: torch.Tensor, indices: torch.Tensor, bank: torch.Tensor,
                              proj: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The gather with ``F.embedding_bag(mode="sum", per_sample_weights=...)``, one bag per (token,
    head), then the per-head projection as an einsum."""
    N, H, k = weights.shape
    u = F.embedding_bag(indices.reshape(N * H, k), bank, per_sample_weights=weights.reshape(N * H, k),
                        mode="sum").view(N, H, -1)
    return torch.einsum("thz,hzv->thv", u, proj) if proj is not None else u


def hml_with(topk: Callable, gather: Callable) -> Callable:
    """The whole HML op (docs/design.md §2.1 without the query norm): top-k, fp32 softmax, gather + projection."""
    def hml(q, subkeys, k, bank, proj):
        scores, idx = topk(q, subkeys, k)
        w = torch.softmax(scores.float(), dim=-1).to(bank.dtype)
        return gather(w, idx, bank, proj)
    return hml


hml_eager = hml_with(pk_topk_eager, hive_gather_eager)
def hive_gather_trusted(weights, indices, bank, proj=None):
    """midus_ops.hive_gather for indices that come from pk_topk (in range by construction), as the
    layers call it: no host-side index check (on CUDA, no synchronisation)."""
    return midus_ops.hive_gather(weights, indices, bank, proj, check_indices=False)


HML_IMPLS = {
    "midus_ops": hml_with(midus_ops.pk_topk, hive_gather_trusted),
    "eager": hml_eager,
    "reference": hml_with(pk_topk_ref, hive_gather_ref),
}


def _pk_topk_eager_op(q, subkeys, k):
    return pk_topk_eager(q, subkeys, k)


def _hive_gather_eager_op(weights, indices, bank, proj=None, deterministic=False, check_indices=True):
    # the eager baseline has no deterministic mode or index check to skip: it is what a user writes
    return hive_gather_eager(weights, indices, bank, proj)


register_memory_ops("eager", _pk_topk_eager_op, _hive_gather_eager_op)


def eager_ops(module: nn.Module):
    """Within the block the memory layers of ``module`` run the eager ops (the "[eager]" twins of the
    benchmark tables); restored on exit."""
    return use_memory_ops(module, "eager")


def with_eager_ops(fn: Callable, module: Optional[nn.Module] = None) -> Callable:
    """``fn`` run with the memory layers of ``module`` (default: ``fn`` itself, a module) on the eager ops."""
    target = fn if module is None else module
    if not isinstance(target, nn.Module):
        raise TypeError("with_eager_ops needs the module whose memory layers it switches: pass module=")

    def wrapped(*args, **kwargs):
        with eager_ops(target):
            return fn(*args, **kwargs)
    return wrapped


class SwiGLU(nn.Module):
    """The Llama FFN: down(silu(gate(x)) * up(x)), d -> d_ff -> d, no bias."""

    def __init__(self, d: int, d_ff: int):
        super().__init__()
        self.gate = nn.Linear(d, d_ff, bias=False)
        self.up = nn.Linear(d, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def compiled(fn: Callable) -> Callable:
    """torch.compile with default options (what a user would try first); a new function object each
    time so that cases do not share (and invalidate) each other's compiled graphs."""
    return torch.compile(lambda *a: fn(*a), dynamic=False)
