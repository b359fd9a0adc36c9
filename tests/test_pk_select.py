"""The CPU selection of pk_topk: its two paths (AVX2 sorting networks, scalar) and the pruning of
stage-2 candidates, which must stay exact when rounding makes a pruned pair's sum tie the k-th.

MIDUS_OPS_CPU_SIMD=0 forces the scalar path; it is read per call, so a subprocess sets it.
"""
import os
import subprocess
import sys

import pytest
import torch

import midus_ops
from midus_ops.reference import pk_topk_ref
from op_testing import fallback_allowed, missing_extension_message

# the CPU kernel's own selection: fails without the extension (conftest), skips under MIDUS_TEST_ALLOW_FALLBACK
pytestmark = [pytest.mark.kernels, pytest.mark.skipif(not midus_ops.EXTENSION_AVAILABLE and fallback_allowed(),
                                                      reason=missing_extension_message())]


def rounding_tie_cases(count=3, seed=0):
    """Sub-key scores x, y (n=4, k=3) where the full 3x3 candidate selection differs from the
    selection over pairs with (i+1)(j+1) <= k: fp32 rounding makes a pruned pair's sum equal the
    k-th and the lower id wins. Found by search so the test does not depend on hand arithmetic."""
    g = torch.Generator().manual_seed(seed)
    n, k, cases = 4, 3, []
    for _ in range(50000):
        big = float(2 ** int(torch.randint(20, 26, (1,), generator=g)))
        x = torch.randint(0, 8, (n,), generator=g).float() * 0.25 + 1.0
        y = big + torch.randint(0, 6, (n,), generator=g).float() * 2.0 ** int(torch.randint(-1, 3, (1,), generator=g))
        if len(set(x.tolist())) < n or len(set(y.tolist())) < n:
            continue
        a = torch.sort(x, descending=True).indices[:k].tolist()
        b = torch.sort(y, descending=True).indices[:k].tolist()
        total = {(i, j): (x[a[i]] + y[b[j]]).item() for i in range(k) for j in range(k)}
        rank = lambda p: (-total[p], a[p[0]] * n + b[p[1]])  # noqa: E731
        full = sorted(total, key=rank)[:k]
        pruned = sorted([p for p in total if (p[0] + 1) * (p[1] + 1) <= k], key=rank)[:k]
        if full != pruned:
            cases.append((x, y))
            if len(cases) == count:
                break
    return cases


def test_pruned_pairs_that_tie_by_rounding_are_selected():
    cases = rounding_tie_cases()
    assert cases, "the search found no rounding tie: the test would prove nothing"
    for x, y in cases:
        # d_k = 2 and q = [1, 1]: the sub-key scores are exactly x and y. 16 tokens fill two
        # AVX2 passes; the reference scores the full k x k candidate set.
        q = torch.ones(16, 1, 2)
        subkeys = torch.stack([x, y])[None, :, :, None]  # [1, 2, 4, 1]
        s, i = midus_ops.pk_topk(q, subkeys, 3)
        s_ref, i_ref = pk_topk_ref(q, subkeys, 3)
        assert torch.equal(i, i_ref)
        assert torch.equal(s, s_ref)


SCRIPT = r"""
import sys, torch, midus_ops
from tests_rounding import rounding_tie_cases
torch.manual_seed(0)
out = []
shapes = [(512, 3, 16, 32, 16, torch.float32), (256, 2, 8, 24, 7, torch.bfloat16), (64, 1, 4, 8, 8, torch.float16),
          (72, 2, 16, 256, 32, torch.float32), (40, 2, 6, 40, 1, torch.float32), (20, 2, 4, 300, 33, torch.float32)]
for N, H, dk, n, k, dt in shapes:
    q = torch.randn(N, H, dk).to(dt); sk = torch.randn(H, 2, n, dk // 2).to(dt)
    qi = torch.randint(-2, 3, (N, H, dk)).to(dt); ski = torch.randint(-2, 3, (H, 2, n, dk // 2)).to(dt)
    for a, b in [(q, sk), (qi, ski)]:
        s, i = midus_ops.pk_topk(a, b, k)
        out += [s.float(), i]
for x, y in rounding_tie_cases():
    s, i = midus_ops.pk_topk(torch.ones(16, 1, 2), torch.stack([x, y])[None, :, :, None], 3)
    out += [s, i]
torch.save(out, sys.argv[1])
"""


def test_simd_and_scalar_paths_agree_bitwise(tmp_path):
    # Shapes cover n <= 256 and k <= 32 (AVX2 path), n = 300 / k = 33 (scalar either way),
    # k = 1, k = n, n not a power of two, token counts not a multiple of 8, and exact ties.
    (tmp_path / "tests_rounding.py").write_text(
        "import torch\n" + __import__("inspect").getsource(rounding_tie_cases))
    results = []
    for simd in ("1", "0"):
        path = tmp_path / f"out_{simd}.pt"
        pythonpath = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "MIDUS_OPS_CPU_SIMD": simd, "PYTHONPATH": pythonpath}
        subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, check=True, cwd=tmp_path)
        results.append(torch.load(path))
    assert len(results[0]) == len(results[1]) > 0
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n,k", [(32, 16), (24, 7), (256, 32), (8, 8), (40, 1)])
def test_integer_scores_match_reference_exactly(n, k):
    # Small integers: every score is exact in fp32 whatever the summation order, and ties are
    # everywhere, so indices must equal the reference's (lower id wins at both stages).
    g = torch.Generator().manual_seed(n * 100 + k)
    q = torch.randint(-2, 3, (203, 2, 8), generator=g).float()
    subkeys = torch.randint(-2, 3, (2, 2, n, 4), generator=g).float()
    s, i = midus_ops.pk_topk(q, subkeys, k)
    s_ref, i_ref = pk_topk_ref(q, subkeys, k)
    assert torch.equal(i, i_ref)
    assert torch.equal(s, s_ref)


def test_nan_scores_do_not_crash_and_rank_first():
    # torch.sort (descending) puts NaN first; the kernels follow, with the lower id among NaNs.
    q = torch.randn(9, 1, 4)
    subkeys = torch.randn(1, 2, 6, 2)
    subkeys[0, 0, 3] = float("nan")
    s, i = midus_ops.pk_topk(q, subkeys, 4)
    s_ref, i_ref = pk_topk_ref(q, subkeys, 4)
    assert torch.isnan(s[:, :, 0]).all()
    assert torch.equal(i // 6, i_ref // 6)  # the NaN sub-key (a = 3) leads, as in the reference
