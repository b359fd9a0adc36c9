"""Continued pre-training (CPT) of an up-scaled model (docs/design.md §3.4).

- Optimizer: AdamW with three parameter groups. ``memory_kv``: the key/value parameters of the
  memory layers (``subkeys``, ``bank``, ``proj`` of a HeadwiseMemoryLayer; ``subkeys``, ``values``
  of a ProductKeyMemory; :func:`midus.memory_parameter_names`): weight decay 0 and their own LR
  recipe (:class:`TrainConfig` ``memory_lr*`` and ``memory_max_grad_norm``, see
  :data:`MEMORY_RECIPES`). ``decay``: every other matrix: linear warm-up then cosine decay to 0
  (transformers' ``get_cosine_schedule_with_warmup``), the usual weight decay. ``no_decay``: norms
  and biases: the same schedule, weight decay 0.
- ``trainable``: "new" (only the inserted blocks, :func:`midus.new_parameter_names`) or "all";
  "auto" picks the method's default from ``model.config.midus_upscale["method"]``: "new" for
  midus, llama_pro, avg_deus and opt_deus (OpT-DeUS trains its new layers only: its shorter
  back-propagation with top placement depends on it), "all" for dus, solar and lesa (and for
  models not produced by ``upscale``).
- Gradient accumulation, gradient clipping, bf16 autocast on GPU, a tqdm bar with loss and
  tokens/s, a JSONL log (one record per optimizer step).
- Checkpoints (``checkpoint-<step>/``: model.safetensors, optimizer.pt, scheduler.pt, RNG states
  of every rank, trainer_state.json with the data position), written to a temp folder and
  renamed, and exact resume: the data order is a pure function of (seed, epoch), so the position
  is the step count.
- One process, or several under ``torchrun`` (DistributedDataParallel; gloo on CPU, NCCL on
  GPU): each rank reads its share of every global batch (``DistributedSampler`` order), so a run
  on R ranks with micro-batch B matches one process with micro-batch R * B.
- ``fsdp=True`` (``midus train --fsdp``): the same loop with the model sharded by FSDP2 instead of
  replicated by DDP (:mod:`midus.distributed`): parameters, gradients and AdamW state split over
  the ranks, the same parameter groups and clipping (over the sharded gradients), checkpoints
  written with ``torch.distributed.checkpoint`` that resume on any number of processes. The model
  stays sharded after :func:`train`; :func:`midus.distributed.gather_model` /
  :func:`midus.distributed.save_pretrained` give the plain model / the Hugging Face folder.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DistributedSampler

from .runtime import rng_state, set_rng_state
# The settings and their command-line flags live in a module without torch (`midus --help` stays fast).
from .train_config import (MEMORY_LR_SCHEDULES, MEMORY_RECIPES, RECIPE_FIELDS, TrainConfig,  # noqa: F401
                           add_recipe_arguments, recipe_from_args)

__all__ = ["TrainConfig", "TrainResult", "train", "resolve_trainable", "build_param_groups", "build_optimizer",
           "build_scheduler", "init_distributed", "dist_info", "latest_checkpoint", "MEMORY_LR_SCHEDULES",
           "RECIPE_FIELDS", "MEMORY_RECIPES", "add_recipe_arguments", "recipe_from_args", "recipe_of"]

# Methods whose default is to train only the inserted blocks (docs/design.md §3.4, [project] defaults).
_NEW_BY_DEFAULT = ("midus", "llama_pro", "avg_deus", "opt_deus")


@dataclass
class TrainResult:
    """What :func:`train` did. ``losses``: mean training loss of each step run in this call;
    ``tokens``: tokens (all ranks) of those steps; ``tokens_per_s``: tokens / ``seconds`` of
    stepping (checkpoint writing excluded)."""
    steps: int
    final_loss: float
    losses: List[float] = field(default_factory=list)
    lrs: List[Dict[str, float]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    trainable: str = "all"
    trainable_params: int = 0
    last_checkpoint: Optional[str] = None


# ----------------------------------------------------------------------------- distributed


def dist_info():
    """(rank, world_size, local_rank): from torch.distributed if initialized, else the torchrun
    environment variables, else (0, 1, 0)."""
    from .runtime import torchrun_env

    rank, world, local = torchrun_env()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local
    return rank, world, local


def init_distributed() -> torch.device:
    """Initialize the process group when launched by ``torchrun`` (WORLD_SIZE > 1) and return
    this process's device: ``cuda:LOCAL_RANK`` with NCCL when CUDA is available, else CPU with
    gloo. A no-op (returns cuda:0 or cpu) in a single process."""
    rank, world, local = dist_info()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return torch.device(f"cuda:{local}") if cuda else torch.device("cpu")


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- parameters


def resolve_trainable(model, trainable: str = "auto") -> Set[str]:
    """Set ``requires_grad`` by ``trainable`` and return the names of the trainable parameters.

    "auto": "new" for models up-scaled with midus, llama_pro, avg_deus or opt_deus, "all" otherwise. "new": the
    parameters of the inserted blocks (:func:`midus.new_parameter_names`; ValueError if the
    model was not produced by ``midus.upscale``). The model is changed in place.
    """
    if trainable not in ("auto", "new", "all"):
        raise ValueError(f"trainable must be 'auto', 'new' or 'all', got {trainable!r}")
    record = getattr(model.config, "midus_upscale", None) or {}
    if trainable == "auto":
        trainable = "new" if record.get("method") in _NEW_BY_DEFAULT else "all"
    if trainable == "new":
        from . import new_parameter_names

        names = new_parameter_names(model)
    else:
        names = {n for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    if not names:
        raise ValueError(f"trainable={trainable!r} selects no parameters")
    return names


def _no_decay_names(model) -> Set[str]:
    """Biases, 1-D parameters and every parameter of a normalisation module (RMSNorm, LayerNorm,
    a per-head query norm: class name containing "Norm")."""
    out = set()
    for mod_name, mod in model.named_modules():
        is_norm = "norm" in type(mod).__name__.lower()
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if is_norm or p.ndim < 2 or p_name == "bias":
                out.add(full)
    return out


def build_param_groups(model, lr: float, weight_decay: float, memory_lr: Optional[float] = None,
                       memory_lr_schedule: str = "constant", memory_lr_decay_steps: int = 0) -> List[dict]:
    """AdamW parameter groups of docs/design.md §3.4 over the parameters with ``requires_grad``.

    Returns up to three groups (empty ones are left out), each with keys ``params``, ``lr``,
    ``weight_decay``, ``name`` ("memory_kv" | "decay" | "no_decay"), ``schedule`` and
    ``constant_lr`` (True when the group keeps its LR). ``memory_kv`` starts at ``memory_lr``
    (default ``lr``) with schedule ``memory_lr_schedule`` (:data:`MEMORY_LR_SCHEDULES`; "decay"
    reaches ``lr`` after ``memory_lr_decay_steps`` steps, the group's ``decay_to`` and
    ``decay_steps``); the others follow the warm-up + cosine schedule ("cosine").
    """
    from . import memory_parameter_names

    if memory_lr_schedule not in MEMORY_LR_SCHEDULES:
        raise ValueError(f"memory_lr_schedule must be one of {', '.join(MEMORY_LR_SCHEDULES)}, "
                         f"got {memory_lr_schedule!r}")
    memory = memory_parameter_names(model)
    no_decay = _no_decay_names(model)
    buckets: Dict[str, list] = {"memory_kv": [], "decay": [], "no_decay": []}
    seen = set()
    for name, p in model.named_parameters():  # tied parameters appear once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        key = "memory_kv" if name in memory else "no_decay" if name in no_decay else "decay"
        buckets[key].append(p)
    groups = []
    for key, params in buckets.items():
        if not params:
            continue
        group = {"params": params, "lr": lr, "name": key, "schedule": "cosine", "constant_lr": False,
                 "weight_decay": weight_decay if key == "decay" else 0.0}
        if key == "memory_kv":
            group.update(lr=lr if memory_lr is None else memory_lr, schedule=memory_lr_schedule,
                         constant_lr=memory_lr_schedule == "constant")
            if memory_lr_schedule == "decay":
                group.update(decay_to=lr, decay_steps=int(memory_lr_decay_steps))
        groups.append(group)
    return groups


def memory_start_lr(cfg: "TrainConfig") -> float:
    """The LR the memory key/values start at: ``memory_lr``, else ``memory_lr_scale * lr``."""
    return cfg.memory_lr if cfg.memory_lr is not None else cfg.memory_lr_scale * cfg.lr


def build_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """torch AdamW over :func:`build_param_groups` with ``cfg``'s memory recipe (fused on CUDA)."""
    groups = build_param_groups(model, cfg.lr, cfg.weight_decay, memory_lr=memory_start_lr(cfg),
                                memory_lr_schedule=cfg.memory_lr_schedule,
                                memory_lr_decay_steps=cfg.memory_lr_decay_steps)
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def _constant(_step: int) -> float:
    return 1.0


