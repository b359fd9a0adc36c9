"""What the operator tests share: dtypes, tolerances, seeding, comparison, tie-heavy inputs."""
from __future__ import annotations

import os
import zlib

import pytest
import torch

import midus_ops
from midus_ops.reference import pk_topk_ref

# Without the compiled extension the public ops run the reference, so a test of "kernel against
# reference" compares the reference with itself and passes for nothing. Such tests (marked
# ``kernels``; tests/conftest.py) fail then, unless this variable says the fallback is what is
# being tested (CI's fallback job): then they run on the reference, and those that need the
# kernels themselves skip (:func:`require_extension`).
ALLOW_FALLBACK_ENV = "MIDUS_TEST_ALLOW_FALLBACK"


def fallback_allowed() -> bool:
    return os.environ.get(ALLOW_FALLBACK_ENV, "") not in ("", "0")


def missing_extension_message() -> str:
    return (f"the compiled extension midus_ops._C is not available ({midus_ops.EXTENSION_ERROR}): this test "
            f"checks the compiled kernels, and without them it would compare the reference with itself. Build "
            f"it (`pip install --no-build-isolation .`, or `python setup.py build_ext --inplace` in a checkout), "
            f"or set {ALLOW_FALLBACK_ENV}=1 if the pure-PyTorch fallback is what you mean to test.")


def require_extension() -> None:
    """For a test that needs the compiled kernels themselves: fails without them, or skips when
    the fallback is what is being tested (``MIDUS_TEST_ALLOW_FALLBACK=1``)."""
    if midus_ops.EXTENSION_AVAILABLE:
        return
    if fallback_allowed():
        pytest.skip(missing_extension_message())
    pytest.fail(missing_extension_message(), pytrace=False)

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
I32, I64 = torch.int32, torch.int64
DT_ID = {F64: "fp64", F32: "fp32", BF16: "bf16", F16: "fp16", I32: "i32", I64: "i64"}

# Tolerances. The kernels and the reference both accumulate in fp32 (fp64 for fp64 inputs) and
# round once to the output dtype, so an output differs from the exact (fp64) value by at most half
# an ulp of its dtype plus the fp32 accumulation error, and two such results (kernel vs reference,
# summing in different orders) can straddle one rounding boundary: 1 ulp apart.
# * rtol = 2 ulps of the output dtype: bf16 has 8 significant bits (ulp <= 2^-7 relative), fp16 11
#   (ulp <= 2^-10); fp32 results are sums of <= ~100 terms, whose reordering error is a few
#   hundred 2^-24 at most, so 2e-5; fp64 likewise 1e-12.
# * atol = ATOL x (largest |expected| element): covers outputs that are small because of
#   cancellation, where the fp32 accumulation error (relative to the terms, not to the result)
#   dominates; 1e-5 bounds ~100-term fp32 sums for every dtype accumulated in fp32.
# A wrong row, a wrong weight, a missed term or an unwritten element is off by O(1) relative to
# the scale, far outside these bounds.
RTOL = {F64: 1e-12, F32: 2e-5, BF16: 2.0 ** -6, F16: 2.0 ** -9}
ATOL = {F64: 1e-12, F32: 1e-5, BF16: 1e-5, F16: 1e-5}


