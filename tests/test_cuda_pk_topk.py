"""CUDA tests of pk_topk (csrc/cuda/pk_topk*.cu and .cpp) and of the layers on CUDA (issue 5).

tests/test_ops.py and tests/test_layers.py already run their public-API matrices on "cuda" when a
GPU is visible; this file adds what only the CUDA kernels have: the shapes that select each code
path (one or two registers per lane for k <= 32 / k <= 64, sub-keys resident in shared memory or
staged in chunks, fewer warps per block for large n, many blocks per head), CPU and CUDA selecting
the same slots on tied scores (bf16 included), determinism, outputs that are really written
(allocator poisoned), the kernel limits (n = 1024 and k = 64 work; k > 64 and n > 4096 raise in
the direct op and fall back to the reference in the public one), both layers on CUDA against
CPU, CUDA-graph capture and replay of the layer forward, the decode launch count, and
torch.compile(fullgraph=True) of the layer on CUDA.

Tests parametrised over ``DEV`` also run on "cpu" (milliseconds): they check the test's own data
(e.g. that a gradcheck case has no near-ties) where no GPU is available. Everything on "cuda" is
skipped without a GPU or without the compiled CUDA kernels.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import midus_ops
from op_testing import (BF16, DT_ID, F16, F32, F64, assert_close, check_pk_topk_against_reference,
                        rounding_tie_inputs, scores_at, seed)
from midus_ops import HeadwiseMemoryLayer, ProductKeyMemory
from midus_ops.reference import pk_topk_ref

CUDA_OK = torch.cuda.is_available() and midus_ops.has_kernel("pk_topk", torch.device("cuda")) \
    and midus_ops.has_kernel("pk_topk_backward", torch.device("cuda"))
needs_cuda = pytest.mark.skipif(
    not CUDA_OK, reason=f"needs a GPU and the compiled CUDA kernels (extension: {midus_ops.EXTENSION_ERROR or 'ok'})")
CPU_KERNEL = midus_ops.has_kernel("pk_topk", torch.device("cpu"))
DEV = ["cpu", pytest.param("cuda", marks=needs_cuda)]
pytestmark = pytest.mark.kernels  # fails without the extension (conftest), unless MIDUS_TEST_ALLOW_FALLBACK=1


def rand_pk(N, H, d_k, n, dtype, device, requires_grad=False):
    q = torch.randn(N, H, d_k, dtype=F64).to(dtype=dtype, device=device)
    sk = (torch.randn(H, 2, n, d_k // 2, dtype=F64) / math.sqrt(d_k)).to(dtype=dtype, device=device)
    return q.requires_grad_(requires_grad), sk.requires_grad_(requires_grad)


def int_pk(N, H, d_k, n, dtype, device, lo=-2, hi=3):
    """Small integers (exact in every dtype; every dot product and sum exact in fp32) with
    duplicated sub-key rows: scores tie a lot at both stages, identically on every device."""
    q = torch.randint(lo, hi, (N, H, d_k)).to(dtype)
    sk = torch.randint(-1, 2, (H, 2, n, d_k // 2)).to(dtype)
    sk[:, :, n // 2] = sk[:, :, 0]
    sk[:, 1, n - 1] = sk[:, 1, 1]
    return q.to(device), sk.to(device)


def clear_rows(q, sk, k, rel=1e-4):
    """[N, H] bool: rows whose k + 1 best pair sums (exact, fp64) are pairwise apart by more than
    rel x their scale, so no rounding of the sub-key scores can change the selected slots or
    their order. Full n*n sums: small shapes only."""
    half, n = q.shape[-1] // 2, sk.shape[2]
    q64, k64 = q.detach().double().cpu(), sk.detach().double().cpu()
    s1 = torch.einsum("thd,hid->thi", q64[..., :half], k64[:, 0])
    s2 = torch.einsum("thd,hid->thi", q64[..., half:], k64[:, 1])
    allp = (s1[..., :, None] + s2[..., None, :]).flatten(-2)
    top = allp.topk(min(k + 1, n * n), dim=-1).values
    gaps = (top[..., :-1] - top[..., 1:]).min(-1).values
    scale = allp.abs().amax(-1).clamp_min(1e-30)
    return gaps > rel * scale


def poison_allocator(*nbytes: int) -> None:
    """Makes the caching allocator hand out 0xFF-filled memory (NaN as float, -1 as int64) for
    the next allocations of these byte sizes, in this order: fill blocks of those sizes, free them,
    then check, by allocating the same sizes again, that the allocator does return the filled
    blocks (it hands the best-fitting cached block back, so the op's own allocations get them)."""
    sizes = [max(512, (int(b) + 511) // 512 * 512) for b in nbytes]
    for attempt in range(2):
        blocks = [torch.full((s,), 255, dtype=torch.uint8, device="cuda") for s in sizes]
        del blocks
        probe = [torch.empty(s, dtype=torch.uint8, device="cuda") for s in sizes]
        ok = all(bool((p == 255).all()) for p in probe)
        del probe
        if ok:
            return
        torch.cuda.empty_cache()  # stale cached blocks of these sizes: start from fresh segments
    raise AssertionError("could not poison the CUDA caching allocator for sizes " + str(sizes))


def elem(dtype):
    return torch.tensor([], dtype=dtype).element_size()


# --------------------------------------------------------------------------------------------
# Forward and backward against the reference, shape by shape
# --------------------------------------------------------------------------------------------
SHAPES = {
    # name: (N, H, d_k, n, k)
    "hml": (300, 4, 64, 32, 16),            # the layer's default n, k; several blocks per head
    "k1": (37, 2, 8, 8, 1),
    "k_eq_n": (20, 2, 8, 12, 12),
    "k32": (25, 2, 16, 40, 32),             # one register per lane, full
    "k33": (25, 2, 16, 40, 33),             # two registers per lane
    "k64": (9, 2, 8, 64, 64),               # k = n = 64
    "n1024_k64": (9, 2, 16, 1024, 64),      # the limits asked for; 72 KiB of fp32 sub-keys: staged in chunks
    "n1024_chunked": (21, 3, 128, 1024, 16),  # 1024 x 65 x 2 x 4 B = 520 KiB of sub-keys: chunks
    "chunked_rounds": (9000, 1, 128, 1024, 16),  # chunks restaged over 2 rounds of W tokens per block
    "n4096_d2": (11, 1, 2, 4096, 8),        # score rows of 32 KiB per warp: fewer warps per block
    "odd_half": (30, 3, 6, 24, 9),          # half = 3
    "d_k2": (40, 2, 2, 9, 4),
    "decode": (1, 32, 64, 32, 16),
}


@needs_cuda
@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64], ids=DT_ID.get)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_cuda_pk_topk_matches_reference(shape, dtype):
    """Forward values against the reference (and indices against the CPU kernel and the
    reference on rows without near-ties), backward against the exact gradient of s1[a] + s2[b]
    at the kernel's own indices; outputs allocated from poisoned memory."""
    N, H, d_k, n, k = SHAPES[shape]
    seed("cuda-pk", shape, dtype)
    q, sk = rand_pk(N, H, d_k, n, dtype, "cuda", requires_grad=True)
    poison_allocator(N * H * k * elem(dtype), N * H * k * 8)
    scores, idx = midus_ops.pk_topk(q, sk, k)
    check_pk_topk_against_reference(q, sk, k, scores, idx)
    if n <= 64:
        clear = clear_rows(q, sk, k).cuda()
        assert clear.float().mean() > 0.5, "test data: too few rows without near-ties"
        _, want_idx = pk_topk_ref(q.detach().cpu(), sk.detach().cpu(), k)
        assert torch.equal(idx[clear].cpu(), want_idx[clear.cpu()]), "indices differ from the reference"
        if CPU_KERNEL:
            _, cpu_idx = torch.ops.midus_ops.pk_topk(q.detach().cpu(), sk.detach().cpu(), k)
            assert torch.equal(idx[clear].cpu(), cpu_idx[clear.cpu()]), "indices differ from the CPU kernel"

    g = torch.randn(N, H, k, dtype=F64).to(dtype=dtype, device="cuda")
    gq, gk = torch.autograd.grad(scores, (q, sk), g)
    q64 = q.detach().cpu().double().requires_grad_()
    k64 = sk.detach().cpu().double().requires_grad_()
    want_gq, want_gk = torch.autograd.grad(scores_at(q64, k64, idx.cpu()), (q64, k64), g.cpu().double())
    assert gq.dtype == dtype and gk.dtype == dtype
    assert_close(gq, want_gq, dtype, "grad q")
    assert_close(gk, want_gk, dtype, "grad subkeys")


@needs_cuda
@pytest.mark.parametrize("dtype", [F32, BF16], ids=DT_ID.get)
def test_cuda_backward_direct_op_poisoned(dtype):
    """The backward op's outputs (grad_q, grad_subkeys and the dS buffer) come from poisoned
    memory; both flags; a gradient in another dtype than q (read as fp32)."""
    N, H, d_k, n, k = 200, 3, 16, 24, 7
    seed("bwd-poison", dtype)
    q, sk = rand_pk(N, H, d_k, n, dtype, "cuda")
    _, idx = midus_ops.pk_topk(q, sk, k)
    q64, k64 = q.cpu().double().requires_grad_(), sk.cpu().double().requires_grad_()
    for g in (torch.randn(N, H, k, device="cuda").to(dtype), torch.randn(N, H, k, device="cuda")):
        want_gq, want_gk = torch.autograd.grad(scores_at(q64, k64, idx.cpu()), (q64, k64), g.cpu().double())
        for need_q, need_k in ((True, True), (True, False), (False, True)):
            poison_allocator(N * H * d_k * elem(dtype), H * n * d_k * elem(dtype), N * 2 * H * n * 4)
            gq, gk = torch.ops.midus_ops.pk_topk_backward(g, q, sk, idx, need_q, need_k)
            if need_q:
                assert_close(gq, want_gq, dtype, "grad q")
            else:
                assert gq.shape == (0,)
            if need_k:
                assert_close(gk, want_gk, dtype, "grad subkeys")
            else:
                assert gk.shape == (0,)


def sparse_grads(q, sk, idx, g):
    """Exact (fp64, CPU) gradients of sum_m g_m (s1[a_m] + s2[b_m]) written with gathers and an
    index_put: no [N, H, n] score tensors, for large shapes."""
    q, sk, idx, g = q.detach().cpu().double(), sk.detach().cpu().double(), idx.cpu(), g.cpu().double()
    N, H, d_k = q.shape
    half, n = d_k // 2, sk.shape[2]
    heads = torch.arange(H).view(1, H, 1).expand_as(idx)
    gq, gk = [], torch.zeros_like(sk)
    for p, ids in enumerate((idx // n, idx % n)):
        rows = sk[:, p][heads, ids]                                     # [N, H, k, half]
        gq.append((g[..., None] * rows).sum(2))
        contrib = g[..., None] * q[:, :, None, p * half:(p + 1) * half]  # [N, H, k, half]
        gk[:, p].index_put_((heads.reshape(-1), ids.reshape(-1)), contrib.reshape(-1, half), accumulate=True)
    return torch.cat(gq, -1), gk


@needs_cuda
def test_cuda_many_token_chunks_backward():
    """Enough tokens that the backward splits dS into several 128 MiB chunks (2H n x 4 B = 64 KiB
    per token at H = 16, n = 512: 2048 tokens a chunk, so 3 chunks); the chunks' GEMMs
    accumulate into one subkeys gradient."""
    seed("bwd-chunks")
    N, H, d_k, n, k = 4500, 16, 4, 512, 2
    q, sk = rand_pk(N, H, d_k, n, F32, "cuda", requires_grad=True)
    scores, idx = midus_ops.pk_topk(q, sk, k)
    g = torch.randn_like(scores)
    gq, gk = torch.autograd.grad(scores, (q, sk), g)
    want_gq, want_gk = sparse_grads(q, sk, idx, g)
    assert_close(gq, want_gq, F32, "grad q")
    assert_close(gk, want_gk, F32, "grad subkeys", factor=4.0)  # sums over many tokens


# --------------------------------------------------------------------------------------------
# Ties: CPU and CUDA select the same slots
# --------------------------------------------------------------------------------------------
TIE_SHAPES = [(40, 3, 4, 7, 4), (64, 4, 64, 32, 16), (30, 2, 8, 48, 40), (16, 2, 8, 64, 64), (6, 2, 4, 1024, 64),
              (20, 2, 6, 24, 9), (30, 1, 2, 9, 1)]


@pytest.mark.parametrize("device", DEV)
@pytest.mark.parametrize("dtype", [BF16, F16, F32, F64], ids=DT_ID.get)
@pytest.mark.parametrize("N,H,d_k,n,k", TIE_SHAPES)
def test_exact_ties_same_slots_as_cpu_and_reference(N, H, d_k, n, k, dtype, device):
    """Small-integer inputs with duplicated sub-keys: scores tie massively at both stages (at
    n = 1024, k = 64 most candidate sums tie, including pruned pairs with the k-th kept sum, which
    the kernel must redo over all k*k pairs). Every dot product is exact in fp32 whatever the
    summation order, so the CUDA kernel, the CPU kernel and the reference must return identical
    scores and identical indices (lower index wins)."""
    seed("ties", N, H, d_k, n, k, dtype)
    q, sk = int_pk(N, H, d_k, n, dtype, device)
    scores, idx = midus_ops.pk_topk(q, sk, k)
    want_scores, want_idx = pk_topk_ref(q.cpu(), sk.cpu(), k)
    assert torch.equal(scores.cpu(), want_scores)
    assert torch.equal(idx.cpu(), want_idx), "tie rule broken: lower index must win at both stages"
    if CPU_KERNEL and device == "cuda":
        cpu_scores, cpu_idx = torch.ops.midus_ops.pk_topk(q.cpu(), sk.cpu(), k)
        assert torch.equal(scores.cpu(), cpu_scores) and torch.equal(idx.cpu(), cpu_idx), "CPU and CUDA differ"
    assert (scores[..., 1:] == scores[..., :-1]).any() or k == 1, "test data: no ties"


@pytest.mark.parametrize("device", DEV)
@pytest.mark.parametrize("dtype", [F32, F64], ids=DT_ID.get)
@pytest.mark.parametrize("n,k", [(20, 16), (48, 40), (64, 64), (300, 7), (1024, 33)])
def test_rounding_ties_same_slots(n, k, dtype, device):
    """Ties created by rounding in the stage-2 sums (tests/test_ops.py explains the data: huge
    second-half scores where one ulp is 2, so sums collide), including pairs a pruned selection
    skips: the indices must equal the reference's (and the CPU kernel's) exactly."""
    seed("round-ties", n, k, dtype)
    q, sk = rounding_tie_inputs(n, dtype)
    scores, idx = midus_ops.pk_topk(q.to(device), sk.to(device), k)
    want_scores, want_idx = pk_topk_ref(q, sk, k)
    assert torch.equal(scores.cpu(), want_scores)
    assert torch.equal(idx.cpu(), want_idx), "tie rule broken for ties created by rounding"


@pytest.mark.parametrize("device", DEV)
def test_non_finite_scores_rows(device):
    """Rows with an inf or NaN among the stage-1 scores are selected over all k*k pairs (the
    pruning assumes finite sums), NaN first as torch.sort descending: same as the reference."""
    seed("nonfinite")
    q, sk = rand_pk(12, 2, 4, 10, F32, "cpu")
    q[0, 0, 0] = float("inf")
    q[1, 1, 2] = float("nan")
    sk[0, 1, 3, 0] = float("-inf")
    sk[1, 0, 5, 1] = float("inf")
    scores, idx = midus_ops.pk_topk(q.to(device), sk.to(device), 4)
    want_scores, want_idx = pk_topk_ref(q, sk, 4)
    # (finite scores may differ in the last bit: the reference's einsum and the CUDA FMAs round
    # the dot products differently; infinities and NaNs must match exactly)
    torch.testing.assert_close(scores.cpu(), want_scores, equal_nan=True, rtol=1e-6, atol=0)
    assert torch.equal(idx.cpu(), want_idx)


# --------------------------------------------------------------------------------------------
# gradcheck, opcheck, determinism
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEV)
@pytest.mark.parametrize("N,H,d_k,n,k", [(4, 2, 6, 5, 3), (2, 2, 4, 36, 33), (2, 1, 4, 100, 5)],
                         ids=["small", "k33", "n100"])
@pytest.mark.parametrize("which", ["both", "q", "subkeys"])
def test_gradcheck(which, N, H, d_k, n, k, device):
    """fp64 finite differences; the seeds give data without near-ties (checked: gaps far above
    gradcheck's eps), so the selection is locally constant."""
    seed("gc", N, H, d_k, n, k)
    q, sk = rand_pk(N, H, d_k, n, F64, device)
    assert bool(clear_rows(q, sk, k, rel=1e-4).all()), "test data: a near-tie"
    q.requires_grad_(which in ("both", "q"))
    sk.requires_grad_(which in ("both", "subkeys"))
    assert torch.autograd.gradcheck(lambda a, b: midus_ops.pk_topk(a, b, k)[0], (q, sk))


@needs_cuda
@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64], ids=DT_ID.get)
@pytest.mark.parametrize("N,H,d_k,n,k", [(5, 2, 8, 6, 3), (1, 1, 2, 4, 4), (9, 3, 16, 40, 34)])
def test_opcheck_cuda(N, H, d_k, n, k, dtype, requires_grad):
    seed("opcheck", N, H, d_k, n, k, dtype, requires_grad)
    q, sk = rand_pk(N, H, d_k, n, dtype, "cuda", requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.midus_ops.pk_topk.default, (q, sk, k))
    _, idx = torch.ops.midus_ops.pk_topk(q.detach(), sk.detach(), k)
    g = torch.randn(N, H, k, device="cuda").to(dtype)
    for check in (True, False):
        torch.library.opcheck(torch.ops.midus_ops.pk_topk_backward.default,
                              (g, q.detach(), sk.detach(), idx, True, True, check))


