"""Tables and target checks from benchmark records (the results file's ``subjects.*.records``).

Targets are those of docs/benchmarks.md §3, stated as ratios against baselines measured in the same run. The GPU
targets are evaluated on any device but ``applies`` only on CUDA; on CPU they are informative
(the CPU sizes are scaled down, and a CPU is not what they were set for).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

# (subject, case, impl, mode, field, op, limit, applies_on, what)
TARGETS = [
    ("ops", "hml", "midus_ops", "fwd", "speedup", ">=", 20.0, "cuda", "HML op fwd >= 20x eager"),
    ("ops", "hml", "midus_ops", "fwd_bwd", "speedup", ">=", 12.0, "cuda", "HML op fwd+bwd >= 12x eager"),
    ("ops", "hml", "midus_ops", "fwd_bwd", "memory_ratio", "<=", 0.1, "cuda", "HML op peak <= 1/10 of eager"),
    ("ops", "hive_gather_noproj", "midus_ops", "fwd", "pct_of_copy", ">=", 85.0, "cuda",
     "large-memory gather fwd >= 85% of copy bandwidth"),
    ("ops", "hml", "midus_ops", "fwd", "speedup", ">=", 4.0, "cpu", "HML op fwd >= 4x eager (CPU)"),
    ("ops", "hml", "midus_ops", "fwd_bwd", "speedup", ">=", 4.0, "cpu", "HML op fwd+bwd >= 4x eager (CPU)"),
    ("blocks", "block", "memory_block", "fwd_bwd", "time_ratio", "<=", 0.5, "cuda",
     "memory block fwd+bwd <= 1/2 DUS block"),
    ("blocks", "block", "memory_block", "fwd_bwd", "memory_ratio", "<=", 1.0, "cuda",
     "memory block peak <= DUS block"),
    ("models", "train", "midus", "train_step", "time_ratio", "<=", 1.15, "cuda",
     "MIDUS 16+8 train step <= 1.15x base"),
    ("models", "train", "dus", "train_step", "time_ratio", "~", 1.4, "cuda",
     "DUS 24 train step about 1.4x base (reference point)"),
    ("models", "train", "midus", "train_step", "memory_ratio", "<=", 27500 / 25738, "cuda",
     "MIDUS 16+8 peak <= 27500/25738 of base"),
    ("decode", "N=1", "hml", "fwd", "time_ratio", "<=", 0.25, "cuda", "HML fwd at N=1 <= 1/4 FFN (eager launch)"),
    ("decode", "N=1", "hml+graph", "fwd", "time_ratio", "<=", 0.25, "cuda", "HML fwd at N=1 <= 1/4 FFN (CUDA graph)"),
]


def _find(records: Iterable[Dict[str, Any]], subject, case, impl, mode) -> Optional[Dict[str, Any]]:
    for r in records:
        if (r.get("subject"), r.get("case"), r.get("impl"), r.get("mode")) == (subject, case, impl, mode):
            return r
    return None


def _not_measured(records: List[Dict[str, Any]], r: Dict[str, Any], fld: str):
    """(met, why) for a record without the target's field: (False, why) when the implementation
    or its baseline failed, (None, why) when either was skipped (e.g. time budget)."""
    b = _find(records, r["subject"], r["case"], r.get("baseline"), r["mode"])
    for who, rec in ((r["impl"], r), (f"baseline {r.get('baseline')}", b)):
        if rec is None:
            return False, f"{who} not measured"
        if "error" in rec:
            return False, f"{who} failed: {rec['error'][:200]}"
        if "skipped" in rec:
            return None, f"{who} skipped: {rec['skipped']}"
    return False, f"no {fld} in the record"


def check_targets(records: List[Dict[str, Any]], device: str, profile: str = "",
                  subject: Optional[str] = None) -> List[Dict[str, Any]]:
    """Every target whose record exists: value, limit, met (None for "about" targets), applies
    (False for a GPU target on CPU, and for every target at the --quick sizes).

    A target whose value could not be computed (its implementation or its baseline failed) is
    reported not met, with value None and ``why``; one that was skipped has met None and ``why``."""
    dev = "cuda" if device.startswith("cuda") else "cpu"
    out = []
    for subj, case, impl, mode, fld, op, limit, on, what in TARGETS:
        if subject is not None and subj != subject:
            continue
        if on == "cpu" and dev != "cpu":
            continue
        r = _find(records, subj, case, impl, mode)
        if r is None:
            continue
        v = r.get(fld)
        why = None
        if v is None:
            met, why = _not_measured(records, r, fld)
        else:
            met = v >= limit if op == ">=" else v <= limit if op == "<=" else None
        out.append({"target": what, "subject": subj, "case": case, "impl": impl, "mode": mode, "field": fld,
                    "value": v, "op": op, "limit": limit, "met": met, "applies": on == dev and profile != "quick",
                    "source": "docs/benchmarks.md §3", **({"why": why} if why else {})})
    return out


def _ms(r) -> str:
    t = r.get("time_ms")
    return f"{t['median']:.3f}" if t else ("error" if "error" in r else "-")


def _spread(r) -> str:
    t = r.get("time_ms")
    return f"{t['min']:.3f}-{t['max']:.3f}" if t else ""


def _num(v, fmt="{:.2f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) else ""


def records_table(records: List[Dict[str, Any]]) -> str:
    """Every record as one Markdown row: time (median, min-max), peak, ratios, tokens/s, params."""
    lines = ["| subject | case | implementation | mode | ms (median) | min-max | peak MiB | vs baseline | "
             "vs [eager] | tokens/s | params |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        vs = ""
        if r.get("speedup") is not None and r["impl"] != r["baseline"]:
            vs = f"{r['speedup']:.2f}x ({r['baseline']})"
        note = r.get("error") or r.get("skipped") or ""
        lines.append(
            f"| {r['subject']} | {r['case']} | {r['impl']} | {r['mode']} | {_ms(r)} | {_spread(r)} | "
            f"{_num(r.get('peak_mib'), '{:.1f}')} | {vs} | {_num(r.get('speedup_vs_eager'), '{:.2f}x')} | "
            f"{_num(r.get('tokens_per_s'), '{:,.0f}')} | {_num(r.get('params'), '{:,}')} |"
            + (f" {note[:80]}" if note and not r.get("time_ms") else ""))
    return "\n".join(lines)


# The rows of the key table: (subject, case, impl, mode, label)
KEY_ROWS = [
    ("ops", "hml", "midus_ops", "fwd", "HML op (pk_topk + softmax + hive_gather), fwd"),
    ("ops", "hml", "midus_ops", "fwd_bwd", "HML op, fwd+bwd"),
    ("ops", "pk_topk", "midus_ops", "fwd_bwd", "pk_topk, fwd+bwd"),
    ("ops", "hive_gather_proj", "midus_ops", "fwd_bwd", "hive_gather with proj, fwd+bwd"),
    ("ops", "hive_gather_noproj", "midus_ops", "fwd_bwd", "hive_gather, large memory, fwd+bwd"),
    ("layers", "layer", "hml", "fwd_bwd", "HeadwiseMemoryLayer, fwd+bwd"),
    ("layers", "layer", "pkm", "fwd_bwd", "ProductKeyMemory, fwd+bwd"),
    ("blocks", "block", "memory_block", "fwd_bwd", "memory block, fwd+bwd"),
    ("blocks", "block", "memory_block_copy", "fwd_bwd", "memory block (out_proj copy), fwd+bwd"),
    ("models", "train", "midus", "train_step", "MIDUS {layers} + {blocks}, training step"),
    ("models", "train", "dus", "train_step", "DUS {layers} + {blocks} copies, training step"),
    ("models", "train", "llama_pro", "train_step", "LLaMA Pro {layers} + {blocks}, training step"),
    ("models", "generate", "midus", "generate_b1", "MIDUS {layers} + {blocks}, generate batch 1"),
    ("models", "generate", "midus", "generate_b16", "MIDUS {layers} + {blocks}, generate batch 16"),
    ("decode", "N=1", "hml", "fwd", "HML decode fwd, N=1"),
    ("decode", "N=1", "hml+graph", "fwd", "HML decode fwd, N=1, CUDA graph"),
]


def key_table(records: List[Dict[str, Any]]) -> str:
    """The headline rows: midus against the baseline of the same run, time and memory ratios, and
    against the same module on eager ops where that twin exists."""
    lines = ["| what | ms | baseline | baseline ms | time ratio | speed-up vs eager | peak MiB | memory ratio |",
             "|---|---|---|---|---|---|---|---|"]
    n = len(lines)
    for subj, case, impl, mode, label in KEY_ROWS:
        r = _find(records, subj, case, impl, mode)
        if r is None or "time_ms" not in r:
            continue
        label = label.format(**r.get("shape", {}))
        b = _find(records, subj, case, r["baseline"], mode) or {}
        eager = r.get("speedup_vs_eager")
        if eager is None and r["baseline"] == "eager":
            eager = r.get("speedup")
        tps = f" ({r['tokens_per_s']:,.0f} tok/s)" if mode.startswith(("generate", "train")) and r.get("tokens_per_s") else ""
        lines.append(f"| {label} | {_ms(r)}{tps} | {r['baseline']} | {_ms(b) if b else ''} | "
                     f"{_num(r.get('time_ratio'), '{:.3f}x')} | {_num(eager, '{:.1f}x')} | "
                     f"{_num(r.get('peak_mib'), '{:.1f}')} | {_num(r.get('memory_ratio'), '{:.3f}x')} |")
    return "\n".join(lines) if len(lines) > n else ""


def targets_table(targets: List[Dict[str, Any]]) -> str:
    lines = ["| target (docs/benchmarks.md §3) | measured | met |", "|---|---|---|"]
    for t in targets:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "NO")
        if not t["applies"]:
            # Not the device or sizes the target is set for: a "NO" here read as a failure of the run.
            side = "" if t["met"] is None else (" (within its limit)" if t["met"] else " (outside its limit)")
            met = f"not judged: informative{side}, the target is set for another device or size"
        measured = f"{t['field']} = {t['value']:.3f}" if t["value"] is not None else f"none ({t['why']})"
        lines.append(f"| {t['target']} | {measured} | {met} |")
    return "\n".join(lines)


def all_records(data: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [r for sec in data.get("subjects", {}).values() for r in sec.get("records", [])]
