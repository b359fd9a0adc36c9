"""Measurement core of the benchmark suite: timing, peak memory, environment, records, results file.

Timing. On CUDA, CUDA events around each run with a synchronisation after it (each run is timed
alone, launch overhead included, nothing queued behind it); on CPU, ``time.perf_counter``. The
implementations of one case are timed interleaved (rep 1 of A, B, C, then rep 2, ...) so that a
slow phase of a shared machine hits them all alike, and the ratios between them, which are what the
targets are stated in, stay fair. Each result gives the median, min, max and quartiles of ``reps``
runs after ``warmup`` runs.

Peak memory, in MiB, of one extra run after the timed ones:

- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus what was
  allocated before the run (``peak_extra_mib``: activations, saved tensors, gradients, workspace;
  not the inputs or parameters that exist before the call).
- CPU: the process's peak resident set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``)
  minus its resident set before the run. tracemalloc does not see torch's allocations, and
  ``ru_maxrss`` never goes down, so it would hide every peak below an earlier one. glibc's
  dynamic mmap threshold is pinned at 64 KiB (``mallopt``) so that freed tensors go back to the
  system instead of staying in the heap, where the next run would reuse them unseen. The figure
  is page-granular and includes allocator slack; where ``clear_refs`` cannot be written it is
  the growth of ``ru_maxrss`` (``memory_method`` says which).
"""
from __future__ import annotations

import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

MiB = 2.0 ** 20
SCHEMA = "midus-bench/1"


# ----------------------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _summary(times: List[float], warmup: int) -> Dict[str, float]:
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "p25": q[0], "p75": q[2],
            "reps": len(times), "warmup": warmup}


def time_interleaved(fns: Dict[str, Callable[[], Any]], reps: int, device: str) -> Dict[str, Dict[str, float]]:
    """Milliseconds of each ``fns[name]()`` over ``reps`` interleaved rounds (warm-up done by the caller)."""
    cuda = device.startswith("cuda")
    times: Dict[str, List[float]] = {name: [] for name in fns}
    sync(device)
    for _ in range(reps):
        for name, fn in fns.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: t for name, t in times.items()}


