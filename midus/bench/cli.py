"""``midus bench``: run the benchmark suite (or named parts), write the results file, print tables.

    midus bench                         # every subject, sizes for the device (GPU: shapes of docs/design.md §4)
    midus bench ops models              # some subjects
    midus bench ops.hml decode.N=1      # single cases
    midus bench --quick                 # tiny sizes, 2 runs: checks the suite, not speed (~1 min CPU)
    midus bench --device cuda --time-budget 340 --plot
    python -m midus.bench ...           # the same without the console script
"""
from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..runtime import debug_enabled, results_dir_env

SUBJECTS = ("ops", "layers", "blocks", "models", "decode", "scaling")
DEFAULTS = {"gpu": dict(reps=20, warmup=3), "cpu": dict(reps=10, warmup=2), "quick": dict(reps=2, warmup=1)}


def subject_module(name: str):
    return importlib.import_module(f"midus.bench.{name}")


def add_arguments(parser: argparse.ArgumentParser, subject: Optional[str] = None) -> None:
    """The options of ``midus bench`` (the lead's CLI adds them to its ``bench`` sub-parser), or of
    one subject's script (``subject``: its PARTs are that subject's cases)."""
    if subject:
        parser.add_argument("parts", nargs="*", metavar="CASE",
                            help=f"cases of {subject} (see --list), with or without the '{subject}.' prefix; "
                                 f"default: all of them")
    else:
        parser.add_argument("parts", nargs="*", metavar="PART",
                            help=f"subjects ({', '.join(SUBJECTS)}) or single cases as SUBJECT.CASE "
                                 f"(e.g. ops.hml, decode.N=1, scaling.n); default: all subjects")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: cuda when a GPU is visible, else cpu (default: auto)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, 2 runs, no torch.compile: checks the suite in about a minute, not speed")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed runs per measurement (default: 20 on GPU, 10 on CPU, 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 3 GPU, 2 CPU, 1 quick)")
    parser.add_argument("--time-budget", type=float, default=0.0,
                        help="seconds: cases that would start after it are recorded as skipped; 0 = no limit")
    comp = parser.add_mutually_exclusive_group()
    comp.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                      help="skip the torch.compile baselines (their compilation takes 10-60 s each)")
    comp.add_argument("--compile", dest="compile", action="store_true",
                      help="include the torch.compile baselines also with --quick")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 with --quick, where tiny ops only pay for "
                             "thread synchronisation; else torch's)")
    parser.add_argument("--out", default=None,
                        help="results folder (default: $OUT, else benchmarks/results when run from the midus "
                             "checkout, else ./midus-bench-results)")
    parser.add_argument("--plot", action="store_true", help="also draw the PNG plots beside the results file")
    parser.add_argument("--list", action="store_true", help="list the subjects and their cases, and exit")
    parser.add_argument("--quiet", action="store_true", help="print only the tables at the end")


def default_out_dir() -> str:
    if results_dir_env():
        return results_dir_env()
    if os.path.isdir(os.path.join("benchmarks", "results")) and os.path.isfile(os.path.join("midus", "__init__.py")):
        return os.path.join("benchmarks", "results")
    return "midus-bench-results"


def parse_parts(parts: List[str]) -> Dict[str, Optional[List[str]]]:
    """{subject: None (all cases) or [case, ...]}, subjects in the order given (suite order when
    none is given); ValueError names a bad PART."""
    if not parts:
        return {s: None for s in SUBJECTS}
    chosen: Dict[str, Optional[List[str]]] = {}
    for part in parts:
        subject, _, case = part.partition(".")
        if subject not in SUBJECTS:
            raise ValueError(f"PART {part!r}: unknown subject {subject!r}; subjects: {', '.join(SUBJECTS)}")
        if not case:
            chosen[subject] = None
            continue
        known = subject_module(subject).CASES
        sweeps = getattr(subject_module(subject), "SWEEPS", ())
        if case not in known and case not in sweeps:
            raise ValueError(f"PART {part!r}: unknown case {case!r} of {subject}; cases: "
                             f"{', '.join(dict.fromkeys(list(sweeps) + list(known)))}")
        if chosen.get(subject, []) is not None:
            chosen.setdefault(subject, []).append(case)
    return chosen


