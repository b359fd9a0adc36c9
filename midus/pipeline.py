"""One experiment, end to end: load -> up-scale -> continued pre-training -> evaluation -> a result row.

``midus run``, every row of ``midus compare`` and every run of ``midus study`` go through
:func:`run_experiment`, so they up-scale, train and measure the same way:

- the model ("default" or a local folder) is loaded in fp32 and up-scaled with
  :func:`midus.upscale` (``method=None``: the base model as it is);
- training (optional) is :func:`midus.train.train` on the ``train`` split, with a
  :class:`~midus.train.TrainConfig` given as a dict of its fields (the memory recipe included);
- perplexity (:func:`midus.evaluate.perplexity`) on the first ``eval_tokens`` tokens of each of
  ``eval_splits`` ("dev", "test", "val", ...; :func:`midus.data.load_corpus`) after training, and
  optionally of the base model and of the up-scaled model before training;
- ``curve_steps``: dev perplexity during training at those steps (0: before the first step), a
  learning curve;
- ``health``: :func:`midus.analyze.memory_health` after training (models with memory blocks);
- ``tasks``: zero-shot accuracy (:func:`midus.zeroshot.evaluate_zero_shot`).

Peak memory during training is :func:`midus.runtime.peak_memory` (CUDA max allocated, or the
process's peak resident set on a CPU), the same measurement as the benchmark suite's. The result row is a JSON-serialisable dict.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from .runtime import count_parameters, load_model, peak_memory, pick_device

__all__ = ["Experiment", "run_experiment", "experiment_dict", "curve_steps"]


def curve_steps(steps: int, points: int) -> List[int]:
    """Step 0 and ``points`` checkpoints spread evenly up to ``steps`` (the last is ``steps``): the
    learning-curve steps of ``midus study`` and ``midus compare --curves``."""
    return sorted({0} | {max(1, round(steps * i / points)) for i in range(1, points + 1)})


@dataclass
class Experiment:
    """What :func:`run_experiment` does. ``method`` None is the base model (no up-scaling);
    ``upscale_options`` are :func:`midus.upscale`'s keyword options (memory or LESA options);
    ``train`` None means no training, else :class:`~midus.train.TrainConfig` fields (``max_steps``,
    ``lr``, the memory recipe, ...; ``progress`` and ``seed`` included)."""
    model: str = "default"
    data: str = "wiki"
    val_fraction: float = 0.1
    method: Optional[str] = "midus"
    num_blocks: int = 8
    placement: Union[str, List[int], None] = "distributed"  # None: the method's default (midus.upscale)
    calibration_tokens: int = 2048   # placement="importance": first tokens of the train split it measures on
    importance: str = "layer"        # placement="importance": "layer" or "heads" (midus.placement)
    upscale_options: Dict[str, Any] = field(default_factory=dict)
    train: Optional[Dict[str, Any]] = None
    seq_len: int = 128
    eval_splits: Sequence[str] = ("val",)
    eval_tokens: int = 4096
    window: int = 128
    stride: int = 0
    eval_batch_size: int = 8
    eval_base: bool = False          # also the perplexity of the model before up-scaling
    eval_before: bool = False        # also the perplexity of the up-scaled model before training
    curve_steps: Sequence[int] = ()  # dev perplexity at these steps (0: before training)
    curve_split: str = "dev"
    health: bool = False             # memory health after training (models with memory blocks)
    health_split: str = "dev"
    health_tokens: int = 1024
    tasks: Sequence[str] = ()
    limit: int = 0
    time_budget: float = 0.0         # > 0: seconds for the whole experiment; training is cut to fit
    seed: int = 0
    device: str = "auto"
    progress: bool = False


def _log(msg: str) -> None:
    import sys

    print(f"[midus] {msg}", file=sys.stderr, flush=True)


def run_experiment(exp: Experiment, log: Callable[[str], None] = _log, keep_model: bool = False) -> Dict[str, Any]:
    """Run ``exp`` in this process and return its result row (a JSON-serialisable dict):

    ``method``, ``params``, ``params_base``, ``params_added``, ``layers``, ``device``, ``setup_s``;
    ``ppl`` {split: perplexity after training}, ``eval_tokens`` {split: tokens scored}, ``eval_s``
    (seconds of all perplexity evaluations), ``load_s``;
    ``ppl_base`` / ``ppl_before`` (when asked); with training ``train_steps``, ``train_tokens``,
    ``train_s``, ``s_per_step``, ``tokens_per_s``, ``trainable``, ``trainable_params``,
    ``final_loss``, ``losses``, ``peak_memory_mib``, ``peak_memory_kind``, ``stopped_early``,
    ``recipe`` (the memory recipe); ``curve`` [{step, ppl}] with ``curve_steps``; ``health``
    (:func:`midus.analyze.memory_health`); ``zero_shot`` with ``tasks``; ``wall_s``. With
    ``keep_model`` the trained model and tokenizer are returned too, as ``row["_model"]`` and
    ``row["_tokenizer"]`` (not serialisable; pop them). Raises ValueError for bad settings.
    """
    import torch

    import midus
    from .data import load_corpus, pack_sequences
    from .evaluate import perplexity
    from .train import TrainConfig, recipe_of, train

    t0 = time.time()
    device = pick_device(exp.device)
    torch.manual_seed(exp.seed)
    cfg = TrainConfig(**{"seed": exp.seed, "progress": exp.progress, **exp.train}) if exp.train is not None else None
    base, tokenizer, path = load_model(exp.model, device)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    eval_ids: Dict[str, torch.Tensor] = {}

    def ids_of(split: str, tokens: int) -> torch.Tensor:
        key = f"{split}:{tokens}"
        if key not in eval_ids:
            eval_ids[key] = load_corpus(exp.data, tokenizer, split=split, val_fraction=exp.val_fraction,
                                        max_tokens=tokens)
        return eval_ids[key]

    eval_s = [0.0]

    def ppl(model, split: str):
        r = perplexity(model, ids_of(split, exp.eval_tokens), window=exp.window, stride=exp.stride,
                       batch_size=exp.eval_batch_size, device=device, autocast_dtype=autocast)
        eval_s[0] += r.seconds
        return r

    row: Dict[str, Any] = {"method": exp.method or "base", "model_path": path, "device": str(device),
                           "seed": exp.seed, "load_s": time.time() - t0}
    n_base = count_parameters(base)
    if exp.eval_base:
        r = ppl(base, exp.eval_splits[0])
        row["ppl_base"] = {exp.eval_splits[0]: r.ppl}
        log(f"base perplexity ({exp.eval_splits[0]}) {r.ppl:.3f}")
    if exp.method is not None:
        extra = {}
        if exp.placement == "importance":  # measured on the training text, never on dev/test
            extra = {"calibration": ids_of("train", exp.calibration_tokens), "importance": exp.importance}
        model = midus.upscale(base, exp.method, num_blocks=exp.num_blocks, placement=exp.placement, **extra,
                              **exp.upscale_options).to(device)
        del base
    else:
        model = base
    row.update(params=count_parameters(model), params_base=n_base, params_added=count_parameters(model) - n_base,
               layers=int(model.config.get_text_config().num_hidden_layers), setup_s=time.time() - t0)
    record = getattr(model.config, "midus_upscale", None) or {}
    if record:
        row["base_layers"] = record["base_layers"]
    if record.get("memory_options"):
        row["memory_options"] = record["memory_options"]
    last_eval_s = 0.0
    if exp.eval_before:
        r = ppl(model, exp.eval_splits[0])
        row["ppl_before"] = {exp.eval_splits[0]: r.ppl}
        last_eval_s = r.seconds
        log(f"up-scaled perplexity before training ({exp.eval_splits[0]}) {r.ppl:.3f}")

    if cfg is not None:
        seqs = pack_sequences(load_corpus(exp.data, tokenizer, split="train", val_fraction=exp.val_fraction),
                              exp.seq_len)
        curve: List[Dict[str, float]] = []
        steps = sorted(set(int(s) for s in exp.curve_steps))
        if 0 in steps:
            curve.append({"step": 0, "ppl": ppl(model, exp.curve_split).ppl})

        def on_step(step: int, net) -> None:
            if step in steps:
                r = ppl(net, exp.curve_split)
                curve.append({"step": step, "ppl": r.ppl})
                log(f"step {step}: {exp.curve_split} perplexity {r.ppl:.3f}")

        if exp.time_budget > 0:
            # Training gets what is left after the evaluations still to come (timed like the last).
            reserve = 1.2 * (last_eval_s or 0.0) * (len(exp.eval_splits) + (0.5 if exp.health else 0.0)) + 10.0
            cfg.max_seconds = max(30.0, exp.time_budget - (time.time() - t0) - reserve)
        mem = peak_memory(lambda: train(model, seqs, cfg, callback=on_step if steps else None), str(device))
        result = mem.pop("result")
        row.update(train_steps=result.steps, train_tokens=result.tokens, train_s=result.seconds,
                   s_per_step=result.seconds / max(result.steps, 1), tokens_per_s=result.tokens_per_s,
                   trainable=result.trainable, trainable_params=result.trainable_params,
                   final_loss=result.final_loss, losses=result.losses,
                   peak_memory_mib=(mem["held_mib"] or 0.0) + mem["peak_extra_mib"],
                   peak_memory_kind=mem["memory_method"], stopped_early=result.steps < cfg.max_steps, max_steps=cfg.max_steps,
                   lr=cfg.lr, recipe=recipe_of(cfg))
        if steps:
            row["curve"] = curve
    model.eval()
    row["ppl"], row["eval_tokens"] = {}, {}
    for split in exp.eval_splits:
        r = ppl(model, split)
        row["ppl"][split], row["eval_tokens"][split] = r.ppl, r.tokens
    if exp.health:
        from .analyze import memory_blocks, memory_health

        try:
            memory_blocks(model)
        except ValueError:
            pass  # no memory blocks: nothing to say
        else:
            row["health"] = memory_health(model, ids_of(exp.health_split, exp.health_tokens), window=exp.window,
                                          batch_size=exp.eval_batch_size, seed=exp.seed, device=device)
    if exp.tasks:
        from .zeroshot import evaluate_zero_shot, resolve_tasks

        t1 = time.time()
        row["zero_shot"] = evaluate_zero_shot(model, tokenizer, resolve_tasks(list(exp.tasks)),
                                              limit=exp.limit or None, device=device, autocast_dtype=autocast,
                                              progress=exp.progress)
        row["zero_shot_s"] = time.time() - t1
    row["eval_s"] = eval_s[0]
    row["wall_s"] = time.time() - t0
    if keep_model:
        row["_model"], row["_tokenizer"] = model, tokenizer
    return row


def experiment_dict(exp: Experiment) -> Dict[str, Any]:
    """``exp`` as a JSON-serialisable dict (for result files and worker processes)."""
    d = asdict(exp)
    for key in ("eval_splits", "curve_steps", "tasks"):
        d[key] = list(d[key])
    return d
