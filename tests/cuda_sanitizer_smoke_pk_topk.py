"""Small runs of every pk_topk CUDA kernel path, for `compute-sanitizer --tool memcheck`.

Not a pytest file (pytest collects test_*.py only): benchmarks/gpu_check.sh runs it as

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 99 \\
        python3 tests/cuda_sanitizer_smoke_pk_topk.py

(without the caching allocator every tensor is its own cudaMalloc, so an access past a tensor's
end is caught). Each case checks its scores and gradients against the reference too, so the
script fails on its own (exit 1) when a kernel is wrong. Shapes are tiny: the sanitizer slows
kernels a lot. Paths: one / two registers per lane (k <= 32 / k > 32), sub-keys resident in
shared memory or staged in chunks, rows redone over all k*k pairs (ties, non-finite scores),
fp32 / bf16 / fp16 / fp64, gradients with and without the subkeys GEMM.
"""
from __future__ import annotations

import math
import sys

import torch

import midus_ops
from midus_ops.reference import pk_topk_ref

CASES = [
    # name, dtype, (N, H, d_k, n, k), integer data (ties)
    ("hml shape bf16", torch.bfloat16, (37, 3, 64, 32, 16), False),
    ("k > 32 fp32", torch.float32, (9, 2, 8, 40, 36), False),
    ("chunked sub-keys fp16", torch.float16, (5, 2, 128, 300, 8), False),
    ("fp64 odd half", torch.float64, (7, 2, 6, 11, 5), False),
    ("ties: full k*k redo, bf16", torch.bfloat16, (6, 2, 4, 64, 64), True),
]


def scores_at(q, sk, idx):
    half, n = q.shape[-1] // 2, sk.shape[2]
    s1 = torch.einsum("thd,hid->thi", q[..., :half], sk[:, 0])
    s2 = torch.einsum("thd,hid->thi", q[..., half:], sk[:, 1])
    return torch.gather(s1, -1, idx // n) + torch.gather(s2, -1, idx % n)


def run_case(name, dtype, shape, ties):
    N, H, d_k, n, k = shape
    torch.manual_seed(0)
    if ties:
        q = torch.randint(-2, 3, (N, H, d_k)).to(dtype)
        sk = torch.randint(-1, 2, (H, 2, n, d_k // 2)).to(dtype)
    else:
        q = torch.randn(N, H, d_k, dtype=torch.float64).to(dtype)
        sk = (torch.randn(H, 2, n, d_k // 2, dtype=torch.float64) / math.sqrt(d_k)).to(dtype)
    qc, skc = q.cuda().requires_grad_(), sk.cuda().requires_grad_()
    scores, idx = midus_ops.pk_topk(qc, skc, k)
    g = torch.randn(scores.shape, dtype=torch.float64).to(dtype).cuda()
    gq, gk = torch.autograd.grad(scores, (qc, skc), g)
    gq_only = torch.ops.midus_ops.pk_topk_backward(g, qc.detach(), skc.detach(), idx, True, False)[0]
    torch.cuda.synchronize()
    want, _ = pk_topk_ref(q, sk, k)
    q64, k64 = q.double().requires_grad_(), sk.double().requires_grad_()
    wq, wk = torch.autograd.grad(scores_at(q64, k64, idx.cpu()), (q64, k64), g.double().cpu())
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    ok = True
    for what, got, exp in [("scores", scores, want.double()), ("grad q", gq, wq), ("grad subkeys", gk, wk),
                           ("grad q alone", gq_only, wq)]:
        err = (got.detach().double().cpu() - exp).abs().max().item()
        scale = max(exp.abs().max().item(), 1e-30)
        if not err <= tol * scale:
            print(f"FAIL {name}: {what} max error {err:.3g} (scale {scale:.3g})")
            ok = False
    if ties and not torch.equal(idx.cpu(), pk_topk_ref(q, sk, k)[1]):
        print(f"FAIL {name}: tied indices differ from the reference")
        ok = False
    print(f"{'ok  ' if ok else 'FAIL'} {name}", flush=True)
    return ok


def main() -> int:
    if not torch.cuda.is_available() or not midus_ops.has_kernel("pk_topk", torch.device("cuda")):
        print("no GPU or no CUDA kernels: nothing to check")
        return 2
    ok = True
    for case in CASES:
        ok &= run_case(*case)
    # Non-finite stage-1 scores: the row is selected over all k*k pairs.
    q = torch.randn(4, 2, 4)
    sk = torch.randn(2, 2, 10, 2)
    q[0, 0, 0] = float("inf")
    sk[1, 0, 3, 1] = float("nan")
    s, i = midus_ops.pk_topk(q.cuda(), sk.cuda(), 4)
    ws, wi = pk_topk_ref(q, sk, 4)
    good = torch.equal(i.cpu(), wi) and torch.allclose(s.cpu(), ws, equal_nan=True)
    print(f"{'ok  ' if good else 'FAIL'} non-finite scores", flush=True)
    ok &= good
    # An out-of-range index given to the backward: the default host check raises first.
    idx = torch.randint(0, 100, (4, 2, 4), device="cuda")
    idx[1, 0, 2] = 100
    try:
        torch.ops.midus_ops.pk_topk_backward(torch.randn(4, 2, 4, device="cuda"), q.cuda(), sk.cuda(), idx, True, True)
        print("FAIL out-of-range index not reported")
        ok = False
    except (IndexError, RuntimeError) as e:
        print("ok   out-of-range index:", str(e).splitlines()[0])
    torch.cuda.synchronize()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
