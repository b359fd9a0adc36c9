"""method="avg_deus" / "opt_deus" of midus.upscale (arXiv 2508.08011) and midus.deus.

The shared checks (identity at insertion, cache == no cache, save/load, copies, layout) run for
both methods on every family in test_upscale.py; here: what the new layers hold, the alignment
(exact recovery of a GQA-respecting head and neuron permutation, through Phi-3's fused projections
and Gemma 3's q/k norms), the placement default, options and records.
"""
import json
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*midus_ops.*")

import midus  # noqa: E402
from midus import upscale  # noqa: E402
from midus.deus import OPT_DEUS_DEFAULTS, align_layer, fuse_layers, merge_layer, split_layer  # noqa: E402
from midus.upscale import residual_writers  # noqa: E402
from test_upscale import FAMILIES, _assert_same_model, tiny, token_ids  # noqa: E402
from test_upscale_smollm2 import smol  # noqa: E402,F401  (module-scoped fixture: the real model + ids)
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def _rows(t, order, per):
    """Blocks of ``per`` rows of ``t`` taken in ``order``."""
    return t.reshape(-1, per, *t.shape[1:])[order].reshape(t.shape)


@torch.no_grad()
def permuted_copy(layer_params, config, seed=1):
    """Layer parameters with the KV groups, the query heads inside each group and the FFN neurons
    permuted (a symmetry of the layer: it computes the same function)."""
    parts = split_layer(layer_params, config)
    H, Hkv = config.num_attention_heads, config.num_key_value_heads
    dh = parts["o.weight"].shape[1] // H
    G = H // Hkv
    g = torch.Generator().manual_seed(seed)
    groups = torch.randperm(Hkv, generator=g)
    heads = torch.cat([groups[x] * G + torch.randperm(G, generator=g) for x in range(Hkv)])
    neurons = torch.randperm(parts["gate.weight"].shape[0], generator=g)
    out = dict(parts)
    for s in ("weight", "bias"):
        if f"q.{s}" in parts:
            out[f"q.{s}"] = _rows(parts[f"q.{s}"], heads, dh)
        for p in ("k", "v"):
            if f"{p}.{s}" in parts:
                out[f"{p}.{s}"] = _rows(parts[f"{p}.{s}"], groups, dh)
        for p in ("gate", "up"):
            if f"{p}.{s}" in parts:
                out[f"{p}.{s}"] = parts[f"{p}.{s}"][neurons]
    out["o.weight"] = _rows(parts["o.weight"].T, heads, dh).T
    out["down.weight"] = parts["down.weight"][:, neurons]
    return merge_layer(out, layer_params)


def with_permuted_layer(family, src=1, dst=2):
    """A tiny model whose layer ``dst`` is a permuted copy of layer ``src``."""
    model = tiny(family)
    params = permuted_copy(dict(model.model.layers[src].named_parameters()), model.config)
    with torch.no_grad():
        for name, p in model.model.layers[dst].named_parameters():
            p.copy_(params[name])
    return model


# ------------------------------------------------------------------------------- the alignment

