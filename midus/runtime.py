"""What every command and the pipeline share: models, devices, output folders, placements.

Below every command (:mod:`midus.cli`, :mod:`midus.compare`, :mod:`midus.analyze`,
:mod:`midus.study`) and beside :mod:`midus.pipeline`; it never imports them. Errors are
``ValueError`` / ``FileNotFoundError`` whose message names the argument (``--model``,
``--output``, ``--placement``), which the command line prints as one line.
"""
from __future__ import annotations

import ctypes
import fnmatch
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

MiB = 2.0 ** 20

__all__ = ["UsageError", "debug_enabled", "torchrun_env", "missing_torchrun_vars", "results_dir_env", "rng_state", "set_rng_state", "add_data_arguments", "eval_split", "resolve_model_path",
           "load_model", "pick_device", "count_parameters", "parse_placement", "check_output", "atomic_output_dir",
           "MODEL_FILE_PATTERNS", "peak_memory"]


class UsageError(Exception):
    """A user error (a bad argument or input): the commands print it as one line, exit status 1."""


# ----------------------------------------------------------------------------- environment
# The package's own environment variables are read here, one reader each (docs/environment.md);
# midus_ops reads its own in midus_ops/ops.py, and the cache folder is midus.defaults's.


def debug_enabled() -> bool:
    """``MIDUS_DEBUG`` set (any non-empty value): user errors raise with their traceback."""
    return bool(os.environ.get("MIDUS_DEBUG"))


def torchrun_env() -> tuple:
    """(rank, world_size, local_rank) from the ``torchrun`` variables ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``; (0, 1, 0) when unset (one process)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def missing_torchrun_vars() -> List[str]:
    """The variables a process group needs (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) that are unset."""
    return [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]


def results_dir_env() -> Optional[str]:
    """``OUT``: the benchmark results folder when ``--out`` is not given (None when unset or empty)."""
    return os.environ.get("OUT") or None


def add_data_arguments(p, split_help: Optional[str]) -> None:
    """The flags of a text source (``--data``, ``--split`` when ``split_help`` is given,
    ``--val-fraction``) on an ``argparse`` parser: shared by the commands that read text."""
    p.add_argument("--data", default="wiki",
                   help="'wiki' (the built-in Wikipedia text), a .txt file, a .jsonl file with a 'text' field "
                        "(either also as .gz, .bz2 or .xz), or a datasets folder (default: wiki)")
    if split_help:
        p.add_argument("--split", choices=["all", "train", "val", "dev", "test"], help=split_help)
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of documents held out as validation (default: 0.1)")


def eval_split(data: str, split: Optional[str]) -> str:
    """The split evaluated when none is given: the validation documents of 'wiki', all of a file."""
    return split or ("val" if data == "wiki" else "all")


def rng_state() -> dict:
    """This process's Python, torch and (where present) CUDA RNG states, for a checkpoint."""
    import random

    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    import random

    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def resolve_model_path(model: str) -> str:
    """A local model folder for ``model``: "default" (SmolLM2-135M-Instruct, fetched and converted
    on first use, :func:`midus.defaults.default_model_path`), another name of
    :data:`midus.defaults.NAMED_MODELS` ("gemma3-270m") or a folder with a config.json.
    Raises FileNotFoundError / ValueError naming ``--model``."""
    from . import defaults

    if model in defaults.NAMED_MODELS:
        return getattr(defaults, defaults.NAMED_MODELS[model])()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"--model: model path not found: {model} (give a local Hugging Face model folder "
                                f"or 'default')")
    if not (path / "config.json").is_file():
        raise ValueError(f"--model: {model} has no config.json: not a Hugging Face model folder")
    return str(path)


def load_model(model: str, device=None, need_tokenizer: bool = True):
    """(model, tokenizer, path) for a local folder or "default"; fp32 weights, eval mode.

    Importing midus registers the MIDUS classes, so up-scaled folders load too. Raises
    FileNotFoundError / ValueError naming ``--model`` if the path is not a model folder or, with
    ``need_tokenizer``, holds no tokenizer (without it the tokenizer is then None).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import midus  # noqa: F401  (registers MidusConfig / MidusForCausalLM)

    path = resolve_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        if need_tokenizer:
            raise ValueError(f"--model: cannot load a tokenizer from {path}: {err}") from None
        tokenizer = None
    net = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if device is not None:
        net.to(device)
    return net.eval(), tokenizer, path


def pick_device(name: str = "auto"):
    """``torch.device`` for "auto" (CUDA when visible, else CPU), "cpu" or "cuda". Raises
    ValueError naming ``device`` for another name or for "cuda" without a visible GPU."""
    import torch

    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def count_parameters(model) -> int:
    """Number of parameters, tied ones (e.g. embeddings and LM head) counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def parse_placement(text: Union[str, List[int]]) -> Union[str, List[int]]:
    """A placement name ("distributed", ...) as it is, or "2,6,10" as [2, 6, 10] (a list passes
    through). Raises ValueError naming ``--placement`` for a malformed list."""
    if isinstance(text, (list, tuple)):
        return [int(x) for x in text]
    if "," in text or text.strip().isdigit():
        try:
            return [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--placement: expected a name or a comma-separated list of layer indices, got {text!r}")
    return text


# What save_pretrained (model, tokenizer, generation config, remote code) writes into a model
# folder: an existing --output holding only these is one this tool may replace.
MODEL_FILE_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                       "pytorch_model*.bin", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
                       "vocab.json", "vocab.txt", "merges.txt", "chat_template.*", "modeling_*.py",
                       "configuration_*.py", "*.gguf", "train_log.jsonl")


