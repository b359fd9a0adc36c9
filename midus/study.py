"""``midus study``: which training recipe makes the memory learn (learning curves, memory health).

The default model is up-scaled with K memory blocks and trained under each recipe of a grid, with
the same data, budget, peak LR and seeds; per run the dev perplexity at ``points`` checkpoints (a
learning curve, step 0 included), and after training the dev and test perplexity and the memory
health (:func:`midus.analyze.memory_health`: top-k weight entropy against ln k, share of slots
read, learned retrieval against random slots). The recipe with the lowest mean final **dev**
perplexity is chosen; test perplexity is reported beside it and never used for the choice.

A recipe is a training recipe for the memory key/values (:class:`midus.train.TrainConfig`
``memory_*``: LR, schedule, separate clipping) plus memory options of the layer (query norm,
temperature, ...; :data:`midus.MEMORY_DEFAULTS`). :data:`RECIPES` lists them with their sources;
baselines (``llama_pro``) run under the same budget for reference.

Each run is its own process (``--jobs`` at a time) writing ``runs/<name>__s<seed>.json`` in the
output folder; a run whose file exists is skipped, so an interrupted study resumes where it
stopped. ``study.json``, ``study.md`` and ``study.png`` are written from the run files at the end
(or alone with ``--report-only``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["RECIPES", "BASELINES", "StudyConfig", "study", "report", "add_arguments", "run"]

# Every recipe spells out all five memory fields of TrainConfig, starting from the paper's: a change
# of TrainConfig's defaults (the default became the study's choice) must not change what a recipe
# runs. Recipes recorded before this (in a study_config.json or a run's spec) listed only what they
# changed from the defaults of the time, which were the paper's: _full_train reads them alike.
_PAPER_TRAIN = {"memory_lr": None, "memory_lr_scale": 1.0, "memory_lr_schedule": "constant", "memory_lr_decay_steps": 0,
                "memory_max_grad_norm": 0.0}


def _full_train(train: Dict[str, Any]) -> Dict[str, Any]:
    return {**_PAPER_TRAIN, **train}


# name -> (label, TrainConfig memory fields, memory options of the layer, source)
RECIPES: Dict[str, Dict[str, Any]] = {
    "paper": dict(label="paper: memory at the peak LR, constant", train={}, memory={},
                  source="MIDUS (arXiv 2512.13751) appendix: key/value parameters at a constant LR equal to the "
                         "peak LR, no weight decay"),
    "lr10": dict(label="memory LR 10x, constant", train={"memory_lr_scale": 10.0}, memory={},
                 source="lucidrains/ultra-mem (memory LR scaled 10x); this issue's pilot: 10x beat 1x and 30x"),
    "lr10-decay": dict(label="memory LR 10x decaying to 1x", train={"memory_lr_scale": 10.0,
                                                                  "memory_lr_schedule": "decay"}, memory={},
                       source="lucidrains/ultra-mem: value LR 10x, decaying linearly to 1x over training"),
    "lr10-clip": dict(label="memory LR 10x, memory clipped on its own", train={"memory_lr_scale": 10.0,
                                                                              "memory_max_grad_norm": 1.0},
                      memory={}, source="Memory Layers at Scale (Berges et al. 2024, facebookresearch/memory): "
                                        "the memory values get their own gradient clipping"),
    "lr10-rms": dict(label="memory LR 10x, RMS query norm", train={"memory_lr_scale": 10.0},
                     memory={"query_norm": "rms"},
                     source="PKM (Lample et al. 2019) normalises the queries (BatchNorm); per-head RMSNorm here"),
    "lr10-rms-tau": dict(label="memory LR 10x, RMS query norm, learned temperature",
                         train={"memory_lr_scale": 10.0}, memory={"query_norm": "rms", "learn_tau": True},
                         source="a per-head learned softmax temperature (as CLIP learns its logit scale), so "
                                "each head can sharpen its top-k weights"),
    "lr10-decay-tau05": dict(label="memory LR 10x decaying to 1x, softmax temperature 0.5",
                             train={"memory_lr_scale": 10.0, "memory_lr_schedule": "decay"}, memory={"tau": 0.5},
                             source="the best LR schedule of the first round with sharper top-k weights from the start "
                                    "(a fixed temperature below 1; the learned one stayed near 1)"),
}
for _r in RECIPES.values():
    _r["train"] = _full_train(_r["train"])
# Reference rows under the same budget: name -> midus.upscale method.
BASELINES: Dict[str, str] = {"llama_pro": "llama_pro"}


class StudyConfig(argparse.Namespace):
    """The settings (the flags of ``midus study``)."""


def _defaults() -> Dict[str, Any]:
    return dict(model="default", data="wiki", val_fraction=0.1, recipes=list(RECIPES), baselines=list(BASELINES),
                seeds=2, num_blocks=8, placement="distributed", steps=160, batch_size=4, seq_len=128, lr=1e-3,
                warmup=10, points=5, eval_tokens=4096, window=128, health_tokens=1024, jobs=1, device="auto")


def _check(cfg: Dict[str, Any]) -> None:
    unknown = [r for r in cfg["recipes"] if r not in RECIPES]
    if unknown or not cfg["recipes"]:
        raise ValueError(f"--recipes: unknown {unknown or '(none given)'}; expected some of {', '.join(RECIPES)}")
    for name in ("recipes", "baselines"):
        if len(set(cfg[name])) != len(cfg[name]):
            raise ValueError(f"--{name}: each at most once, got {','.join(cfg[name])}")
    unknown = [b for b in cfg["baselines"] if b not in BASELINES]
    if unknown:
        raise ValueError(f"--baselines: unknown {unknown}; expected some of {', '.join(BASELINES)} or none")
    for name in ("seeds", "num_blocks", "steps", "batch_size", "points", "eval_tokens", "health_tokens", "jobs"):
        if int(cfg[name]) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {cfg[name]}")
    if cfg["points"] > cfg["steps"]:
        raise ValueError(f"--points ({cfg['points']}) must not exceed --steps ({cfg['steps']})")
    if not (cfg["lr"] > 0 and math.isfinite(cfg["lr"])) or cfg["warmup"] < 0:
        raise ValueError(f"need --lr > 0 and --warmup >= 0, got {cfg['lr']}, {cfg['warmup']}")
    if cfg["seq_len"] < 2 or cfg["window"] < 2:
        raise ValueError(f"--seq-len and --window must be >= 2, got {cfg['seq_len']}, {cfg['window']}")


def _runs(cfg: Dict[str, Any]) -> List[Dict[str, Any]]:
    runs = []
    for seed in range(cfg["seeds"]):
        for name in cfg["recipes"]:
            runs.append({"name": name, "kind": "recipe", "seed": seed})
        for name in cfg["baselines"]:
            runs.append({"name": name, "kind": "baseline", "seed": seed})
    return runs


def _experiment(cfg: Dict[str, Any], run: Dict[str, Any]):
    from .pipeline import Experiment, curve_steps

    train = {"max_steps": cfg["steps"], "micro_batch_size": cfg["batch_size"], "lr": cfg["lr"],
             "warmup_steps": cfg["warmup"], "trainable": "new"}
    if run["kind"] == "recipe":
        recipe = (cfg.get("recipe_defs") or RECIPES)[run["name"]]
        method, options = "midus", dict(recipe["memory"])
        train.update(_full_train(recipe["train"]))
    else:
        method, options = BASELINES[run["name"]], {}
    return Experiment(model=cfg["model"], data=cfg["data"], val_fraction=cfg["val_fraction"], method=method,
                      num_blocks=cfg["num_blocks"], placement=cfg["placement"], upscale_options=options, train=train,
                      seq_len=cfg["seq_len"], eval_splits=("dev", "test"), eval_tokens=cfg["eval_tokens"],
                      window=cfg["window"], curve_steps=curve_steps(cfg["steps"], cfg["points"]), curve_split="dev",
                      health=method == "midus", health_split="dev", health_tokens=cfg["health_tokens"],
                      seed=run["seed"], device=cfg["device"])


# Settings that may differ when a study resumes: which runs there are and how they are scheduled.
_RESUME_FREE = ("recipes", "baselines", "seeds", "jobs", "recipe_defs")


def _check_resume(cfg: Dict[str, Any], out: Path) -> None:
    """Refuse to add runs to ``out`` made under other settings (their rows would be reported under
    this study's budget), naming the settings and recipe definitions that differ."""
    old_file = out / "study_config.json"
    done = [p for p in (out / "runs").glob("*.json") if not p.name.startswith(".")] if (out / "runs").is_dir() else []
    if not done or not old_file.is_file():
        return
    old = json.loads(old_file.read_text())
    diff = [k for k in cfg if k not in _RESUME_FREE and k in old and old[k] != cfg[k]]
    for name, d in cfg["recipe_defs"].items():
        was = (old.get("recipe_defs") or {}).get(name)
        if was and (_full_train(was["train"]) != _full_train(d["train"]) or was["memory"] != d["memory"]):
            diff.append(f"recipe {name}")
    if diff:
        raise ValueError(f"--output: {out} holds runs made with other settings ({', '.join(diff)}); use the same "
                         f"settings to resume it, or a new --output")


def _run_file(out: Path, run: Dict[str, Any]) -> Path:
    return out / "runs" / f"{run['name']}__s{run['seed']}.json"


def study(cfg: Dict[str, Any], output: str, log=print) -> Dict[str, Any]:
    """Run every (recipe or baseline, seed) of ``cfg`` not yet in ``output``/runs, ``jobs`` worker
    processes at a time, then write the report. Returns the report dict (:func:`report`)."""
    _check(cfg)
    # The definitions travel with the runs: the results say what each name meant.
    cfg = {**cfg, "recipe_defs": {name: RECIPES[name] for name in cfg["recipes"]}}
    out = Path(output).expanduser()
    _check_resume(cfg, out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "study_config.json").write_text(json.dumps(cfg, indent=2))
    todo = [r for r in _runs(cfg) if not _run_file(out, r).exists()]
    log(f"[midus] study: {len(_runs(cfg)) - len(todo)} runs done, {len(todo)} to run, {cfg['jobs']} at a time")
    threads = max(1, (os.cpu_count() or 1) // cfg["jobs"])
    running: List[tuple] = []
    while todo or running:
        while todo and len(running) < cfg["jobs"]:
            r = todo.pop(0)
            spec = out / "runs" / f".{r['name']}__s{r['seed']}.spec.json"
            spec.write_text(json.dumps({"config": cfg, "run": r}))
            logf = open(out / "runs" / f"{r['name']}__s{r['seed']}.log", "w")
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MIDUS_STUDY_THREADS": str(threads)}
            proc = subprocess.Popen([sys.executable, "-m", "midus.study", "--worker", str(spec),
                                     str(_run_file(out, r))], stdout=logf, stderr=subprocess.STDOUT, env=env)
            running.append((proc, r, logf, time.time()))
            log(f"[midus] study: started {r['name']} seed {r['seed']}")
        time.sleep(2.0)
        for item in list(running):
            proc, r, logf, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            logf.close()
            status = "done" if proc.returncode == 0 else f"FAILED (status {proc.returncode}; see its .log)"
            log(f"[midus] study: {r['name']} seed {r['seed']} {status} in {time.time() - t0:.0f} s")
    rep = report(out)
    log(f"[midus] study: wrote {out / 'study.md'}, study.json, study.png")
    return rep


def _worker(spec_file: str, out_file: str) -> int:
    import torch

    from .pipeline import experiment_dict, run_experiment

    threads = os.environ.get("MIDUS_STUDY_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    spec = json.loads(Path(spec_file).read_text())
    cfg, r = spec["config"], spec["run"]
    exp = _experiment(cfg, r)
    row = run_experiment(exp)
    row.update(name=r["name"], kind=r["kind"], experiment=experiment_dict(exp), threads=torch.get_num_threads())
    tmp = Path(out_file).with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    os.replace(tmp, out_file)  # only complete runs count as done
    Path(spec_file).unlink(missing_ok=True)
    return 0


# ----------------------------------------------------------------------------- report


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _spread(xs: Sequence[float]) -> float:
    """Half the range (max - min) / 2: with 2 seeds, the distance of each from their mean."""
    return (max(xs) - min(xs)) / 2 if len(xs) > 1 else 0.0


def _summarise(rows: List[dict], defs: Dict[str, dict]) -> List[dict]:
    by_name: Dict[str, List[dict]] = {}
    for r in rows:
        by_name.setdefault(r["name"], []).append(r)
    out = []
    for name, rs in by_name.items():
        rs.sort(key=lambda r: r["seed"])
        steps = [p["step"] for p in rs[0].get("curve", [])]
        curve = [{"step": s, "ppl": _mean([r["curve"][i]["ppl"] for r in rs]),
                  "spread": _spread([r["curve"][i]["ppl"] for r in rs])} for i, s in enumerate(steps)]
        s = {"name": name, "kind": rs[0]["kind"], "seeds": [r["seed"] for r in rs], "curve": curve,
             "label": defs[name]["label"] if name in defs else f"baseline: {name}",
             "source": defs.get(name, {}).get("source", ""), "params_added": rs[0]["params_added"],
             "s_per_step": _mean([r["s_per_step"] for r in rs])}
        for split in ("dev", "test"):
            vals = [r["ppl"][split] for r in rs]
            s[f"{split}_ppl"], s[f"{split}_spread"] = _mean(vals), _spread(vals)
        if all("health" in r for r in rs):
            for key in ("weight_entropy", "max_entropy", "entropy_ratio", "slot_usage", "retrieval_gain"):
                vals = [r["health"][key] for r in rs]
                s[key], s[key + "_spread"] = _mean(vals), _spread(vals)
        out.append(s)
    return out


def report(output: str) -> Dict[str, Any]:
    """Read ``output``/runs/*.json and write ``study.json``, ``study.md`` and ``study.png``."""
    out = Path(output).expanduser()
    # Hidden files are the specs of runs that were interrupted (pathlib's glob matches them).
    rows = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json")) if not p.name.startswith(".")]
    if not rows:
        raise ValueError(f"--output: no finished runs in {out / 'runs'}")
    cfg = json.loads((out / "study_config.json").read_text()) if (out / "study_config.json").exists() else {}
    summary = _summarise(rows, {**RECIPES, **cfg.get("recipe_defs", {})})
    recipes = [s for s in summary if s["kind"] == "recipe"]
    chosen = min(recipes, key=lambda s: s["dev_ppl"])["name"] if recipes else None
    base = rows[0].get("curve", [{}])[0].get("ppl")
    # A grid stopped early is reported as such, never as if the missing runs had not been asked for.
    done = {(r["name"], r["seed"]) for r in rows}
    missing = [f"{name} seed {seed}" for name in cfg.get("recipes", []) + cfg.get("baselines", [])
               for seed in range(cfg.get("seeds", 0)) if (name, seed) not in done]
    rep = {"config": cfg, "chosen": chosen, "chosen_by": "lowest mean dev perplexity after training",
           "base_dev_ppl": base, "summary": summary, "missing": missing, "runs": rows,
           "environment": _environment()}
    (out / "study.json").write_text(json.dumps(rep, indent=1))
    (out / "study.md").write_text(markdown(rep))
    try:
        plot(rep, out / "study.png")
    except Exception as err:  # a figure is not worth losing the table for
        print(f"[midus] study: no figure ({type(err).__name__}: {err})", file=sys.stderr)
    return rep


def _environment() -> Dict[str, Any]:
    import platform

    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d")}


def _pm(x: Optional[float], spread: Optional[float], fmt: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:{fmt}}" + (f" ± {spread:{fmt}}" if spread else "")


def markdown(rep: Dict[str, Any]) -> str:
    """The study as Markdown: one row per recipe / baseline (mean ± half-range over seeds)."""
    summary, cfg = rep["summary"], rep["config"]
    steps = [p["step"] for p in summary[0]["curve"]]
    head = (["recipe", "added"] + [f"dev@{s}" for s in steps] + ["dev ppl", "test ppl", "weight entropy / ln k",
            "slots read", "learned vs random (nats)", "s/step"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in sorted(summary, key=lambda s: (s["kind"] != "recipe", s["dev_ppl"])):
        mark = " **(chosen)**" if s["name"] == rep["chosen"] else ""
        cells = [f"`{s['name']}`{mark}", f"{s['params_added'] / 1e6:+.1f}M"]
        cells += [_pm(p["ppl"], None, ".2f") for p in s["curve"]]
        cells += [_pm(s["dev_ppl"], s["dev_spread"]), _pm(s["test_ppl"], s["test_spread"]),
                  _pm(s.get("entropy_ratio"), s.get("entropy_ratio_spread"), ".3f"),
                  _pm(s.get("slot_usage"), s.get("slot_usage_spread"), ".3f"),
                  _pm(s.get("retrieval_gain"), s.get("retrieval_gain_spread"), ".3f"), f"{s['s_per_step']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    env = rep["environment"]
    lines += ["", f"Base model dev perplexity {rep['base_dev_ppl']:.3f}. K = {cfg.get('num_blocks')} "
              f"({cfg.get('placement')}); {cfg.get('steps')} steps x {cfg.get('batch_size')} x {cfg.get('seq_len')} "
              f"tokens, peak LR {cfg.get('lr')} (warm-up {cfg.get('warmup')}, cosine), new blocks trained; seeds "
              f"{cfg.get('seeds')} (mean ± half the range). Perplexity on the first {cfg.get('eval_tokens')} tokens of "
              f"dev and of test (window {cfg.get('window')}); memory health on {cfg.get('health_tokens')} dev tokens: "
              f"mean top-k weight entropy over ln k (1 = uniform weights), mean share of slots read, loss with k "
              f"random slots at uniform weights minus the learned loss. Chosen: `{rep['chosen']}` "
              f"({rep['chosen_by']}; test never used). {env.get('gpu') or env.get('cpu')}, torch {env.get('torch')}, "
              f"{env.get('date')}.", ""]
    if rep.get("missing"):
        lines += [f"Not run (the grid was stopped before them): {', '.join(rep['missing'])}.", ""]
    lines += ["Recipes:", ""] + [f"- `{s['name']}`: {s['label']}. {s['source']}" for s in summary
                                 if s["kind"] == "recipe"]
    return "\n".join(lines) + "\n"


def plot(rep: Dict[str, Any], path) -> None:
    """Learning curves (dev perplexity against step, mean over seeds with the range shaded) and
    the memory health (weight entropy ratio against learned-vs-random gain) per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for s in sorted(rep["summary"], key=lambda s: s["dev_ppl"]):
        xs = [p["step"] for p in s["curve"]]
        ys = [p["ppl"] for p in s["curve"]]
        lo = [p["ppl"] - p["spread"] for p in s["curve"]]
        hi = [p["ppl"] + p["spread"] for p in s["curve"]]
        style = "--" if s["kind"] != "recipe" else "-"
        line, = ax.plot(xs, ys, style, marker="o", ms=3, label=s["name"] + (" (chosen)" if s["name"] == rep["chosen"]
                                                                          else ""))
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        if "entropy_ratio" in s:
            ax2.errorbar(s["entropy_ratio"], s["retrieval_gain"], xerr=s["entropy_ratio_spread"],
                         yerr=s["retrieval_gain_spread"], fmt="o", color=line.get_color())
            ax2.annotate(s["name"], (s["entropy_ratio"], s["retrieval_gain"]), fontsize=7, xytext=(3, 3),
                         textcoords="offset points")
    ax.set_xlabel("CPT step")
    ax.set_ylabel("dev perplexity")
    ax.set_title("learning curves (mean over seeds, range shaded)", fontsize=9)
    ax.legend(fontsize=7)
    ax2.axvline(0.85, color="gray", lw=0.8, ls=":")
    ax2.axhline(0.1, color="gray", lw=0.8, ls=":")
    ax2.set_xlabel("top-k weight entropy / ln k (1 = uniform)")
    ax2.set_ylabel("random slots minus learned (nats)")
    ax2.set_title("memory health after CPT (dotted: the issue's targets)", fontsize=9)
    cfg = rep["config"]
    fig.suptitle(f"midus study: {cfg.get('steps')} x {cfg.get('batch_size')} x {cfg.get('seq_len')} tokens, "
                 f"K = {cfg.get('num_blocks')}, {cfg.get('seeds')} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``midus study``."""
    d = _defaults()
    p.add_argument("--model", default=d["model"], help="local model folder, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=d["data"], help="text, as for `midus train` (default: wiki)")
    p.add_argument("--recipes", default="all", help=f"comma-separated subset of {','.join(RECIPES)} (default: all)")
    p.add_argument("--baselines", default=",".join(BASELINES),
                   help=f"reference methods under the same budget: {','.join(BASELINES)} or 'none' (default: all)")
    for name, kind, what in (("seeds", int, "seeds per recipe"), ("num-blocks", int, "K, memory blocks"),
                             ("steps", int, "CPT steps"), ("batch-size", int, "sequences per step"),
                             ("seq-len", int, "tokens per sequence"), ("lr", float, "peak LR"),
                             ("warmup", int, "warm-up steps"), ("points", int, "dev checkpoints on each curve"),
                             ("eval-tokens", int, "dev and test tokens scored"),
                             ("window", int, "perplexity window"), ("health-tokens", int, "dev tokens for the "
                                                                                         "memory health"),
                             ("jobs", int, "runs at a time (each gets cores / jobs threads)")):
        key = name.replace("-", "_")
        p.add_argument(f"--{name}", type=kind, default=d[key], help=f"{what} (default: {d[key]})")
    p.add_argument("--placement", default=d["placement"], help="as for `midus upscale` (default: distributed)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: auto)")
    p.add_argument("--output", default="midus-study", help="folder for runs/, study.json/.md/.png; an existing "
                   "one is resumed (default: ./midus-study)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from the finished runs")


def run(args) -> int:
    """``midus study``: run the grid (resuming), print the table, write the report."""
    if args.report_only:
        rep = report(args.output)
    else:
        cfg = {k: getattr(args, k) for k in _defaults() if k not in ("recipes", "baselines", "val_fraction")}
        cfg["recipes"] = list(RECIPES) if args.recipes == "all" else [r.strip() for r in args.recipes.split(",")
                                                                      if r.strip()]
        cfg["baselines"] = [] if args.baselines.strip().lower() in ("", "none") else \
            [b.strip() for b in args.baselines.split(",") if b.strip()]
        cfg["val_fraction"] = 0.1
        _check(cfg)
        from .runtime import parse_placement, pick_device, resolve_model_path

        # Once, before any worker starts: a bad flag is one error, not one per run, and the default
        # model is fetched by one process rather than raced for by --jobs workers.
        parse_placement(cfg["placement"])
        pick_device(cfg["device"])
        resolve_model_path(cfg["model"])
        rep = study(cfg, args.output, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(markdown(rep))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[2], sys.argv[3]))
    sys.exit("usage: midus study ... (this module's entry point is for its worker processes)")
