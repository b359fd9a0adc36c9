"""Shared start of the benchmarks/*.py scripts: which midus to import, and the results folder.

This checkout's code is used when its C++ extension is built in place (midus_ops/_C*.so, as after
`pip install -e .` or gpu_check.sh) or when no installed midus has the benchmark suite; otherwise
the installed midus (with its compiled extension). PYTHONPATH still wins over both.
"""
import glob
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")


def _installed_has_bench() -> bool:
    spec = importlib.util.find_spec("midus")  # finds, does not import
    return bool(spec and spec.origin and os.path.isdir(os.path.join(os.path.dirname(spec.origin), "bench")))


if glob.glob(os.path.join(ROOT, "midus_ops", "_C*.so")) or not _installed_has_bench():
    # after the script's folder and the PYTHONPATH entries, before site-packages
    pp = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path.insert(1 + len(pp), ROOT)
