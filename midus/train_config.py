"""The settings of :func:`midus.train.train` and their command-line flags, without torch.

:class:`TrainConfig`, the memory recipes and :func:`add_recipe_arguments` are what ``midus
train``/``run``/``compare`` need to build their parsers; they live here, in a module that
imports neither torch nor transformers, so that ``midus --help`` and argument errors come back
in well under a second. :mod:`midus.train` re-exports them (``from midus.train import
TrainConfig`` keeps working).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

__all__ = ["TrainConfig", "MEMORY_LR_SCHEDULES", "MEMORY_RECIPES", "RECIPE_FIELDS", "add_recipe_arguments",
           "recipe_from_args"]

MEMORY_LR_SCHEDULES = ("constant", "decay", "cosine")

# Named memory recipes (TrainConfig fields). "study": the default, chosen by `midus study` on dev
# data (benchmarks/results/study_cpu_2026-12-03): the memory key/values start at 10x the peak LR
# and decay linearly to it over the run (as lucidrains' ultra-mem schedules its values). "paper":
# MIDUS's appendix, the peak LR, constant.
MEMORY_RECIPES = {
    "study": {"memory_lr": None, "memory_lr_scale": 10.0, "memory_lr_schedule": "decay", "memory_lr_decay_steps": 0,
              "memory_max_grad_norm": 0.0},
    "paper": {"memory_lr": None, "memory_lr_scale": 1.0, "memory_lr_schedule": "constant",
              "memory_lr_decay_steps": 0, "memory_max_grad_norm": 0.0},
}


@dataclass
class TrainConfig:
    """Settings of :func:`train`. Batch sizes count sequences; the global batch per optimizer
    step is ``micro_batch_size * grad_accum * world_size`` sequences."""
    max_steps: int = 100
    micro_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 3e-4                # peak LR of every group but the memory key/values
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    max_grad_norm: float = 1.0      # 0 disables clipping
    trainable: str = "auto"         # "auto" | "new" | "all"
    seed: int = 0
    precision: str = "auto"         # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "bf16" | "fp32"
    checkpoint_dir: Optional[str] = None  # None: no checkpoints, no log file
    save_every: int = 0             # 0: one checkpoint at the end (if checkpoint_dir is set)
    keep_checkpoints: int = 2
    resume_from: Optional[str] = None  # a checkpoint folder, or "latest" (in checkpoint_dir)
    log_file: Optional[str] = None  # default: <checkpoint_dir>/log.jsonl
    progress: bool = True
    max_seconds: float = 0.0        # > 0: stop after the step that crosses this wall time
    # The memory recipe: LR, schedule and clipping of the memory key/values (docs/design.md §3.4; MEMORY_RECIPES).
    memory_lr: Optional[float] = None   # absolute start LR; None: memory_lr_scale * lr
    # Defaults: the recipe `midus study` chose on dev (MEMORY_RECIPES["study"]; README); the paper's
    # is MEMORY_RECIPES["paper"].
    memory_lr_scale: float = 10.0       # start LR as a multiple of the peak LR (when memory_lr is None)
    memory_lr_schedule: str = "decay"   # "constant" | "decay" (linear to lr) | "cosine" (as the rest)
    memory_lr_decay_steps: int = 0      # "decay": steps to reach lr (0: max_steps)
    memory_max_grad_norm: float = 0.0   # > 0: memory key/values clipped on their own to this norm
    # FSDP2 (midus.distributed): parameters, gradients and AdamW state sharded over the processes;
    # needs a process group (torchrun); sharded checkpoints (torch.distributed.checkpoint).
    fsdp: bool = False

    def __post_init__(self):
        for name in ("max_steps", "micro_batch_size", "grad_accum"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"need warmup_steps >= 0 and lr a positive finite number, got {self.warmup_steps}, "
                             f"{self.lr!r}")
        for name in ("save_every", "keep_checkpoints"):
            if int(getattr(self, name)) < (0 if name == "save_every" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'save_every' else 1}, got {getattr(self, name)}")
        if self.memory_lr is not None and not (self.memory_lr > 0 and math.isfinite(self.memory_lr)):
            raise ValueError(f"memory_lr must be a positive number or None, got {self.memory_lr!r}")
        if not (self.memory_lr_scale > 0 and math.isfinite(self.memory_lr_scale)):
            raise ValueError(f"memory_lr_scale must be a positive number, got {self.memory_lr_scale!r}")
        if self.memory_lr_schedule not in MEMORY_LR_SCHEDULES:
            raise ValueError(f"memory_lr_schedule must be one of {', '.join(MEMORY_LR_SCHEDULES)}, "
                             f"got {self.memory_lr_schedule!r}")
        if int(self.memory_lr_decay_steps) < 0:
            raise ValueError(f"memory_lr_decay_steps must be >= 0 (0: max_steps), got {self.memory_lr_decay_steps}")
        if self.memory_lr_decay_steps and self.memory_lr_schedule != "decay":
            raise ValueError(f"memory_lr_decay_steps ({self.memory_lr_decay_steps}) is for memory_lr_schedule "
                             f"'decay', not {self.memory_lr_schedule!r}")
        for name in ("max_grad_norm", "memory_max_grad_norm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 (0: off), got {getattr(self, name)!r}")
        if self.trainable not in ("auto", "new", "all"):
            raise ValueError(f"trainable must be 'auto', 'new' or 'all', got {self.trainable!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        self.betas = tuple(self.betas)


RECIPE_FIELDS = ("memory_lr", "memory_lr_scale", "memory_lr_schedule", "memory_lr_decay_steps", "memory_max_grad_norm")


def add_recipe_arguments(parser) -> None:
    """The command-line flags of the memory recipe (``midus train``, ``run``, ``compare``): each
    defaults to None, meaning :class:`TrainConfig`'s default, so defaults live in one place."""
    d = TrainConfig()
    g = parser.add_argument_group("memory recipe (the memory keys/values: subkeys, bank, proj / values; "
                                  "defaults from midus.train.TrainConfig)")
    g.add_argument("--memory-recipe", choices=sorted(MEMORY_RECIPES), default=None,
                   help="a named recipe: study (10x the peak LR decaying to 1x: the default, chosen by `midus study`) "
                        "or paper (the peak LR, constant); the flags below override its fields")
    g.add_argument("--memory-lr", type=float, default=None,
                   help="absolute start LR of the memory keys/values (default: --memory-lr-scale x the peak LR)")
    g.add_argument("--memory-lr-scale", type=float, default=None,
                   help=f"memory start LR as a multiple of the peak LR (default: {d.memory_lr_scale:g})")
    g.add_argument("--memory-lr-schedule", choices=MEMORY_LR_SCHEDULES, default=None,
                   help="constant, decay (linearly to the peak LR over --memory-lr-decay-steps) or cosine "
                        f"(warm-up + cosine like the rest) (default: {d.memory_lr_schedule})")
    g.add_argument("--memory-lr-decay-steps", type=int, default=None,
                   help="steps of the decay to the peak LR; 0 = all steps (default: 0)")
    g.add_argument("--memory-max-grad-norm", type=float, default=None,
                   help="clip the memory keys/values on their own to this norm; 0 = clipped with the rest "
                        f"(default: {d.memory_max_grad_norm:g})")


def recipe_from_args(args) -> Dict[str, object]:
    """The memory-recipe fields given on the command line: a named ``--memory-recipe``'s, then the
    single flags (those left at None are omitted)."""
    if getattr(args, "memory_lr", None) is not None and getattr(args, "memory_lr_scale", None) is not None:
        raise ValueError("--memory-lr and --memory-lr-scale: give one (an absolute start LR, or a multiple of the "
                         "peak LR), not both")
    named = getattr(args, "memory_recipe", None)
    out = dict(MEMORY_RECIPES[named]) if named else {}
    given = {f: getattr(args, f) for f in RECIPE_FIELDS if getattr(args, f, None) is not None}
    out.update(given)
    try:  # checked now, before any model loads, and named by the flag the user typed
        TrainConfig(**out)
    except ValueError as err:
        field = next((f for f in sorted(given, key=len, reverse=True) if str(err).startswith(f)), None)
        if field is None:
            raise
        raise ValueError(f"--{field.replace('_', '-')}: {err}") from None
    return out
