"""Kept for older instructions: the hive_gather cases of the "ops" subject on CUDA (MIDUS-1B
gather + projection, and the large-memory gather against F.embedding_bag and the copy bandwidth).

    python benchmarks/bench_gpu_hive_gather.py [--no-compile] [--reps 20]
"""
import sys

from _entry import RESULTS

from midus.bench.cli import main_subject

if __name__ == "__main__":
    sys.exit(main_subject("ops", ["hive_gather_proj", "hive_gather_noproj"] + sys.argv[1:], out=RESULTS,
                          device="cuda"))
