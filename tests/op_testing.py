"""What the operator tests share: dtypes, tolerances, seeding, comparison, tie-heavy inputs."""
from __future__ import annotations

import zlib

import torch

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
