"""Tests of the two fused operators of ``midus_ops`` (spec/HML.md section 1; issue 2).

* ``pk_topk(q, subkeys, k) -> (scores, indices)``  (spec 1.1)
* ``hive_gather(weights, indices, bank, proj=None, *, deterministic=False) -> out``  (spec 1.2)

The device is a test parameter: ``DEVICES`` is ["cpu"] plus "cuda" when a GPU is visible. The
public ops run the compiled kernel when ``midus_ops.has_kernel(op, device)`` and the pure-PyTorch
reference otherwise, so every public-API test also passes on CUDA before the CUDA kernels exist
(and tests them once they do). Tests that call ``torch.ops.midus_ops.*`` directly skip, with the
reason, where the extension has no kernel for the device.

Every input is fresh random data (never all zeros) from a seed fixed per test case, so the tests
are reproducible yet can fail; nothing compares against a hard-coded output except the tiny
hand-made tie-rule cases, whose expected values are derived by hand in the comments.
"""
from __future__ import annotations

import math

import pytest
import torch

import midus_ops
from midus_ops.reference import hive_gather_ref, pk_topk_ref
from op_testing import (ATOL, BF16, DT_ID, F16, F32, F64, RTOL, assert_close,  # noqa: F401
                        check_pk_topk_against_reference, fallback_allowed, missing_extension_message,
                        rounding_tie_inputs, scores_at, seed)

# Without the extension these tests fail (conftest), unless MIDUS_TEST_ALLOW_FALLBACK=1: then the
# public-op tests run on the reference and those of the compiled ops skip.
pytestmark = pytest.mark.kernels

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HAS_EXT = midus_ops.EXTENSION_AVAILABLE
requires_ext = pytest.mark.skipif(not HAS_EXT and fallback_allowed(), reason=missing_extension_message())

ALL_DTYPES = [F32, F64, BF16, F16]


def need_kernel(op: str, device: str) -> None:
    if not midus_ops.has_kernel(op, torch.device(device)):
        pytest.skip(f"no compiled midus_ops::{op} kernel for {device} "
                    f"(extension available: {HAS_EXT}; {midus_ops.EXTENSION_ERROR or 'no kernel for this device yet'})")


def poison_allocator(device: str, *numels: int) -> None:
    """Allocate NaN-filled blocks of the outputs' sizes and free them right away, so the op's
    ``empty`` outputs are likely to reuse NaN memory (CUDA's caching allocator hands freed blocks
    straight back; glibc malloc reuses small freed chunks). An element a kernel forgets to write
    then shows up as NaN (or, for int64 indices, as an out-of-range value) instead of a lucky 0."""
    for numel in numels:
        t = torch.full((max(1, 2 * numel),), float("nan"), dtype=torch.float32, device=device)
        del t


