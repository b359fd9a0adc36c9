"""``midus compare``: the paper's comparison of up-scaling methods, at small scale, on a real model.

The paper (arXiv 2512.13751, section 4) grows Llama-3.2-1B by K blocks with each method, gives
every result the same continued pre-training (CPT), and compares perplexity and zero-shot
accuracy. This module runs the same protocol on any local model (by default the embedded
SmolLM2-135M and the Wikipedia text of :mod:`midus.defaults`):

- methods (``METHODS``): ``base`` (the model as it is, no training: the reference row),
  ``base_cpt`` (the base model under the same CPT), ``dus``, ``llama_pro``, ``solar``, ``lesa``,
  ``midus`` (HML memory blocks) and ``midus_pkm`` (PKM memory blocks), all with the same K and
  placement (spec 3.2, 3.3);
- the same token budget for every trained row: ``steps`` optimizer steps of ``batch_size`` x
  ``seq_len`` tokens, the same data order (seed) and the same peak LR; what is trained follows
  each method's default (spec 3.4: only the new blocks for midus and llama_pro, everything
  otherwise);
- per row: parameters (and those added), training seconds per step, peak memory during
  training, validation perplexity (sliding window, :func:`midus.evaluate.perplexity`) and
  zero-shot accuracy (:func:`midus.zeroshot.evaluate_zero_shot`, lm-evaluation-harness).

Each row runs in its own Python process, so one method's memory can not inflate another's peak
and a failure is reported in its row instead of ending the comparison. Peak memory is
``torch.cuda.max_memory_allocated`` during training on a GPU, and on a CPU the peak resident set
size of the process during training (sampled every 20 ms from ``/proc/self/status``; the
process's lifetime peak where that file does not exist).

This is a small-scale reproduction: a 135M model, minutes of CPT on about 10K tokens, and zero-
shot accuracy on a few dozen examples per task have wide error bars (the table gives the
standard error); read the ranking with that in mind.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["METHODS", "CompareConfig", "PRESETS", "compare", "run_method", "write_report", "add_arguments", "run"]

# name -> (midus.upscale method or None, its options, label in the table)
METHODS: Dict[str, tuple] = {
    "base": (None, {}, "base (no CPT)"),
    "base_cpt": (None, {}, "base + CPT"),
    "dus": ("dus", {}, "DUS (copied blocks)"),
    "llama_pro": ("llama_pro", {}, "LLaMA Pro"),
    "solar": ("solar", {}, "SOLAR"),
    "lesa": ("lesa", {}, "LESA"),
    "midus": ("midus", {"memory": "hml"}, "MIDUS (HML)"),
    "midus_pkm": ("midus", {"memory": "pkm"}, "MIDUS (PKM)"),
}

# The CPU preset took 20.6 min on 2 shared cores (README); the GPU preset
# is a larger budget for a real comparison (still far below the paper's 2B tokens).
PRESETS = {
    "cpu": dict(steps=20, batch_size=4, seq_len=128, eval_tokens=4096, window=128, limit=20),
    "gpu": dict(steps=300, batch_size=16, seq_len=512, eval_tokens=65536, window=512, limit=0),
}


@dataclass
class CompareConfig:
    """Settings of :func:`compare` (the CLI flags of ``midus compare``). ``limit`` is examples per
    zero-shot task (0: the whole validation set); ``tasks`` are :data:`midus.zeroshot` task names
    (empty: no zero-shot evaluation)."""
    model: str = "default"
    data: str = "wiki"
    val_fraction: float = 0.1
    methods: List[str] = field(default_factory=lambda: list(METHODS))
    num_blocks: int = 8
    placement: str = "distributed"
    steps: int = PRESETS["cpu"]["steps"]
    batch_size: int = PRESETS["cpu"]["batch_size"]
    seq_len: int = PRESETS["cpu"]["seq_len"]
    lr: float = 3e-4
    warmup: int = 2
    seed: int = 0
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
        for name in ("num_blocks", "steps", "batch_size", "seq_len", "eval_tokens", "window"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2 or self.window < 2:
            raise ValueError(f"seq_len and window must be >= 2, got {self.seq_len} and {self.window}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods: each at most once, got {self.methods}")
        if not self.lr > 0 or self.warmup < 0:
            raise ValueError(f"need lr > 0 and warmup >= 0, got lr={self.lr}, warmup={self.warmup}")
        if self.limit < 0:
            raise ValueError(f"limit must be >= 0 (0: whole validation sets), got {self.limit}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")


class _PeakRSS:
    """Peak resident set size (bytes) of this process while the ``with`` block runs."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._proc = Path("/proc/self/status").exists()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        if self._proc:
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._proc:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
        else:  # lifetime peak; ru_maxrss is KiB on Linux, bytes on macOS
            scale = 1 if sys.platform == "darwin" else 1024
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        return False