@pytest.mark.parametrize("device", DEV)
def test_opcheck_hive_gather_check_indices_flag(device):
    """The schema's check_indices argument (False: the layers' in-range indices) through the
    fake kernel, autograd and AOT dispatch; results identical to the checked call."""
    if not midus_ops.has_kernel("hive_gather", torch.device(device)):
        pytest.skip("no compiled hive_gather kernel for " + device)
    seed("opcheck-flag")
    w = torch.randn(5, 2, 3, device=device, requires_grad=True)
    idx = torch.randint(0, 20, (5, 2, 3), device=device)
    bank = torch.randn(20, 12, device=device, requires_grad=True)
    proj = torch.randn(2, 12, 5, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.midus_ops.hive_gather.default, (w, idx, bank, proj, False, False))
    a = midus_ops.hive_gather(w, idx, bank, proj, check_indices=False)
    b = midus_ops.hive_gather(w, idx, bank, proj)
    assert torch.equal(a, b)
    ga = torch.autograd.grad(a.sum(), (w, bank, proj))
    gb = torch.autograd.grad(b.sum(), (w, bank, proj))
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


@needs_cuda
@pytest.mark.parametrize("mode", ["default", "deterministic_algorithms"])
@pytest.mark.parametrize("dtype", [BF16, F32], ids=DT_ID.get)
def test_cuda_bitwise_deterministic(dtype, mode):
    """Three forward+backward runs at an HML-like shape (many tokens per sub-key, so the
    subkeys gradient sums thousands of contributions per row) give identical bits."""
    seed("determinism", dtype)
    N, H, d_k, n, k = 4096, 8, 64, 32, 16
    q, sk = rand_pk(N, H, d_k, n, dtype, "cuda", requires_grad=True)
    g = torch.randn(N, H, k, device="cuda").to(dtype)
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        if mode == "deterministic_algorithms":
            torch.use_deterministic_algorithms(True, warn_only=True)
        runs = []
        for _ in range(3):
            scores, idx = midus_ops.pk_topk(q, sk, k)
            runs.append((scores, idx) + torch.autograd.grad(scores, (q, sk), g))
    finally:
        torch.use_deterministic_algorithms(prev)
    for other in runs[1:]:
        for name, a, b in zip(["scores", "indices", "grad q", "grad subkeys"], runs[0], other):
            assert torch.equal(a, b), f"{name} differs between identical runs"


