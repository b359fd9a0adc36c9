"""The "decode" subject of the midus benchmark suite (midus/bench/decode.py), results in benchmarks/results/.

    python benchmarks/bench_decode.py [CASE ...] [--quick] [--device cuda] [--reps N] [--plot]

The same as `midus bench decode`; `--help` lists the options, `--list` the cases.
"""
import sys

from _entry import RESULTS

from midus.bench.cli import main_subject

if __name__ == "__main__":
    sys.exit(main_subject("decode", out=RESULTS))
