"""Writes tests/data/saved_v0_1_0/: tiny MIDUS models saved by midus 0.1.0 as it was before issue 12
(memory blocks whose attention held ``o_proj = nn.Identity()``), with the logits they gave then.

tests/test_compat.py loads them with the current code: what a user saved must keep loading and
computing the same. Re-running this script with later code would defeat that purpose; it was run
once, at commit 6aa071e (``git show 6aa071e:midus/modeling_midus.py``), with transformers 5.24.0.
"""
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import midus

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "saved_v0_1_0")
VARIANTS = {"hml": {}, "hml-copy": {"out_proj": "copy"}, "pkm": {"memory": "pkm", "pkm_heads": 2, "pkm_d_k": 8}}


def main(out: str = OUT, variants: dict = VARIANTS) -> None:
    """Up-scale one tiny Llama with each of ``variants`` (name -> memory options), give the memory
    non-zero values, and save the models and their logits into ``out`` (also used by
    make_saved_models_2026_12_03.py)."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                        attention_bias=True)).eval()
    ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(1))
    expected = {"input_ids": ids}
    for name, opts in variants.items():
        model = midus.upscale(base, "midus", 1, n=4, k=2, d_z=8, **opts).eval()
        with torch.no_grad():  # non-zero memory (and out_proj bias), so that the memory counts in the logits
            for pname, p in model.named_parameters():
                if ".memory." in pname or "out_proj.bias" in pname:
                    p.normal_(std=0.5)
            expected[f"logits/{name}"] = model(ids).logits.contiguous()
        model.save_pretrained(os.path.join(out, name))
    save_file(expected, os.path.join(out, "expected.safetensors"))


if __name__ == "__main__":
    sys.exit(main())
