"""Continued pre-training of an up-scaled model with the Hugging Face ``Trainer``.

The ``Trainer`` is also how accelerate, DeepSpeed and accelerate's FSDP users arrive; this module
gives it what :func:`midus.train.train` does on its own (docs/design.md §3.4)::

    from transformers import TrainingArguments
    from midus.hf_trainer import MidusTrainer, PackedDataset

    trainer = MidusTrainer(model=upscaled, args=TrainingArguments(output_dir="out", max_steps=1000,
                           learning_rate=3e-4, warmup_steps=100, lr_scheduler_type="cosine", weight_decay=0.1),
                           train_dataset=PackedDataset(midus.data.pack_sequences(ids, 1024)),
                           trainable="new", memory_lr_scale=10.0, memory_lr_schedule="decay")
    trainer.train()
    trainer.save_model("out/final")     # a folder AutoModelForCausalLM loads, with or without `import midus`

- ``trainable`` ("auto" | "new" | "all", :func:`midus.train.resolve_trainable`) freezes the base
  model before the Trainer sees it: "new" trains only the inserted blocks.
- The optimizer has the parameter groups of :func:`midus.train.build_param_groups` (memory
  key/values: no weight decay, their own start LR ``memory_lr`` or ``memory_lr_scale`` x
  ``learning_rate``; the other matrices: ``weight_decay``; norms and biases: none) and the class
  ``TrainingArguments.optim`` names (AdamW by default), with its betas and epsilon.
- The schedule: the groups other than the memory key/values follow ``lr_scheduler_type`` (with
  ``warmup_steps``) as under a plain Trainer; the memory key/values follow
  ``memory_lr_schedule``: "constant", "decay" (linearly to ``learning_rate`` over
  ``memory_lr_decay_steps``, 0 = all steps) or "cosine" (the same schedule as the other groups).
  The ``learning_rate`` the Trainer logs is the other groups'; ``memory_lr`` is logged beside it.
- ``memory_max_grad_norm`` > 0: the memory key/values are clipped on their own, and the global
  clipping (``max_grad_norm``) covers the other parameters only, as in :func:`midus.train.train`
  (not under DeepSpeed, which clips inside its engine, nor accelerate's FSDP1: refused).

:class:`PackedDataset` turns packed sequences (``int64 [N, T]``) into the Trainer's examples
(``input_ids`` = ``labels``; the model shifts the labels). ``python -m midus.hf_trainer --model
FOLDER --output OUT`` (also under ``torchrun``) is a runnable example (:func:`main`).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback

from .train import RECIPE_FIELDS, TrainConfig, build_param_groups, build_scheduler, memory_start_lr, resolve_trainable

__all__ = ["MidusTrainer", "PackedDataset", "schedule_multiplier"]


class PackedDataset(torch.utils.data.Dataset):
    """Packed token sequences (``int64 [N, T]``, :func:`midus.data.pack_sequences`) as Trainer
    examples ``{"input_ids": seq, "labels": seq}``. Raises ValueError for another shape or dtype."""

    def __init__(self, sequences: torch.Tensor):
        if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2 or sequences.dtype != torch.long:
            got = f"{sequences.dtype} {tuple(sequences.shape)}" if isinstance(sequences, torch.Tensor) else \
                type(sequences).__name__
            raise ValueError(f"sequences must be int64 [num_sequences, seq_len], got {got}")
        if sequences.shape[1] < 2:
            raise ValueError(f"sequences: seq_len must be >= 2 (one input and one next-token target), "
                             f"got {sequences.shape[1]}")
        self.sequences = sequences

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        seq = self.sequences[i]
        return {"input_ids": seq, "labels": seq}


def schedule_multiplier(name: str, warmup_steps: int, total_steps: int,
                        kwargs: Optional[dict] = None) -> Callable[[int], float]:
    """The LR multiplier (step -> factor) of transformers' schedule ``name`` (``lr_scheduler_type``),
    taken from ``transformers.get_scheduler`` on a throw-away optimizer, so the math is theirs.
    Raises ValueError naming ``lr_scheduler_type`` for a schedule that is not a per-step
    multiplier (e.g. "reduce_lr_on_plateau")."""
    from transformers import get_scheduler

    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        sched = get_scheduler(name, probe, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                              scheduler_specific_kwargs=kwargs or {})
    except (ValueError, TypeError) as err:
        raise ValueError(f"lr_scheduler_type: {name!r}: {err}") from None
    if not isinstance(sched, LambdaLR) or len(sched.lr_lambdas) != 1:
        raise ValueError(f"lr_scheduler_type: {name!r} is not a per-step LR multiplier; MidusTrainer gives the memory "
                         f"key/values their own schedule beside it, so it needs one (e.g. linear, cosine, constant, "
                         f"constant_with_warmup, cosine_with_min_lr, warmup_stable_decay)")
    return sched.lr_lambdas[0]


# The recipe defaults are TrainConfig's (the study's recipe), so `midus train` and the Trainer agree.
_DEFAULT = TrainConfig()


class _RecordMemoryLR(TrainerCallback):
    """The memory LR of the step just taken (after optimizer.step, before the scheduler moves on),
    so the logged ``memory_lr`` is the one that step used, as the Trainer's ``learning_rate`` is."""

    def __init__(self, trainer: "MidusTrainer"):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        for g in self.trainer.optimizer.param_groups:
            if g.get("name") == "memory_kv":
                self.trainer._memory_lr = g["lr"]


