"""GPU benchmark of midus_ops.hive_gather against its baselines, measured in one run (bf16).

(a) MIDUS-1B gather + projection: N=8192, H=32, k=16, R=1024, d_z=256, d_v=64, against
    midus_ops.reference.hive_gather_ref eager and torch.compile of it: forward, forward+backward
    (gradients for weights, bank and proj), and peak extra memory of forward+backward
    (torch.cuda.max_memory_allocated minus what was allocated before, i.e. the inputs).
(b) Large memory: R=2^20 rows of d_z=1024, 16384 bags of k=32 (4096 tokens x 4 heads), no proj,
    against F.embedding_bag (mode="sum", per_sample_weights; fp32, since its bf16 backward with
    per-sample weights is unsupported) and a device-to-device copy measured in the same run:
    GB/s gathered (bags x k x d_z x 2 bytes over the forward time) and its % of the copy's GB/s
    (bytes read + written).

Targets (shared/bench/ANCHORS.md), as ratios to the baselines of the same run:
(a) >= 20x eager forward, >= 10x eager forward+backward, <= 1/10 of eager's peak extra memory;
(b) forward >= 85% of the copy bandwidth, forward+backward <= 2.3 ms on an H100-class GPU.

Timing: CUDA events, median of `--reps` (>= 20) runs after warm-up (benchmarks/common.py). midus
runs with its default index check (a host-side check with one synchronisation per call; see
csrc/cuda/hive_gather.cu) and again with MIDUS_OPS_CUDA_INDEX_CHECK=device (device-side asserts
only, no synchronisation). Results are printed as a table and written as JSON (+ Markdown) to
$OUT or benchmarks/results/, after each section, so a time-out keeps what was measured.

    python benchmarks/bench_gpu_hive_gather.py [--reps 20] [--no-compile] [--only a|b]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import environment, time_ms, write_results  # noqa: E402

import midus_ops  # noqa: E402
from midus_ops.reference import hive_gather_ref  # noqa: E402

MiB = 2 ** 20


def peak_extra_mib(fn) -> float:
    """Peak memory allocated while fn() runs, above what was allocated before (the inputs)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MiB


class IndexCheckMode:
    """Sets MIDUS_OPS_CUDA_INDEX_CHECK for the duration (read by the C++ op at every call)."""

    def __init__(self, mode):
        self.mode = mode

    def __enter__(self):
        self.old = os.environ.get("MIDUS_OPS_CUDA_INDEX_CHECK")
        if self.mode is None:
            os.environ.pop("MIDUS_OPS_CUDA_INDEX_CHECK", None)
        else:
            os.environ["MIDUS_OPS_CUDA_INDEX_CHECK"] = self.mode

    def __exit__(self, *a):
        if self.old is None:
            os.environ.pop("MIDUS_OPS_CUDA_INDEX_CHECK", None)
        else:
            os.environ["MIDUS_OPS_CUDA_INDEX_CHECK"] = self.old


def measure(name, fwd, inputs, grad_out, reps, results, rows):
    """fwd(): the forward; inputs: tensors to differentiate; grad_out: the output gradient."""
    entry = {"name": name}
    try:
        def fb():
            out = fwd()
            torch.autograd.grad(out, inputs, grad_out)

        entry["fwd"] = time_ms(fwd, reps=reps, warmup=3, device="cuda")
        entry["fwd_bwd"] = time_ms(fb, reps=reps, warmup=3, device="cuda")
        entry["peak_extra_mib_fwd_bwd"] = peak_extra_mib(fb)
    except Exception as e:  # a baseline that fails (e.g. out of memory) is reported, not fatal
        entry["error"] = f"{type(e).__name__}: {e}"[:500]
    results.append(entry)
    f = entry.get("fwd", {}).get("median_ms", float("nan"))
    fb_ = entry.get("fwd_bwd", {}).get("median_ms", float("nan"))
    mem = entry.get("peak_extra_mib_fwd_bwd", float("nan"))
    rows.append((name, f, fb_, mem, entry.get("error", "")))
    print(f"  {name:<44} fwd {f:9.3f} ms   fwd+bwd {fb_:9.3f} ms   peak extra {mem:9.1f} MiB"
          + (f"   ERROR {entry['error'][:80]}" if "error" in entry else ""), flush=True)
    return entry


