"""Model-state memory per rank for Llama-3.2-1B and Llama-3.1-8B up-scaled with 8 MIDUS memory
blocks, under DDP and FSDP2 (README, "Training on several GPUs").

The models are built on the meta device from their published configurations (no weights, no
download) and up-scaled with ``midus.upscale`` at the default memory options; the counts and the
formula are :func:`midus.distributed.estimate_memory`. Prints a Markdown table; ``--json`` also
writes the numbers.

    python benchmarks/fsdp_memory.py [--json out.json]
"""
import argparse
import json
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import midus
from midus.distributed import estimate_memory

GiB = 2.0 ** 30

# The published config.json values that decide the parameter count.
CONFIGS = {
    "Llama-3.2-1B": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "Llama-3.1-8B": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}
RUNS = [("ddp", 1), ("ddp", 8), ("fsdp", 2), ("fsdp", 8)]


def build(name: str):
    with torch.device("meta"):
        return midus.upscale(LlamaForCausalLM(LlamaConfig(**CONFIGS[name])), "midus", num_blocks=8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args(argv)
    rows, data = [], {}
    for name in CONFIGS:
        model = build(name)
        base = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) - \
            sum(p.numel() for n, p in model.named_parameters() if n in midus.new_parameter_names(model))
        data[name] = {"base_params": base}
        for trainable in ("new", "all"):
            for strategy, n in RUNS:
                est = estimate_memory(model, n, strategy, trainable)
                data[name][f"{strategy}-{n}-{trainable}"] = est
                rows.append((name, trainable, f"{'DDP' if strategy == 'ddp' else 'FSDP2'} x {n}", est))
        e = data[name]["fsdp-8-new"]
        print(f"{name}: base {base / 1e9:.3f} B parameters, up-scaled P = {e['P'] / 1e9:.3f} B "
              f"(+{(e['P'] - base) / 1e6:.1f} M in 8 memory blocks, {(e['P'] - base) / 8 / 1e6:.2f} M each); largest "
              f"units U1 = {e['U1'] / 1e6:.1f} M, U2 = {e['U2'] / 1e6:.1f} M; root R = {e['R'] / 1e6:.1f} M",
              file=sys.stderr)
    print("| model | trains | run | weights | grads (+DDP buckets) | AdamW | bf16 copies / gathered units | total GiB per rank |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name, trainable, run, e in rows:
        extra = e["autocast"] + e["gathered"] + e["unit_grads"] + e["root"]
        print(f"| {name} | {trainable} ({e['T'] / 1e6:,.0f} M) | {run} | {e['weights'] / GiB:.2f} | "
              f"{(e['grads'] + e['buckets']) / GiB:.2f} | {e['optimizer'] / GiB:.2f} | {extra / GiB:.2f} | "
              f"**{e['total'] / GiB:.1f}** |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
