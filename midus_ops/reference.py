"""Pure-PyTorch reference implementations of the two MIDUS memory operators.

These functions are the executable documentation of the math in docs/design.md §1
(MIDUS, arXiv 2512.13751; product keys after Lample et al. 2019, "Large Memory Layers with
Product Keys"). They are short on purpose: the fast kernels in ``midus_ops._C`` are tested
against them, and ``midus_ops`` falls back to them when the compiled extension cannot load.

They materialise every intermediate ([N, H, k, d_z] for the gather), so they are slow and
memory-hungry on large inputs: that cost is what the kernels remove.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["pk_topk_ref", "hive_gather_ref", "topk_lower_index_wins", "accumulation_dtype"]


def accumulation_dtype(dt: torch.dtype) -> torch.dtype:
    """The dtype the ops and layers compute scores, sums and top-k weights in: fp32 at least, fp64
    for fp64 inputs (so that fp64 gradchecks hold)."""
    return torch.float64 if dt == torch.float64 else torch.float32


def _outside_autocast(fn):
    """Run ``fn`` with autocast off on its first argument's device: the reference computes in
    fp32 (fp64) as it says; under autocast its einsums would run in bf16/fp16 and select other
    slots than the kernels (which autocast does not reach)."""
    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        dev = first.device.type
        off = torch.autocast(dev, enabled=False) if dev in ("cpu", "cuda") else contextlib.nullcontext()
        with off:
            return fn(first, *args, **kwargs)
    return wrapper


def topk_lower_index_wins(scores: torch.Tensor, index: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim with the project's tie rule: among equal scores the lower
    ``index`` wins. ``index`` holds the integer id of every entry (same shape as ``scores``).

    Returns (values, ids), values descending. A stable sort keeps equal scores in the order of
    its input, so sorting by id first and then stably by score (descending) gives the rule.
    """
    by_id = torch.argsort(index, dim=-1)
    scores = torch.gather(scores, -1, by_id)
    index = torch.gather(index, -1, by_id)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.gather(scores, -1, order), torch.gather(index, -1, order)


@_outside_autocast
def pk_topk_ref(q: torch.Tensor, subkeys: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Product-key scoring and top-k, per head (docs/design.md §1.1).

    Args:
        q: [N, H, d_k] queries, d_k even; float32, float64, bfloat16 or float16.
        subkeys: [H, 2, n, d_k/2] per-head sub-key tables (half 0 scores q[..., :d_k/2],
            half 1 scores q[..., d_k/2:]); same dtype as ``q``.
        k: number of memories selected per (token, head), 1 <= k <= n.

    Returns:
        scores: [N, H, k], dtype of ``q``, descending; scores[t, h, m] = s1[a] + s2[b].
        indices: [N, H, k] int64 in [0, n*n), indices = a * n + b.

    Scores are computed in fp32 (fp64 for fp64 inputs). Ties: lower index wins, at both stages.
    """
    acc = accumulation_dtype(q.dtype)
    N, H, d_k = q.shape
    n = subkeys.shape[2]
    half = d_k // 2
    qa = q.to(acc)
    keys = subkeys.to(acc)
    # s[p][t, h, i] = <keys[h, p, i], q_p[t, h]>
    s1 = torch.einsum("thd,hid->thi", qa[..., :half], keys[:, 0])
    s2 = torch.einsum("thd,hid->thi", qa[..., half:], keys[:, 1])
    ids = torch.arange(n, device=q.device).expand(N, H, n)
    v1, a = topk_lower_index_wins(s1, ids, k)  # [N, H, k]
    v2, b = topk_lower_index_wins(s2, ids, k)
    cand = (v1[..., :, None] + v2[..., None, :]).reshape(N, H, k * k)
    cand_ids = (a[..., :, None] * n + b[..., None, :]).reshape(N, H, k * k)
    scores, indices = topk_lower_index_wins(cand, cand_ids, k)
    return scores.to(q.dtype), indices


@_outside_autocast
def hive_gather_ref(
    weights: torch.Tensor,
    indices: torch.Tensor,
    bank: torch.Tensor,
    proj: Optional[torch.Tensor] = None,
    *,
    check_indices: bool = True,
) -> torch.Tensor:
    """Weighted gather from a shared latent bank, then a per-head projection (docs/design.md §1.2, HIVE).

    Args:
        weights: [N, H, k] per-sample weights; same dtype as ``bank``.
        indices: [N, H, k] int32 or int64 rows of ``bank``, each in [0, R).
        bank: [R, d_z] shared latent bank.
        proj: [H, d_z, d_v] per-head projections, or None (then d_v = d_z).
        check_indices: True checks the index range first, on the host: on CUDA a stream
            synchronisation (skipped while a CUDA graph is being captured); inside
            ``torch.compile``, in the compiled kernel. False leaves a bad
            index to ``F.embedding`` (an IndexError on CPU, a device-side assert on CUDA).

    Returns:
        out: [N, H, d_v], dtype of ``bank``.
        u[t, h] = sum_j weights[t, h, j] * bank[indices[t, h, j]]  (EmbeddingBag "sum"
        with per-sample weights); out[t, h] = u[t, h] @ proj[h].

    Raises:
        IndexError: an index is negative or >= R (torch indexing would wrap negatives); inside
            ``torch.compile`` a RuntimeError with the same message (on CUDA: a device-side assert).
    """
    R = bank.shape[0]
    if check_indices and indices.numel() and indices.device.type != "meta":
        if torch.compiler.is_compiling():
            # Traced: a host-side min/max would be a data-dependent graph break, and without any
            # check the compiled gather fails with Inductor's "index out of bounds" naming a
            # temporary. torch._assert_async compiles into the kernel and keeps the message.
            bound = R if isinstance(R, int) else "R"  # a SymInt under dynamic shapes
            torch._assert_async(((indices >= 0) & (indices < R)).all(),
                                f"hive_gather: indices out of range: expected every index in [0, {bound}) "
                                f"(R = bank.shape[0])")
        elif not (indices.is_cuda and torch.cuda.is_current_stream_capturing()):
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= R:
                raise IndexError(f"hive_gather: indices out of range: found {lo if lo < 0 else hi}, "
                                 f"expected every index in [0, {R}) (R = bank.shape[0])")
    acc = accumulation_dtype(bank.dtype)
    # F.embedding, not bank[indices]: its backward is deterministic (index backward is not), and
    # gathering from the fp32 copy makes the bank gradient accumulate in fp32.
    rows = F.embedding(indices.long(), bank.to(acc))          # [N, H, k, d_z]
    u = (weights.to(acc)[..., None] * rows).sum(dim=2)        # [N, H, d_z]
    if proj is None:
        return u.to(bank.dtype)
    return torch.einsum("thz,hzv->thv", u, proj.to(acc)).to(bank.dtype)
