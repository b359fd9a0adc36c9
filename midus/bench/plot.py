"""Plots of a benchmark results file (matplotlib, PNG), drawn from the data file alone.

    python benchmarks/plot.py benchmarks/results/bench_cpu_2026-11-29.json   # or: python -m midus.bench.plot

Writes beside the results file (or into ``--out``), named after it:
- ``<stem>_speedup.png``: per subject, speed-up of each implementation over the eager PyTorch
  version measured in the same run (ops: against ``eager``; layers, blocks, models, decode: against
  the same module on the eager ops, its ``[eager]`` twin).
- ``<stem>_vs_baseline.png``: per subject, time relative to the subject's baseline (eager op,
  SwiGLU FFN, DUS block, base model, FFN at decode), with the targets of docs/benchmarks.md §3 drawn as lines.
- ``<stem>_memory.png``: per subject, peak memory (MiB) of each implementation.
- ``<stem>_scaling.png``: HML op time (fwd+bwd, fwd) and memory as N, n, k and d_z grow.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional

from .core import load_results
from .report import all_records

# The mode each subject is summarised by in the bar charts.
MAIN_MODE = {"ops": ("fwd", "fwd_bwd"), "layers": ("fwd", "fwd_bwd"), "blocks": ("fwd", "fwd_bwd"),
             "models": ("train_step", "generate_b"), "decode": ("fwd",)}  # mode prefixes
TARGET_LINES = {"blocks": [(0.5, "target: memory block <= 1/2 DUS block")],
                "models": [(1.15, "target: MIDUS <= 1.15x base"), (1.4, "DUS about 1.4x")],
                "decode": [(0.25, "target: HML N=1 <= 1/4 FFN")]}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grouped_bars(ax, groups: List[str], series: Dict[str, List[Optional[float]]], log: bool = True,
                  from_one: bool = False) -> None:
    """Bars per group and series; ``from_one``: ratios drawn from 1 (up: above, down: below)."""
    names = list(series)
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
        if from_one:
            vals = [v - 1.0 if v else 0.0 for v in series[name]]
            ax.bar(xs, vals, width=width, bottom=1.0, label=name)
        else:
            ax.bar(xs, [v or 0.0 for v in series[name]], width=width, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=7)
    if log and any(v for vs in series.values() for v in vs if v):
        ax.set_yscale("log")
    ax.legend(fontsize=6)
    ax.grid(axis="y", alpha=0.3)


def _subject_bars(records, field: str, title: str, path: str, baseline_impls: bool = False,
                  lines: Optional[Dict[str, list]] = None, ylabel: str = "") -> Optional[str]:
    subjects = [s for s in MAIN_MODE if any(r["subject"] == s and r.get(field) is not None for r in records)]
    if not subjects:
        return None
    plt = _plt()
    ncols = min(len(subjects), 3)
    nrows = (len(subjects) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 4.0 * nrows), squeeze=False)
    for ax in axes.flat[len(subjects):]:
        ax.axis("off")
    for ax, subject in zip(axes.flat, subjects):
        rows = [r for r in records if r["subject"] == subject and r["mode"].startswith(MAIN_MODE[subject])
                and r.get(field) is not None and (baseline_impls or r["impl"] != r["baseline"])
                and not r["impl"].endswith("[eager]")]
        groups = list(dict.fromkeys(f"{r['case']} {r['mode']}" for r in rows))
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        series = {i: [next((r[field] for r in rows if r["impl"] == i and f"{r['case']} {r['mode']}" == g), None)
                      for g in groups] for i in impls}
        _grouped_bars(ax, groups, series, from_one=field != "peak_mib")
        if field in ("speedup", "speedup_vs_eager", "time_ratio"):
            ax.axhline(1.0, color="k", lw=0.8)
        for y, label in (lines or {}).get(subject, []):
            ax.axhline(y, color="r", ls="--", lw=0.8)
            ax.text(0.01, y, label, color="r", fontsize=6, transform=ax.get_yaxis_transform(), va="bottom")
        base = rows[0]["baseline"] if rows else ""
        ax.set_title(f"{subject}" + (f" (vs {base})" if field in ("speedup", "time_ratio") else ""), fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
    dev = records[0].get("device", "")
    fig.suptitle(f"{title} — {dev}, torch {records[0].get('torch')}, commit {records[0].get('git_commit')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _scaling(records, path: str) -> Optional[str]:
    rows = [r for r in records if r["subject"] == "scaling" and "time_ms" in r]
    if not rows:
        return None
    plt = _plt()
    sweeps = list(dict.fromkeys(r["sweep"] for r in rows))
    fig, axes = plt.subplots(2, len(sweeps), figsize=(3.6 * len(sweeps), 6.4), squeeze=False)
    for j, sweep in enumerate(sweeps):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            for mode, style in (("fwd_bwd", "-o"), ("fwd", "--.")):
                pts = sorted((r["x"], r["time_ms"]["median"], r.get("peak_mib")) for r in rows
                             if r["sweep"] == sweep and r["impl"] == impl and r["mode"] == mode)
                if not pts:
                    continue
                axes[0][j].plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{impl} {mode}")
                if mode == "fwd_bwd":
                    mem = [(p[0], p[2]) for p in pts if p[2] is not None]
                    axes[1][j].plot([m[0] for m in mem], [max(m[1], 1e-3) for m in mem], "-o", label=impl)
        for i, ylabel in ((0, "time ms"), (1, "peak MiB (fwd+bwd)")):
            ax = axes[i][j]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(sweep)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        axes[0][j].set_title(f"HML op vs {sweep}", fontsize=9)
    base = rows[0].get("base", "")
    fig.suptitle(f"HML op scaling, one size at a time (others at {base}) — {rows[0].get('device')}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_results(results_path: str, out_dir: Optional[str] = None) -> List[str]:
    """Draw every plot the file has data for; returns the PNG paths written."""
    data = load_results(results_path)
    records = _with_eager_speedup(all_records(data))
    out_dir = out_dir or os.path.dirname(os.path.abspath(results_path))
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, os.path.splitext(os.path.basename(results_path))[0])
    written = [
        _subject_bars(records, "speedup_vs_eager_any", "Speed-up over eager PyTorch (same run)",
                      f"{stem}_speedup.png", ylabel="x faster than eager"),
        _subject_bars(records, "time_ratio", "Time relative to the baseline (lower is faster)",
                      f"{stem}_vs_baseline.png", lines=TARGET_LINES, ylabel="time / baseline time"),
        _subject_bars(records, "peak_mib", "Peak memory", f"{stem}_memory.png", baseline_impls=True,
                      ylabel="MiB"),
        _scaling(records, f"{stem}_scaling.png"),
    ]
    return [p for p in written if p]


def _with_eager_speedup(records):
    """``speedup_vs_eager_any``: against ``eager`` where that is the baseline, else the [eager] twin."""
    for r in records:
        if r.get("speedup_vs_eager") is not None:
            r["speedup_vs_eager_any"] = r["speedup_vs_eager"]
        elif r.get("baseline") == "eager" and r.get("speedup") is not None and r["subject"] != "scaling":
            r["speedup_vs_eager_any"] = r["speedup"]
    return records


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/plot.py", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="results JSON file(s) written by `midus bench`")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: beside each results file)")
    args = p.parse_args(argv)
    status = 0
    for path in args.results:
        try:
            for png in plot_results(path, args.out):
                print(png)
        except (OSError, ValueError) as e:
            print(f"plot: {path}: {e}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