@pytest.mark.parametrize("family", ["llama", "phi3", "gemma3"])  # biases, H/H_kv = 2; fused projections; q/k norms
def test_permuted_copy_is_a_symmetry(family):
    """The test's premise: the permuted layer computes what the original does."""
    base = tiny(family)
    perm = with_permuted_layer(family)
    ref = tiny(family)
    with torch.no_grad():  # the reference: layer 2 := an unpermuted copy of layer 1
        for name, p in ref.model.layers[2].named_parameters():
            p.copy_(dict(base.model.layers[1].named_parameters())[name])
        torch.testing.assert_close(perm(token_ids()).logits, ref(token_ids()).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma3"])
def test_opt_deus_recovers_a_permutation_and_avg_deus_does_not(family):
    """Layer 2 is layer 1 with its KV groups, query heads and neurons permuted: the optimal transport
    plan finds the permutation, so the fused layer (writers kept) is layer 1 again, and the up-scaled
    model computes what DUS's clone of layer 1 computes. The plain average blurs unrelated units."""
    base = with_permuted_layer(family)
    dus = upscale(base, "dus", placement=[1]).eval()
    opt = upscale(base, "opt_deus", placement=[1], identity=False).eval()
    avg = upscale(base, "avg_deus", placement=[1], identity=False).eval()
    layer1 = dict(base.model.layers[1].named_parameters())
    for name, value in opt.model.layers[2].named_parameters():
        torch.testing.assert_close(value, layer1[name], atol=1e-6, rtol=1e-5)
    info = opt.config.midus_upscale["deus_layers"][0]
    assert info["after"] == 1 and info["ffn_partners"] < 1.001 and info["group_partners"] < 1.001
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(opt(ids).logits, dus(ids).logits, atol=1e-4, rtol=1e-4)
        assert (avg(ids).logits - dus(ids).logits).abs().max() > 1e-2


def test_sinkhorn_plan_agrees_with_the_exact_matching():
    """On two unrelated random layers, the (sharp) Sinkhorn plan's argmax is ot.emd's permutation
    for almost every neuron, and its matched cost is close to the exact optimum."""
    import ot

    model = tiny("llama")
    a, b = (split_layer(dict(model.model.layers[i].named_parameters()), model.config) for i in (1, 2))
    aligned, info = align_layer(a, b, model.config, reg=0.005, max_iter=5000)
    fa = torch.cat([a["gate.weight"], a["gate.bias"][:, None], a["up.weight"], a["up.bias"][:, None]], 1).detach().double()
    fb = torch.cat([b["gate.weight"], b["gate.bias"][:, None], b["up.weight"], b["up.bias"][:, None]], 1).detach().double()
    M = torch.cdist(fa, fb)
    n = M.shape[0]
    exact = ot.emd(torch.full((n,), 1 / n, dtype=torch.float64), torch.full((n,), 1 / n, dtype=torch.float64), M)
    exact_cost = float((exact * n * M).sum(1).mean())
    # recover the plan's rows from the aligned gate rows: aligned = W @ fb  ->  W = aligned @ pinv(fb)
    W = aligned["gate.weight"] @ torch.linalg.pinv(b["gate.weight"].double())
    agree = (W.argmax(1) == exact.argmax(1)).double().mean().item()
    assert agree > 0.9, agree
    assert float((W * M).sum(1).mean()) < 1.01 * exact_cost
    unaligned = float(M.diagonal().mean())
    assert exact_cost < unaligned


def test_avg_deus_is_the_mean_of_the_two_layers_with_writers_zeroed():
    base = tiny("llama")  # biases everywhere
    new = upscale(base, "avg_deus", placement=[1]).eval()
    assert new.config.midus_upscale["inserted_positions"] == [2]
    a, b = (dict(base.model.layers[i].named_parameters()) for i in (1, 2))
    for name, value in new.model.layers[2].named_parameters():
        if name.startswith(("self_attn.o_proj.", "mlp.down_proj.")):
            assert not value.any(), name
        else:
            torch.testing.assert_close(value, (a[name] + b[name]) / 2)
    kept = upscale(base, "avg_deus", placement=[1], identity=False)
    torch.testing.assert_close(kept.model.layers[2].mlp.down_proj.weight,
                               (a["mlp.down_proj.weight"] + b["mlp.down_proj.weight"]) / 2)


def test_gemma3_writers_are_the_branch_norm_gains():
    """Gemma 3's branches end in a norm: the new layer keeps its fused o_proj/down_proj and gets
    gain 0 (weight -1 of a (1 + weight) norm); the model is the identity and one optimizer step
    moves it only a little (a zeroed o_proj under a norm jumps to a full-size branch)."""
    base = tiny("gemma3")
    new = upscale(base, "opt_deus", placement=[1]).eval()
    layer = new.model.layers[2]
    assert torch.equal(layer.post_attention_layernorm.weight, torch.full_like(layer.post_attention_layernorm.weight, -1))
    assert torch.equal(layer.post_feedforward_layernorm.weight, -torch.ones_like(layer.post_feedforward_layernorm.weight))
    assert layer.self_attn.o_proj.weight.any() and layer.mlp.down_proj.weight.any()
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(new(ids).logits, base(ids).logits)
    writers, zero = residual_writers("gemma3_text")
    assert zero == -1.0 and set(writers.values()) == {"post_attention_layernorm", "post_feedforward_layernorm"}


# ------------------------------------------------------------------------------ placement, records

def test_opt_deus_default_placement_is_the_top_gaps():
    base = tiny("llama")
    new = upscale(base, "opt_deus", 2)
    rec = new.config.midus_upscale
    assert rec["placement"] == "top-gaps" and rec["base_layers"] == [1, 2] and rec["inserted_positions"] == [2, 4]
    assert [r["source"] for r in rec["deus_layers"]] == ["fused layers 1 and 2", "fused layers 2 and 3"]
    assert midus.placement_indices(32, 16, "top-gaps") == list(range(15, 31))  # the paper's 32 -> 48 layers
    assert upscale(base, "avg_deus", 2).config.midus_upscale["placement"] == "distributed"


def test_after_the_last_layer_the_new_layer_is_a_copy():
    base = tiny("qwen3")
    new = upscale(base, "opt_deus", placement=[3], identity=False)
    rec = new.config.midus_upscale
    assert rec["deus_layers"][0]["source"].startswith("copy of the last layer")
    for name, value in new.model.layers[4].named_parameters():
        assert torch.equal(value, dict(base.model.layers[3].named_parameters())[name]), name


def test_options_and_alignment_are_recorded_and_survive_save_load(tmp_path):
    base = tiny("phi3")
    new = upscale(base, "opt_deus", 2, reg=0.05, max_iter=300).eval()
    rec = new.config.midus_upscale
    assert rec["deus_options"] == dict(OPT_DEUS_DEFAULTS, reg=0.05, max_iter=300)
    assert all({"after", "source", "group_partners", "ffn_partners", "marginal_error"} <= set(r)
               for r in rec["deus_layers"])
    new.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.midus_upscale == json.loads(json.dumps(rec))
    _assert_same_model(new, loaded, token_ids())


def test_deterministic_and_the_input_is_untouched():
    base = tiny("gemma3")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    a, b = upscale(base, "opt_deus", 2), upscale(base, "opt_deus", 2)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_fuse_layers_rejects_mismatched_layers():
    small = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=32))
    a = dict(small.model.layers[0].named_parameters())
    b = dict(tiny("llama").model.layers[0].named_parameters())
    with pytest.raises(ValueError, match="names or shapes"):
        fuse_layers(a, b, small.config, "avg_deus")
    with pytest.raises(ValueError, match="deus method"):
        fuse_layers(a, a, small.config, "mean")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_split_and_merge_are_inverse(family):
    model = tiny(family)
    params = dict(model.model.layers[0].named_parameters())
    parts = split_layer(params, model.config)
    assert {"q.weight", "k.weight", "v.weight", "o.weight", "gate.weight", "up.weight", "down.weight"} <= set(parts)
    merged = merge_layer(parts, params)
    assert list(merged) == list(params) and all(torch.equal(merged[k], params[k]) for k in params)


def test_opt_deus_on_the_real_smollm2(smol):
    """SmolLM2-135M (9 heads in 3 KV groups, 1536 neurons): identity at insertion with the default
    placement, and the recorded plans are sharp (a few partners per neuron, not a blur of all)."""
    model, ids = smol
    new = upscale(model, "opt_deus", 2).eval()
    rec = new.config.midus_upscale
    assert rec["base_layers"] == [27, 28]
    with torch.no_grad():
        torch.testing.assert_close(new(ids).logits, model(ids).logits, atol=0, rtol=0)
    for r in rec["deus_layers"]:
        assert r["ffn_partners"] < 20, r  # of 1536
