"""Plots of benchmark results files (midus/bench/plot.py): speed-up over eager, time against the
baseline with the targets, memory per subject, and the scaling curves, as PNGs beside each file.

    python benchmarks/plot.py benchmarks/results/bench_cpu_2026-11-29.json [--out DIR]
"""
import sys

import _entry  # noqa: F401

from midus.bench.plot import main

if __name__ == "__main__":
    sys.exit(main())