def _is_model_config(path: Path) -> bool:
    try:
        return "model_type" in json.loads(path.read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_output(output: str) -> None:
    """An existing --output is replaced whole, so it must be a folder this tool could have written:
    empty, or a model folder (a config.json with a model_type, and nothing but the files
    save_pretrained writes). Anything else (other files or subfolders, the working folder or one
    of its parents) is refused rather than deleted: ValueError naming ``--output``."""
    path = Path(output).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output: {output} exists and is not a folder")
    if path.is_dir():
        resolved, cwd = path.resolve(), Path.cwd().resolve()
        if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve():
            raise ValueError(f"--output: {output} is the working folder, one of its parents or the home folder; "
                             f"it would be replaced whole: name a new folder")
        entries = list(path.iterdir())
        if entries and not _is_model_config(path / "config.json"):
            raise ValueError(f"--output: {output} is a non-empty folder that is not a model folder (no config.json "
                             f"with a model_type); it would be replaced whole: name a new or empty folder")
        others = sorted(e.name + ("/" if e.is_dir() else "") for e in entries
                        if e.is_dir() or not any(fnmatch.fnmatch(e.name, pat) for pat in MODEL_FILE_PATTERNS))
        if others:
            raise ValueError(f"--output: {output} holds files that are not part of a saved model "
                             f"({', '.join(others[:4])}{', ...' if len(others) > 4 else ''}); it would be replaced "
                             f"whole: move them, or name a new folder")


def _raise_on_sigterm():
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    try:
        return signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        return None


def _restore_sigterm(previous) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def atomic_output_dir(output: str):
    """Yield a temp folder beside ``output``; on success it replaces ``output`` (rename), on any
    error it is deleted and ``output`` is left exactly as it was (:func:`check_output` first)."""
    check_output(output)
    final = Path(output).expanduser().absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    # SIGTERM (a scheduler's kill, `timeout`) would end the process without unwinding and leave the
    # hidden temp folder behind: turn it into an exception for the time the folder exists.
    previous = _raise_on_sigterm()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _restore_sigterm(previous)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- peak memory

_MALLOC_PINNED = False


def _pin_malloc() -> None:
    """Pin glibc's mmap threshold (M_MMAP_THRESHOLD = -3) at 64 KiB: freed tensors leave the RSS."""
    global _MALLOC_PINNED
    if _MALLOC_PINNED:
        return
    _MALLOC_PINNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)
        libc.malloc_trim(0)
    except OSError:  # not glibc: the measure is still right, only coarser
        pass


def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], Any], device: str) -> Dict[str, Any]:
    """Run ``fn()`` once; return ``peak_extra_mib`` (peak above the memory held before the call),
    ``held_mib`` (held before the call), ``memory_method`` and ``result`` (what ``fn`` returned).

    CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``. CPU: the
    process's peak resident set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``) minus
    its resident set before; glibc's mmap threshold is pinned at 64 KiB so freed tensors leave
    the resident set; where ``clear_refs`` cannot be written, the growth of ``ru_maxrss`` (a lower
    bound). (Tensors are freed by reference counting; no gc.collect here, it costs more than most
    of the calls measured.)"""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_extra_mib": (peak - before) / MiB, "held_mib": before / MiB,
                "memory_method": "torch.cuda.max_memory_allocated", "result": out}
    import resource

    _pin_malloc()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    rss0 = _proc_status_kib("VmRSS")
    if rss0 is not None and _reset_hwm():
        out = fn()
        hwm = _proc_status_kib("VmHWM") or rss0
        return {"peak_extra_mib": max(hwm - rss0, 0) / 1024, "held_mib": rss0 / 1024,
                "memory_method": "VmHWM - VmRSS (clear_refs)", "result": out}
    max0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = fn()
    max1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_extra_mib": (max1 - max0) / 1024, "held_mib": None,
            "memory_method": "ru_maxrss growth (a lower bound)", "result": out}
