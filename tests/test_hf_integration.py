"""MIDUS models in the Hugging Face workflows users run on them (issue 12): the base's attention
implementation, usage statistics after from_pretrained, PEFT LoRA with the usual targets, and
padded batches. Tiny random models of tests/test_upscale.py, on CPU.
"""
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*midus_ops.*")

import midus  # noqa: E402
from midus_ops import HeadwiseMemoryLayer, ProductKeyMemory  # noqa: E402
from test_upscale import FAMILIES, VARIANTS, perturb_zero_init, tiny, token_ids, up  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

MIDUS_VARIANTS = [v for v, (method, _) in VARIANTS.items() if method == "midus"]


def memory_layers(model):
    return [m for m in model.modules() if isinstance(m, (HeadwiseMemoryLayer, ProductKeyMemory))]


# ------------------------------------------------------------------ attention implementation (item 1)

def _tiny_with_attention(family, attn_implementation):
    base = tiny(family)
    base.set_attn_implementation(attn_implementation)
    return base


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_upscale_keeps_the_attention_implementation(variant, impl, tmp_path):
    """transformers #30298 kind: a base loaded with attn_implementation="eager" (the one that
    returns attention maps) must stay eager in every method's result, memory blocks included."""
    base = _tiny_with_attention("llama", impl)
    new = up(base, variant)
    assert new.config._attn_implementation == impl
    assert new.config.get_text_config()._attn_implementation == impl
    for module in new.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and module is not new:
            assert cfg._attn_implementation == impl, type(module).__name__
    if impl == "eager":
        out = new(token_ids(), output_attentions=True)
        assert len(out.attentions) == len(new.model.layers)
        assert all(a is not None and a.shape == (2, 4, 10, 10) for a in out.attentions)
        # each row of a causal attention map is a distribution over the earlier positions
        torch.testing.assert_close(out.attentions[-1].sum(-1), torch.ones(2, 4, 10))
    new.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=impl)
    assert loaded.config.get_text_config()._attn_implementation == impl
