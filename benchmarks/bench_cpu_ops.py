"""Kept for older instructions: the "ops" subject on CPU (the same as bench_ops.py --device cpu).

    python benchmarks/bench_cpu_ops.py [--quick] [--threads 2]
"""
import sys

from _entry import RESULTS

from midus.bench.cli import main_subject

if __name__ == "__main__":
    sys.exit(main_subject("ops", out=RESULTS, device="cpu"))
