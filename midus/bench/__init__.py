"""midus benchmark suite: ops, layers, blocks, whole models, decode and scaling, with the baselines
measured side by side in the same process and run, written to one results file per device and date.

    midus bench [PART ...] [--quick] [--device cuda] [--time-budget S] [--plot]
    python -m midus.bench ...                       # the same
    python benchmarks/bench_<subject>.py ...        # one subject, from the checkout
    python benchmarks/plot.py RESULTS.json          # the PNG plots of a results file

Subjects (one module each, ``bench(ctx)``): :mod:`.ops`, :mod:`.layers`, :mod:`.blocks`,
:mod:`.models`, :mod:`.decode`, :mod:`.scaling`; sizes per device in each module's ``SIZES``
("gpu": the shapes of docs/design.md §4; "cpu": scaled down for a 2-core machine; "quick": tiny).
Measurement: :mod:`.core` (CUDA events / wall time, peak memory, environment, results file);
targets and tables: :mod:`.report`; plots: :mod:`.plot`. For the ``midus`` command,
:func:`add_arguments` and :func:`run` (see :mod:`.cli`).
"""
from .cli import SUBJECTS, add_arguments, main, run

__all__ = ["SUBJECTS", "add_arguments", "run", "main"]