class MidusTrainer(Trainer):
    """A ``transformers.Trainer`` with the memory recipe of :mod:`midus.train` (module docstring).

    Keyword arguments beyond the Trainer's: ``trainable`` ("auto" | "new" | "all"), and the memory
    recipe ``memory_lr``, ``memory_lr_scale``, ``memory_lr_schedule``, ``memory_lr_decay_steps``,
    ``memory_max_grad_norm`` (:class:`midus.train.TrainConfig`, same defaults; the peak LR, weight
    decay, betas, warm-up and steps come from ``args``). Bad values raise ValueError naming the
    argument. ``trainable`` is applied to ``model`` in place when the Trainer is built.
    """

    def __init__(self, *args, trainable: str = "auto", memory_lr: Optional[float] = _DEFAULT.memory_lr,
                 memory_lr_scale: float = _DEFAULT.memory_lr_scale,
                 memory_lr_schedule: str = _DEFAULT.memory_lr_schedule,
                 memory_lr_decay_steps: int = _DEFAULT.memory_lr_decay_steps,
                 memory_max_grad_norm: float = _DEFAULT.memory_max_grad_norm, **kwargs):
        # TrainConfig validates the recipe with the messages midus train gives.
        self.midus_recipe = TrainConfig(trainable=trainable, memory_lr=memory_lr, memory_lr_scale=memory_lr_scale,
                                        memory_lr_schedule=memory_lr_schedule,
                                        memory_lr_decay_steps=memory_lr_decay_steps,
                                        memory_max_grad_norm=memory_max_grad_norm)
        model = kwargs.get("model", args[0] if args else None)
        if model is None:
            raise ValueError("model: MidusTrainer needs the model itself (model_init is not supported: the trainable "
                             "set and the parameter groups are decided when the Trainer is built)")
        self.midus_trainable = resolve_trainable(model, trainable)
        self._memory_grad_norm: Optional[float] = None
        self._memory_lr: Optional[float] = None
        super().__init__(*args, **kwargs)
        self.add_callback(_RecordMemoryLR(self))
        if memory_max_grad_norm > 0:
            if getattr(self, "is_deepspeed_enabled", False):
                raise ValueError("memory_max_grad_norm: DeepSpeed clips all gradients inside its engine, so the memory "
                                 "key/values cannot be clipped on their own; leave it at 0 under DeepSpeed")
            if getattr(self, "is_fsdp_enabled", False) and not getattr(self.accelerator, "is_fsdp2", False):
                raise ValueError("memory_max_grad_norm: accelerate's FSDP1 clips all parameters at once; use FSDP2 "
                                 "(fsdp_version: 2) or leave it at 0")

    # ------------------------------------------------------------------ optimizer and schedule

    def _memory_params(self, model) -> List[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups if g.get("name") == "memory_kv" for p in g["params"]]

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            args = self.args
            cfg = replace(self.midus_recipe, lr=args.learning_rate)
            groups = build_param_groups(opt_model, args.learning_rate, args.weight_decay,
                                        memory_lr=memory_start_lr(cfg), memory_lr_schedule=cfg.memory_lr_schedule,
                                        memory_lr_decay_steps=cfg.memory_lr_decay_steps)
            # The Trainer logs the LR of the first group: make it the peak-LR schedule, not the memory's.
            groups.sort(key=lambda g: g["name"] == "memory_kv")
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(args, opt_model)
            own_groups = {"params", "model", "optimizer_dict"} & set(optimizer_kwargs)
            if own_groups:
                raise ValueError(f"optim: {args.optim} builds its own parameter groups ({', '.join(sorted(own_groups))});"
                                 f" MidusTrainer needs the memory key/values in a group of their own: use an AdamW "
                                 f"variant (adamw_torch, adamw_torch_fused, adamw_8bit, ...)")
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Optional[torch.optim.Optimizer] = None):
        if self.lr_scheduler is None:
            optimizer = optimizer or self.optimizer
            args = self.args
            rest = schedule_multiplier(args.lr_scheduler_type, args.get_warmup_steps(num_training_steps),
                                       num_training_steps, args.lr_scheduler_kwargs)
            self.lr_scheduler = build_scheduler(optimizer, args.get_warmup_steps(num_training_steps),
                                               num_training_steps, rest=rest)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    # ------------------------------------------------------------------ clipping and logs

    def _clip_memory(self, model) -> None:
        # torch's own clipping (DTensor-aware under FSDP2) on gradients the accelerator has
        # already unscaled: a second accelerator.clip_grad_norm_ would unscale fp16 gradients twice.
        cap = self.midus_recipe.memory_max_grad_norm
        params = [p for p in self._memory_params(model) if p.grad is not None]
        if cap > 0 and params:
            norm = torch.nn.utils.clip_grad_norm_(params, cap)
            self._memory_grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def _clip_grad_norm(self, model):
        # Called by the Trainer (transformers 5.x) when max_grad_norm > 0, before optimizer.step().
        if self.midus_recipe.memory_max_grad_norm <= 0:
            return super()._clip_grad_norm(model)
        memory = {id(p) for p in self._memory_params(model)}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in memory]
        norm = self.accelerator.clip_grad_norm_(rest, self.args.max_grad_norm)  # unscales fp16 gradients first
        self._clip_memory(model)
        return norm

    def _get_grad_norm(self, model, grad_norm=None):
        out = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is None and self.args.max_grad_norm <= 0:
            self._clip_memory(model)  # the recipe's own clipping also without a global one
        return out

    def log(self, logs: Dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self.optimizer is not None:
            if self._memory_lr is not None:
                logs["memory_lr"] = self._memory_lr
            if self._memory_grad_norm is not None:
                logs["memory_grad_norm"] = self._memory_grad_norm
        super().log(logs, *args, **kwargs)


# The recipe keywords MidusTrainer takes are exactly midus.train's recipe fields.
assert set(RECIPE_FIELDS) <= set(MidusTrainer.__init__.__code__.co_varnames)


# ----------------------------------------------------------------------------- a runnable example


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m midus.hf_trainer`` (or under ``torchrun`` / ``accelerate launch``: DDP): CPT of a
    model folder with :class:`MidusTrainer`; the final model and tokenizer go to ``--output``, the
    Trainer's checkpoints to ``<output>-trainer``. A small, complete example: for DeepSpeed or
    accelerate's FSDP, build the ``TrainingArguments`` in Python (``deepspeed=``, ``fsdp=``)."""
    import argparse
    import sys

    from transformers import TrainingArguments

    from .data import load_corpus, pack_sequences
    from .runtime import atomic_output_dir, check_output, load_model
    from .train import add_recipe_arguments, recipe_from_args

    ap = argparse.ArgumentParser(prog="python -m midus.hf_trainer", description=main.__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="an up-scaled model folder (e.g. from `midus upscale`)")
    ap.add_argument("--data", default="wiki", help="'wiki', a .txt / .jsonl file or a datasets folder (default: wiki)")
    ap.add_argument("--output", required=True, help="folder for the trained model")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per process per micro-step")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--scheduler", default="cosine", help="lr_scheduler_type of the other groups (default: cosine)")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--trainable", choices=["auto", "new", "all"], default="auto")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    ap.add_argument("--save-steps", type=int, default=0, help="Trainer checkpoint every N steps (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    add_recipe_arguments(ap)
    args = ap.parse_args(argv)
    try:
        check_output(args.output)
        model, tokenizer, path = load_model(args.model)
        split = "train" if args.data == "wiki" else "all"
        data = pack_sequences(load_corpus(args.data, tokenizer, split=split), args.seq_len)
        targs = TrainingArguments(
            output_dir=f"{args.output.rstrip('/')}-trainer", max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, warmup_steps=args.warmup,
            lr_scheduler_type=args.scheduler, weight_decay=args.weight_decay, adam_beta1=0.9, adam_beta2=0.95,
            max_grad_norm=args.max_grad_norm, bf16=args.bf16, logging_steps=max(1, args.steps // 20),
            save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500, report_to=[],
            seed=args.seed, dataloader_num_workers=0)
        trainer = MidusTrainer(model=model, args=targs, train_dataset=PackedDataset(data), trainable=args.trainable,
                               **recipe_from_args(args))
        trainer.train()
        if trainer.is_world_process_zero():
            with atomic_output_dir(args.output) as tmp:
                trainer.save_model(str(tmp))
                tokenizer.save_pretrained(tmp)
            print(f"wrote {args.output}: {trainer.state.global_step} steps with the Hugging Face Trainer")
    except (ValueError, FileNotFoundError) as err:
        print(f"python -m midus.hf_trainer: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