# --------------------------------------------------------------------------------------------
# Bad input, limits, N = 0
# --------------------------------------------------------------------------------------------
@needs_cuda
def test_cuda_limits_direct_op_and_public_fallback():
    """k = 65 and n = 4097 are beyond the CUDA kernel: the direct op raises naming k / n and the
    limit; the public op runs the reference (right values)."""
    seed("limits")
    q, sk = rand_pk(3, 1, 4, 70, F32, "cuda")
    with pytest.raises(RuntimeError, match=r"k = 65.*64"):
        torch.ops.midus_ops.pk_topk(q, sk, 65)
    scores, idx = midus_ops.pk_topk(q, sk, 65)
    check_pk_topk_against_reference(q, sk, 65, scores, idx)
    q, sk = rand_pk(3, 1, 2, 4097, F32, "cuda")
    with pytest.raises(RuntimeError, match=r"n = 4097.*4096"):
        torch.ops.midus_ops.pk_topk(q, sk, 4)
    scores, idx = midus_ops.pk_topk(q, sk, 4)
    check_pk_topk_against_reference(q, sk, 4, scores, idx)


@needs_cuda
def test_cuda_bad_inputs_direct_op():
    q, sk = rand_pk(4, 2, 8, 6, F32, "cuda")
    with pytest.raises(RuntimeError, match="device"):
        torch.ops.midus_ops.pk_topk(q, sk.cpu(), 3)
    with pytest.raises(RuntimeError, match=r"\bk\b"):
        torch.ops.midus_ops.pk_topk(q, sk, 7)
    with pytest.raises(RuntimeError, match="subkeys"):
        torch.ops.midus_ops.pk_topk(q, sk[..., :3], 3)
    _, idx = torch.ops.midus_ops.pk_topk(q, sk, 3)
    g = torch.randn(4, 2, 3, device="cuda")
    with pytest.raises(RuntimeError, match="device"):
        torch.ops.midus_ops.pk_topk_backward(g.cpu(), q, sk, idx, True, True)
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.midus_ops.pk_topk_backward(g, q, sk, idx.int(), True, True)
    with pytest.raises(RuntimeError, match="grad_scores"):
        torch.ops.midus_ops.pk_topk_backward(g[:, :, :2], q, sk, idx, True, True)