class _LinearTo:
    """LR multiplier going linearly from 1 at step 0 to ``end`` at ``steps``, then ``end``
    (a class, not a closure, so that LambdaLR's state_dict can save it)."""

    def __init__(self, end: float, steps: int):
        self.end, self.steps = float(end), max(1, int(steps))

    def __call__(self, step: int) -> float:
        return 1.0 + (self.end - 1.0) * min(1.0, step / self.steps)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    rest: Optional[Callable[[int], float]] = None) -> LambdaLR:
    """One LambdaLR over the groups of :func:`build_param_groups`, by each group's ``schedule``:
    "constant" keeps the group's LR; "decay" goes linearly from it to ``decay_to`` over
    ``decay_steps`` (0: ``total_steps``), then stays; "cosine" (and groups without a schedule
    key that are not ``constant_lr``) follows ``rest`` (step -> multiplier), by default
    transformers' ``get_cosine_schedule_with_warmup`` (linear 0 -> lr over ``warmup_steps``,
    cosine to 0 at ``total_steps``); :class:`midus.hf_trainer.MidusTrainer` passes the Trainer's."""
    cosine = rest
    if cosine is None:
        from transformers import get_cosine_schedule_with_warmup

        # Take transformers' own schedule function from a throw-away optimizer, so the math is theirs.
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        cosine = get_cosine_schedule_with_warmup(probe, warmup_steps, total_steps).lr_lambdas[0]
    lambdas = []
    for g in optimizer.param_groups:
        schedule = g.get("schedule", "constant" if g.get("constant_lr") else "cosine")
        if schedule == "constant":
            lambdas.append(_constant)
        elif schedule == "decay":
            lambdas.append(_LinearTo(g["decay_to"] / g["lr"], g.get("decay_steps") or total_steps))
        else:
            lambdas.append(cosine)
    return LambdaLR(optimizer, lambdas)