def _count(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def run_method(name: str, cfg: CompareConfig) -> dict:
    """One row of the comparison, in this process: up-scale, train, evaluate. Returns a
    JSON-serialisable dict (see :func:`compare`)."""
    import torch

    import midus
    from .cli import _parse_placement, load_model
    from .data import load_corpus, pack_sequences
    from .evaluate import perplexity
    from .train import train

    method, options, label = METHODS[name]
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    base, tokenizer, path = load_model(cfg.model)
    n_base = _count(base)
    model = base
    if method is not None:
        placement = _parse_placement(cfg.placement)
        if method == "solar":  # its layer order is fixed by K
            placement = "distributed"
        model = midus.upscale(base, method, num_blocks=cfg.num_blocks, placement=placement, **options)
        del base
    model.to(device)
    row = {"method": name, "label": label, "params": _count(model), "params_added": _count(model) - n_base,
           "layers": int(model.config.get_text_config().num_hidden_layers), "device": str(device),
           "setup_s": time.time() - t0}

    if name != "base":
        seqs = pack_sequences(load_corpus(cfg.data, tokenizer, split="train", val_fraction=cfg.val_fraction),
                              cfg.seq_len)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with _PeakRSS() as rss:
            result = train(model, seqs, max_steps=cfg.steps, micro_batch_size=cfg.batch_size, lr=cfg.lr,
                           warmup_steps=min(cfg.warmup, cfg.steps - 1), seed=cfg.seed, progress=cfg.progress)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss.peak
        row.update(train_steps=result.steps, train_tokens=result.tokens, train_s=result.seconds,
                   s_per_step=result.seconds / max(result.steps, 1), tokens_per_s=result.tokens_per_s,
                   trainable=result.trainable, trainable_params=result.trainable_params,
                   final_loss=result.final_loss, peak_memory_mib=peak / 2 ** 20,
                   peak_memory_kind="cuda_max_allocated" if device.type == "cuda" else "process_rss")
    model.eval()
    val = load_corpus(cfg.data, tokenizer, split="val", val_fraction=cfg.val_fraction, max_tokens=cfg.eval_tokens)
    ppl = perplexity(model, val, window=cfg.window, device=device,
                     autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    row.update(ppl=ppl.ppl, eval_tokens=ppl.tokens)
    if cfg.tasks:
        from .zeroshot import evaluate_zero_shot, resolve_tasks

        tasks = resolve_tasks(cfg.tasks)
        t1 = time.time()
        row["zero_shot"] = evaluate_zero_shot(model, tokenizer, tasks, limit=cfg.limit or None, device=device,
                                              autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
                                              progress=cfg.progress)
        row["zero_shot_s"] = time.time() - t1
    row["wall_s"] = time.time() - t0
    return row


def _run_in_subprocess(name: str, cfg: CompareConfig, workdir: Path) -> dict:
    cfg_file, out_file = workdir / f"{name}.config.json", workdir / f"{name}.json"
    cfg_file.write_text(json.dumps(asdict(cfg)))
    cmd = [sys.executable, "-m", "midus.compare", "--worker", name, str(cfg_file), str(out_file)]
    try:  # the worker's progress goes to our stderr as it happens; stdout is kept for the table
        err_fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        err_fd = None
    proc = subprocess.run(cmd, stdout=err_fd, stderr=err_fd)
    if out_file.exists():
        return json.loads(out_file.read_text())
    return {"method": name, "label": METHODS[name][2], "error": f"worker process exited with status {proc.returncode}"}


def compare(cfg: CompareConfig, output_dir: Optional[str] = None, in_process: bool = False) -> dict:
    """Run every method of ``cfg.methods`` (each in a fresh process unless ``in_process``) and, if
    ``output_dir`` is given, write ``compare.json``, ``compare.md`` and ``compare.png`` there.

    Returns ``{"config": ..., "environment": ..., "rows": [...]}``; each row has ``method``,
    ``label``, ``params``, ``params_added``, ``layers``, ``s_per_step``, ``tokens_per_s``,
    ``peak_memory_mib``, ``trainable``, ``ppl``, ``zero_shot`` ({task: {"acc", "acc_norm", "n", ...}})
    and timings, or ``error`` (the worker's exception, or its exit status if it died).
    Raises ValueError for bad settings (:class:`CompareConfig`).
    """
    import platform

    import torch

    t0 = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="midus-compare-") as tmp:
        for i, name in enumerate(cfg.methods):
            print(f"[midus] compare {i + 1}/{len(cfg.methods)}: {name}", file=sys.stderr, flush=True)
            if in_process:
                rows.append(run_method(name, cfg))
            else:
                rows.append(_run_in_subprocess(name, cfg, Path(tmp)))
            r = rows[-1]
            print(f"[midus] compare {name}: " + (f"error: {r['error']}" if "error" in r else
                  f"ppl {r['ppl']:.3f}, {r.get('s_per_step', 0):.2f} s/step, {r['wall_s']:.0f} s"),
                  file=sys.stderr, flush=True)
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
           platform.machine(), "threads": torch.get_num_threads(), "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "date": time.strftime("%Y-%m-%d"), "wall_s": time.time() - t0}
    report = {"config": asdict(cfg), "environment": env, "rows": rows}
    if output_dir:
        write_report(report, output_dir)
    return report


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


def markdown_table(report: dict) -> str:
    """The comparison as a Markdown table (one row per method)."""
    rows = report["rows"]
    tasks = sorted({t for r in rows for t in (r.get("zero_shot") or {})})
    head = ["method", "params", "added", "trained", "s/step", "peak MiB", "val ppl"] + tasks + (["mean acc"] if tasks else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'][:120]} |" + " |" * (len(head) - 2))
            continue
        zs = r.get("zero_shot") or {}
        trained = {"new": "new blocks", "all": "all"}.get(r.get("trainable"), "-")
        cells = [r["label"], f"{r['params'] / 1e6:.1f}M", f"{r['params_added'] / 1e6:+.1f}M", trained,
                 _fmt(r.get("s_per_step"), ".2f", "-"), _fmt(r.get("peak_memory_mib"), ".0f", "-"),
                 f"{r['ppl']:.3f}"]
        for t in tasks:
            v = zs.get(t) or {}
            acc = v.get("acc_norm") if v.get("acc_norm") is not None else v.get("acc")
            err = v.get("acc_norm_stderr") if v.get("acc_norm") is not None else v.get("acc_stderr")
            cells.append(_fmt(acc, ".3f") + (f" ± {err:.3f}" if isinstance(err, (int, float)) else ""))
        if tasks:
            cells.append(_fmt(_mean_acc(r), ".3f"))
        lines.append("| " + " | ".join(cells) + " |")
    c, e = report["config"], report["environment"]
    first = next((r for r in rows if "train_tokens" in r), {})
    lines += ["", f"Model {_model_name(c['model'])}, data {c['data']}; K = {c['num_blocks']} ({c['placement']}); CPT {c['steps']} steps x {c['batch_size']} x "
              f"{c['seq_len']} tokens ({first.get('train_tokens', c['steps'] * c['batch_size'] * c['seq_len']):,} "
              f"tokens, the same data order for every method), peak LR {c['lr']:g}; what is trained is each method's "
              f"default (spec 3.4: the new blocks for LLaMA Pro and MIDUS, everything otherwise); perplexity on {c['eval_tokens']:,} validation tokens (window "
              f"{c['window']}); " + (("zero-shot: " + (f"first {c['limit']} examples per task" if c['limit'] else
              "whole validation sets") + ", acc_norm where the task defines it, else acc (± standard error). ")
              if tasks else "") + "Device: "
              f"{e.get('gpu') or e.get('cpu')} ({rows[0].get('device', '?') if rows else '?'}), torch {e['torch']}, "
              f"{e['threads']} threads; {e['date']}; total {e['wall_s'] / 60:.1f} min. Peak memory: "
              + ("CUDA max allocated during training." if e.get("gpu") else "process RSS during training.")]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
    """Bar charts (perplexity, mean zero-shot accuracy, seconds per step, peak memory) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if "error" not in r]
    labels = [r["label"] for r in rows]
    panels = [("validation perplexity (lower is better)", [r["ppl"] for r in rows])]
    if any(r.get("zero_shot") for r in rows):
        panels.append(("mean zero-shot accuracy", [_mean_acc(r) or 0.0 for r in rows]))
    panels += [
              ("training s/step", [r.get("s_per_step") or 0.0 for r in rows]),
              ("peak memory during training (MiB)", [r.get("peak_memory_mib") or 0.0 for r in rows])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.45 * len(rows) + 1.6))
    colors = ["tab:red" if r["method"].startswith("midus") else "tab:gray" for r in rows]
    for ax, (title, values) in zip(axes, panels):
        ax.barh(range(len(rows)), values, color=colors)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(labels if ax is axes[0] else [""] * len(rows))
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        for i, v in enumerate(values):  # the value at the bar's end: axes start at 0, so read the numbers
            if v:
                ax.text(v, i, f" {v:,.0f}" if v >= 100 else f" {v:.3g}", va="center", fontsize=7)
    c = report["config"]
    fig.suptitle(f"midus compare: {_model_name(c['model'])}, K={c['num_blocks']}, "
                 f"{c['steps']} x {c['batch_size']} x {c['seq_len']} CPT tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


_REPORT_FILES = ("compare.json", "compare.md", "compare.png")


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
    return paths


# ----------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``midus compare``."""
    p.add_argument("--model", default="default", help="local model folder, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--data", default="wiki", help="training/validation text, as for `midus train` (default: wiki)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="documents held out for validation (default: 0.1)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    p.add_argument("--num-blocks", type=int, default=8, help="K, blocks every method adds (default: 8)")
    p.add_argument("--placement", default="distributed", help="as for `midus upscale` (solar ignores it)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="budget: cpu (about 21 min on 2 cores) or gpu (a larger CPT budget); the flags below "
                        "override it")
    for name, kind, what in (("steps", int, "CPT optimizer steps"), ("batch-size", int, "sequences per step"),
                             ("seq-len", int, "tokens per sequence"), ("eval-tokens", int, "validation tokens"),
                             ("window", int, "perplexity window"),
                             ("limit", int, "zero-shot examples per task, 0 = all")):
        p.add_argument(f"--{name}", type=kind, default=None, help=f"{what} (default: from --preset)")
    p.add_argument("--lr", type=float, default=3e-4,
                   help="peak LR, the same for every method (the memory keys/values keep it constant, spec 3.4; "
                        "default: 3e-4; 1e-3 raised the perplexity of the methods that train every weight)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and inits (default: 0)")
    p.add_argument("--tasks", default="all",
                   help="zero-shot tasks, comma-separated, 'all', or 'none' (default: all)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: auto)")
    p.add_argument("--output", default="midus-compare",
                   help="folder for compare.json, compare.md and compare.png (default: ./midus-compare)")
    p.add_argument("--progress", action="store_true", help="show training progress bars")


def config_from_args(args) -> CompareConfig:
    preset = PRESETS[args.preset]
    tasks = [] if args.tasks.strip().lower() in ("", "none") else [t.strip() for t in args.tasks.split(",") if t.strip()]

    def pick(name):
        value = getattr(args, name)
        return preset[name] if value is None else value

    return CompareConfig(model=args.model, data=args.data, val_fraction=args.val_fraction,
                         methods=[m.strip() for m in args.methods.split(",") if m.strip()],
                         num_blocks=args.num_blocks, placement=args.placement, steps=pick("steps"),
                         batch_size=pick("batch_size"), seq_len=pick("seq_len"), lr=args.lr, warmup=args.warmup,
                         seed=args.seed, eval_tokens=pick("eval_tokens"), window=pick("window"), tasks=tasks,
                         limit=pick("limit"), device=args.device, progress=args.progress)


def preflight(cfg: CompareConfig) -> None:
    """Check what each worker would otherwise find out alone, after minutes of work: the model
    folder, the data, K and the placement against the model's depth, the device. Raises
    ValueError (or CLIError) naming the argument."""
    import torch
    from transformers import AutoConfig

    import midus
    from .cli import _parse_placement, _resolve_model_path

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    if cfg.data != "wiki" and not Path(cfg.data).expanduser().exists():
        raise ValueError(f"--data: not found: {cfg.data} (give 'wiki', a .txt/.jsonl file or a datasets folder)")
    L = AutoConfig.from_pretrained(_resolve_model_path(cfg.model)).get_text_config().num_hidden_layers
    placement = _parse_placement(cfg.placement)
    for name in cfg.methods:
        method = METHODS[name][0]
        try:
            if method == "solar":
                midus.solar_layer_order(L, cfg.num_blocks)
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
    report = compare(cfg, output_dir=args.output)
    print(markdown_table(report))
    print(f"wrote {args.output}/compare.json, compare.md, compare.png")
    return 0 if all("error" not in r for r in report["rows"]) else 1


def _worker(argv: Sequence[str]) -> int:
    name, cfg_file, out_file = argv
    cfg = CompareConfig(**json.loads(Path(cfg_file).read_text()))
    try:
        row = run_method(name, cfg)
    except Exception as err:  # reported in the method's row; the comparison goes on
        import traceback

        traceback.print_exc()
        row = {"method": name, "label": METHODS[name][2], "error": f"{type(err).__name__}: {err}"}  # its last line
    Path(out_file).write_text(json.dumps(row))
    return 0 if "error" not in row else 1


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[2:]))
    sys.exit("usage: midus compare ... (this module's entry point is for its worker processes)")