@needs_cuda
@pytest.mark.parametrize("bad", [-1, 36, 10 ** 6])
def test_cuda_backward_bad_indices_host_check(bad):
    """Default: a host-side check raises an error naming `indices` before any kernel runs, and
    the CUDA context stays usable."""
    q, sk = rand_pk(4, 2, 8, 6, F32, "cuda")
    idx = torch.randint(0, 36, (4, 2, 3), device="cuda")
    idx[1, 1, 2] = bad
    g = torch.randn(4, 2, 3, device="cuda")
    with pytest.raises((IndexError, RuntimeError), match="indices"):
        torch.ops.midus_ops.pk_topk_backward(g, q, sk, idx, True, True)
    torch.cuda.synchronize()
    idx[1, 1, 2] = 0
    torch.ops.midus_ops.pk_topk_backward(g, q, sk, idx, True, True)
    torch.cuda.synchronize()


@needs_cuda
def test_cuda_empty():
    q, sk = rand_pk(0, 3, 8, 6, BF16, "cuda", requires_grad=True)
    scores, idx = midus_ops.pk_topk(q, sk, 4)
    assert scores.shape == (0, 3, 4) and idx.shape == (0, 3, 4) and idx.dtype == torch.int64
    scores.float().sum().backward()
    assert q.grad.shape == q.shape and torch.equal(sk.grad, torch.zeros_like(sk))
    gq, gk = torch.ops.midus_ops.pk_topk_backward(torch.empty(0, 3, 4, device="cuda"), q.detach(), sk.detach(),
                                                  idx, True, True)
    assert gq.shape == q.shape and torch.equal(gk, torch.zeros_like(sk))


