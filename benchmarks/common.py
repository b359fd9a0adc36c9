"""Shared pieces of the benchmark scripts: timing, environment record, results files, baselines.

Timing: on CUDA, CUDA events; on CPU, wall time (time.perf_counter). Each measurement is the
median (with min and max) of `reps` runs after `warmup` runs.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def time_ms(fn: Callable[[], object], reps: int = 20, warmup: int = 3, device: str = "cpu") -> Dict[str, float]:
    """Median, min and max milliseconds of `fn()` over `reps` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def environment(device: str = "cpu") -> Dict[str, object]:
    """What the figures were measured on: device, versions, threads, commit, date."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "git_commit": _git_commit(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    else:
        env["device"] = f"CPU: {env['cpu']} ({env['threads']} threads)"
    try:
        import midus_ops
        env["midus_ops_extension"] = midus_ops.EXTENSION_AVAILABLE
    except Exception:
        env["midus_ops_extension"] = False
    return env


def write_results(name: str, payload: Dict[str, object], out_dir: str | None = None) -> str:
    """Write payload to <out_dir or $OUT or benchmarks/results>/<name>_<device>_<date>.json."""
    out_dir = out_dir or os.environ.get("OUT") or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    dev = "cuda" if str(payload.get("env", {}).get("device", "")).lower().find("cpu") < 0 else "cpu"
    day = datetime.date.today().isoformat()
    path = os.path.join(out_dir, f"{name}_{dev}_{day}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return path


def hml_eager(q, subkeys, k, bank, proj, tau: float = 1.0):
    """What a user writes without midus_ops (the ANCHORS.md "eager reference"): einsum scoring,
    torch.topk per half, cartesian top-k, gather of [N, H, k, d_z], einsum projection.
    No tie rule (torch.topk's own), so it is the fast eager baseline, not the spec's reference."""
    n, half = subkeys.shape[2], subkeys.shape[3]
    s1 = torch.einsum("thd,hid->thi", q[..., :half], subkeys[:, 0])
    s2 = torch.einsum("thd,hid->thi", q[..., half:], subkeys[:, 1])
    v1, a = s1.topk(k, dim=-1)
    v2, b = s2.topk(k, dim=-1)
    cand = (v1[..., :, None] + v2[..., None, :]).flatten(-2)
    cand_idx = (a[..., :, None] * n + b[..., None, :]).flatten(-2)
    scores, j = cand.topk(k, dim=-1)
    idx = cand_idx.gather(-1, j)
    w = torch.softmax(scores.float() / tau, dim=-1).to(bank.dtype)
    u = (w[..., None] * bank[idx]).sum(dim=2)
    return torch.einsum("thz,hzv->thv", u, proj) if proj is not None else u