def time_ms(fn: Callable[[], Any], reps: int = 20, warmup: int = 3, device: str = "cpu") -> Dict[str, float]:
    """Median, min, max (and quartiles) milliseconds of ``fn()`` over ``reps`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    return _summary(time_interleaved({"fn": fn}, reps, device)["fn"], warmup)


# ----------------------------------------------------------------------------- memory

# One parameter count and one peak-memory measurement for the suite and midus compare/study (midus.runtime).
from midus.runtime import count_parameters as count_params, peak_memory  # noqa: E402


def tensor_mib(*modules_or_tensors) -> float:
    """MiB of the parameters and buffers of modules (or of tensors)."""
    total = 0
    for m in modules_or_tensors:
        tensors = list(m.parameters()) + list(m.buffers()) if isinstance(m, torch.nn.Module) else [m]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total / MiB


# ----------------------------------------------------------------------------- environment


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """Short commit (+ "-dirty") of the checkout midus runs from, else of the working folder if it is
    a midus checkout, else $MIDUS_GIT_COMMIT or "unknown" (an installed copy has no git history)."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for folder in (here, os.getcwd()):
        if not os.path.isfile(os.path.join(folder, "midus", "__init__.py")):
            continue
        try:
            out = subprocess.run(["git", "-C", folder, "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True, timeout=10)
            if out.returncode != 0:
                continue
            dirty = subprocess.run(["git", "-C", folder, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            continue
    return os.environ.get("MIDUS_GIT_COMMIT", "unknown")


def device_slug(device: str) -> str:
    """"cpu", or the GPU's name in lower case with dashes ("nvidia-h200"): the results file's device."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return "cpu"


def environment(device: str = "cpu") -> Dict[str, Any]:
    """What the figures were measured on: device, versions, threads, commit, date, kernels used."""
    env: Dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "git_commit": git_commit(),
    }
    try:
        env["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
    else:
        env["device"] = f"CPU: {env['cpu']} ({env['threads']} threads)"
    try:
        import midus_ops

        dev = torch.device("cuda" if device.startswith("cuda") else "cpu")
        env["midus_ops_extension"] = midus_ops.EXTENSION_AVAILABLE
        env["midus_ops_kernels"] = {op: midus_ops.has_kernel(op, dev)
                                    for op in ("pk_topk", "pk_topk_backward", "hive_gather", "hive_gather_backward")}
        env["MIDUS_OPS_CUDA_KERNELS"] = midus_ops.ops.CUDA_KERNELS_SETTING  # read once, where the ops read it
    except Exception as e:  # the record says why rather than failing the run
        env["midus_ops_extension"] = f"import failed: {e}"
    return env


# ----------------------------------------------------------------------------- cases and records


@dataclass
class Impl:
    """One implementation of a case: callables per mode (``None``: not measured in that mode).

    ``setup_error``: the implementation could not be built (recorded, not raised).
    ``params`` / ``param_mib``: for modules (parameters counted in the reported peak).
    ``tokens``: tokens processed per call (for tokens/s). ``dtype``: when it differs from the case's.
    """

    modes: Dict[str, Optional[Callable[[], Any]]] = field(default_factory=dict)
    params: Optional[int] = None
    param_mib: float = 0.0
    tokens: Optional[int] = None
    dtype: Optional[str] = None
    note: Optional[str] = None
    setup_error: Optional[str] = None


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:400]


class Budget:
    """A soft wall-clock budget: cases that start after the deadline are recorded as skipped."""

    def __init__(self, seconds: float = 0.0):
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + seconds if seconds and seconds > 0 else math.inf

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def exhausted(self) -> bool:
        return self.left() <= 0


class Context:
    """Everything a subject needs: device, dtype, size profile, repetitions, budget, and the sink
    where its records go (saved to the results file after every case, so a time-out keeps them)."""

    def __init__(self, device: str, profile: str, reps: int, warmup: int, compile: bool = True,
                 budget: Optional[Budget] = None, cases: Optional[List[str]] = None, verbose: bool = True,
                 on_case: Optional[Callable[[], None]] = None):
        self.device = device
        self.profile = profile
        self.dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.reps = reps
        self.warmup = warmup
        self.compile = compile
        self.budget = budget or Budget()
        self.cases = cases  # None: all; else case names to run
        self.verbose = verbose
        self.on_case = on_case
        self.records: List[Dict[str, Any]] = []
        self.env = environment(device)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def log(self, msg: str) -> None:
        if self.verbose:
            print(msg, flush=True)

    def wants(self, case: str) -> bool:
        return self.cases is None or case in self.cases

    def run_case(self, subject: str, case: str, impls: Dict[str, Impl], *, baseline: str, shape: Dict[str, Any],
                 modes: List[str], reps: Optional[int] = None, extra: Optional[Dict[str, Any]] = None,
                 memory: bool = True) -> List[Dict[str, Any]]:
        """Time (interleaved) and measure every implementation of one case in each mode; append the
        records, with ratios against ``baseline`` (and against ``<impl>[eager]`` where it exists)."""
        reps = reps or self.reps
        dtype = str(self.dtype).replace("torch.", "")
        common = {"subject": subject, "case": case, "baseline": baseline, "shape": shape, "dtype": dtype,
                  "device": self.env["device"], "torch": self.env["torch"], "cuda": self.env["cuda"],
                  "git_commit": self.env["git_commit"], **(extra or {})}
        out: List[Dict[str, Any]] = []
        if self.budget.exhausted():
            for name in impls:
                for mode in modes:
                    out.append({**common, "impl": name, "mode": mode, "skipped": "time budget exhausted"})
            self.log(f"  {subject}/{case}: skipped (time budget exhausted)")
            self._emit(out)
            return out
        for mode in modes:
            live: Dict[str, Callable[[], Any]] = {}
            recs: Dict[str, Dict[str, Any]] = {}
            for name, impl in impls.items():
                rec = {**common, "impl": name, "mode": mode}
                if impl.dtype:
                    rec["dtype"] = impl.dtype
                for key in ("params", "tokens", "note"):
                    if getattr(impl, key) is not None:
                        rec[key] = getattr(impl, key)
                fn = impl.modes.get(mode)
                recs[name] = rec
                if impl.setup_error:
                    rec["error"] = impl.setup_error
                    continue
                if fn is None:
                    rec["skipped"] = "not applicable"
                    continue
                try:  # warm-up (first call timed: compile time for torch.compile'd functions)
                    t0 = time.perf_counter()
                    fn()
                    sync(self.device)
                    rec["first_call_s"] = time.perf_counter() - t0
                    for _ in range(max(self.warmup - 1, 0)):
                        fn()
                    live[name] = fn
                except Exception as e:  # e.g. out of memory, an unsupported dtype: reported, not fatal
                    rec["error"] = _err(e)
                    self._free()
            try:
                times = time_interleaved(live, reps, self.device) if live else {}
            except Exception as e:
                for name in live:
                    recs[name]["error"] = _err(e)
                times = {}
            for name, t in times.items():
                recs[name]["time_ms"] = _summary(t, self.warmup)
                if memory:
                    try:
                        mem = peak_memory(live[name], self.device)
                        mem.pop("result")
                        recs[name].update(mem)
                        recs[name]["peak_mib"] = recs[name]["peak_extra_mib"] + impls[name].param_mib
                    except Exception as e:
                        recs[name]["memory_error"] = _err(e)
                tok = recs[name].get("tokens")
                if tok:
                    recs[name]["tokens_per_s"] = tok / (recs[name]["time_ms"]["median"] * 1e-3)
                if impls[name].params is not None:
                    recs[name]["param_mib"] = impls[name].param_mib
            _ratios(recs, baseline)
            out.extend(recs.values())
            for rec in recs.values():
                self.log("  " + _line(rec))
        self._free()
        self._emit(out)
        return out

    def _emit(self, recs: List[Dict[str, Any]]) -> None:
        self.records.extend(recs)
        if self.on_case:
            self.on_case()

    def _free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def _ratios(recs: Dict[str, Dict[str, Any]], baseline: str) -> None:
    """speedup = t(baseline) / t(impl); time_ratio = its inverse; memory_ratio = peak(impl) / peak(baseline).
    Also ``speedup_vs_eager`` against ``<impl>[eager]``, the same module with the eager PyTorch ops."""
    def med(r):
        return r.get("time_ms", {}).get("median")

    b = recs.get(baseline, {})
    for name, r in recs.items():
        if med(r) and med(b):
            r["speedup"] = med(b) / med(r)
            r["time_ratio"] = med(r) / med(b)
        if r.get("peak_mib") is not None and b.get("peak_mib"):
            r["memory_ratio"] = r["peak_mib"] / b["peak_mib"]
        twin = recs.get(f"{name}[eager]")
        if twin is not None and med(r) and med(twin):
            r["speedup_vs_eager"] = med(twin) / med(r)
            if r.get("peak_mib") is not None and twin.get("peak_mib"):
                r["memory_ratio_vs_eager"] = r["peak_mib"] / twin["peak_mib"]


def _line(r: Dict[str, Any]) -> str:
    head = f"{r['subject']}/{r['case']:<22} {r['impl']:<26} {r['mode']:<12}"
    if "time_ms" not in r:
        return head + (f" ERROR {r['error'][:100]}" if "error" in r else f" skipped ({r.get('skipped')})")
    t = r["time_ms"]
    s = f"{head} {t['median']:10.3f} ms [{t['min']:.3f}, {t['max']:.3f}]"
    if r.get("peak_mib") is not None:
        s += f"  peak {r['peak_mib']:9.1f} MiB"
    if r.get("speedup") is not None and r["impl"] != r["baseline"]:
        s += f"  {r['speedup']:6.2f}x vs {r['baseline']}"
    return s


# ----------------------------------------------------------------------------- results file


def results_path(out_dir: str, device: str, quick: bool, day: Optional[str] = None) -> str:
    """<out_dir>/bench_<device>_<date>.json (bench_quick_... for --quick runs, which git ignores)."""
    day = day or datetime.date.today().isoformat()
    return os.path.join(out_dir, f"bench{'_quick' if quick else ''}_{device_slug(device)}_{day}.json")


def load_results(path: str) -> Dict[str, Any]:
    with open(path) as f:
        data = json.load(f)
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a midus benchmark results file (schema {data.get('schema')!r}, "
                         f"expected {SCHEMA!r})")
    return data


def save_subject(path: str, subject: str, section: Dict[str, Any]) -> None:
    """Write (or replace) one subject's section of the results file, keeping the others: one file
    per device and date, whichever subjects were run into it and in how many commands. Written to a
    temporary file first and renamed, so an interrupted write never leaves half a file."""
    data: Dict[str, Any] = {"schema": SCHEMA, "subjects": {}}
    if os.path.exists(path):
        try:
            data = load_results(path)
        except (ValueError, json.JSONDecodeError):
            pass  # a foreign or broken file is replaced
    data["subjects"][subject] = section
    data["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


@contextmanager
def env_var(name: str, value: Optional[str]):
    """Set (or unset, with None) an environment variable for the duration."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