# ----------------------------------------------------------------------------- checkpoints


def latest_checkpoint(checkpoint_dir) -> Optional[str]:
    """The ``checkpoint-<step>`` folder with the highest step in ``checkpoint_dir``, or None."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return None
    found = [(int(p.name.split("-")[1]), p) for p in d.glob("checkpoint-*")
             if p.is_dir() and p.name.split("-")[1].isdigit() and (p / "trainer_state.json").is_file()]
    return str(max(found)[1]) if found else None


def _save_checkpoint(cfg: TrainConfig, step: int, model, optimizer, scheduler, trainer_state: dict) -> str:
    from safetensors.torch import save_model

    rank, world, _ = dist_info()
    rng = [None] * world
    if world > 1:
        dist.all_gather_object(rng, rng_state())
    else:
        rng = [rng_state()]
    final = Path(cfg.checkpoint_dir) / f"checkpoint-{step}"
    if rank == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"))  # handles tied weights
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng, tmp / "rng_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        # Keep the newest keep_checkpoints folders.
        old = sorted((int(p.name.split("-")[1]), p) for p in final.parent.glob("checkpoint-*")
                     if p.name.split("-")[1].isdigit())
        for _, p in old[: max(0, len(old) - max(1, cfg.keep_checkpoints))]:
            shutil.rmtree(p, ignore_errors=True)
    _barrier()
    return str(final)


# Settings a resumed run must share with its checkpoint: they define the optimizer state and the LR
# of every step (the data order too: seed). max_steps may grow; batch sizes and process counts may
# change (FSDP re-shards). A checkpoint written before the memory recipe existed trained the memory
# at the peak LR, constant: MEMORY_RECIPES["paper"].
RESUME_SETTINGS = ("lr", "warmup_steps", "weight_decay", "betas", "eps", "trainable", "seed", "memory_lr",
                   "memory_lr_scale", "memory_lr_schedule", "memory_lr_decay_steps", "memory_max_grad_norm")


def check_resume_settings(cfg: TrainConfig, saved: Optional[dict]) -> None:
    """Raise ValueError naming every setting of :data:`RESUME_SETTINGS` in which ``cfg`` differs
    from ``saved`` (the ``config`` a checkpoint's trainer_state.json records; None: not checked)."""
    if not saved:
        return
    saved = {**MEMORY_RECIPES["paper"], **saved}
    diff = []
    for name in RESUME_SETTINGS:
        if name not in saved:
            continue
        old, new = saved[name], getattr(cfg, name)
        if isinstance(new, tuple):
            old = tuple(old)
        if old != new:
            diff.append(f"{name} {old!r} -> {new!r}")
    if diff:
        raise ValueError(f"resume_from: the checkpoint was trained with other settings ({'; '.join(diff)}); resume "
                         f"with the same ones (only max_steps, batch sizes and the number of processes may change) "
                         f"or start a new run")


def _refuse_sharded_checkpoint(path) -> None:
    p = Path(path)
    if (p / "dcp").is_dir() and not (p / "model.safetensors").is_file():
        raise ValueError(f"resume_from: {p} is a sharded (FSDP) checkpoint; resume it with fsdp=True (--fsdp) under "
                         f"torchrun, on any number of processes")


def _to_float(x) -> float:
    """float() of a gradient norm; under FSDP it is a replicated DTensor."""
    full = getattr(x, "full_tensor", None)
    return float(full() if full is not None else x)


def _load_checkpoint(path: str, model, optimizer, scheduler) -> dict:
    from safetensors.torch import load_model

    p = Path(path)
    if not (p / "trainer_state.json").is_file():
        raise FileNotFoundError(f"resume_from: {p} is not a midus checkpoint (no trainer_state.json)")
    rank, world, _ = dist_info()
    state = json.loads((p / "trainer_state.json").read_text())
    load_model(model, str(p / "model.safetensors"), device=str(next(model.parameters()).device))
    dev = next(model.parameters()).device
    optimizer.load_state_dict(torch.load(p / "optimizer.pt", map_location=dev, weights_only=True))
    scheduler.load_state_dict(torch.load(p / "scheduler.pt", weights_only=True))
    rng = torch.load(p / "rng_state.pt", weights_only=False)  # our own file: python + torch RNG states
    if len(rng) != world:
        print(f"[midus] warning: checkpoint {p} was written by {len(rng)} processes, resuming on {world}: "
              f"the data order after resume differs from an uninterrupted run")
    set_rng_state(rng[rank % len(rng)])
    return state


# ----------------------------------------------------------------------------- the loop


def _step_indices(num_seqs: int, step: int, per_rank: int, seed: int, rank: int, world: int) -> List[int]:
    """Sequence indices this rank trains on at optimizer step ``step`` (0-based). The order is
    DistributedSampler's (a permutation drawn from seed + epoch), so it is a pure function of
    the step: resuming at step s reads exactly what an uninterrupted run would."""
    sampler = DistributedSampler(range(num_seqs), num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    steps_per_epoch = len(sampler) // per_rank
    if steps_per_epoch == 0:
        raise ValueError(f"the training data has {num_seqs} sequences; one optimizer step needs "
                         f"{per_rank * world} (micro_batch_size * grad_accum * world_size)")
    epoch, offset = divmod(step, steps_per_epoch)
    sampler.set_epoch(epoch)
    order = list(sampler)
    return order[offset * per_rank: (offset + 1) * per_rank]


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def train(model, data: torch.Tensor, config: Optional[TrainConfig] = None,
          callback: Optional[Callable[[int, torch.nn.Module], None]] = None, **overrides) -> TrainResult:
    """Continued pre-training of ``model`` on packed sequences (docs/design.md §3.4).

    Args:
        model: a Hugging Face causal LM (e.g. from ``midus.upscale``); trained in place, moved to
            this process's device (:func:`init_distributed`); ``requires_grad`` set by ``trainable``.
        data: int64 [num_sequences, seq_len] (:func:`midus.data.pack_sequences`); each sequence is
            its own labels (next-token prediction, mean loss over its seq_len - 1 targets).
        config: a :class:`TrainConfig`; keyword ``overrides`` replace its fields.
        callback: called as ``callback(step, model)`` after each optimizer step (1-based step; on
            every rank), e.g. to evaluate at checkpoints; its time is not counted as training time.
            The model is put back in train mode after it.

    Returns a :class:`TrainResult`. Under ``torchrun`` every rank must call this with the same
    arguments; the returned losses are averaged over ranks. With ``fsdp=True`` the model is
    sharded in place (an ``FSDPModule`` afterwards; :mod:`midus.distributed`). Raises ValueError
    for bad settings (the message names the field; ``fsdp`` without a process group),
    FileNotFoundError for a missing ``resume_from``.
    """
    from tqdm.auto import tqdm

    cfg = TrainConfig(**{**(asdict(config) if config else {}), **overrides})
    if data.dim() != 2 or data.dtype != torch.long:
        raise ValueError(f"data must be int64 [num_sequences, seq_len], got {data.dtype} {tuple(data.shape)}")
    if data.shape[1] < 2:
        raise ValueError(f"data: seq_len must be >= 2 (one input and one next-token target), got {data.shape[1]}")
    if cfg.fsdp:
        from . import distributed as fsdp_lib

        device = fsdp_lib.init_fsdp()  # a clear ValueError, not a hang, without a process group
    else:
        device = init_distributed()
    rank, world, local = dist_info()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    trainable_names = resolve_trainable(model, cfg.trainable)
    trainable = "all" if len(trainable_names) == len(dict(model.named_parameters())) else "new"
    if cfg.fsdp:
        # Sharded unit by unit, moving each unit's shards to the device: the optimizer must see
        # the sharded parameters (DTensors), so it is built after.
        fsdp_lib.shard_model(model, device, cfg.precision)
    else:
        model.to(device)
    model.train()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, cfg.max_steps)
    ddp = DistributedDataParallel(model, device_ids=[local] if device.type == "cuda" else None) \
        if world > 1 and not cfg.fsdp else None
    runner = ddp or model
    # The memory key/values are clipped on their own when the recipe says so (Meta's memory layers
    # clip the values separately): their gradients then do not shrink everyone else's step.
    separate = cfg.memory_max_grad_norm > 0
    params = [p for g in optimizer.param_groups for p in g["params"] if not (separate and g["name"] == "memory_kv")]
    memory_params = [p for g in optimizer.param_groups if g["name"] == "memory_kv" for p in g["params"]]

    start_step, tokens_before = 0, 0
    if cfg.resume_from:
        path = cfg.resume_from
        if path == "latest":
            if not cfg.checkpoint_dir:
                raise ValueError("resume_from='latest' needs checkpoint_dir")
            path = latest_checkpoint(cfg.checkpoint_dir)
            if path is None:
                raise FileNotFoundError(f"resume_from='latest': no checkpoint in {cfg.checkpoint_dir}")
        if not cfg.fsdp:
            _refuse_sharded_checkpoint(path)
        saved = Path(path) / "trainer_state.json"
        # Before the model is touched; a checkpoint of the other kind is refused for that first.
        if saved.is_file() and (not cfg.fsdp or (Path(path) / "dcp").is_dir()):
            check_resume_settings(cfg, json.loads(saved.read_text()).get("config"))
        # The schedule follows this call's max_steps (a run may be extended): keep the freshly built
        # multipliers over those in the checkpoint, then set each group's LR for the step resumed at.
        fresh = [dict(getattr(fn, "__dict__", {})) for fn in scheduler.lr_lambdas]
        if cfg.fsdp:
            state = fsdp_lib.load_checkpoint(path, model, optimizer, scheduler)
        else:
            state = _load_checkpoint(path, model, optimizer, scheduler)
        for fn, d, g, base in zip(scheduler.lr_lambdas, fresh, optimizer.param_groups, scheduler.base_lrs):
            if d:
                fn.__dict__.update(d)
            g["lr"] = base * fn(scheduler.last_epoch)
        start_step, tokens_before = state["step"], state.get("tokens", 0)

    log_path = cfg.log_file or (os.path.join(cfg.checkpoint_dir, "log.jsonl") if cfg.checkpoint_dir else None)
    log = None
    if log_path and rank == 0:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "a", encoding="utf-8")

    per_rank = cfg.micro_batch_size * cfg.grad_accum
    seq_len = data.shape[1]
    tokens_per_step = per_rank * world * seq_len
    result = TrainResult(steps=start_step, final_loss=float("nan"), trainable=trainable,
                         trainable_params=sum(p.numel() for g in optimizer.param_groups for p in g["params"]))
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", disable=not cfg.progress or rank != 0,
               dynamic_ncols=True)
    step_seconds, t_start = 0.0, time.time()
    try:
        for step in range(start_step, cfg.max_steps):
            t0 = time.time()
            idx = _step_indices(data.shape[0], step, per_rank, cfg.seed, rank, world)
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                batch = data[idx[micro * cfg.micro_batch_size:(micro + 1) * cfg.micro_batch_size]].to(device)
                # DDP all-reduces on the last micro-batch only.
                sync = ddp is None or micro == cfg.grad_accum - 1
                # Under FSDP the mixed-precision policy casts the parameters; no autocast on top.
                with (nullcontext() if sync else ddp.no_sync()), \
                        (nullcontext() if cfg.fsdp else _autocast(device, cfg.precision)):
                    loss = runner(input_ids=batch, labels=batch, use_cache=False).loss / cfg.grad_accum
                loss.backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else
                                                       float("inf")) if params else torch.zeros(())
            memory_grad_norm = None
            if separate and memory_params:
                memory_grad_norm = _to_float(torch.nn.utils.clip_grad_norm_(memory_params, cfg.memory_max_grad_norm))
            lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if world > 1:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG if device.type == "cuda" else dist.ReduceOp.SUM)
                if device.type != "cuda":  # gloo has no AVG
                    loss_sum /= world
            loss_val = float(loss_sum)
            dt = time.time() - t0
            step_seconds += dt
            result.steps = step + 1
            result.losses.append(loss_val)
            result.lrs.append(lrs)
            result.tokens += tokens_per_step
            result.final_loss = loss_val
            tps = result.tokens / step_seconds
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{tps:.0f}")
            if log is not None:
                record = {"step": step + 1, "loss": loss_val, "lr": lrs, "grad_norm": _to_float(grad_norm),
                          "tokens": tokens_before + result.tokens, "tokens_per_s": tokens_per_step / dt,
                          "elapsed_s": time.time() - t_start}
                if memory_grad_norm is not None:
                    record["memory_grad_norm"] = memory_grad_norm
                if step == start_step:  # the settings (and so the memory recipe) of this call
                    record["config"] = asdict(cfg)
                log.write(json.dumps(record) + "\n")
                log.flush()
            if callback is not None:
                callback(step + 1, model)
                model.train()
            last = step + 1 == cfg.max_steps
            out_of_time = cfg.max_seconds > 0 and time.time() - t_start > cfg.max_seconds
            if world > 1 and cfg.max_seconds > 0:  # every rank must stop at the same step
                flag = torch.tensor([float(out_of_time)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                out_of_time = bool(flag.item())
            if cfg.checkpoint_dir and ((cfg.save_every and (step + 1) % cfg.save_every == 0) or last or out_of_time):
                state = {"step": step + 1, "tokens": tokens_before + result.tokens, "world_size": world,
                         "seq_len": seq_len, "config": asdict(cfg)}
                if cfg.fsdp:
                    result.last_checkpoint = fsdp_lib.save_checkpoint(cfg.checkpoint_dir, step + 1, model, optimizer,
                                                                      scheduler, state, keep=cfg.keep_checkpoints)
                else:
                    result.last_checkpoint = _save_checkpoint(cfg, step + 1, model, optimizer, scheduler, state)
            if out_of_time and not last:
                if rank == 0:  # written above the progress bar, so the bar that stops short says why
                    tqdm.write(f"[midus] stopping after step {step + 1} of {cfg.max_steps}: the time limit "
                               f"(max_seconds={cfg.max_seconds:.0f}, from --time-budget in midus run) was reached",
                               file=sys.stderr)
                break
    finally:
        bar.close()
        if log is not None:
            log.close()
    result.seconds = step_seconds
    result.tokens_per_s = result.tokens / step_seconds if step_seconds else 0.0
    # What produced these weights travels with them (save_pretrained writes it into config.json).
    model.config.midus_train = {**recipe_of(cfg), "lr": cfg.lr, "steps": result.steps,
                                "tokens": tokens_before + result.tokens, "trainable": trainable}
    model.eval()
    return result


def recipe_of(cfg: TrainConfig) -> Dict[str, object]:
    """The memory recipe of ``cfg`` as a JSON-serialisable dict (the ``memory_*`` fields and the
    memory start LR they give)."""
    out = {f: getattr(cfg, f) for f in ("memory_lr", "memory_lr_scale", "memory_lr_schedule",
                                        "memory_lr_decay_steps", "memory_max_grad_norm")}
    out["memory_start_lr"] = memory_start_lr(cfg)
    return out