def rand_pk(N, H, d_k, n, dtype, device, requires_grad=False):
    q = torch.randn(N, H, d_k, dtype=F64).to(dtype=dtype, device=device)
    subkeys = (torch.randn(H, 2, n, d_k // 2, dtype=F64) / math.sqrt(d_k)).to(dtype=dtype, device=device)
    return q.requires_grad_(requires_grad), subkeys.requires_grad_(requires_grad)


def rand_hive(N, H, k, R, d_z, d_v, dtype, idx_dtype, device, requires_grad=False):
    """Random weights (softmax-like positive and a few negative), indices, bank and proj (or
    None when d_v is None)."""
    weights = torch.randn(N, H, k, dtype=F64).to(dtype=dtype, device=device).requires_grad_(requires_grad)
    indices = torch.randint(0, R, (N, H, k), dtype=idx_dtype).to(device)
    bank = torch.randn(R, d_z, dtype=F64).to(dtype=dtype, device=device).requires_grad_(requires_grad)
    proj = None
    if d_v is not None:
        proj = (torch.randn(H, d_z, d_v, dtype=F64) / math.sqrt(d_z)).to(dtype=dtype, device=device)
        proj.requires_grad_(requires_grad)
    return weights, indices, bank, proj


# ============================================================================================
# The extension itself
# ============================================================================================
@requires_ext
def test_extension_registers_cpu_kernels():
    """With the extension loaded, all four ops have CPU kernels and the public ops use them
    (otherwise every 'kernel vs reference' test below would silently compare the reference to
    itself)."""
    for op in ("pk_topk", "pk_topk_backward", "hive_gather", "hive_gather_backward"):
        assert midus_ops.has_kernel(op, torch.device("cpu")), op
        assert hasattr(torch.ops.midus_ops, op), op
    assert not midus_ops.has_kernel("pk_topk", torch.device("meta"))


@requires_ext
def test_public_ops_dispatch_to_the_cpu_kernel(monkeypatch):
    """On CPU the public ops must call the C++ kernels, not the reference: make the reference
    raise where ``midus_ops.ops`` looks it up, and the public ops must still work."""
    import midus_ops.ops as ops_mod

    def boom(*a, **k):
        raise AssertionError("the reference ran although a CPU kernel is registered")

    monkeypatch.setattr(ops_mod, "pk_topk_ref", boom)
    monkeypatch.setattr(ops_mod, "hive_gather_ref", boom)
    seed("dispatch")
    q, sk = rand_pk(4, 2, 8, 6, F32, "cpu", requires_grad=True)
    scores, idx = midus_ops.pk_topk(q, sk, 3)
    scores.sum().backward()
    w, i, b, p = rand_hive(4, 2, 3, 10, 5, 4, F32, torch.int64, "cpu", requires_grad=True)
    midus_ops.hive_gather(w, i, b, p).sum().backward()


# ============================================================================================
# pk_topk: the tie rule (reference and kernels)
# ============================================================================================
def _tie_case(device, dtype):
    # d_k = 2 (one dim per half), q = [1, 1], so s1 = K1[:, 0] and s2 = K2[:, 0].
    # s1 = [2, 1, 0], s2 = [0, 1, 2]: stage 1 picks a = [0, 1, 2] and b = [2, 1, 0].
    # Candidate a*n + b and its score s1[a] + s2[b] (n = 3):
    #   id 2: 4;  id 1: 3;  id 5: 3;  id 0: 2;  id 4: 2;  id 8: 2; ...
    # Top 3: [4, 3, 3] with ids [2, 1, 5]: ids 1 and 5 tie at 3 and the lower (1) comes first.
    q = torch.tensor([[[1.0, 1.0]]], dtype=dtype, device=device)
    subkeys = torch.tensor([[[[2.0], [1.0], [0.0]], [[0.0], [1.0], [2.0]]]], dtype=dtype, device=device)
    return q, subkeys, [4.0, 3.0, 3.0], [2, 1, 5]


def _tie_case_stage1(device, dtype):
    # s1 = [1, 2, 2] (ids 1 and 2 tie): top-2 a = [1, 2]; s2 = [3, 3, 1]: top-2 b = [0, 1].
    # Candidates, all equal to 5: ids 1*3+0 = 3, 1*3+1 = 4, 2*3+0 = 6, 2*3+1 = 7 -> top-2 ids [3, 4].
    # Were stage 1 to keep id 2 before id 1 (or b = 1 before 0), the ids would differ.
    q = torch.tensor([[[1.0, 1.0]]], dtype=dtype, device=device)
    subkeys = torch.tensor([[[[1.0], [2.0], [2.0]], [[3.0], [3.0], [1.0]]]], dtype=dtype, device=device)
    return q, subkeys, [5.0, 5.0], [3, 4]


@pytest.mark.parametrize("case", [_tie_case, _tie_case_stage1], ids=["stage2", "stage1"])
def test_tie_rule_reference_hand_made(case):
    """The reference itself follows the spec's tie rule on hand-checked cases."""
    q, sk, want_scores, want_ids = case("cpu", F32)
    scores, idx = pk_topk_ref(q, sk, len(want_ids))
    assert scores.flatten().tolist() == want_scores
    assert idx.flatten().tolist() == want_ids
    assert idx.dtype == torch.int64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("case", [_tie_case, _tie_case_stage1], ids=["stage2", "stage1"])
def test_tie_rule_public_op_hand_made(case, dtype, device):
    q, sk, want_scores, want_ids = case(device, dtype)
    scores, idx = midus_ops.pk_topk(q, sk, len(want_ids))
    assert scores.dtype == dtype and idx.dtype == torch.int64
    assert scores.flatten().tolist() == want_scores
    assert idx.flatten().tolist() == want_ids


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("N,H,d_k,n,k", [(40, 3, 4, 7, 4), (25, 2, 8, 12, 12), (30, 1, 2, 9, 1), (20, 2, 6, 24, 9)])
def test_pk_topk_exact_ties_indices_equal_reference(N, H, d_k, n, k, dtype, device):
    """Deliberate exact ties: small integer q and sub-keys (exact in every dtype, and all their
    dot products and sums are exact in fp32), plus duplicated sub-key rows. Scores tie a lot at
    both stages, and the kernel's indices must equal the reference's exactly (lower index wins)."""
    seed("ties", N, H, d_k, n, k, dtype)
    q = torch.randint(-2, 3, (N, H, d_k)).to(dtype)
    subkeys = torch.randint(-1, 2, (H, 2, n, d_k // 2)).to(dtype)
    subkeys[:, :, n // 2] = subkeys[:, :, 0]          # duplicated rows: guaranteed stage-1 ties
    subkeys[:, 1, n - 1] = subkeys[:, 1, 1]
    q, subkeys = q.to(device), subkeys.to(device)
    scores, idx = midus_ops.pk_topk(q, subkeys, k)
    want_scores, want_idx = pk_topk_ref(q.cpu(), subkeys.cpu(), k)
    assert torch.equal(scores.cpu(), want_scores)
    assert torch.equal(idx.cpu(), want_idx), "tie rule broken: lower index must win at both stages"
    # The case really has ties: some (token, head) has two equal selected scores.
    assert (scores[..., 1:] == scores[..., :-1]).any() or k == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F32, F64], ids=DT_ID.get)
def test_pk_topk_tie_rule_when_candidate_sums_round_equal(dtype, device):
    """Ties created by rounding in the stage-2 sum must follow the rule too.

    n = 2, k = 2, d_k = 2, q = [1, 1]: s1 = [1, 1 + eps] (so stage 1 gives a = [1, 0]) and
    s2 = [B, B] with B so large that 1 + B and 1 + eps + B round to the same value B (B = 2^26 in
    fp32, 2^55 in fp64). All four candidates then score exactly B (the returned scores say so), and
    the rule 'lower index wins' picks ids 0 (a=0, b=0) and 1 (a=0, b=1). A selection that only
    looks at candidates (i, j) with (i+1)(j+1) <= k assumes strictly monotone sums and returns
    ids [0, 2] instead."""
    eps, big = (2.0 ** -23, 2.0 ** 26) if dtype == F32 else (2.0 ** -52, 2.0 ** 55)
    # 11 identical tokens: a lone row and rows in a (vectorised) group of 8 plus a tail.
    q = torch.ones(11, 1, 2, dtype=dtype, device=device)
    subkeys = torch.tensor([[[[1.0], [1.0 + eps]], [[big], [big]]]], dtype=dtype, device=device)
    ref_scores, ref_idx = pk_topk_ref(q[:1].cpu(), subkeys.cpu(), 2)
    assert ref_scores.flatten().tolist() == [big, big] and ref_idx.flatten().tolist() == [0, 1]
    for rows in (q[:1], q):
        scores, idx = midus_ops.pk_topk(rows, subkeys, 2)
        assert scores.reshape(-1, 2).tolist() == [[big, big]] * rows.shape[0]
        assert idx.reshape(-1, 2).tolist() == [[0, 1]] * rows.shape[0], \
            f"got ids {idx.reshape(-1, 2).tolist()} for 4 candidates tied at {big}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F32, F64], ids=DT_ID.get)
@pytest.mark.parametrize("n,k", [(20, 3), (20, 16), (48, 40), (300, 7)])
def test_pk_topk_rounding_ties_stress(n, k, dtype, device):
    """Many ties created by rounding (op_testing.rounding_tie_inputs), against the reference's
    indices exactly: such a pruned selection gets 1/3 to all of these rows wrong (checked by
    simulating it on the same data). The kernel and the reference do the same IEEE additions, so
    the indices must match exactly."""
    seed("round-ties", n, k, dtype)
    q, subkeys = rounding_tie_inputs(n, dtype)
    scores, idx = midus_ops.pk_topk(q.to(device), subkeys.to(device), k)
    want_scores, want_idx = pk_topk_ref(q, subkeys, k)
    assert torch.equal(scores.cpu(), want_scores)
    assert torch.equal(idx.cpu(), want_idx), "tie rule broken for ties created by rounding"


# ============================================================================================
# pk_topk: kernels against the reference
# ============================================================================================
PK_SHAPES = [
    # N, H, d_k, n, k
    (7, 3, 8, 8, 4),       # baseline
    (5, 2, 8, 8, 1),       # k = 1
    (5, 2, 8, 8, 8),       # k = n
    (9, 2, 16, 24, 5),     # n not a power of two
    (6, 1, 8, 10, 3),      # H = 1
    (1, 4, 8, 12, 4),      # N = 1
    (8, 2, 2, 9, 4),       # d_k = 2
    (4, 2, 64, 32, 16),    # the layer's default n, k
    (3, 2, 8, 48, 40),     # k > 32 (beyond the CPU's 8-row sorting-network path)
    (5, 2, 4, 300, 6),     # n > 256 (likewise)
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("N,H,d_k,n,k", PK_SHAPES)
def test_pk_topk_matches_reference(N, H, d_k, n, k, dtype, device):
    """Forward against the reference, and the backward against the exact gradient of
    s1[a] + s2[b] at the kernel's own indices (gradients flow only through the selected
    sub-key scores)."""
    seed("pk", N, H, d_k, n, k, dtype)
    q, sk = rand_pk(N, H, d_k, n, dtype, device, requires_grad=True)
    poison_allocator(device, N * H * k * 2)
    scores, idx = midus_ops.pk_topk(q, sk, k)
    check_pk_topk_against_reference(q, sk, k, scores, idx)

    g = torch.randn(N, H, k, dtype=F64).to(dtype=dtype, device=device)
    gq, gk = torch.autograd.grad(scores, (q, sk), g)
    q64 = q.detach().double().requires_grad_()
    k64 = sk.detach().double().requires_grad_()
    want_gq, want_gk = torch.autograd.grad(scores_at(q64, k64, idx), (q64, k64), g.double())
    assert gq.dtype == dtype and gk.dtype == dtype
    assert_close(gq, want_gq, dtype, "grad q")
    assert_close(gk, want_gk, dtype, "grad subkeys")


@pytest.mark.parametrize("device", DEVICES)
def test_pk_topk_many_token_chunks(device):
    """Enough (token, head, n) work that the CPU kernel splits the tokens into several GEMM
    chunks (about 32 MiB of scores each: 128 tokens at H=64, n=512), N not a multiple of it.
    Tokens are independent, so the (slow) reference checks only the tokens at both ends and
    around each chunk boundary; every token is checked for finite, in-range output."""
    seed("pk-chunks")
    N, H, d_k, n, k = 300, 64, 2, 512, 2
    q, sk = rand_pk(N, H, d_k, n, F32, device)
    scores, idx = midus_ops.pk_topk(q, sk, k)
    assert bool(torch.isfinite(scores).all()) and int(idx.min()) >= 0 and int(idx.max()) < n * n
    for lo, hi in [(0, 3), (124, 132), (252, 260), (296, 300)]:
        check_pk_topk_against_reference(q[lo:hi], sk, k, scores[lo:hi], idx[lo:hi])


@pytest.mark.parametrize("device", DEVICES)
def test_pk_topk_non_contiguous_inputs(device):
    """Transposed / sliced views must give the same result as contiguous copies."""
    seed("pk-noncontig")
    q = torch.randn(3, 10, 6, device=device).transpose(0, 1)          # [10, 3, 6] non-contiguous
    sk = torch.randn(3, 2, 7, 6, device=device)[..., ::2]              # [3, 2, 7, 3] strided
    s1, i1 = midus_ops.pk_topk(q, sk, 4)
    s2, i2 = midus_ops.pk_topk(q.contiguous(), sk.contiguous(), 4)
    assert torch.equal(s1, s2) and torch.equal(i1, i2)
    check_pk_topk_against_reference(q, sk, 4, s1, i1)


# ============================================================================================
# hive_gather: kernels against the reference
# ============================================================================================
HIVE_SHAPES = [
    # N, H, k, R, d_z, d_v (None: no proj)
    (7, 3, 4, 50, 16, 8),      # baseline
    (9, 2, 1, 30, 12, 5),      # k = 1
    (6, 2, 5, 40, 96, 24),     # d_z = 96: not a power of two, > one 64-wide column block
    (6, 2, 5, 40, 96, None),   # proj = None, d_v = d_z = 96
    (5, 1, 3, 20, 10, 6),      # H = 1
    (1, 4, 6, 25, 16, 16),     # N = 1
    (8, 3, 4, 1, 7, 3),        # R = 1: every index is 0
    (12, 2, 8, 1024, 32, None),  # many rows, few reads
]


def hive_expected(weights, indices, bank, proj, grad_out):
    """Exact (fp64) output and gradients of the reference on the same inputs upcast."""
    w = weights.detach().double().cpu().requires_grad_()
    b = bank.detach().double().cpu().requires_grad_()
    p = None if proj is None else proj.detach().double().cpu().requires_grad_()
    out = hive_gather_ref(w, indices.cpu(), b, p)
    grads = torch.autograd.grad(out, [w, b] + ([p] if p is not None else []), grad_out.double().cpu())
    return out, grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32], ids=DT_ID.get)
@pytest.mark.parametrize("N,H,k,R,d_z,d_v", HIVE_SHAPES)
def test_hive_gather_matches_reference(N, H, k, R, d_z, d_v, idx_dtype, dtype, device):
    """Output and the gradients of weights, bank and proj, given the same indices, against the
    exact reference. Every output element is compared, so an element the kernel never writes
    (uninitialised ``empty`` memory, poisoned with NaN first) fails."""
    seed("hive", N, H, k, R, d_z, d_v, idx_dtype, dtype)
    w, idx, bank, proj = rand_hive(N, H, k, R, d_z, d_v, dtype, idx_dtype, device, requires_grad=True)
    d_out = d_z if d_v is None else d_v
    poison_allocator(device, N * H * d_out, R * d_z, N * H * k)
    out = midus_ops.hive_gather(w, idx, bank, proj)
    assert out.shape == (N, H, d_out) and out.dtype == dtype and out.device == w.device
    assert bool(torch.isfinite(out).all()), "non-finite output for finite inputs (unwritten element?)"
    g = torch.randn(N, H, d_out, dtype=F64).to(dtype=dtype, device=device)
    inputs = [w, bank] + ([proj] if proj is not None else [])
    grads = torch.autograd.grad(out, inputs, g)

    want_out, want_grads = hive_expected(w, idx, bank, proj, g)
    assert_close(out, want_out, dtype, "out")
    for name, got, want in zip(["weights", "bank", "proj"], grads, want_grads):
        assert got.dtype == dtype and got.shape == want.shape
        assert bool(torch.isfinite(got).all()), f"grad {name} not finite"
        assert_close(got, want, dtype, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_hive_gather_many_token_chunks(device):
    """N = 520 at H = 16, d_z = 1024: the CPU kernel processes tokens in chunks of 256 (a 16 MiB
    fp32 buffer), so this crosses two chunk boundaries and ends on a partial chunk, forward and
    backward."""
    seed("hive-chunks")
    N, H, k, R, d_z, d_v = 520, 16, 1, 64, 1024, 4
    w, idx, bank, proj = rand_hive(N, H, k, R, d_z, d_v, F32, torch.int64, device, requires_grad=True)
    out = midus_ops.hive_gather(w, idx, bank, proj)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [w, bank, proj], g)
    want_out, want_grads = hive_expected(w, idx, bank, proj, g)
    assert_close(out, want_out, F32, "out")
    for name, got, want in zip(["weights", "bank", "proj"], grads, want_grads):
        assert_close(got, want, F32, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_hive_gather_non_contiguous_inputs(device):
    seed("hive-noncontig")
    N, H, k, R, d_z, d_v = 6, 3, 4, 20, 10, 5
    w = torch.randn(H, N, k, device=device).transpose(0, 1)
    idx = torch.randint(0, R, (N, H, 2 * k), device=device)[..., ::2]
    bank = torch.randn(d_z, R, device=device).t()
    proj = torch.randn(H, d_v, d_z, device=device).transpose(1, 2)
    out = midus_ops.hive_gather(w, idx, bank, proj)
    assert torch.allclose(out, midus_ops.hive_gather(w.contiguous(), idx.contiguous(), bank.contiguous(),
                                                     proj.contiguous()), rtol=1e-6, atol=1e-6)
    assert_close(out, hive_gather_ref(w.double(), idx, bank.double(), proj.double()), F32, "out")


# ============================================================================================
# hive_gather: heavy repetition and determinism
# ============================================================================================
HOT_ROWS = (5, 17, 40)


def hot_inputs(dtype, idx_dtype, device, requires_grad=True):
    """Every token and head reads only rows 5, 17 and 40 (the Zipf-like worst case for a
    scatter-add: all contributions collide on three rows)."""
    N, H, k, R, d_z, d_v = 384, 3, 4, 48, 80, 16
    w, _, bank, proj = rand_hive(N, H, k, R, d_z, d_v, dtype, idx_dtype, device, requires_grad=requires_grad)
    pick = torch.randint(0, len(HOT_ROWS), (N, H, k))
    idx = torch.tensor(HOT_ROWS, dtype=idx_dtype)[pick].to(device)
    return w, idx, bank, proj


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,idx_dtype", [(F64, torch.int64), (F32, torch.int64), (F32, torch.int32),
                                             (BF16, torch.int64)], ids=["fp64", "fp32", "fp32-i32", "bf16"])
def test_hive_gather_heavy_repetition_bank_grad(dtype, idx_dtype, device):
    """4608 contributions land on 3 rows: the bank gradient equals the reference's on those rows
    and is exactly zero elsewhere."""
    seed("hot", dtype, idx_dtype)
    w, idx, bank, proj = hot_inputs(dtype, idx_dtype, device)
    out = midus_ops.hive_gather(w, idx, bank, proj)
    g = torch.randn(out.shape, dtype=F64).to(dtype=dtype, device=device)
    gw, gb, gp = torch.autograd.grad(out, [w, bank, proj], g)
    want_out, (want_gw, want_gb, want_gp) = hive_expected(w, idx, bank, proj, g)
    cold = [r for r in range(bank.shape[0]) if r not in HOT_ROWS]
    assert torch.equal(gb[cold].cpu(), torch.zeros_like(gb[cold]).cpu()), "gradient on a row nobody read"
    assert bool((gb[list(HOT_ROWS)] != 0).any(dim=1).all()), "a hot row got no gradient"
    # Sums of ~1536 terms per hot row: the fp32 accumulation error grows with the term count, so
    # for these rows allow 4x the usual tolerance (still ~1e-4 relative for fp32, far below O(1)).
    tol_dtype = dtype
    torch.testing.assert_close(gb.double().cpu(), want_gb, rtol=4 * RTOL[tol_dtype],
                               atol=4 * ATOL[tol_dtype] * want_gb.abs().max().item())
    assert_close(out, want_out, dtype, "out")
    assert_close(gw, want_gw, dtype, "grad weights")
    torch.testing.assert_close(gp.double().cpu(), want_gp, rtol=4 * RTOL[tol_dtype],
                               atol=4 * ATOL[tol_dtype] * want_gp.abs().max().item())


def _two_backward_runs(device, deterministic):
    seed("determinism")
    w, idx, bank, proj = hot_inputs(F32, torch.int64, device)
    g = torch.randn(idx.shape[0], idx.shape[1], proj.shape[2], device=device)
    runs = []
    for _ in range(2):
        out = midus_ops.hive_gather(w, idx, bank, proj, deterministic=deterministic)
        runs.append((out.detach(),) + torch.autograd.grad(out, [w, bank, proj], g))
    return runs


@pytest.fixture
def restore_deterministic_algorithms():
    """Whatever a test does to the global flag, put it back (other tests run in this process)."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["flag", "global"])
def test_hive_gather_deterministic_bitwise(mode, device, restore_deterministic_algorithms):
    """``deterministic=True``, or ``torch.use_deterministic_algorithms(True)``, gives bitwise
    identical output and gradients run to run under heavy repetition."""
    if mode == "global":
        torch.use_deterministic_algorithms(True)
        r1, r2 = _two_backward_runs(device, deterministic=False)
    else:
        r1, r2 = _two_backward_runs(device, deterministic=True)
    for name, a, b in zip(["out", "grad weights", "grad bank", "grad proj"], r1, r2):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


_DETERMINISTIC_AT_IMPORT = torch.are_deterministic_algorithms_enabled()


def test_deterministic_flag_is_restored():
    """Guards the fixture above: the global flag is back to what it was when this file was
    imported, after the tests that set it (this runs after them in file order)."""
    assert torch.are_deterministic_algorithms_enabled() == _DETERMINISTIC_AT_IMPORT


# ============================================================================================
# Partial requires_grad and gradcheck (fp64)
# ============================================================================================
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["both", "q", "subkeys"])
def test_gradcheck_pk_topk(which, device):
    """Finite differences of the scores in fp64. The random inputs have no near-ties (gaps far
    above gradcheck's eps = 1e-6), so the selection is locally constant and the scores smooth."""
    seed("gc-pk", which)
    q, sk = rand_pk(4, 2, 6, 5, F64, device)
    q.requires_grad_(which in ("both", "q"))
    sk.requires_grad_(which in ("both", "subkeys"))
    assert torch.autograd.gradcheck(lambda a, b: midus_ops.pk_topk(a, b, 3)[0], (q, sk))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["q", "subkeys"])
def test_pk_topk_partial_requires_grad(which, device):
    """Only one input trainable: the other's .grad stays None, the trainable one's is right."""
    seed("partial-pk", which)
    q, sk = rand_pk(6, 2, 8, 7, F32, device)
    trainable = q if which == "q" else sk
    trainable.requires_grad_()
    scores, idx = midus_ops.pk_topk(q, sk, 3)
    g = torch.randn_like(scores)
    scores.backward(g)
    frozen = sk if which == "q" else q
    assert frozen.grad is None
    q64, k64 = q.detach().double().requires_grad_(), sk.detach().double().requires_grad_()
    want = torch.autograd.grad(scores_at(q64, k64, idx), q64 if which == "q" else k64, g.double())[0]
    assert_close(trainable.grad, want, F32, f"grad {which}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32], ids=DT_ID.get)
@pytest.mark.parametrize("with_proj", [True, False], ids=["proj", "noproj"])
def test_gradcheck_hive_gather(with_proj, idx_dtype, device):
    seed("gc-hive", with_proj, idx_dtype)
    w, idx, bank, proj = rand_hive(3, 2, 3, 7, 5, 4 if with_proj else None, F64, idx_dtype, device,
                                   requires_grad=True)
    idx[0, 0] = torch.tensor([2, 2, 2])  # a repeated row inside one bag as well
    if with_proj:
        assert torch.autograd.gradcheck(lambda a, b, c: midus_ops.hive_gather(a, idx, b, c), (w, bank, proj))
    else:
        assert torch.autograd.gradcheck(lambda a, b: midus_ops.hive_gather(a, idx, b), (w, bank))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("trainable", ["weights", "bank", "proj", "weights+proj"])
def test_gradcheck_hive_gather_some_inputs(trainable, device):
    """Only some inputs require grad; the others are constants of the function checked."""
    seed("gc-hive-some", trainable)
    w, idx, bank, proj = rand_hive(3, 2, 3, 7, 5, 4, F64, torch.int64, device)
    names = trainable.split("+")
    tensors = dict(weights=w, bank=bank, proj=proj)
    for name in names:
        tensors[name].requires_grad_()

    def f(*args):
        t = dict(tensors, **dict(zip(names, args)))
        return midus_ops.hive_gather(t["weights"], idx, t["bank"], t["proj"])

    assert torch.autograd.gradcheck(f, tuple(tensors[n] for n in names))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_proj", [True, False], ids=["proj", "noproj"])
def test_hive_gather_frozen_bank_trainable_weights(with_proj, device):
    """Frozen bank (and proj), trainable weights: bank.grad stays None, weights.grad is right."""
    seed("frozen", with_proj)
    w, idx, bank, proj = rand_hive(10, 2, 4, 30, 12, 6 if with_proj else None, F32, torch.int64, device)
    w.requires_grad_()
    out = midus_ops.hive_gather(w, idx, bank, proj)
    assert out.requires_grad
    g = torch.randn_like(out)
    out.backward(g)
    assert bank.grad is None and (proj is None or proj.grad is None)
    _, (want_gw, _, *_) = hive_expected(w, idx, bank, proj, g)
    assert_close(w.grad, want_gw, F32, "grad weights")


# ============================================================================================
# opcheck: schema, fake kernels, autograd registration, AOT dispatch
# ============================================================================================
@pytest.mark.opcheck
@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=DT_ID.get)
@pytest.mark.parametrize("N,H,d_k,n,k", [(5, 2, 8, 6, 3), (1, 1, 2, 4, 4), (4, 3, 16, 24, 1)])
def test_opcheck_pk_topk(N, H, d_k, n, k, dtype, requires_grad, device):
    need_kernel("pk_topk", device)
    seed("opcheck-pk", N, H, d_k, n, k, dtype, requires_grad)
    q, sk = rand_pk(N, H, d_k, n, dtype, device, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.midus_ops.pk_topk.default, (q, sk, k))


@pytest.mark.opcheck
@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32], ids=DT_ID.get)
@pytest.mark.parametrize("with_proj", [True, False], ids=["proj", "noproj"])
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=DT_ID.get)
def test_opcheck_hive_gather(dtype, with_proj, idx_dtype, device):
    need_kernel("hive_gather", device)
    seed("opcheck-hive", dtype, with_proj, idx_dtype)
    w, idx, bank, proj = rand_hive(5, 2, 3, 20, 12, 5 if with_proj else None, dtype, idx_dtype, device,
                                   requires_grad=True)
    torch.library.opcheck(torch.ops.midus_ops.hive_gather.default, (w, idx, bank, proj, False))
    torch.library.opcheck(torch.ops.midus_ops.hive_gather.default, (w, idx, bank, proj, True))