def _resolve_device(device: str) -> str:
    import torch  # here, not at the top: `midus bench --help` needs no torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda: no CUDA device is visible (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda})")
    return device


def run(args) -> int:
    """Run what ``args`` (from :func:`add_arguments`) asks for; returns the exit status (0: every
    subject ran; 1: a subject failed as a whole; single implementations that fail, e.g. out of
    memory, are recorded in the results and do not fail the run). Raises ValueError naming the
    argument for bad input."""
    from . import core

    if args.list:
        for s in SUBJECTS:
            mod = subject_module(s)
            print(f"{s}: {', '.join(getattr(mod, 'SWEEPS', ()) or mod.CASES)}  ({mod.__doc__.splitlines()[0]})")
        return 0
    chosen = parse_parts(args.parts)
    device = _resolve_device(args.device)
    profile = "quick" if args.quick else ("gpu" if device == "cuda" else "cpu")
    reps = args.reps if args.reps is not None else DEFAULTS[profile]["reps"]
    warmup = args.warmup if args.warmup is not None else DEFAULTS[profile]["warmup"]
    if reps < 1 or warmup < 0:
        raise ValueError(f"--reps must be >= 1 and --warmup >= 0, got {reps} and {warmup}")
    threads = args.threads if args.threads is not None else (1 if args.quick else None)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    compile_ = (not args.quick) if args.compile is None else args.compile
    out_dir = args.out or default_out_dir()
    for parent in [Path(out_dir)] + list(Path(out_dir).parents):  # before timing anything, not after
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out: {parent} exists and is not a folder")
            break
    if args.time_budget is not None and args.time_budget < 0:
        raise ValueError(f"--time-budget must be >= 0 (0: no limit), got {args.time_budget}")
    path = core.results_path(out_dir, device, args.quick)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    say(f"midus bench: {', '.join(chosen)} on {device} ({profile} sizes, {reps} runs after {warmup} warm-up"
        f"{', no torch.compile' if not compile_ else ''}) -> {path}")

    # Everything imported so far (torch, transformers) leaves the collector's view: the
    # gc.collect() between cases then costs milliseconds instead of half a second.
    for subject in chosen:
        subject_module(subject)
    gc.collect()
    gc.freeze()
    try:
        return _run(args, chosen, device, profile, reps, warmup, compile_, path)
    finally:
        gc.unfreeze()