def seed(*parts) -> int:
    """Seed torch from the test's parameters: fresh data per case, identical run to run (zlib's
    crc32 is stable across processes, unlike ``hash``)."""
    s = zlib.crc32(repr(parts).encode())
    torch.manual_seed(s)
    return s


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str = "",
                 factor: float = 1.0) -> None:
    """``got`` (any float dtype, any device) against ``want`` (usually exact fp64) with ``factor``
    times the tolerances of ``dtype``; a non-finite ``got`` where ``want`` is finite (an unwritten,
    poisoned element) fails with its own message."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got_d, want_d = got.detach().double().cpu(), want.detach().double().cpu()
    assert bool(torch.isfinite(got_d)[torch.isfinite(want_d)].all()), f"{what}: non-finite values (unwritten element?)"
    scale = want_d.abs().max().item() if want_d.numel() else 1.0
    torch.testing.assert_close(got_d, want_d, rtol=factor * RTOL[dtype], atol=factor * ATOL[dtype] * max(scale, 1e-30),
                               msg=lambda m: f"{what}: {m}")


def rounding_tie_inputs(n: int, dtype: torch.dtype, N: int = 21, H: int = 3):
    """(q [N, H, 2], subkeys [H, 2, n, 1]) whose stage-2 candidate sums collide by rounding.

    d_k = 2, so s1 = K1 * q1 and s2 = K2 * q2 are single products, exact in fp32/fp64. K1 = 1 +
    m * 2^-20 (fp32; 2^-49 in fp64; m in 0..max(15, n/2 - 1)) times q1 in {1, 2, 4}: small and
    mostly distinct; K2 = 2^24 + 2r (fp32; 2^53 + 2r in fp64; r in 0..max(7, n/8 - 1)) with
    q2 = 1: huge, where one ulp is 2. Candidate sums round onto multiples of 2 and collide, so
    ids decide all the time, including for pairs that a selection pruned by monotonicity
    ((i+1)(j+1) <= k) would skip. Call :func:`seed` first."""
    big, small = (2.0 ** 24, 2.0 ** -20) if dtype == F32 else (2.0 ** 53, 2.0 ** -49)
    q = torch.stack([torch.tensor([1.0, 2.0, 4.0], dtype=dtype)[torch.randint(0, 3, (N, H))],
                     torch.ones(N, H, dtype=dtype)], dim=-1)
    k1 = 1 + torch.randint(0, max(16, n // 2), (H, n, 1)).to(dtype) * small
    k2 = big + 2 * torch.randint(0, max(8, n // 8), (H, n, 1)).to(dtype)
    return q, torch.stack([k1, k2], dim=1)


def sub_scores_f64(q: torch.Tensor, subkeys: torch.Tensor):
    """Exact sub-key scores s1, s2 [N, H, n] in fp64 from the given (possibly low-precision)
    inputs, differentiable: the values the selected scores must equal."""
    half = q.shape[-1] // 2
    q64, k64 = q.double(), subkeys.double()
    s1 = torch.einsum("thd,hid->thi", q64[..., :half], k64[:, 0])
    s2 = torch.einsum("thd,hid->thi", q64[..., half:], k64[:, 1])
    return s1, s2


def scores_at(q: torch.Tensor, subkeys: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """score[t, h, m] = s1[a] + s2[b] with (a, b) = divmod(indices, n), in fp64, differentiable
    in q and subkeys: the reference for the scores of *given* indices and for their gradient."""
    n = subkeys.shape[2]
    s1, s2 = sub_scores_f64(q, subkeys)
    idx = indices.long()
    return torch.gather(s1, -1, idx // n) + torch.gather(s2, -1, idx % n)


def check_pk_topk_against_reference(q, subkeys, k, scores, idx):
    """Robust to near-ties: (1) scores equal the reference's (the k best values do not depend on
    which of two tied entries was chosen); (2) each returned index really has the returned
    score, recomputed exactly from the sub-key scores; (3) indices are distinct, in [0, n*n),
    int64, and scores are descending. Together: a valid top-k with the right scores."""
    N, H, d_k = q.shape
    n = subkeys.shape[2]
    dtype = q.dtype
    assert scores.shape == (N, H, k) and idx.shape == (N, H, k)
    assert scores.dtype == dtype and idx.dtype == torch.int64
    assert scores.device == q.device and idx.device == q.device
    assert bool(torch.isfinite(scores).all()), "non-finite score for finite inputs (unwritten output?)"
    assert int(idx.min()) >= 0 and int(idx.max()) < n * n, "index out of [0, n*n) (unwritten output?)"
    if k > 1:
        assert bool((scores[..., 1:] <= scores[..., :-1]).all()), "scores not descending"
        srt = idx.sort(dim=-1).values
        assert bool((srt[..., 1:] != srt[..., :-1]).all()), "an index selected twice"
    q_cpu, sk_cpu = q.detach().cpu(), subkeys.detach().cpu()
    want_scores, _ = pk_topk_ref(q_cpu, sk_cpu, k)
    assert_close(scores, want_scores, dtype, "scores vs reference")
    assert_close(scores, scores_at(q_cpu, sk_cpu, idx.cpu()), dtype, "score of the returned index")
