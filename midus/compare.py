"""``midus compare``: the paper's comparison of up-scaling methods, at small scale, on a real model.

The paper (arXiv 2512.13751, section 4) grows Llama-3.2-1B by K blocks with each method, gives
every result the same continued pre-training (CPT), and compares perplexity and zero-shot
accuracy. This module runs the same protocol on any local model (by default the embedded
SmolLM2-135M and the Wikipedia text of :mod:`midus.defaults`), fairly:

- methods (``METHODS``): ``base`` (the model as it is, no training: the reference row),
  ``base_cpt`` (the base model under the same CPT), ``dus``, ``llama_pro``, ``solar``, ``lesa``,
  ``avg_deus`` and ``opt_deus`` (:mod:`midus.deus`, arXiv 2508.08011), ``midus`` (HML memory
  blocks) and ``midus_pkm`` (PKM memory blocks), all with the same K and placement (docs/design.md §3.2,
  §3.3; ``placement="importance"`` is measured on the training text, per method's run);
- the same token budget and data order for every trained row: ``steps`` optimizer steps of
  ``batch_size`` x ``seq_len`` tokens; what is trained follows each method's default (docs/design.md §3.4:
  only the new blocks for midus, llama_pro, avg_deus and opt_deus, everything otherwise), and the memory rows use the
  memory recipe (:class:`midus.train.TrainConfig` defaults, or ``recipe``);
- a grid of peak LRs (``lrs``) for every trained method, the best chosen on the **dev** half of
  the validation documents (:func:`midus.data.dev_test_split`); the table reports **test**
  perplexity at the chosen LR, which is never used for choosing; with ``seeds`` > 1 the chosen LR
  is rerun with more seeds (data order and new weights) and the table gives the mean and half the
  range; ``curves`` adds dev perplexity at ``points`` checkpoints of each chosen run;
- per row: parameters (and those added), training seconds per step, peak memory during training
  (:func:`midus.runtime.peak_memory`), dev and test perplexity and zero-shot accuracy
  (:func:`midus.zeroshot.evaluate_zero_shot`, lm-evaluation-harness) of the chosen run(s).

Every run goes through :func:`midus.pipeline.run_experiment`, each in its own Python process, so
one method's memory can not inflate another's peak and a failure is reported in its row instead
of ending the comparison. This is a small-scale reproduction: a 135M model, minutes of CPT, and
zero-shot accuracy on a few dozen examples per task have wide error bars (the table gives the
standard error); read the ranking with that in mind.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["METHODS", "CompareConfig", "PRESETS", "compare", "run_method", "write_report", "add_arguments", "run"]

# name -> (midus.upscale method or None, its options, label in the table)
METHODS: Dict[str, tuple] = {
    "base": (None, {}, "base (no CPT)"),
    "base_cpt": (None, {}, "base + CPT"),
    "dus": ("dus", {}, "DUS (copied blocks)"),
    "llama_pro": ("llama_pro", {}, "LLaMA Pro"),
    "solar": ("solar", {}, "SOLAR"),
    "lesa": ("lesa", {}, "LESA"),
    "avg_deus": ("avg_deus", {}, "Avg-DeUS"),
    "opt_deus": ("opt_deus", {}, "OpT-DeUS"),
    "midus": ("midus", {"memory": "hml"}, "MIDUS (HML)"),
    "midus_pkm": ("midus", {"memory": "pkm"}, "MIDUS (PKM)"),
}

# Budgets. The GPU preset is a larger one for a real comparison (still far below the paper's 2B
# tokens); the CPU preset's time is in the README.
PRESETS = {
    "cpu": dict(steps=60, batch_size=4, seq_len=128, eval_tokens=4096, window=128, limit=20, lrs=[3e-4, 1e-3]),
    "gpu": dict(steps=300, batch_size=16, seq_len=512, eval_tokens=65536, window=512, limit=0,
                lrs=[1e-4, 3e-4, 1e-3]),
}


@dataclass
class CompareConfig:
    """Settings of :func:`compare` (the CLI flags of ``midus compare``). ``lrs``: the peak LRs
    tried for every trained method (chosen on dev; ``lr`` is the old single-LR setting and, when
    given, means ``lrs=[lr]``); ``seeds``: runs of each method at its chosen LR; ``recipe``:
    memory-recipe fields of :class:`midus.train.TrainConfig` for the memory rows (empty: its
    defaults); ``memory_options``: extra :func:`midus.upscale` memory options for the memory rows;
    ``limit`` is examples per zero-shot task (0: the whole validation set); ``tasks`` are
    :data:`midus.zeroshot` task names (empty: no zero-shot evaluation)."""
    model: str = "default"
    data: str = "wiki"
    val_fraction: float = 0.1
    methods: List[str] = field(default_factory=lambda: list(METHODS))
    num_blocks: int = 8
    placement: str = "distributed"
    importance: str = "layer"
    steps: int = PRESETS["cpu"]["steps"]
    batch_size: int = PRESETS["cpu"]["batch_size"]
    seq_len: int = PRESETS["cpu"]["seq_len"]
    lrs: List[float] = field(default_factory=lambda: list(PRESETS["cpu"]["lrs"]))
    lr: Optional[float] = None
    warmup: int = 2
    seed: int = 0
    seeds: int = 1
    curves: bool = False
    points: int = 4
    recipe: Dict[str, Any] = field(default_factory=dict)
    memory_options: Dict[str, Any] = field(default_factory=dict)
    eval_tokens: int = PRESETS["cpu"]["eval_tokens"]
    window: int = PRESETS["cpu"]["window"]
    tasks: List[str] = field(default_factory=lambda: ["all"])
    limit: int = PRESETS["cpu"]["limit"]
    device: str = "auto"
    progress: bool = False

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods: unknown {unknown or '(none given)'}; expected some of {', '.join(METHODS)}")
        for name in ("num_blocks", "steps", "batch_size", "seq_len", "eval_tokens", "window", "seeds", "points"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2 or self.window < 2:
            raise ValueError(f"seq_len and window must be >= 2, got {self.seq_len} and {self.window}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods: each at most once, got {self.methods}")
        if self.lr is not None:
            self.lrs = [self.lr]
        self.lrs = [float(x) for x in self.lrs]
        if not self.lrs or not all(x > 0 and math.isfinite(x) for x in self.lrs) or self.warmup < 0:
            raise ValueError(f"need lr (every value of the grid) > 0 and warmup >= 0, got lr={self.lrs}, "
                             f"warmup={self.warmup}")
        if len(set(self.lrs)) != len(self.lrs):
            raise ValueError(f"lr: each value at most once, got {self.lrs}")
        if self.limit < 0:
            raise ValueError(f"limit must be >= 0 (0: whole validation sets), got {self.limit}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.importance not in ("layer", "heads"):
            raise ValueError(f"importance must be 'layer' or 'heads', got {self.importance!r}")
        from .train_config import RECIPE_FIELDS, TrainConfig

        bad = [k for k in self.recipe if k not in RECIPE_FIELDS]
        if bad:
            raise ValueError(f"recipe: unknown fields {bad}; expected some of {', '.join(RECIPE_FIELDS)}")
        TrainConfig(**self.recipe)  # validates the values, naming the field
        if self.memory_options:
            from midus_ops import MemoryOptions

            MemoryOptions.from_dict(self.memory_options)  # validates, naming the option


def _experiment(name: str, cfg: CompareConfig, lr: Optional[float], seed: int, tasks: bool, curve: bool):
    """The pipeline experiment of one run of method ``name`` (lr None: no training)."""
    from .pipeline import Experiment, curve_steps
    from .runtime import parse_placement

    method, options, _ = METHODS[name]
    options = dict(options)
    train = None
    if lr is not None:
        train = {"max_steps": cfg.steps, "micro_batch_size": cfg.batch_size, "lr": lr,
                 "warmup_steps": min(cfg.warmup, cfg.steps - 1), **(cfg.recipe if method == "midus" else {})}
    if method == "midus":
        options.update(cfg.memory_options)
    placement = "distributed" if method == "solar" else parse_placement(cfg.placement)  # solar: fixed by K
    return Experiment(model=cfg.model, data=cfg.data, val_fraction=cfg.val_fraction, method=method,
                      num_blocks=cfg.num_blocks, placement=placement, importance=cfg.importance,
                      upscale_options=options, train=train,
                      seq_len=cfg.seq_len, eval_splits=("dev", "test"), eval_tokens=cfg.eval_tokens,
                      window=cfg.window, curve_steps=curve_steps(cfg.steps, cfg.points) if curve and train else (),
                      health=method == "midus" and train is not None, tasks=list(cfg.tasks) if tasks else (),
                      limit=cfg.limit, seed=seed, device=cfg.device, progress=cfg.progress)


def run_method(name: str, cfg: CompareConfig, lr: Optional[float] = None, seed: Optional[int] = None,
               tasks: bool = True, curve: bool = False, save_to: Optional[str] = None) -> dict:
    """One run of method ``name`` in this process (:func:`midus.pipeline.run_experiment`): up-scale,
    train at peak LR ``lr`` (default the grid's first; none for "base"), evaluate dev and test
    perplexity (and zero-shot accuracy with ``tasks``). ``save_to``: also save the trained model
    and tokenizer there (for a later zero-shot run). Returns a JSON-serialisable dict."""
    from .pipeline import run_experiment

    if name != "base" and lr is None:
        lr = cfg.lrs[0]
    exp = _experiment(name, cfg, None if name == "base" else lr, cfg.seed if seed is None else seed, tasks, curve)
    row = run_experiment(exp, keep_model=save_to is not None)
    if save_to is not None:
        model, tokenizer = row.pop("_model"), row.pop("_tokenizer")
        model.save_pretrained(save_to)
        tokenizer.save_pretrained(save_to)
    row.update(method=name, label=METHODS[name][2])
    return row


def _zero_shot_of(path: str, cfg: CompareConfig) -> dict:
    """Zero-shot accuracy of a saved model (the chosen run of a method)."""
    from .pipeline import Experiment, run_experiment

    row = run_experiment(Experiment(model=path, data=cfg.data, val_fraction=cfg.val_fraction, method=None,
                                    eval_splits=(), tasks=list(cfg.tasks), limit=cfg.limit, seed=cfg.seed,
                                    device=cfg.device, progress=cfg.progress))
    return {"zero_shot": row["zero_shot"], "zero_shot_s": row["zero_shot_s"]}


def _run_in_subprocess(job: dict, workdir: Path, tag: str) -> dict:
    job_file, out_file = workdir / f"{tag}.job.json", workdir / f"{tag}.json"
    job_file.write_text(json.dumps(job))
    cmd = [sys.executable, "-m", "midus.compare", "--worker", str(job_file), str(out_file)]
    try:  # the worker's progress goes to our stderr as it happens; stdout is kept for the table
        err_fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        err_fd = None
    proc = subprocess.run(cmd, stdout=err_fd, stderr=err_fd)
    if out_file.exists():
        return json.loads(out_file.read_text())
    name = job.get("name", "?")
    return {"method": name, "label": METHODS.get(name, (None, None, name))[2],
            "error": f"worker process exited with status {proc.returncode}"}


def _do(job: dict, cfg: CompareConfig, workdir: Path, tag: str, in_process: bool) -> dict:
    if in_process:
        return _execute(job, cfg)
    return _run_in_subprocess({**job, "config": asdict(cfg)}, workdir, tag)


def _execute(job: dict, cfg: CompareConfig) -> dict:
    try:
        if job["kind"] == "zero_shot":
            return _zero_shot_of(job["path"], cfg)
        return run_method(job["name"], cfg, lr=job.get("lr"), seed=job["seed"], tasks=job["tasks"],
                          curve=job["curve"], save_to=job.get("save_to"))
    except Exception as err:  # reported in the method's row; the comparison goes on
        import traceback

        traceback.print_exc()
        name = job.get("name", "?")
        return {"method": name, "label": METHODS.get(name, (None, None, name))[2],
                "error": f"{type(err).__name__}: {err}"}  # its last line


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def _half_range(xs):
    return (max(xs) - min(xs)) / 2 if len(xs) > 1 else 0.0


def _method_row(name: str, cfg: CompareConfig, grid: List[dict], chosen: Optional[dict], seeds: List[dict]) -> dict:
    """One table row from a method's runs: the LR grid (dev and test of each), the chosen LR, and
    the seeds at that LR (test perplexity mean and half-range, zero-shot mean over seeds)."""
    runs = [r for r in seeds if "error" not in r]
    first = runs[0]
    row = {k: v for k, v in first.items() if k not in ("ppl", "zero_shot", "curve", "losses", "health")}
    row.update(method=name, label=METHODS[name][2], seeds=[r["seed"] for r in runs])
    if grid:
        row["lr_grid"] = [{"lr": r.get("lr"), "dev_ppl": r["ppl"]["dev"], "test_ppl": r["ppl"]["test"]}
                          if "error" not in r else {"lr": r.get("lr"), "error": r["error"]} for r in grid]
        row["chosen_lr"] = chosen.get("lr") if chosen else None
    for split in ("dev", "test"):
        vals = [r["ppl"][split] for r in runs]
        row[f"{split}_ppl"], row[f"{split}_ppl_spread"] = _mean(vals), _half_range(vals)
    row["ppl"] = row["test_ppl"]  # what the table reports
    row["eval_tokens"] = first["eval_tokens"]["test"]
    if any("curve" in r for r in runs):
        row["curves"] = [{"seed": r["seed"], "curve": r["curve"]} for r in runs if "curve" in r]
    if any("health" in r for r in runs):
        row["health"] = {k: _mean([r["health"][k] for r in runs if "health" in r])
                         for k in ("weight_entropy", "max_entropy", "entropy_ratio", "slot_usage", "retrieval_gain")}
    zs = [r["zero_shot"] for r in runs if r.get("zero_shot")]
    if zs:
        tasks = zs[0].keys()
        row["zero_shot"] = {}
        for t in tasks:
            merged = dict(zs[0][t])
            for metric in ("acc", "acc_norm"):
                vals = [z[t][metric] for z in zs if z[t].get(metric) is not None]
                if vals:
                    merged[metric] = _mean(vals)
            merged["seeds"] = len(zs)
            row["zero_shot"][t] = merged
    if len(runs) < len(seeds):
        row["seed_errors"] = [r["error"] for r in seeds if "error" in r]
    return row


# Settings that must match for rows of an earlier comparison to be reused (everything but which
# methods run and how progress is shown).
_RESUME_IGNORES = ("methods", "progress")


def resumable_rows(cfg: CompareConfig, previous: dict) -> Dict[str, dict]:
    """The finished rows of an earlier report that ``cfg`` can reuse: {method: row}. Raises
    ValueError naming the settings that differ (a row is only comparable under the same budget,
    LR grid, seeds, data and model)."""
    from .train import RECIPE_FIELDS, TrainConfig, recipe_of

    old = previous.get("config", {})
    new = asdict(cfg)
    rows = {r["method"]: r for r in previous.get("rows", []) if "error" not in r}
    # The memory recipe is compared as it took effect (recorded in each trained row), not as
    # flags: `--memory-recipe study` and its fields spelled out are the same recipe, while the same
    # flags under a changed default would not be.
    effective = {f: v for f, v in recipe_of(TrainConfig(**cfg.recipe)).items() if f in RECIPE_FIELDS}
    recorded = [r["recipe"] for r in rows.values() if r["method"] == "midus" and isinstance(r.get("recipe"), dict)]
    ignore = _RESUME_IGNORES + (("recipe",) if recorded else ())
    diff = sorted(k for k in new if k not in ignore and old.get(k) != new[k])
    if any({f: rec.get(f) for f in RECIPE_FIELDS} != effective for rec in recorded):
        diff.append("recipe")
    if diff:
        raise ValueError(f"--resume: the earlier comparison used other settings ({', '.join(diff)}); its rows are "
                         f"not comparable: use the same settings or a new --output")
    return rows


def compare(cfg: CompareConfig, output_dir: Optional[str] = None, in_process: bool = False,
            previous: Optional[dict] = None) -> dict:
    """Run every method of ``cfg.methods`` (each run in a fresh process unless ``in_process``) and,
    if ``output_dir`` is given, write ``compare.json``, ``compare.md`` and ``compare.png`` there
    (and ``compare_curves.png`` with ``curves``).

    Per trained method: one run per LR of ``cfg.lrs`` (seed ``cfg.seed``), the LR with the lowest
    dev perplexity chosen, then ``seeds - 1`` more runs at that LR (seeds ``seed + 1, ...``).
    Returns ``{"config": ..., "environment": ..., "rows": [...]}``; each row has ``method``,
    ``label``, ``params``, ``params_added``, ``layers``, ``s_per_step``, ``tokens_per_s``,
    ``peak_memory_mib``, ``trainable``, ``dev_ppl``, ``test_ppl`` (and ``ppl`` = ``test_ppl``),
    their ``_spread`` over seeds, ``lr_grid``, ``chosen_lr``, ``seeds``, ``zero_shot`` ({task:
    {"acc", "acc_norm", "n", ...}}, mean over seeds), ``curves`` and ``health`` where asked and
    timings, or ``error`` (the worker's exception, or its exit status if it died).
    ``previous``: an earlier report with the same settings (:func:`resumable_rows`); its finished
    rows are kept and only the other methods run. With ``output_dir`` the report is rewritten after
    every method, so an interrupted comparison can resume. Raises ValueError for bad settings
    (:class:`CompareConfig`).
    """
    t0 = time.time()
    rows = []
    tasks = bool(cfg.tasks)
    done = resumable_rows(cfg, previous) if previous else {}
    wall_before = (previous or {}).get("environment", {}).get("wall_s", 0.0) if done else 0.0
    with tempfile.TemporaryDirectory(prefix="midus-compare-") as tmp:
        tmp = Path(tmp)
        for i, name in enumerate(cfg.methods):
            if name in done:
                print(f"[midus] compare {i + 1}/{len(cfg.methods)}: {name} (kept from the earlier run)",
                      file=sys.stderr, flush=True)
                rows.append(done[name])
                continue
            print(f"[midus] compare {i + 1}/{len(cfg.methods)}: {name}", file=sys.stderr, flush=True)
            if name == "base":
                r = _do({"kind": "run", "name": name, "seed": cfg.seed, "tasks": tasks, "curve": False}, cfg, tmp,
                        name, in_process)
                rows.append(r if "error" in r else _method_row(name, cfg, [], None, [r]))
            else:
                grid = []
                for lr in cfg.lrs:
                    save = str(tmp / f"{name}-lr{lr:g}-model") if tasks and len(cfg.lrs) > 1 else None
                    r = _do({"kind": "run", "name": name, "lr": lr, "seed": cfg.seed, "curve": cfg.curves,
                             "tasks": tasks and len(cfg.lrs) == 1, "save_to": save}, cfg, tmp, f"{name}-lr{lr:g}",
                            in_process)
                    r.setdefault("lr", lr)
                    grid.append(r)
                    print(f"[midus] compare {name} lr {lr:g}: " + (f"error: {r['error']}" if "error" in r else
                          f"dev {r['ppl']['dev']:.3f}, test {r['ppl']['test']:.3f}, {r.get('s_per_step', 0):.2f} "
                          f"s/step"), file=sys.stderr, flush=True)
                ok = [r for r in grid if "error" not in r]
                if not ok:
                    rows.append({**grid[0], "method": name, "label": METHODS[name][2]})
                    continue
                chosen = min(ok, key=lambda r: r["ppl"]["dev"])
                if tasks and len(cfg.lrs) > 1:
                    zs = _do({"kind": "zero_shot", "name": name, "path": str(tmp / f"{name}-lr{chosen['lr']:g}-model")},
                             cfg, tmp, f"{name}-zero-shot", in_process)
                    if "error" in zs:
                        chosen["zero_shot_error"] = zs["error"]
                    else:
                        chosen.update(zs)
                for r in grid:
                    shutil.rmtree(tmp / f"{name}-lr{r['lr']:g}-model", ignore_errors=True)
                seeds = [chosen]
                for seed in range(cfg.seed + 1, cfg.seed + cfg.seeds):
                    seeds.append(_do({"kind": "run", "name": name, "lr": chosen["lr"], "seed": seed, "tasks": tasks,
                                      "curve": cfg.curves}, cfg, tmp, f"{name}-seed{seed}", in_process))
                rows.append(_method_row(name, cfg, grid, chosen, seeds))
            r = rows[-1]
            print(f"[midus] compare {name}: " + (f"error: {r['error']}" if "error" in r else
                  f"test ppl {r['ppl']:.3f}" + (f" at lr {r['chosen_lr']:g}" if r.get("chosen_lr") else "")),
                  file=sys.stderr, flush=True)
            if output_dir:  # after every method: an interrupted comparison keeps what it finished
                write_report(_report(cfg, rows, wall_before + time.time() - t0), output_dir)
    report = _report(cfg, rows, wall_before + time.time() - t0)
    if output_dir:
        write_report(report, output_dir)
    return report


def _report(cfg: CompareConfig, rows: List[dict], wall_s: float) -> dict:
    import platform

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
           platform.machine(), "threads": torch.get_num_threads(), "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "date": time.strftime("%Y-%m-%d"), "wall_s": wall_s}
    return {"config": asdict(cfg), "environment": env, "rows": list(rows)}


def _mean_acc(row: dict) -> Optional[float]:
    zs = row.get("zero_shot") or {}
    accs = [v.get("acc_norm") if v.get("acc_norm") is not None else v.get("acc") for v in zs.values()]
    accs = [a for a in accs if a is not None]
    return sum(accs) / len(accs) if accs else None


def _model_name(model: str) -> str:
    if model == "default":
        from .defaults import DEFAULT_MODEL_NAME

        return f"{DEFAULT_MODEL_NAME} (default)"
    return Path(str(model)).name


def _fmt(x, spec: str, none: str = "") -> str:
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _lr_cell(r: dict) -> str:
    grid = r.get("lr_grid") or []
    if len(grid) < 2:
        return _fmt(r.get("chosen_lr"), "g", "-")
    return ", ".join((f"**{g['lr']:g}**" if g["lr"] == r.get("chosen_lr") else f"{g['lr']:g}") + ": " +
                     (_fmt(g.get("dev_ppl"), ".2f") if "error" not in g else "failed") for g in grid)


def markdown_table(report: dict) -> str:
    """The comparison as a Markdown table (one row per method)."""
    from .analyze import retrieval_gain_words

    rows = report["rows"]
    c, e = report["config"], report["environment"]
    seeds = c.get("seeds", 1)
    tasks = sorted({t for r in rows for t in (r.get("zero_shot") or {})})
    head = (["method", "params", "added", "trained", "s/step", "peak MiB", "peak LR: dev ppl", "test ppl"] + tasks +
            (["mean acc"] if tasks else []))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'][:120]} |" + " |" * (len(head) - 2))
            continue
        zs = r.get("zero_shot") or {}
        trained = {"new": "new blocks", "all": "all"}.get(r.get("trainable"), "-")
        test = f"{r['ppl']:.3f}" + (f" ± {r['test_ppl_spread']:.3f}" if r.get("test_ppl_spread") else "")
        cells = [r["label"], f"{r['params'] / 1e6:.1f}M", f"{r['params_added'] / 1e6:+.1f}M", trained,
                 _fmt(r.get("s_per_step"), ".2f", "-"), _fmt(r.get("peak_memory_mib"), ".0f", "-"), _lr_cell(r), test]
        for t in tasks:
            v = zs.get(t) or {}
            acc = v.get("acc_norm") if v.get("acc_norm") is not None else v.get("acc")
            err = v.get("acc_norm_stderr") if v.get("acc_norm") is not None else v.get("acc_stderr")
            cells.append(_fmt(acc, ".3f") + (f" ± {err:.3f}" if isinstance(err, (int, float)) else ""))
        if tasks:
            cells.append(_fmt(_mean_acc(r), ".3f"))
        lines.append("| " + " | ".join(cells) + " |")
    first = next((r for r in rows if "train_tokens" in r), {})
    lrs = c.get("lrs") or [c.get("lr")]
    recipe = next((r.get("recipe") for r in rows if r.get("method", "").startswith("midus") and r.get("recipe")), None)
    lines += ["", f"Model {_model_name(c['model'])}, data {c['data']}; K = {c['num_blocks']} ({c['placement']}); CPT "
              f"{c['steps']} steps x {c['batch_size']} x {c['seq_len']} tokens "
              f"({first.get('train_tokens', c['steps'] * c['batch_size'] * c['seq_len']):,} tokens, the same data order "
              f"for every method); peak LR chosen per method from {', '.join(f'{x:g}' for x in lrs)} on the dev half of "
              f"the validation documents (bold), the **test** half reported (the first {c['eval_tokens']:,} tokens of each, "
              f"{c['eval_tokens'] - 1:,} of them predicted, window {c['window']}); " + (f"{seeds} seeds at the chosen LR (test ppl: mean ± half the range; zero-shot: "
                                     f"mean). " if seeds > 1 else "one seed. ") +
              "What is trained is each method's default (docs/design.md §3.4: the new blocks for LLaMA Pro, "
              "Avg-/OpT-DeUS and MIDUS, everything otherwise)" + (f"; the memory keys/values follow the recipe {_recipe_words(recipe)}" if recipe else "") +
              ". " + (("Zero-shot: " + (f"first {c['limit']} examples per task" if c['limit'] else
                       "whole validation sets") + ", acc_norm where the task defines it, else acc (± standard error). ")
                      if tasks else "") +
              f"Device: {e.get('gpu') or e.get('cpu')} ({rows[0].get('device', '?') if rows else '?'}), torch "
              f"{e['torch']}, {e['threads']} threads; {e['date']}; total {e['wall_s'] / 60:.1f} min. Peak memory: "
              + ("CUDA max allocated during training." if e.get("gpu") else "process resident set during training.")]
    health = [(r["label"], r["health"]) for r in rows if r.get("health")]
    for label, h in health:
        lines.append(f"\nMemory health of {label} after CPT (dev): top-k weight entropy {h['weight_entropy']:.3f} of "
                     f"ln k = {h['max_entropy']:.3f} ({h['entropy_ratio']:.2f}), slots read {h['slot_usage']:.2f}, "
                     f"{retrieval_gain_words(h['retrieval_gain'])}.")
    return "\n".join(lines) + "\n"


def _recipe_words(recipe: dict) -> str:
    lr = (f"LR {recipe['memory_lr']:g}" if recipe.get("memory_lr") is not None else
          f"{recipe.get('memory_lr_scale', 1):g}x the peak LR")
    sched = recipe.get("memory_lr_schedule", "constant")
    words = f"{lr}, {sched}" + (" to the peak LR" if sched == "decay" else "")
    if recipe.get("memory_max_grad_norm"):
        words += f", clipped on their own at {recipe['memory_max_grad_norm']:g}"
    return f"({words})"


def plot(report: dict, path: str) -> None:
    """Bar charts (test perplexity, mean zero-shot accuracy, seconds per step, peak memory) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if "error" not in r]
    labels = [r["label"] for r in rows]
    panels = [("test perplexity (lower is better)", [r["ppl"] for r in rows],
               [r.get("test_ppl_spread") or 0.0 for r in rows])]
    if any(r.get("zero_shot") for r in rows):
        panels.append(("mean zero-shot accuracy", [_mean_acc(r) or 0.0 for r in rows], None))
    panels += [("training s/step", [r.get("s_per_step") or 0.0 for r in rows], None),
               ("peak memory during training (MiB)", [r.get("peak_memory_mib") or 0.0 for r in rows], None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.45 * len(rows) + 1.6))
    colors = ["tab:red" if r["method"].startswith("midus") else "tab:gray" for r in rows]
    for ax, (title, values, err) in zip(axes, panels):
        ax.barh(range(len(rows)), values, color=colors, xerr=err if err and any(err) else None)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(labels if ax is axes[0] else [""] * len(rows))
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        for i, v in enumerate(values):  # the value at the bar's end: axes start at 0, so read the numbers
            if v:
                ax.text(v, i, f" {v:,.0f}" if v >= 100 else f" {v:.3g}", va="center", fontsize=7)
    c = report["config"]
    fig.suptitle(f"midus compare: {_model_name(c['model'])}, K={c['num_blocks']}, "
                 f"{c['steps']} x {c['batch_size']} x {c['seq_len']} CPT tokens, LR chosen on dev", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(report: dict, path: str) -> None:
    """Learning curves: dev perplexity against CPT step of each method's chosen run(s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in report["rows"]:
        for i, c in enumerate(r.get("curves") or []):
            xs, ys = [p["step"] for p in c["curve"]], [p["ppl"] for p in c["curve"]]
            style = "-" if r["method"].startswith("midus") else "--"
            ax.plot(xs, ys, style, marker="o", ms=3, label=r["label"] if i == 0 else None,
                    color=f"C{report['rows'].index(r) % 10}", alpha=1.0 if i == 0 else 0.5)
    ax.set_xlabel("CPT step")
    ax.set_ylabel("dev perplexity")
    ax.set_title("midus compare: learning curves at each method's chosen LR", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


_REPORT_FILES = ("compare.json", "compare.md", "compare.png", "compare_curves.png")


def _check_output_dir(output_dir: str) -> Path:
    """The folder must be new, empty, or hold only a previous comparison (whose files are replaced)."""
    out = Path(output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output: {output_dir} exists and is not a folder")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in _REPORT_FILES)
        if others:
            raise ValueError(f"--output: {output_dir} holds other files ({', '.join(others[:3])}...); give a new or "
                             "empty folder, or one from a previous `midus compare`")
    return out


def write_report(report: dict, output_dir: str) -> Dict[str, str]:
    """Write compare.json, compare.md and compare.png into ``output_dir`` (see :func:`_check_output_dir`)."""
    out = _check_output_dir(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: str(out / f) for k, f in zip(("json", "md", "png"), _REPORT_FILES)}
    Path(paths["json"]).write_text(json.dumps(report, indent=2))
    Path(paths["md"]).write_text(markdown_table(report))
    plot(report, paths["png"])
    if any(r.get("curves") for r in report["rows"]):
        paths["curves"] = str(out / "compare_curves.png")
        plot_curves(report, paths["curves"])
    return paths


# ----------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``midus compare``."""
    from .train_config import add_recipe_arguments

    p.add_argument("--model", default="default", help="local model folder, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--data", default="wiki", help="training/validation text, as for `midus train` (default: wiki)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="documents held out, halved into dev (choosing) and test (reporting) (default: 0.1)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    p.add_argument("--num-blocks", type=int, default=8, help="K, blocks every method adds (default: 8)")
    p.add_argument("--placement", default="distributed",
                   help="as for `midus upscale`, one for every method (solar ignores it) (default: distributed)")
    p.add_argument("--importance", choices=["layer", "heads"], default="layer",
                   help="with --placement importance: what is measured (default: layer)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="budget: cpu (the README gives its time on 2 cores) or gpu (a larger CPT budget); the flags "
                        "below override it")
    for name, kind, what in (("steps", int, "CPT optimizer steps"), ("batch-size", int, "sequences per step"),
                             ("seq-len", int, "tokens per sequence"), ("eval-tokens", int, "dev and test tokens"),
                             ("window", int, "perplexity window"),
                             ("limit", int, "zero-shot examples per task, 0 = all")):
        p.add_argument(f"--{name}", type=kind, default=None, help=f"{what} (default: from --preset)")
    p.add_argument("--lr", default=None,
                   help="peak LR grid, comma-separated (e.g. 3e-4,1e-3): every trained method runs each and the best "
                        "on dev is reported on test (default: from --preset; cpu: 3e-4,1e-3)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and inits (default: 0)")
    p.add_argument("--seeds", type=int, default=1,
                   help="runs per method at its chosen LR, seeds --seed, --seed+1, ...: mean ± half the range "
                        "(default: 1)")
    p.add_argument("--curves", action="store_true", help="dev perplexity at --points checkpoints of each chosen run, "
                   "and compare_curves.png")
    p.add_argument("--points", type=int, default=4, help="checkpoints per learning curve (default: 4)")
    p.add_argument("--tasks", default="all",
                   help="zero-shot tasks, comma-separated, 'all', or 'none' (default: all)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: auto)")
    p.add_argument("--output", default="midus-compare",
                   help="folder for compare.json, compare.md and compare.png (default: ./midus-compare)")
    p.add_argument("--progress", action="store_true", help="show training progress bars")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished rows of the comparison already in --output (same settings required) and "
                        "run only the other methods; the report is rewritten after every method")
    add_recipe_arguments(p)


def _parse_lrs(text: Optional[str], default: List[float]) -> List[float]:
    if text is None:
        return list(default)
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--lr: expected a number or a comma-separated list of numbers, got {text!r}") from None


def config_from_args(args) -> CompareConfig:
    from .train import recipe_from_args

    preset = PRESETS[args.preset]
    tasks = [] if args.tasks.strip().lower() in ("", "none") else [t.strip() for t in args.tasks.split(",") if t.strip()]

    def pick(name):
        value = getattr(args, name)
        return preset[name] if value is None else value

    return CompareConfig(model=args.model, data=args.data, val_fraction=args.val_fraction,
                         methods=[m.strip() for m in args.methods.split(",") if m.strip()],
                         num_blocks=args.num_blocks, placement=args.placement, importance=args.importance,
                         steps=pick("steps"),
                         batch_size=pick("batch_size"), seq_len=pick("seq_len"), lrs=_parse_lrs(args.lr, preset["lrs"]),
                         warmup=args.warmup, seed=args.seed, seeds=args.seeds, curves=args.curves, points=args.points,
                         recipe=recipe_from_args(args), eval_tokens=pick("eval_tokens"), window=pick("window"),
                         tasks=tasks, limit=pick("limit"), device=args.device, progress=args.progress)


def preflight(cfg: CompareConfig) -> None:
    """Check what each worker would otherwise find out alone, after minutes of work: the model
    folder, the data (and that it has dev and test documents), K and the placement against the
    model's depth, the device. Raises ValueError naming the argument."""
    from transformers import AutoConfig

    import midus
    from .data import dev_test_split, load_documents, split_documents
    from .runtime import parse_placement, pick_device, resolve_model_path

    pick_device(cfg.device)
    if cfg.data != "wiki" and not Path(cfg.data).expanduser().exists():
        raise ValueError(f"--data: not found: {cfg.data} (give 'wiki', a .txt/.jsonl file or a datasets folder)")
    try:
        dev_test_split(split_documents(load_documents(cfg.data), cfg.val_fraction)[1])
    except ValueError as err:
        raise ValueError(f"--data/--val-fraction: {err}") from None
    L = AutoConfig.from_pretrained(resolve_model_path(cfg.model)).get_text_config().num_hidden_layers
    placement = parse_placement(cfg.placement)
    for name in cfg.methods:
        method = METHODS[name][0]
        if method == "solar" and cfg.placement != "distributed":
            raise ValueError(f"--placement: solar's layer order is fixed by K (it drops layers from two copies of the "
                             f"stack); leave solar out of --methods or drop --placement {cfg.placement}")
        try:
            if method == "solar":
                midus.solar_layer_order(L, cfg.num_blocks)
            elif placement == "importance":  # measured in each run; only K can be checked here
                if not 1 <= cfg.num_blocks <= L:
                    raise ValueError(f"num_blocks must satisfy 1 <= num_blocks <= num_layers = {L}, got {cfg.num_blocks}")
            elif method is not None:
                midus.placement_indices(L, cfg.num_blocks, placement)
        except ValueError as err:
            raise ValueError(f"--num-blocks/--placement for {name} on a {L}-layer model: {err}") from None


def run(args) -> int:
    """``midus compare``: run the comparison, print the Markdown table, write the report files."""
    cfg = config_from_args(args)
    _check_output_dir(args.output)  # fail before an hour of work, not after
    preflight(cfg)
    if cfg.tasks:
        from .zeroshot import resolve_tasks

        try:
            cfg.tasks = resolve_tasks(cfg.tasks)
        except ValueError as err:
            raise ValueError(f"--{err}") from None
    previous = None
    if args.resume:
        path = Path(args.output).expanduser() / "compare.json"
        if path.is_file():
            previous = json.loads(path.read_text())
            resumable_rows(cfg, previous)  # refuse other settings before any work
    report = compare(cfg, output_dir=args.output, previous=previous)
    print(markdown_table(report))
    print(f"wrote {args.output}/compare.json, compare.md, compare.png")
    return 0 if all("error" not in r for r in report["rows"]) else 1


def _worker(argv: Sequence[str]) -> int:
    job_file, out_file = argv
    job = json.loads(Path(job_file).read_text())
    cfg = CompareConfig(**job.pop("config"))
    row = _execute(job, cfg)
    Path(out_file).write_text(json.dumps(row))
    return 0 if "error" not in row else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[2:]))
    sys.exit("usage: midus compare ... (this module's entry point is for its worker processes)")