@needs_cuda
def test_cuda_non_contiguous_inputs():
    seed("noncontig")
    q = torch.randn(3, 40, 16, device="cuda").transpose(0, 1)
    sk = torch.randn(3, 2, 20, 16, device="cuda")[..., ::2]
    a = midus_ops.pk_topk(q, sk, 5)
    b = midus_ops.pk_topk(q.contiguous(), sk.contiguous(), 5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------------------------
# The layers on CUDA
# --------------------------------------------------------------------------------------------
def quantize_(layer):
    """Sub-keys (and the PKM query) on a coarse grid: every score is exact in fp32 whatever the
    summation order, so the CPU and CUDA kernels select the same slots (ties: lower index)."""
    with torch.no_grad():
        layer.subkeys.copy_(torch.randint(-4, 5, layer.subkeys.shape) / 8.0)
        if isinstance(layer, HeadwiseMemoryLayer):
            layer.bank.normal_()
        else:
            layer.query.weight.copy_(torch.randint(-4, 5, layer.query.weight.shape) / 8.0)
    return layer


LAYER_CASES = [("hml", F32), ("hml", BF16), ("hml", F64), ("pkm", F32), ("pkm", BF16), ("pkm", F64),
               ("hml_rms", F64)]


@needs_cuda
@pytest.mark.parametrize("kind,dtype", LAYER_CASES, ids=[f"{k}-{DT_ID[d]}" for k, d in LAYER_CASES])
def test_cuda_layers_match_cpu(kind, dtype):
    """Forward and backward of each layer on CUDA against the same layer on CPU (the CPU kernels):
    outputs, the input gradient and every parameter gradient within a few ulps of the dtype.
    Inputs and sub-keys on a coarse grid (``quantize_``), so both
    devices select the same slots despite the massive ties; the RMS-normalised queries are off
    the grid, so that case runs in fp64 on random data (no near-ties at fp64 precision)."""
    seed("layers", kind, dtype)
    if kind == "pkm":
        layer = quantize_(ProductKeyMemory(16, num_heads=3, n=12, k=5, d_k=8))
        x = torch.randint(-4, 5, (2, 33, 16)) / 4.0
    elif kind == "hml":
        layer = quantize_(HeadwiseMemoryLayer(4, 16, n=16, k=8, d_z=32))
        x = torch.randint(-4, 5, (2, 33, 4, 16)) / 4.0
    else:
        layer = HeadwiseMemoryLayer(4, 16, n=16, k=8, d_z=32, query_norm="rms")
        with torch.no_grad():
            layer.bank.normal_()
            layer.query_norm.weight.uniform_(0.5, 1.5)
        x = torch.randn(2, 33, 4, 16, dtype=F64)
    layer = layer.to(dtype)
    layer_cuda = copy.deepcopy(layer).cuda()
    outs, grads = [], []
    for lay, dev in ((layer, "cpu"), (layer_cuda, "cuda")):
        xi = x.to(dtype=dtype, device=dev).requires_grad_()
        out = lay(xi)
        g = (1 + torch.arange(out.numel(), dtype=F64).view(out.shape) / out.numel()).to(dtype=dtype, device=dev)
        grads.append(torch.autograd.grad(out, [xi] + list(lay.parameters()), g))
        outs.append(out)
    assert outs[1].is_cuda and outs[1].dtype == dtype
    # Both devices round intermediates (weights, grad_scores, ...) to the dtype, one ulp apart at
    # times, so the tolerance is a few ulps of the dtype relative to the largest element.
    tol = {F64: (1e-9, 1e-10), F32: (1e-4, 1e-5), BF16: (2.0 ** -5, 2.0 ** -7)}[dtype]
    names = ["output", "grad input"] + [f"grad {name}" for name, _ in layer.named_parameters()]
    for name, a, b in zip(names, [outs[1]] + list(grads[1]), [outs[0]] + list(grads[0])):
        assert bool(torch.isfinite(a).all()), name
        b = b.detach().double()
        torch.testing.assert_close(a.detach().double().cpu(), b, rtol=tol[0], atol=tol[1] * b.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


def _hml_cuda(dtype, N, seed_):
    seed("graph", dtype, N, seed_)
    layer = HeadwiseMemoryLayer(8, 64, n=32, k=16, d_z=64).to(dtype).cuda().eval()
    layer.track_stats = False
    with torch.no_grad():
        layer.bank.normal_()
    return layer


@needs_cuda
@pytest.mark.parametrize("dtype", [F32, BF16], ids=DT_ID.get)
@pytest.mark.parametrize("N", [1, 64, 700])
def test_cuda_graph_capture_and_replay_hml(N, dtype):
    """The HML forward (pk_topk -> softmax -> hive_gather, no host synchronisation) captures in a
    CUDA graph; replays give the eager output, also after new data is copied into the static
    input."""
    layer = _hml_cuda(dtype, N, 0)
    x = torch.randn(N, 8, 64, device="cuda").to(dtype)
    with torch.no_grad():
        eager = layer(x)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                layer(x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
        x2 = torch.randn(N, 8, 64, device="cuda").to(dtype)
        x.copy_(x2)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, layer(x2))
        assert not torch.equal(out, eager)


@needs_cuda
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=DT_ID.get)
def test_cuda_16bit_inference_weights_identical(dtype):
    """Without gradients, bf16/fp16 CUDA layers take the softmax weights straight in their dtype
    from torch's softmax (fp32 inside, one rounding): the layer output must be bitwise the one of
    the fp32-softmax path that runs with gradients (and with usage statistics on)."""
    layer = _hml_cuda(dtype, 300, 3)
    x = torch.randn(300, 8, 64, device="cuda").to(dtype)
    with torch.no_grad():
        fast = layer(x)
    slow = layer(x.clone().requires_grad_())
    layer.track_stats = True
    with torch.no_grad():
        recorded = layer(x)
    assert torch.equal(fast, slow.detach()) and torch.equal(fast, recorded)
    s = torch.randn(1000, 16, device="cuda").to(dtype)
    assert torch.equal(torch.softmax(s, -1), torch.softmax(s.float(), -1).to(dtype))


@needs_cuda
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=DT_ID.get)
def test_cuda_decode_launch_count(dtype):
    """Decode (N = 1 and 64), query_norm "none", inference: the HML forward launches three
    kernels (pk_topk, softmax, hive_gather) and copies nothing to the host."""
    from torch.profiler import ProfilerActivity, profile

    for N in (1, 64):
        layer = _hml_cuda(dtype, N, 1)
        x = torch.randn(N, 8, 64, device="cuda").to(dtype)
        with torch.no_grad():
            layer(x)  # warm-up (one-time attribute queries)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                layer(x)
                torch.cuda.synchronize()
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        if not events:
            pytest.skip("the profiler recorded no CUDA activity (CUPTI unavailable)")
        names = [e.name for e in events]
        assert not any("memcpy" in n.lower() for n in names), f"a copy in the decode forward: {names}"
        kernels = [n for n in names if "memset" not in n.lower()]
        assert len(kernels) <= 3, f"{len(kernels)} kernels at N = {N}: {kernels}"


@needs_cuda
def test_cuda_compile_fullgraph_hml():
    """torch.compile(fullgraph=True) of the layer on CUDA traces both ops; forward and backward
    match eager."""
    layer = _hml_cuda(F32, 96, 2).train()
    x = torch.randn(96, 8, 64, device="cuda", requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    a = compiled(x)
    ga = torch.autograd.grad(a.square().sum(), [x] + list(layer.parameters()))
    b = layer(x)
    gb = torch.autograd.grad(b.square().sum(), [x] + list(layer.parameters()))
    assert_close(a, b.double(), F32, "compiled output", factor=4.0)
    for u, v in zip(ga, gb):
        assert_close(u, v.double(), F32, "compiled grad", factor=4.0)