@pytest.mark.opcheck
@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["weights", "bank", "proj", "none"])
def test_opcheck_hive_gather_partial_grad(which, device):
    """Only one input (or none) requires grad: the autograd registration must still be right."""
    need_kernel("hive_gather", device)
    seed("opcheck-hive-partial", which)
    w, idx, bank, proj = rand_hive(4, 3, 2, 9, 6, 4, F32, torch.int64, device)
    if which != "none":
        dict(weights=w, bank=bank, proj=proj)[which].requires_grad_()
    torch.library.opcheck(torch.ops.midus_ops.hive_gather.default, (w, idx, bank, proj, False))


# ============================================================================================
# Bad input: every error names the argument
# ============================================================================================
def _pk(device, N=4, H=2, d_k=8, n=6, H_k=None, half=None):
    q = torch.randn(N, H, d_k, device=device)
    sk = torch.randn(H if H_k is None else H_k, 2, n, d_k // 2 if half is None else half, device=device)
    return q, sk


# name: (build(device) -> (q, subkeys, k), the public wrapper's exception type, regex its message must
# match). The compiled op called directly checks the same and raises RuntimeError (TORCH_CHECK).
PK_BAD = {
    "k_gt_n": (lambda d: (*_pk(d, n=6), 7), ValueError, r"\bk\b.*n = 6|n = 6.*\bk\b"),
    "k_lt_1": (lambda d: (*_pk(d), 0), ValueError, r"\bk\b"),
    "k_negative": (lambda d: (*_pk(d), -2), ValueError, r"\bk\b"),
    "odd_d_k": (lambda d: (*_pk(d, d_k=7, half=3), 2), ValueError, r"d_k.*even|even.*d_k"),
    "d_k_mismatch": (lambda d: (*_pk(d, d_k=8, half=3), 2), ValueError, r"subkeys"),
    "H_mismatch": (lambda d: (*_pk(d, H=2, H_k=3), 2), ValueError, r"subkeys.*\bq\b|heads"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(PK_BAD))
def test_pk_topk_bad_input_public(case, device, impl):
    """The public wrapper's checks, with the exception type it promises (not the C++ op's
    RuntimeError, nor a shape error from deep inside the reference)."""
    build, exc, pattern = PK_BAD[case]
    q, sk, k = build(device)
    with pytest.raises(exc, match=pattern) as info:
        midus_ops.pk_topk(q, sk, k)
    assert info.type is exc


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(PK_BAD))
def test_pk_topk_bad_input_direct_op(case, device):
    """The C++ op checks its inputs too (callers may bypass the Python wrapper)."""
    need_kernel("pk_topk", device)
    build, exc, pattern = PK_BAD[case]
    q, sk, k = build(device)
    with pytest.raises((exc, RuntimeError), match=pattern):
        torch.ops.midus_ops.pk_topk(q, sk, k)


def test_pk_topk_type_errors():
    q, sk = _pk("cpu")
    with pytest.raises(TypeError, match=r"\bk\b"):
        midus_ops.pk_topk(q, sk, 2.0)
    with pytest.raises(TypeError, match=r"subkeys|dtype"):
        midus_ops.pk_topk(q, sk.double(), 2)
    with pytest.raises(TypeError, match=r"\bq\b"):
        midus_ops.pk_topk(q.long(), sk, 2)


@pytest.mark.parametrize("other", ["meta"] + (["cuda"] if torch.cuda.is_available() else []))
def test_pk_topk_mixed_devices(other):
    q, sk = _pk("cpu")
    with pytest.raises((ValueError, RuntimeError), match=r"subkeys.*\bq\b|\bq\b.*subkeys"):
        midus_ops.pk_topk(q, sk.to(other), 2)
    with pytest.raises((ValueError, RuntimeError), match=r"subkeys.*\bq\b|\bq\b.*subkeys"):
        midus_ops.pk_topk(q.to(other), sk, 2)


def _hive(device, N=4, H=2, k=3, R=10, d_z=6, d_v=5, idx=None, idx_dtype=torch.int64, proj_heads=None,
          idx_shape=None):
    w = torch.randn(N, H, k, device=device)
    if idx is None:
        idx = torch.randint(0, R, idx_shape or (N, H, k), dtype=idx_dtype, device=device)
    bank = torch.randn(R, d_z, device=device)
    proj = None if d_v is None else torch.randn(proj_heads or H, d_z, d_v, device=device)
    return w, idx, bank, proj


def _with_index(device, value, R=10, position=(2, 1, 0), idx_dtype=torch.int64):
    w, idx, bank, proj = _hive(device, R=R, idx_dtype=idx_dtype)
    idx[position] = value
    return w, idx, bank, proj


HIVE_BAD = {  # as PK_BAD
    "index_negative": (lambda d: _with_index(d, -1), IndexError, r"indices"),
    "index_eq_R": (lambda d: _with_index(d, 10), IndexError, r"indices"),
    "index_huge_i32": (lambda d: _with_index(d, 2 ** 31 - 1, idx_dtype=torch.int32), IndexError, r"indices"),
    "index_negative_first": (lambda d: _with_index(d, -7, position=(0, 0, 0)), IndexError, r"indices"),
    "float_indices": (lambda d: _hive(d, idx=torch.zeros(4, 2, 3, device=d)), TypeError, r"indices"),
    "shape_mismatch": (lambda d: _hive(d, idx_shape=(4, 2, 2)), ValueError, r"indices.*weights|weights.*indices"),
    "proj_heads": (lambda d: _hive(d, proj_heads=3), ValueError, r"proj.*head|head.*proj"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(HIVE_BAD))
def test_hive_gather_bad_input_public(case, device, impl):
    build, exc, pattern = HIVE_BAD[case]
    w, idx, bank, proj = build(device)
    with pytest.raises(exc, match=pattern) as info:
        midus_ops.hive_gather(w, idx, bank, proj)
    assert info.type is exc


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(HIVE_BAD))
def test_hive_gather_bad_input_direct_op(case, device):
    need_kernel("hive_gather", device)
    build, exc, pattern = HIVE_BAD[case]
    w, idx, bank, proj = build(device)
    with pytest.raises((exc, RuntimeError), match=pattern):
        torch.ops.midus_ops.hive_gather(w, idx, bank, proj, False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [-1, 10, 1000], ids=["negative", "eq_R", "far"])
@pytest.mark.parametrize("need", ["all", "weights", "bank", "proj"])
def test_hive_gather_backward_bad_indices(bad, need, device):
    """The backward path never reads or writes out of bounds either: any gradient requested
    with a bad index raises an error naming ``indices``."""
    need_kernel("hive_gather_backward", device)
    w, idx, bank, proj = _with_index(device, bad)
    g = torch.randn(4, 2, 5, device=device)
    flags = (need in ("all", "weights"), need in ("all", "bank"), need in ("all", "proj"))
    with pytest.raises((IndexError, RuntimeError), match=r"indices"):
        torch.ops.midus_ops.hive_gather_backward(g, w, idx, bank, proj, False, *flags)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [-1, 36, 10 ** 6], ids=["negative", "eq_n2", "far"])
