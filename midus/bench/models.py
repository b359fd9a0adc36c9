"""Subject "models": whole Hugging Face models, base against its three up-scalings.

Llama-3.2-1B-shaped ``LlamaForCausalLM`` with random weights (GPU; CPU: a narrower Llama with the
same depths) and, from it, ``midus.upscale``: ``base`` (16 layers, the baseline), ``dus`` (24: 8
copies), ``midus`` (16 + 8 memory blocks), ``midus[eager]`` (the same model running the eager
PyTorch ops) and ``llama_pro`` (24). Memory banks get random values (a trained memory).

Cases and modes:
- case ``train``, mode ``train_step``: forward + backward of the causal-LM loss on B x T random tokens, every parameter
  trainable (as docs/benchmarks.md §3 measures it); the optimizer step is left out: its cost is per parameter
  and the same for every method. tokens/s = B * T / step time.
- case ``generate``, modes ``generate_b1``, ``generate_b16``: greedy ``generate()`` with the KV cache, batch 1 and 16, P prompt
  tokens, exactly G new tokens (min_new_tokens = max_new_tokens); tokens/s = batch * G / time.
  Fewer runs than the training step (``gen_reps``): each run is G sequential steps.
Peak memory: parameters plus the peak above them during the call. Targets (docs/benchmarks.md §3): MIDUS
training step at most 1.15x the base model's time (DUS 24 about 1.4x).
"""
from __future__ import annotations

import gc

import torch
from transformers import LlamaForCausalLM
from transformers.utils import logging as hf_logging

import midus

from .baselines import with_eager_ops
from .blocks import init_banks, llama_config
from .core import Context, Impl, count_params, tensor_mib

# GPU: Llama-3.2-1B (vocab 128256, tied embeddings); train 4 x 2048; generate P=64 -> +64.
# CPU: d=256, 4 heads (2 KV) of 64, FFN 1024, vocab 4096, same depths; train 2 x 128; P=16 -> +16.
SIZES = {
    "gpu": dict(llama=dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                           num_key_value_heads=8, head_dim=64, rope_theta=500000.0, tie_word_embeddings=True),
                layers=16, blocks=8, B=4, T=2048, prompt=64, new_tokens=64, gen_batches=(1, 16), gen_reps=5,
                memory=dict(n=32, k=16, d_z=256)),
    "cpu": dict(llama=dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=64, rope_theta=500000.0, tie_word_embeddings=True),
                layers=16, blocks=8, B=2, T=128, prompt=16, new_tokens=16, gen_batches=(1, 16), gen_reps=3,
                memory=dict(n=32, k=16, d_z=128)),
    "quick": dict(llama=dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, tie_word_embeddings=True),
                  layers=4, blocks=2, B=1, T=16, prompt=4, new_tokens=4, gen_batches=(1, 2), gen_reps=2,
                  memory=dict(n=6, k=3, d_z=12)),
}
CASES = ("train", "generate")


def build_models(s, device: str, dtype: torch.dtype):
    """{name: model} on ``device`` in ``dtype``: the random base and its up-scalings (midus.upscale)."""
    cfg = llama_config(s["llama"], num_hidden_layers=s["layers"], max_position_embeddings=4096,
                       bos_token_id=0, eos_token_id=0, pad_token_id=0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype, on the device: no fp32 CPU copy
    try:
        torch.manual_seed(0)
        with torch.device(device):
            base = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    base.config._attn_implementation = "sdpa"
    models = {"base": base}
    for method in ("dus", "midus", "llama_pro"):
        opts = s["memory"] if method == "midus" else {}
        models[method] = midus.upscale(base, method, num_blocks=s["blocks"], **opts)
    init_banks(models["midus"])
    return models


def _train_modes(model, ids, eager: bool):
    def step():
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
    return {"train_step": with_eager_ops(step, model) if eager else step}


def _gen_modes(model, prompts, new_tokens: int, eager: bool):
    def gen(ids):
        def f():
            model.eval()
            with torch.no_grad():
                return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return with_eager_ops(f, model) if eager else f
    return {f"generate_b{b}": gen(ids) for b, ids in prompts.items()}


def bench(ctx: Context) -> None:
    s = SIZES[ctx.profile]
    dev, dt = ctx.device, ctx.dtype
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # generate()'s notices about generation flags, once per call
    try:
        models = build_models(s, dev, dt)
        B, T, V = s["B"], s["T"], s["llama"]["vocab_size"]
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1, V, (B, T), generator=g).to(dev)
        prompts = {b: torch.randint(1, V, (b, s["prompt"]), generator=g).to(dev) for b in s["gen_batches"]}
        names = ["base", "dus", "midus", "midus[eager]", "llama_pro"]
        shape = dict(B=B, T=T, layers=s["layers"], blocks=s["blocks"], prompt=s["prompt"], new_tokens=s["new_tokens"],
                     **{k: v for k, v in s["llama"].items() if k != "tie_word_embeddings"}, **s["memory"])

        def impls(kind):
            out = {}
            for name in names:
                model = models[name.replace("[eager]", "")]
                eager = name.endswith("[eager]")
                kw = dict(params=count_params(model), param_mib=tensor_mib(model))
                if kind == "train":
                    out[name] = Impl(modes=_train_modes(model, ids, eager), tokens=B * T, **kw)
                else:
                    out[name] = Impl(modes=_gen_modes(model, prompts, s["new_tokens"], eager), **kw)
            return out

        recs = []
        if ctx.wants("train"):
            recs += ctx.run_case("models", "train", impls("train"), baseline="base", shape=shape, modes=["train_step"])
        if ctx.wants("generate"):
            gen_modes = [f"generate_b{b}" for b in s["gen_batches"]]
            recs += ctx.run_case("models", "generate", impls("gen"), baseline="base", shape=shape, modes=gen_modes,
                                 reps=min(s["gen_reps"], ctx.reps))
        for r in recs:  # generation tokens/s: batch x new tokens per call
            if r["mode"].startswith("generate_b") and "time_ms" in r:
                b = int(r["mode"].split("_b")[1])
                r["tokens"] = b * s["new_tokens"]
                r["tokens_per_s"] = r["tokens"] / (r["time_ms"]["median"] * 1e-3)
        if ctx.on_case:
            ctx.on_case()
    finally:
        hf_logging.set_verbosity(verbosity)
        models = None
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
