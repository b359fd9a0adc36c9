"""Small runs of every hive_gather CUDA kernel path, for `compute-sanitizer --tool memcheck`.

Not a pytest file (pytest collects test_*.py only): benchmarks/gpu_check.sh runs it as

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 99 \\
        python3 tests/cuda_sanitizer_smoke.py

(without the caching allocator every tensor is its own cudaMalloc, so an access past a tensor's
end is caught). Each case also checks its values against the reference, so the script fails on
its own (exit 1) when a kernel is wrong. Shapes are tiny: the sanitizer slows kernels a lot.
"""
from __future__ import annotations

import math
import sys

import torch

import midus_ops
from midus_ops.reference import hive_gather_ref

CASES = [
    # name, dtype, idx dtype, (N, H, k, R, d_z, d_v or None), misaligned bank
    ("fwd+bwd tensor cores bf16", torch.bfloat16, torch.int64, (37, 3, 5, 40, 24, 40), False),
    ("fwd+bwd tensor cores fp16, 2 d_z chunks / generic bwd", torch.float16, torch.int32, (9, 2, 3, 20, 264, 72), False),
    ("generic fp32", torch.float32, torch.int64, (11, 2, 4, 30, 12, 5), False),
    ("generic fp64", torch.float64, torch.int32, (5, 2, 3, 7, 5, 4), False),
    ("generic bf16 k > 64", torch.bfloat16, torch.int64, (6, 2, 70, 50, 16, 8), False),
    ("no proj, vector bf16", torch.bfloat16, torch.int64, (13, 2, 9, 30, 64, None), False),
    ("no proj, scalar bf16 (odd d_z)", torch.bfloat16, torch.int32, (13, 2, 9, 30, 7, None), False),
    ("no proj, misaligned bank fp32", torch.float32, torch.int64, (13, 2, 9, 30, 16, None), True),
    ("tensor cores, misaligned bank -> generic", torch.bfloat16, torch.int64, (13, 2, 9, 30, 16, 8), True),
]


def run_case(name, dtype, idx_dtype, shape, misaligned, hot=False):
    N, H, k, R, d_z, d_v = shape
    torch.manual_seed(0)
    w = torch.randn(N, H, k, dtype=torch.float64).to(dtype).cuda().requires_grad_()
    idx = torch.randint(0, R, (N, H, k), dtype=idx_dtype)
    if hot:
        idx[:] = 3
    idx = idx.cuda()
    bank0 = torch.randn(R, d_z, dtype=torch.float64).to(dtype).cuda()
    if misaligned:
        flat = torch.empty(R * d_z + 1, dtype=dtype, device="cuda")
        bank = flat[1:].view(R, d_z)
        bank.copy_(bank0)
    else:
        bank = bank0
    bank.requires_grad_()
    proj = None
    if d_v is not None:
        proj = (torch.randn(H, d_z, d_v, dtype=torch.float64) / math.sqrt(d_z)).to(dtype).cuda().requires_grad_()
    out = midus_ops.hive_gather(w, idx, bank, proj)
    g = torch.randn(out.shape, dtype=torch.float64).to(dtype).cuda()
    inputs = [w, bank] + ([proj] if proj is not None else [])
    grads = torch.autograd.grad(out, inputs, g)
    torch.cuda.synchronize()
    # Reference in fp64 on the CPU.
    ins64 = [t.detach().double().cpu().requires_grad_() for t in inputs]
    ref = hive_gather_ref(ins64[0], idx.cpu(), ins64[1], ins64[2] if proj is not None else None)
    want = torch.autograd.grad(ref, ins64, g.double().cpu())
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    ok = True
    for what, got, exp in zip(["out", "grad weights", "grad bank", "grad proj"], [out] + list(grads), [ref] + list(want)):
        err = (got.detach().double().cpu() - exp).abs().max().item()
        scale = max(exp.abs().max().item(), 1e-30)
        if not err <= tol * scale:
            print(f"FAIL {name}: {what} max error {err:.3g} (scale {scale:.3g})")
            ok = False
    print(f"{'ok  ' if ok else 'FAIL'} {name}", flush=True)
    return ok


def main() -> int:
    if not torch.cuda.is_available() or not midus_ops.has_kernel("hive_gather", torch.device("cuda")):
        print("no GPU or no CUDA kernels: nothing to check")
        return 2
    ok = True
    for case in CASES:
        ok &= run_case(*case)
    # The multi-level bank-gradient reduction: one hot row, enough contributions for >= 3 levels.
    ok &= run_case("hot row, several carry levels", torch.bfloat16, torch.int64, (1024, 2, 16, 64, 16, 8), False,
                   hot=True)
    # Index errors: the default host check raises before any kernel runs.
    w = torch.randn(4, 2, 3, device="cuda")
    bank = torch.randn(10, 8, device="cuda")
    idx = torch.randint(0, 10, (4, 2, 3), device="cuda")
    idx[2, 1, 0] = 10
    try:
        midus_ops.hive_gather(w, idx, bank)
        print("FAIL out-of-range index not reported")
        ok = False
    except IndexError as e:
        print("ok   out-of-range index:", str(e).splitlines()[0])
    torch.cuda.synchronize()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
