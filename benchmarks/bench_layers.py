"""The "layers" subject of the midus benchmark suite (midus/bench/layers.py), results in benchmarks/results/.

    python benchmarks/bench_layers.py [CASE ...] [--quick] [--device cuda] [--reps N] [--plot]

The same as `midus bench layers`; `--help` lists the options, `--list` the cases.
"""
import sys

from _entry import RESULTS

from midus.bench.cli import main_subject

if __name__ == "__main__":
    sys.exit(main_subject("layers", out=RESULTS))