def section_a(args, payload):
    N, H, k, R, d_z, d_v = 8192, 32, 16, 1024, 256, 64
    dt = torch.bfloat16
    torch.manual_seed(0)
    dev = "cuda"
    weights = torch.softmax(torch.randn(N, H, k, device=dev), -1).to(dt).requires_grad_()
    indices = torch.randint(0, R, (N, H, k), device=dev)
    bank = (torch.randn(R, d_z, device=dev) * 0.02).to(dt).requires_grad_()
    proj = (torch.randn(H, d_z, d_v, device=dev) / math.sqrt(d_z)).to(dt).requires_grad_()
    grad_out = torch.randn(N, H, d_v, device=dev).to(dt)
    inputs = [weights, bank, proj]
    results, rows = [], []
    print(f"(a) MIDUS-1B gather + projection: N={N} H={H} k={k} R={R} d_z={d_z} d_v={d_v}, bf16", flush=True)

    with IndexCheckMode(None):
        measure("midus_ops.hive_gather", lambda: midus_ops.hive_gather(weights, indices, bank, proj), inputs,
                grad_out, args.reps, results, rows)
    with IndexCheckMode("device"):
        measure("midus_ops.hive_gather (index check: device)",
                lambda: midus_ops.hive_gather(weights, indices, bank, proj), inputs, grad_out, args.reps, results, rows)
    measure("hive_gather_ref eager", lambda: hive_gather_ref(weights, indices, bank, proj), inputs, grad_out,
            args.reps, results, rows)

    def eager_bf16():  # what a user writes in bf16: gather [N, H, k, d_z], weighted sum, einsum
        u = (weights[..., None] * bank[indices]).sum(dim=2)
        return torch.einsum("thz,hzv->thv", u, proj)

    measure("eager bf16 (bank[indices], einsum)", eager_bf16, inputs, grad_out, args.reps, results, rows)
    payload["a"] = {"shape": dict(N=N, H=H, k=k, R=R, d_z=d_z, d_v=d_v, dtype="bfloat16"), "results": results,
                    "rows": rows}
    print("wrote", save(payload), flush=True)  # before the (slow) compile, in case of a time-out
    if not args.no_compile:
        compiled = torch.compile(hive_gather_ref)
        t0 = time.perf_counter()
        try:
            out = compiled(weights, indices, bank, proj)
            torch.autograd.grad(out, inputs, grad_out)
            torch.cuda.synchronize()
            payload["a"]["compile_seconds"] = time.perf_counter() - t0
            measure("torch.compile(hive_gather_ref)", lambda: compiled(weights, indices, bank, proj), inputs,
                    grad_out, args.reps, results, rows)
        except Exception as e:
            results.append({"name": "torch.compile(hive_gather_ref)", "error": f"{type(e).__name__}: {e}"[:500]})
            rows.append(("torch.compile(hive_gather_ref)", float("nan"), float("nan"), float("nan"), "error"))

    by = {r["name"]: r for r in results}
    m, e = by["midus_ops.hive_gather"], by["hive_gather_ref eager"]
    ratios = {}
    if "fwd" in m and "fwd" in e:
        ratios["speedup_fwd_vs_eager"] = e["fwd"]["median_ms"] / m["fwd"]["median_ms"]
        ratios["speedup_fwd_bwd_vs_eager"] = e["fwd_bwd"]["median_ms"] / m["fwd_bwd"]["median_ms"]
        ratios["memory_fraction_of_eager"] = m["peak_extra_mib_fwd_bwd"] / max(e["peak_extra_mib_fwd_bwd"], 1e-9)
        c = by.get("torch.compile(hive_gather_ref)", {})
        if "fwd" in c:
            ratios["speedup_fwd_vs_compile"] = c["fwd"]["median_ms"] / m["fwd"]["median_ms"]
            ratios["speedup_fwd_bwd_vs_compile"] = c["fwd_bwd"]["median_ms"] / m["fwd_bwd"]["median_ms"]
        ratios["targets_met"] = {
            "fwd >= 20x eager": ratios["speedup_fwd_vs_eager"] >= 20,
            "fwd+bwd >= 10x eager": ratios["speedup_fwd_bwd_vs_eager"] >= 10,
            "memory <= 1/10 eager": ratios["memory_fraction_of_eager"] <= 0.1,
        }
    payload["a"]["ratios"] = ratios
    payload["a"]["rows"] = rows
    print("  ratios:", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in ratios.items()}, flush=True)