def test_pk_topk_backward_bad_indices(bad, device):
    need_kernel("pk_topk_backward", device)
    q, sk = _pk(device, n=6)
    idx = torch.randint(0, 36, (4, 2, 3), device=device)
    idx[1, 1, 2] = bad
    g = torch.randn(4, 2, 3, device=device)
    with pytest.raises((IndexError, RuntimeError), match=r"indices"):
        torch.ops.midus_ops.pk_topk_backward(g, q, sk, idx, True, True)


@pytest.mark.parametrize("other", ["meta"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("moved", ["bank", "weights", "indices", "proj"])
def test_hive_gather_mixed_devices(moved, other):
    w, idx, bank, proj = _hive("cpu")
    t = dict(weights=w, indices=idx, bank=bank, proj=proj)
    t[moved] = t[moved].to(other)
    with pytest.raises((ValueError, RuntimeError), match=moved):
        midus_ops.hive_gather(t["weights"], t["indices"], t["bank"], t["proj"])


def test_hive_gather_type_errors():
    w, idx, bank, proj = _hive("cpu")
    with pytest.raises(TypeError, match=r"weights|bank"):
        midus_ops.hive_gather(w.double(), idx, bank, proj)
    with pytest.raises(TypeError, match=r"proj"):
        midus_ops.hive_gather(w, idx, bank, proj.double())
    with pytest.raises(TypeError, match=r"weights|bank"):
        midus_ops.hive_gather(w.long(), idx, bank.long(), None)
    with pytest.raises(TypeError, match=r"bank"):
        midus_ops.hive_gather(w, idx, bank.long(), None)


# ============================================================================================
# N = 0
# ============================================================================================
@pytest.mark.parametrize("device", DEVICES)
def test_pk_topk_empty(device):
    q, sk = rand_pk(0, 3, 8, 6, F32, device, requires_grad=True)
    scores, idx = midus_ops.pk_topk(q, sk, 4)
    assert scores.shape == (0, 3, 4) and idx.shape == (0, 3, 4)
    assert scores.dtype == F32 and idx.dtype == torch.int64
    scores.sum().backward()
    assert q.grad.shape == q.shape
    assert sk.grad.shape == sk.shape and torch.equal(sk.grad, torch.zeros_like(sk))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_proj", [True, False], ids=["proj", "noproj"])
def test_hive_gather_empty(with_proj, device):
    w, idx, bank, proj = rand_hive(0, 3, 4, 10, 6, 5 if with_proj else None, F32, torch.int64, device,
                                   requires_grad=True)
    out = midus_ops.hive_gather(w, idx, bank, proj)
    assert out.shape == (0, 3, 5 if with_proj else 6) and out.dtype == F32
    out.sum().backward()
    assert w.grad.shape == w.shape
    assert torch.equal(bank.grad, torch.zeros_like(bank))
    if with_proj:
        assert torch.equal(proj.grad, torch.zeros_like(proj))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_direct_backward_ops(device):
    """The backward ops called directly with N = 0 return gradients of the right shapes."""
    need_kernel("hive_gather_backward", device)
    w, idx, bank, proj = rand_hive(0, 3, 4, 10, 6, 5, F32, torch.int64, device)
    gw, gb, gp = torch.ops.midus_ops.hive_gather_backward(torch.empty(0, 3, 5, device=device), w, idx, bank, proj,
                                                          False, True, True, True)
    assert gw.shape == (0, 3, 4) and torch.equal(gb, torch.zeros_like(bank)) and torch.equal(gp, torch.zeros_like(proj))
    q, sk = rand_pk(0, 3, 8, 6, F32, device)
    gq, gk = torch.ops.midus_ops.pk_topk_backward(torch.empty(0, 3, 4, device=device), q, sk,
                                                  torch.empty(0, 3, 4, dtype=torch.int64, device=device), True, True)
    assert gq.shape == q.shape and torch.equal(gk, torch.zeros_like(sk))


# ============================================================================================
# No host synchronisation where the docstrings promise none (issue 12 item 5)
# ============================================================================================
class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ATen ops that read a tensor's value on the host: on CUDA each is a stream
    synchronisation, and an error under CUDA-graph capture. Device independent, so the promise is
    checked on CPU too: int()/.item() (_local_scalar_dense), bool() (is_nonzero), boolean
    indexing (nonzero), masked_select, unique."""
    OPS = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "_unique2", "unique_dim", "equal"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.OPS:
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_hive_gather_check_indices_false_reads_nothing_on_the_host(impl):
    w, idx, bank, proj = rand_hive(6, 2, 3, 10, 5, 4, F32, torch.int64, "cpu", requires_grad=True)
    with HostReads() as reads:
        out = midus_ops.hive_gather(w, idx, bank, proj, check_indices=False)
        out.square().sum().backward()
    assert reads.seen == [], reads.seen
    if impl == "reference":  # the control: the default check does read the indices
        with HostReads() as reads:
            midus_ops.hive_gather(w, idx, bank, proj)
        assert "_local_scalar_dense" in reads.seen
        bad = idx.clone()
        bad[0, 0, 0] = 10
        with pytest.raises(IndexError):  # F.embedding's own check on CPU
            midus_ops.hive_gather(w, bad, bank, proj, check_indices=False)


@pytest.mark.parametrize("cls", ["hml", "pkm"])
def test_layers_read_nothing_on_the_host(cls, impl):
    """A layer's forward (eval, usage statistics on, with a token mask) and its training
    forward+backward never read a value on the host, on the reference path as with the kernels:
    what CUDA-graph capture of the layer needs."""
    from midus_ops import HeadwiseMemoryLayer, ProductKeyMemory

    seed("host-reads", cls)
    if cls == "hml":
        layer, x = HeadwiseMemoryLayer(num_heads=2, head_dim=8, n=5, k=3, d_z=6, tau=0.5), torch.randn(3, 4, 2, 8)
    else:
        layer, x = ProductKeyMemory(d_model=12, num_heads=2, n=5, k=3, d_k=8, tau=0.5), torch.randn(3, 4, 12)
    mask = torch.rand(3, 4) > 0.3
    with HostReads() as reads:
        with torch.no_grad():
            layer.eval()(x, token_mask=mask)
        layer.train()(x.requires_grad_()).square().sum().backward()
    assert reads.seen == [], reads.seen
    assert layer.memory_stats()["tokens"].item() == int(mask.sum())
