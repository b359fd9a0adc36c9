"""Writes tests/data/saved_2026_12_03/: tiny MIDUS models saved by midus as it was just before the
memory options became ``midus_ops.MemoryOptions`` (issue 14), with the logits they gave then:
query_norm="rms" with a learned temperature (HML), and PKM with a learned temperature.

tests/test_compat.py loads them with the current code. Like make_saved_models.py it was run once,
at commit fc12d47 (a worktree of that commit on PYTHONPATH, its extension built from the same
sources), with transformers 5.24.0:
    PYTHONPATH=<worktree at fc12d47> python tests/data/make_saved_models_2026_12_03.py tests/data/saved_2026_12_03
Re-running it with later code would defeat its purpose.
"""
import os, sys
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM
import midus
OUT = sys.argv[1]
VARIANTS = {"hml-rms-learn-tau": {"query_norm": "rms", "learn_tau": True, "tau": 0.7},
            "pkm-learn-tau": {"memory": "pkm", "pkm_heads": 2, "pkm_d_k": 8, "learn_tau": True}}
torch.manual_seed(0)
base = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                    attention_bias=True)).eval()
ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(1))
expected = {"input_ids": ids}
for name, opts in VARIANTS.items():
    model = midus.upscale(base, "midus", 1, n=4, k=2, d_z=8, **opts).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if ".memory." in pname or "out_proj.bias" in pname:
                p.normal_(std=0.5)
        expected[f"logits/{name}"] = model(ids).logits.contiguous()
    model.save_pretrained(os.path.join(OUT, name))
save_file(expected, os.path.join(OUT, "expected.safetensors"))
