"""CPU benchmark of the memory operators at the CPU shape of spec/HML.md section 4.

    python benchmarks/bench_cpu_ops.py            # N=2048, H=8, d_k=64, n=32, k=16, d_z=128, d_v=64
    python benchmarks/bench_cpu_ops.py --quick    # tiny shapes, to check the script itself

Times, side by side in one run and fp32 on `--threads` threads (default 2): the fast eager
baseline a user would write (torch.topk, gather, einsum; `common.hml_eager`), the spec's
reference (`midus_ops.reference`, exact tie rule), and midus_ops (C++ kernels). Forward and
forward+backward, median of `--reps` runs. Writes a JSON file under benchmarks/results/ (or $OUT)
and prints a Markdown table. The target (ANCHORS.md): midus_ops >= 4x faster than the eager
baseline for the HML op, forward and forward+backward.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, hml_eager, time_ms, write_results  # noqa: E402

import midus_ops  # noqa: E402
from midus_ops.reference import hive_gather_ref, pk_topk_ref  # noqa: E402


def hml_with(topk, gather):
    def f(q, subkeys, k, bank, proj):
        scores, idx = topk(q, subkeys, k)
        w = torch.softmax(scores.float(), dim=-1).to(bank.dtype)
        return gather(w, idx, bank, proj)
    return f


def run(shape, reps, warmup):
    N, H, d_k, n, k, d_z, d_v = (shape[x] for x in ("N", "H", "d_k", "n", "k", "d_z", "d_v"))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(N, H, d_k, generator=g)
    subkeys = torch.randn(H, 2, n, d_k // 2, generator=g) / d_k ** 0.5
    bank = torch.randn(n * n, d_z, generator=g)
    proj = torch.randn(H, d_z, d_v, generator=g) / d_z ** 0.5
    weights = torch.softmax(torch.randn(N, H, k, generator=g), -1)
    indices = torch.randint(0, n * n, (N, H, k), generator=g)
    grad_hml = torch.randn(N, H, d_v, generator=g)
    grad_scores = torch.randn(N, H, k, generator=g)

    subjects = {
        "hml": {
            "inputs": (q, subkeys, k, bank, proj), "grad": grad_hml, "out": lambda r: r,
            "impls": {"eager": hml_eager, "reference": hml_with(pk_topk_ref, hive_gather_ref),
                      "midus_ops": hml_with(midus_ops.pk_topk, midus_ops.hive_gather)},
        },
        "pk_topk": {
            "inputs": (q, subkeys, k), "grad": grad_scores, "out": lambda r: r[0],
            "impls": {"reference": pk_topk_ref, "midus_ops": midus_ops.pk_topk},
        },
        "hive_gather": {
            "inputs": (weights, indices, bank, proj), "grad": grad_hml, "out": lambda r: r,
            "impls": {"reference": hive_gather_ref, "midus_ops": midus_ops.hive_gather},
        },
    }
    rows = []
    for subject, spec in subjects.items():
        for impl, fn in spec["impls"].items():
            inputs = spec["inputs"]
            fwd = time_ms(lambda: fn(*inputs), reps=reps, warmup=warmup)
            leaves = [x.clone().requires_grad_(True) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                      for x in inputs]

            def fwd_bwd():
                out = spec["out"](fn(*leaves))
                out.backward(spec["grad"])
                for x in leaves:
                    if isinstance(x, torch.Tensor):
                        x.grad = None
            fb = time_ms(fwd_bwd, reps=reps, warmup=warmup)
            rows.append({"subject": subject, "impl": impl, "fwd": fwd, "fwd_bwd": fb})
    # speed-up of midus_ops against each baseline of the same subject, measured in this run
    for r in rows:
        if r["impl"] == "midus_ops":
            for b in rows:
                if b["subject"] == r["subject"] and b["impl"] != "midus_ops":
                    r[f"speedup_vs_{b['impl']}"] = {
                        "fwd": b["fwd"]["median_ms"] / r["fwd"]["median_ms"],
                        "fwd_bwd": b["fwd_bwd"]["median_ms"] / r["fwd_bwd"]["median_ms"]}
    return rows


def table(rows) -> str:
    lines = ["| subject | implementation | fwd ms | fwd+bwd ms | fwd speed-up | fwd+bwd speed-up |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        base = {"hml": "eager", "pk_topk": "reference", "hive_gather": "reference"}[r["subject"]]
        su = r.get(f"speedup_vs_{base}")
        s_f = f"{su['fwd']:.1f}x vs {base}" if su else ""
        s_b = f"{su['fwd_bwd']:.1f}x vs {base}" if su else ""
        lines.append(f"| {r['subject']} | {r['impl']} | {r['fwd']['median_ms']:.2f} | "
                     f"{r['fwd_bwd']['median_ms']:.2f} | {s_f} | {s_b} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2, the spec's CPU shape)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny shapes and few runs: checks the script, not speed")
    p.add_argument("--out", default=None, help="results folder (default $OUT or benchmarks/results)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = dict(N=2048, H=8, d_k=64, n=32, k=16, d_z=128, d_v=64)
    if args.quick:
        shape = dict(N=64, H=2, d_k=8, n=6, k=3, d_z=12, d_v=8)
        args.reps, args.warmup = 2, 1
    rows = run(shape, args.reps, args.warmup)
    env = environment("cpu")
    path = write_results("cpu_ops" + ("_quick" if args.quick else ""),
                         {"env": env, "shape": shape, "dtype": "float32", "results": rows}, args.out)
    print(f"midus_ops CPU benchmark, fp32, {env['device']}, torch {env['torch']}, commit {env['git_commit']}")
    print(f"shape: {shape}")
    print(table(rows))
    print(f"results: {path}")
    if not env["midus_ops_extension"]:
        print("WARNING: midus_ops._C is not available: 'midus_ops' rows ran the reference.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