def section_b(args, payload):
    R, d_z, N, H, k = 2 ** 20, 1024, 4096, 4, 32
    bags = N * H
    dev = "cuda"
    torch.manual_seed(1)
    print(f"(b) large memory: R=2^20 d_z={d_z}, {bags} bags of k={k}, no proj", flush=True)
    results, rows = [], []
    payload["b"] = {"shape": dict(R=R, d_z=d_z, N=N, H=H, k=k, dtype="bfloat16"), "results": results}

    # Copy bandwidth (bytes read + written), the ceiling this section is judged against.
    src = torch.empty(2 ** 30, dtype=torch.bfloat16, device=dev)  # 2 GiB
    dst = torch.empty_like(src)
    src.fill_(1.0)
    t = time_ms(lambda: dst.copy_(src), reps=args.reps, warmup=3, device="cuda")
    copy_gbs = 2 * src.numel() * 2 / (t["median_ms"] * 1e-3) / 1e9
    payload["b"]["copy"] = {"bytes_moved": 2 * src.numel() * 2, "time": t, "GBps": copy_gbs}
    print(f"  device-to-device copy: {copy_gbs:8.1f} GB/s (read + write)", flush=True)
    src = dst = None  # free the 4 GiB before the next allocations
    torch.cuda.empty_cache()

    weights = torch.softmax(torch.randn(N, H, k, device=dev), -1).to(torch.bfloat16).requires_grad_()
    indices = torch.randint(0, R, (N, H, k), device=dev)
    bank = (torch.randn(R, d_z, device=dev, dtype=torch.bfloat16) * 0.02).requires_grad_()
    grad_out = torch.randn(N, H, d_z, device=dev).to(torch.bfloat16)
    gathered = bags * k * d_z * 2
    with IndexCheckMode(None):
        m = measure("midus_ops.hive_gather bf16", lambda: midus_ops.hive_gather(weights, indices, bank),
                    [weights, bank], grad_out, args.reps, results, rows)
    with IndexCheckMode("device"):
        md = measure("midus_ops.hive_gather bf16 (index check: device)",
                     lambda: midus_ops.hive_gather(weights, indices, bank), [weights, bank], grad_out, args.reps,
                     results, rows)
    torch.cuda.empty_cache()

    # F.embedding_bag baseline in fp32.
    bank32 = (torch.randn(R, d_z, device=dev) * 0.02).requires_grad_()
    w32 = weights.detach().float().view(bags, k).requires_grad_()
    idx2 = indices.view(bags, k)
    g32 = grad_out.float().view(bags, d_z)
    measure("F.embedding_bag fp32", lambda: F.embedding_bag(idx2, bank32, per_sample_weights=w32, mode="sum"),
            [w32, bank32], g32, args.reps, results, rows)

    for entry in (m, md):
        if "fwd" in entry:
            gbs = gathered / (entry["fwd"]["median_ms"] * 1e-3) / 1e9
            entry["fwd_GBps_gathered"] = gbs
            entry["fwd_pct_of_copy"] = 100 * gbs / copy_gbs
            print(f"  {entry['name']:<44} gathered {gbs:8.1f} GB/s = {entry['fwd_pct_of_copy']:5.1f}% of copy",
                  flush=True)
    payload["b"]["gathered_bytes"] = gathered
    payload["b"]["rows"] = rows
    if "fwd" in m:
        payload["b"]["targets"] = {
            "fwd >= 85% of copy bandwidth": m["fwd_pct_of_copy"] >= 85,
            "fwd+bwd <= 2.3 ms (H100 figure)": m["fwd_bwd"]["median_ms"] <= 2.3,
        }
        print("  targets:", payload["b"]["targets"], flush=True)


def markdown(payload) -> str:
    lines = [f"# hive_gather on {payload['env'].get('device')} (torch {payload['env'].get('torch')})", ""]
    for key, title in (("a", "(a) MIDUS-1B gather + projection (bf16)"), ("b", "(b) large memory, no proj")):
        if key not in payload:
            continue
        lines += [f"## {title}", "", "| version | fwd ms | fwd+bwd ms | peak extra MiB |", "|---|---|---|---|"]
        for name, f, fb, mem, err in payload[key].get("rows", []):
            lines.append(f"| {name} | {f:.3f} | {fb:.3f} | {mem:.1f} |" + (f" {err[:60]}" if err else ""))
        if key == "a" and payload["a"].get("ratios"):
            r = payload["a"]["ratios"]
            lines += ["", f"speed-up vs eager: fwd {r.get('speedup_fwd_vs_eager', float('nan')):.1f}x, fwd+bwd "
                      f"{r.get('speedup_fwd_bwd_vs_eager', float('nan')):.1f}x; memory "
                      f"{r.get('memory_fraction_of_eager', float('nan')):.3f} of eager; targets "
                      f"{r.get('targets_met')}"]
        if key == "b" and "copy" in payload["b"]:
            lines += ["", f"copy {payload['b']['copy']['GBps']:.0f} GB/s (read + write)"]
            for e in payload["b"]["results"]:
                if "fwd_GBps_gathered" in e:
                    lines.append(f"- {e['name']}: {e['fwd_GBps_gathered']:.0f} GB/s gathered = "
                                 f"{e['fwd_pct_of_copy']:.1f}% of copy")
            lines.append(f"- targets: {payload['b'].get('targets')}")
        lines.append("")
    return "\n".join(lines)


def save(payload):
    path = write_results("bench_gpu_hive_gather", payload)
    md = os.path.join(os.path.dirname(path), "bench_gpu_hive_gather.md")
    with open(md, "w") as f:
        f.write(markdown(payload))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline of (a)")
    ap.add_argument("--only", choices=["a", "b"])
    args = ap.parse_args()
    args.reps = max(args.reps, 20)
    if not torch.cuda.is_available():
        print("no GPU: nothing to measure")
        return 2
    payload = {"env": environment("cuda"), "reps": args.reps,
               "has_cuda_kernel": midus_ops.has_kernel("hive_gather", torch.device("cuda"))}
    if not payload["has_cuda_kernel"]:
        print("WARNING: no compiled CUDA kernel for hive_gather; midus_ops rows measure the reference", flush=True)
    if args.only in (None, "a"):
        section_a(args, payload)
        print("wrote", save(payload), flush=True)
    if args.only in (None, "b"):
        section_b(args, payload)
        print("wrote", save(payload), flush=True)
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
