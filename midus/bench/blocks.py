"""Subject "blocks": the MIDUS memory block against the dense DUS block it replaces.

At the Llama-3.2-1B shape (GPU) or a scaled-down Llama (CPU), B x T tokens, causal sdpa attention:
``dus_block`` (the baseline: a Llama decoder layer, attention + SwiGLU, what DUS inserts),
``memory_block`` (``midus.MidusMemoryBlock``, the layer ``midus.upscale(method="midus")`` inserts,
out_proj="none"), ``memory_block_copy`` (out_proj="copy") and their ``[eager]`` twins (the same
blocks running the eager PyTorch ops). Modes ``fwd`` and ``fwd_bwd`` (gradients for the input and
all parameters). Peak memory counts the parameters plus the peak above them. Target (docs/benchmarks.md §3):
memory block fwd+bwd at most half the DUS block's time.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from midus import MEMORY_DEFAULTS, MidusMemoryBlock
from midus_ops import HeadwiseMemoryLayer

from .baselines import with_eager_ops
from .core import Context
from .layers import module_impl

# Llama-3.2-1B: d=2048, 32 heads (8 KV) of 64, FFN 8192, RoPE theta 500000; batch 4 x 2048; HML
# defaults (n=32, k=16, d_z=256). CPU: d=512, 8 heads (2 KV) of 64, FFN 2048, 2 x 256, d_z=128.
SIZES = {
    "gpu": dict(llama=dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                           head_dim=64, rope_theta=500000.0), B=4, T=2048, memory=dict(n=32, k=16, d_z=256)),
    "cpu": dict(llama=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=2,
                           head_dim=64, rope_theta=500000.0), B=2, T=256, memory=dict(n=32, k=16, d_z=128)),
    "quick": dict(llama=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=8), B=1, T=16, memory=dict(n=6, k=3, d_z=12)),
}
CASES = ("block",)


def llama_config(llama: Dict, **kw) -> LlamaConfig:
    cfg = LlamaConfig(**llama, **kw)
    cfg._attn_implementation = "sdpa"
    return cfg


def init_banks(model: nn.Module, std: float = 0.02) -> None:
    """Give every HML bank random values (a trained memory); zero at insertion would read zeros."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, HeadwiseMemoryLayer):
                m.bank.normal_(0.0, std)


class _BlockCall(nn.Module):
    """block(hidden) with the position embeddings and positions of a causal sequence fixed."""

    def __init__(self, block: nn.Module, pos_emb, position_ids):
        super().__init__()
        self.block, self.pos_emb, self.position_ids = block, pos_emb, position_ids

    def forward(self, x):
        out = self.block(x, attention_mask=None, position_ids=self.position_ids, position_embeddings=self.pos_emb)
        return out[0] if isinstance(out, tuple) else out  # transformers 4.x layers return tuples


def bench(ctx: Context) -> None:
    from .layers import module_modes

    s = SIZES[ctx.profile]
    dev, dt = ctx.device, ctx.dtype
    B, T = s["B"], s["T"]
    cfg = llama_config(s["llama"], num_hidden_layers=1, vocab_size=256)
    torch.manual_seed(0)
    blocks = {"dus_block": LlamaDecoderLayer(cfg, layer_idx=0)}
    for name, out_proj in (("memory_block", "none"), ("memory_block_copy", "copy")):
        opts = {**MEMORY_DEFAULTS, **s["memory"], "out_proj": out_proj}
        blocks[name] = MidusMemoryBlock(cfg, layer_idx=0, memory_options=opts)
    for b in blocks.values():
        b.to(dev, dt).train()
        init_banks(b)
    x = torch.randn(B, T, cfg.hidden_size, device=dev, dtype=dt, requires_grad=True)
    grad = torch.randn_like(x)
    position_ids = torch.arange(T, device=dev).unsqueeze(0).expand(B, T)
    pos_emb = LlamaRotaryEmbedding(cfg).to(dev)(x, position_ids)
    impls = {}
    for name, block in blocks.items():
        call = _BlockCall(block, pos_emb, position_ids)
        impls[name] = module_impl(block, module_modes(call, x, grad), tokens=B * T)
        if name != "dus_block":
            impls[f"{name}[eager]"] = module_impl(block, module_modes(call, x, grad, with_eager_ops), tokens=B * T)
    shape = dict(B=B, T=T, **s["llama"], **s["memory"])
    ctx.run_case("blocks", "block", impls, baseline="dus_block", shape=shape, modes=["fwd", "fwd_bwd"])