def _run(args, chosen, device, profile, reps, warmup, compile_, path) -> int:
    from . import core, report

    budget = core.Budget(args.time_budget)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    failed = False
    records: List[Dict[str, Any]] = []
    for subject, cases in chosen.items():
        mod = subject_module(subject)
        old: List[Dict[str, Any]] = []
        if cases is not None and os.path.exists(path):  # re-running some cases keeps the others
            try:
                prev = core.load_results(path)["subjects"].get(subject, {})
                old = [r for r in prev.get("records", []) if r.get("case") not in cases and r.get("sweep") not in cases]
            except Exception:
                old = []
        ctx = core.Context(device, profile, reps, warmup, compile=compile_, budget=budget, cases=cases,
                           verbose=not args.quiet)
        t0 = time.perf_counter()
        section: Dict[str, Any] = {"env": ctx.env, "profile": profile, "reps": reps, "warmup": warmup,
                                   "compile": compile_, "sizes": mod.SIZES[profile], "complete": False}

        def save(final: bool = False):
            section["records"] = old + ctx.records
            section["seconds"] = round(time.perf_counter() - t0, 1)
            section["targets"] = report.check_targets(section["records"], device, profile, subject)
            section["complete"] = final
            core.save_subject(path, subject, section)

        ctx.on_case = save
        say(f"[{subject}] {mod.__doc__.splitlines()[0]}")
        try:
            if budget.exhausted():  # not even the set-up (building models takes a while)
                section["skipped"] = "time budget exhausted"
            else:
                mod.bench(ctx)
        except Exception as e:  # one subject failing (e.g. out of memory building a model) ends only it
            failed = True
            section["error"] = f"{type(e).__name__}: {e}"[:1000]
            print(f"[{subject}] FAILED: {section['error']}", file=sys.stderr, flush=True)
            if debug_enabled():
                traceback.print_exc()
        ctx._free()
        save(final="error" not in section and "skipped" not in section)
        say(f"[{subject}] {section['seconds']:.0f} s")
        records += section["records"]

    print()
    print(report.records_table(records))
    key = report.key_table(records)
    if key:
        print()
        print("Key figures (ratios against baselines measured in the same run):")
        print(key)
    targets = report.check_targets(records, device, profile)
    if targets:
        print()
        if not any(t["applies"] for t in targets):
            print(f"Targets ({'--quick: tiny sizes' if args.quick else device}): none is set for this run's device and "
                  f"sizes, so none is judged; they are shown for information.")
        print(report.targets_table(targets))
    md = write_markdown(path, device, profile)
    print(f"\nresults: {path}\ntables:  {md}")
    env = core.environment(device)
    if device == "cuda" and not all(env.get("midus_ops_kernels", {}).values()):
        print(f"NOTE: midus_ops has no CUDA kernel for {[k for k, v in env['midus_ops_kernels'].items() if not v]} "
              f"here (MIDUS_OPS_CUDA_KERNELS={env.get('MIDUS_OPS_CUDA_KERNELS')!r}): those ops ran the reference.")
    if args.plot:
        from .plot import plot_results

        for p in plot_results(path):
            print(f"plot: {p}")
    return 1 if failed else 0


def write_markdown(path: str, device: str, profile: str) -> str:
    """<results stem>.md beside the results file: the tables of every subject the file holds."""
    from . import core, report

    data = core.load_results(path)
    records = report.all_records(data)
    envs = {s: sec.get("env", {}) for s, sec in data["subjects"].items()}
    lines = [f"# midus benchmarks: {os.path.basename(path)}", ""]
    for s, env in envs.items():
        sec = data["subjects"][s]
        lines.append(f"- {s}: {env.get('device')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, commit "
                     f"{env.get('git_commit')}, {env.get('date')}, {sec.get('reps')} runs, {sec.get('seconds')} s"
                     + ("" if sec.get("complete") else " (incomplete)"))
    key = report.key_table(records)
    if key:
        lines += ["", "## Key figures", "", key]
    targets = report.check_targets(records, device, profile)
    if targets:
        lines += ["", "## Targets", "", report.targets_table(targets)]
    lines += ["", "## All measurements", "", report.records_table(records), ""]
    md = os.path.splitext(path)[0] + ".md"
    with open(md, "w") as f:
        f.write("\n".join(lines))
    return md


def main_subject(subject: str, argv: Optional[List[str]] = None, out: Optional[str] = None,
                 device: Optional[str] = None) -> int:
    """Entry point of benchmarks/bench_<subject>.py: the suite limited to one subject (PARTs may
    name its cases with or without the "<subject>." prefix); results in ``out`` unless --out/$OUT."""
    parser = argparse.ArgumentParser(prog=f"bench_{subject}.py",
                                     description=subject_module(subject).__doc__.split("\n\n")[0])
    add_arguments(parser, subject)
    if device:
        parser.set_defaults(device=device)
    args = parser.parse_args(argv)
    args.parts = [p if p.startswith(subject) else f"{subject}.{p}" for p in args.parts] or [subject]
    if args.out is None and not results_dir_env():
        args.out = out
    try:
        return run(args)
    except ValueError as err:
        print(f"bench_{subject}.py: error: {err}", file=sys.stderr)
        return 2


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m midus.bench``: the same as ``midus bench``."""
    parser = argparse.ArgumentParser(prog="midus bench", description=__doc__.split("\n\n")[0],
                                     epilog="Subjects: " + ", ".join(SUBJECTS))
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as err:
        if debug_enabled():
            raise
        print(f"midus bench: error: {err}", file=sys.stderr)
        return 2
