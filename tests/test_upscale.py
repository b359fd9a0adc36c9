"""midus.upscale and the MIDUS model on tiny random models of every family (spec/HML.md 3.1-3.3).

The real-model (SmolLM2-135M) checks are in test_upscale_smollm2.py.
"""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*midus_ops.*")

import midus  # noqa: E402
from midus import upscale  # noqa: E402
from midus_ops import HeadwiseMemoryLayer, ProductKeyMemory  # noqa: E402
from midus.upscale import residual_writers  # noqa: E402
from transformers import (AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config,  # noqa: E402
                          GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Phi3Config,
                          Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

# Where the imported midus lives (site-packages under CI, the checkout in development): child
# processes must import the same build, not the source folder, which has no compiled extension.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(midus.__file__)))
VOCAB = 128
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
# Each family exercises something: Llama biases (zeroing by role must cover them), Mistral and
# Qwen2 a sliding window shorter than the generated text (masks and cache per layer type), Qwen3
# q/k norms and tied embeddings, Gemma 3 all of these plus (1 + w) norms around each branch, scaled
# embeddings, sliding/full layer types and a final logit soft cap, Phi-3 the fused qkv_proj and
# gate_up_proj and partial RoPE.
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=6)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=6,
                                                  max_window_layers=2)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=True)),
    "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(
        **COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=6, final_logit_softcapping=30.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"], pad_token_id=0)),
    "phi3": lambda: Phi3ForCausalLM(Phi3Config(**COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                               partial_rotary_factor=0.5)),
}
SMALL_MEM = dict(n=8, k=4, d_z=16, pkm_heads=2, pkm_d_k=16)  # memory sizes for tiny models
VARIANTS = {  # name -> (method, options)
    "midus-hml": ("midus", dict(SMALL_MEM)),
    "midus-hml-copy": ("midus", dict(SMALL_MEM, out_proj="copy")),
    "midus-pkm": ("midus", dict(SMALL_MEM, memory="pkm")),
    "dus": ("dus", {}),
    "llama_pro": ("llama_pro", {}),
    "solar": ("solar", {}),
    "avg_deus": ("avg_deus", {}),
    # distributed like the others here (its own default, top-gaps, is tested in test_deus.py)
    "opt_deus": ("opt_deus", {"placement": "distributed"}),
}
IDENTITY_VARIANTS = ["midus-hml", "midus-hml-copy", "midus-pkm", "llama_pro", "avg_deus", "opt_deus"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def tiny(family, seed=0):
    torch.manual_seed(seed)
    model = FAMILIES[family]().eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: make them distinct per layer
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def up(base, variant, num_blocks=2, **kw):
    method, opts = VARIANTS[variant]
    return upscale(base, method, num_blocks, **{**opts, **kw}).eval()


def zero_init_params(model):
    """The parameters that start at zero: memory banks/values, the residual writers of llama_pro and
    avg/opt_deus (for Gemma 3 its branch norms' weights, which start at -1: gain 0)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, HeadwiseMemoryLayer):
            out[f"{name}.bank"] = module.bank
        elif isinstance(module, ProductKeyMemory):
            out[f"{name}.values"] = module.values
    rec = model.config.midus_upscale
    if rec["method"] in ("llama_pro", "avg_deus", "opt_deus"):
        writers, _ = residual_writers(rec["base_model_type"])
        for p in rec["inserted_positions"]:
            for path in writers.values():
                for pname, param in model.model.layers[p].get_submodule(path).named_parameters():
                    out[f"model.layers.{p}.{path}.{pname}"] = param
    return out


@torch.no_grad()
def perturb_zero_init(model, seed=1):
    """Give the zero-initialised parameters random values so that the new blocks do something."""
    g = torch.Generator().manual_seed(seed)
    for p in zero_init_params(model).values():
        p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def token_ids(batch=2, length=10, seed=3):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- placement (spec 3.2)

@pytest.mark.parametrize("L,K,placement,expected", [
    (16, 8, "distributed", [1, 3, 5, 7, 9, 11, 13, 15]),
    (30, 8, "distributed", [2, 6, 10, 14, 17, 21, 25, 29]),  # floor(3.75)-1, floor(7.5)-1, ...
    (4, 3, "distributed", [0, 1, 3]),
    (5, 5, "distributed", [0, 1, 2, 3, 4]),
    (5, 1, "distributed", [4]),
    (16, 8, "top-heavy", [8, 9, 10, 11, 12, 13, 14, 15]),
    (30, 8, "top-heavy", [22, 23, 24, 25, 26, 27, 28, 29]),
    (16, 8, "bottom-heavy", [0, 1, 2, 3, 4, 5, 6, 7]),
    (30, 8, "bottom-heavy", [0, 1, 2, 3, 4, 5, 6, 7]),
    (16, 3, [12, 0, 5], [0, 5, 12]),
    (16, None, [7], [7]),
])
def test_placement_indices(L, K, placement, expected):
    assert midus.placement_indices(L, K, placement) == expected


@pytest.mark.parametrize("L,K,expected", [
    (16, 8, list(range(0, 12)) + list(range(4, 16))),
    (4, 2, [0, 1, 2, 1, 2, 3]),
    (4, 4, [0, 1, 2, 3, 0, 1, 2, 3]),
    (5, 1, [0, 1, 2, 2, 3, 4]),
])
def test_solar_layer_order(L, K, expected):
    assert midus.solar_layer_order(L, K) == expected


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_layout_layer_indices_and_config(variant):
    """New stack order, own layer_idx per layer, config fields that count/list layers, record."""
    base = tiny("qwen2")  # has layer_types and max_window_layers
    L, K = 4, 2
    new = up(base, variant, K)
    rec = new.config.midus_upscale
    text = new.config.get_text_config()
    assert text.num_hidden_layers == L + K == len(new.model.layers)
    assert rec["method"] == VARIANTS[variant][0] and rec["num_blocks"] == K and rec["base_num_layers"] == L
    if rec["method"] == "solar":
        assert rec["layer_order"] == [0, 1, 2, 1, 2, 3] and rec["inserted_positions"] == [3, 4]
    else:  # distributed, L=4, K=2: after base layers 1 and 3
        assert rec["base_layers"] == [1, 3] and rec["layer_order"] == [0, 1, 1, 2, 3, 3]
        assert rec["inserted_positions"] == [2, 5]
    for pos, layer in enumerate(new.model.layers):
        assert layer.self_attn.layer_idx == pos
    base_types = base.config.layer_types  # full, full, sliding, sliding
    assert text.layer_types == [base_types[s] for s in rec["layer_order"]]
    assert text.max_window_layers == sum(1 for s in rec["layer_order"] if s < base.config.max_window_layers)
    assert [layer.self_attn.sliding_window for layer in new.model.layers] == \
        [6 if t == "sliding_attention" else None for t in text.layer_types]
    if rec["method"] == "midus":
        assert type(new).__name__ == "MidusForCausalLM" and new.config.model_type == "midus"
        assert new.config.memory_positions == rec["inserted_positions"]
        for p in rec["inserted_positions"]:
            assert isinstance(new.model.layers[p], midus.MidusMemoryBlock)
    else:
        assert type(new) is type(base)
    # one KV-cache slot per layer of the new stack
    out = new(token_ids(), use_cache=True)
    cache = out.get("past_key_values", out.get("cache"))
    assert cache is not None and len(cache.layers) == L + K


def test_nested_text_config_is_updated():
    base = tiny("llama")
    new = up(base, "midus-hml", 3)
    assert new.config.text_config.num_hidden_layers == 7
    assert base.config.num_hidden_layers == 4  # the input's config is not touched


# ------------------------------------------------------------------------- bad input (errors name it)

@pytest.mark.parametrize("call,exc,match", [
    (lambda b: upscale(b, "midus", 0), ValueError, "num_blocks"),
    (lambda b: upscale(b, "dus", 5), ValueError, "num_blocks"),
    (lambda b: upscale(b, "solar", 1), ValueError, "even"),
    (lambda b: upscale(b, "solar", 0), ValueError, "num_blocks"),
    (lambda b: upscale(b, "frankenmerge", 2), ValueError, "method"),
    (lambda b: upscale(b, "midus", 2, placement="middle"), ValueError, "placement"),
    (lambda b: upscale(b, "midus", 2, placement=[1, 4]), ValueError, "out of range"),
    (lambda b: upscale(b, "midus", 2, placement=[-1, 2]), ValueError, "out of range"),
    (lambda b: upscale(b, "dus", 2, placement=[1, 1]), ValueError, "repeated"),
    (lambda b: upscale(b, "dus", 3, placement=[0, 1]), ValueError, "num_blocks"),
    (lambda b: upscale(b, "solar", 2, placement="top-heavy"), ValueError, "placement"),
    (lambda b: upscale(b, "dus", 2, n=8), TypeError, "method='midus' only"),
    (lambda b: upscale(b, "midus", 2, banks=3), TypeError, "banks"),
    (lambda b: upscale(b, "midus", 2, memory="lstm"), ValueError, "memory"),
    (lambda b: upscale(b, "midus", 2, out_proj="mix"), ValueError, "out_proj"),
    (lambda b: upscale(b, "midus", 2, memory="pkm", out_proj="copy"), ValueError, "out_proj"),
    (lambda b: upscale(b, "midus", 2.0), TypeError, "num_blocks"),
    (lambda b: upscale(b, "midus", 2, n=4, k=8), ValueError, "k must"),
    (lambda b: upscale(b, "midus", 2, tau=0.0), ValueError, "tau"),
    (lambda b: upscale(b, "midus", 2, query_norm="layer"), ValueError, "query_norm"),
    (lambda b: upscale(b, "opt_deus", 4), ValueError, "num_blocks"),  # top-gaps: at most L - 1
    (lambda b: upscale(b, "dus", 4, placement="top-gaps"), ValueError, "num_blocks"),
    (lambda b: upscale(b, "opt_deus", 2, reg=0.0), ValueError, "reg"),
    (lambda b: upscale(b, "opt_deus", 2, max_iter=0), ValueError, "max_iter"),
    (lambda b: upscale(b, "avg_deus", 2, identity="yes"), ValueError, "identity"),
    (lambda b: upscale(b, "avg_deus", 2, reg=0.1), TypeError, "reg"),  # avg_deus has no plan
    (lambda b: upscale(b, "llama_pro", 2, reg=0.1), TypeError, "method='midus' only"),
    (lambda b: upscale(b, "dus", 2, placement="importance"), ValueError, "calibration"),
    (lambda b: upscale(b, "dus", 2, calibration=token_ids()), ValueError, "calibration"),
    (lambda b: upscale(b, "dus", 2, placement="importance", calibration=token_ids(), importance="neurons"),
     ValueError, "importance"),
    (lambda b: upscale(b, "solar", 2, placement="importance", calibration=token_ids()), ValueError, "solar"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(tiny("llama"))


def test_bad_input_messages_name_the_problem():
    with pytest.raises(ValueError) as e:
        upscale(tiny("llama"), "midus", 9)
    assert "num_blocks" in str(e.value) and "4" in str(e.value)  # names K and L
    with pytest.raises(ValueError) as e:
        upscale(tiny("llama"), "nope", 2)
    assert all(m in str(e.value) for m in midus.METHODS)


def test_hml_without_out_proj_needs_heads_times_head_dim_equal_to_hidden_size():
    wide = Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=32))  # 4 x 32 = 128 != 64 (as Gemma 3 270M, Qwen3-0.6B)
    with pytest.raises(ValueError, match="out_proj='copy'"):
        upscale(wide, "midus", 2, **SMALL_MEM)
    new = upscale(wide.eval(), "midus", 2, out_proj="copy", **SMALL_MEM).eval()
    with torch.no_grad():
        assert torch.equal(new(token_ids()).logits, wide(token_ids()).logits)


def test_unsupported_family_lists_the_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError) as e:
        upscale(gpt2, "dus", 1)
    msg = str(e.value)
    assert "gpt2" in msg and all(f in msg for f in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3"))


# ----------------------------------------------------------------- copies: clones, input untouched

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_copies_share_no_storage_and_input_is_untouched(variant):
    base = tiny("qwen3")  # tied embeddings
    before = {k: v.clone() for k, v in base.state_dict().items()}
    cfg_before = base.config.to_dict()
    new = up(base, variant)
    base_ptrs = {t.data_ptr() for t in list(base.parameters()) + list(base.buffers())}
    new_ptrs = {t.data_ptr() for t in list(new.parameters()) + list(new.buffers())}
    assert not base_ptrs & new_ptrs
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert base.config.to_dict() == cfg_before and len(base.model.layers) == 4
    # tying survives in the new model
    assert new.lm_head.weight is new.model.embed_tokens.weight


@pytest.mark.parametrize("family", ["llama", "qwen3"])  # biases; q/k norms
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_copied_weights_come_from_the_right_layers(family, variant):
    base = tiny(family)
    new = up(base, variant)
    rec = new.config.midus_upscale
    bsd, nsd = base.state_dict(), new.state_dict()
    zero = zero_init_params(new)
    for key, value in nsd.items():
        if not key.startswith("model.layers."):
            assert torch.equal(value, bsd[key]), key
            continue
        _, _, pos, rest = key.split(".", 3)
        src = rec["layer_order"][int(pos)]
        if rest.startswith("memory."):
            continue
        if rest.startswith("out_proj."):
            assert rec["method"] == "midus"
            if rest.endswith("bias"):  # zeroed: the block must start as the identity
                assert not value.any()
            else:
                assert torch.equal(value, bsd[f"model.layers.{src}.self_attn.o_proj.{rest[9:]}"])
            continue
        expected = bsd[f"model.layers.{src}.{rest}"]
        if rec["method"] in ("avg_deus", "opt_deus") and int(pos) in rec["inserted_positions"]:
            continue  # fused from two layers, checked in test_deus.py
        is_writer = rec["method"] == "llama_pro" and int(pos) in rec["inserted_positions"] and \
            (rest.startswith("self_attn.o_proj.") or rest.startswith("mlp.down_proj."))
        if is_writer:
            assert not value.any() and expected.any(), key  # zeroed by role, the source is not zero
        else:
            assert torch.equal(value, expected), key
    if rec["method"] == "llama_pro":
        assert zero  # o_proj/down_proj weights and biases of the two clones
    if rec["method"] == "midus" and rec["memory_options"]["memory"] == "hml":
        for p in rec["inserted_positions"]:
            block = new.model.layers[p]
            assert "o_proj" not in dict(block.self_attn.named_children())  # no output projection in Attn'
            assert not block.memory.bank.any() and block.memory.proj.any() and block.memory.subkeys.any()
            assert not hasattr(block, "mlp")


def test_memory_block_queries_the_memory_with_per_head_attention_outputs():
    """HML input o is [B, T, H, d_h], head h computed from KV head h // (H / H_kv) only."""
    new = up(tiny("llama"), "midus-hml", 1)  # L=4, K=1: the block follows layer 3, position 4
    block = new.model.layers[4]
    seen = []
    block.memory.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    ids = token_ids()
    with torch.no_grad():
        new(ids)
        d_h = block.head_dim
        block.self_attn.v_proj.weight[d_h:2 * d_h].add_(1.0)  # the values of KV head 1 only
        new(ids)
    o1, o2 = seen
    assert o1.shape == (2, 10, 4, 16)
    assert torch.equal(o1[:, :, :2], o2[:, :, :2])  # query heads 0, 1 read KV head 0
    assert not torch.equal(o1[:, :, 2], o2[:, :, 2]) and not torch.equal(o1[:, :, 3], o2[:, :, 3])  # KV head 1


# ------------------------------------------------------------------------ identity at insertion

@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("variant", IDENTITY_VARIANTS)
def test_identity_at_insertion(family, variant):
    base = tiny(family)
    new = up(base, variant, 3)
    ids = token_ids()
    with torch.no_grad():
        ref, got = base(ids).logits, new(ids).logits
    assert torch.equal(ref, got)
    # and the new blocks are not dead: perturbing the zero-initialised parameters changes the output
    perturb_zero_init(new)
    with torch.no_grad():
        assert not torch.allclose(new(ids).logits, ref)


@pytest.mark.parametrize("variant", IDENTITY_VARIANTS)
def test_one_step_trains_the_zero_initialised_parameters(variant):
    base = tiny("llama")
    new = up(base, variant, 2).train()
    # The memory block works under activation checkpointing too (renamed in transformers 5.2x; 4.x
    # defaults to reentrant checkpointing, which gives no gradients when the embeddings are frozen).
    if hasattr(new, "activation_checkpointing_enable"):
        new.activation_checkpointing_enable()
    else:
        new.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    names = midus.new_parameter_names(new)
    params = [p for n, p in new.named_parameters() if n in names]
    for p in new.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    ids = token_ids(2, 16)
    zeros = zero_init_params(new)
    assert zeros and all(not p.any() for p in zeros.values())
    loss0 = new(ids, labels=ids).loss
    loss0.backward()
    opt.step()
    with torch.no_grad():
        loss1 = new(ids, labels=ids).loss
    assert torch.isfinite(loss1) and loss1.item() != loss0.item()
    assert all(p.any() for p in zeros.values()), [n for n, p in zeros.items() if not p.any()]


# -------------------------------------------------------- generation with / without the KV cache

@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_generate_with_and_without_cache(family, variant):
    new = up(tiny(family), variant)
    perturb_zero_init(new)
    prompt = token_ids(1, 8)
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(prompt))
    with_cache = new.generate(prompt, use_cache=True, **kw)
    without = new.generate(prompt, use_cache=False, **kw)
    assert with_cache.shape == (1, 28)
    assert torch.equal(with_cache, without)


def test_hidden_states_cover_every_position():
    new = up(tiny("llama"), "midus-hml", 2)
    perturb_zero_init(new)
    out = new(token_ids(), output_hidden_states=True)
    assert len(out.hidden_states) == 4 + 2 + 1
    # consecutive states differ at every position, memory blocks included
    for a, b in zip(out.hidden_states[:-2], out.hidden_states[1:-1]):
        assert not torch.equal(a, b)


def test_bf16_model_stays_bf16():
    base = tiny("llama").to(torch.bfloat16)
    new = up(base, "midus-hml", 2)
    assert {p.dtype for p in new.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.equal(new(token_ids()).logits, base(token_ids()).logits)


# ------------------------------------------------------------------------ save / load round trips

def _assert_same_model(a, b, ids):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_and_load(family, variant, tmp_path):
    new = up(tiny(family), variant)
    perturb_zero_init(new)
    new.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(new)
    _assert_same_model(new, loaded, token_ids())
    assert loaded.config.midus_upscale == json.loads(json.dumps(new.config.midus_upscale))
    assert midus.new_parameter_names(loaded) == midus.new_parameter_names(new)
    files = set(os.listdir(tmp_path))
    assert "config.json" in files and any(f.endswith(".safetensors") for f in files)
    if VARIANTS[variant][0] == "midus":
        cfg = json.loads((tmp_path / "config.json").read_text())
        assert cfg["model_type"] == "midus" and "modeling_midus.py" in files
        assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_midus.MidusForCausalLM"
        assert midus.memory_parameter_names(loaded) == midus.memory_parameter_names(new)
    else:  # plain model of the base class, no remote code needed
        assert "modeling_midus.py" not in files


_REMOTE_CHECK = r"""
import json, sys, torch, warnings
warnings.filterwarnings("ignore")
from transformers import AutoModelForCausalLM
results = {}
for path in sys.argv[1:]:
    m = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    ref = torch.load(path + "/ref.pt")
    ids = ref["ids"]
    sd = m.state_dict()
    same_params = sd.keys() == ref["state"].keys() and all(torch.equal(sd[k], ref["state"][k]) for k in sd)
    with torch.no_grad():
        same_logits = torch.equal(m(ids).logits, ref["logits"])
    gen = m.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    results[path] = dict(cls=type(m).__module__ + "." + type(m).__name__, same_params=same_params,
                         same_logits=same_logits, same_gen=torch.equal(gen, ref["gen"]))
results["midus_imported"] = [k for k in sys.modules if k == "midus" or k.startswith("midus.")]
print("RESULT" + json.dumps(results))
"""


def test_trust_remote_code_in_a_fresh_process(tmp_path):
    """config.json's auto_map + the copied modeling file load without ever importing midus."""
    paths = []
    for family, variant in [("llama", "midus-hml-copy"), ("mistral", "midus-pkm"), ("qwen2", "midus-hml"),
                            ("qwen3", "midus-hml"), ("gemma3", "midus-pkm"), ("phi3", "midus-hml")]:
        new = up(tiny(family), variant)
        perturb_zero_init(new)
        path = tmp_path / f"{family}-{variant}"
        new.save_pretrained(path)
        ids = token_ids()
        with torch.no_grad():
            logits = new(ids).logits
        gen = new.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
        torch.save({"ids": ids, "logits": logits, "gen": gen, "state": new.state_dict()}, path / "ref.pt")
        paths.append(str(path))
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    # cwd outside the repo: `midus` must not be importable by accident from the current folder
    proc = subprocess.run([sys.executable, "-c", _REMOTE_CHECK, *paths], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    results = json.loads(line[0][len("RESULT"):])
    assert results.pop("midus_imported") == []
    for path, r in results.items():
        assert r["cls"].startswith("transformers_modules.") and r["cls"].endswith("modeling_midus.MidusForCausalLM"), r
        assert r["same_params"] and r["same_logits"] and r["same_gen"], (path, r)


# ------------------------------------------------------------------------ parameter groups, import

def test_new_and_memory_parameter_names():
    base = tiny("llama")
    new = up(base, "midus-hml-copy", 2)
    names = midus.new_parameter_names(new)
    assert names == {n for n, _ in new.named_parameters() if n.startswith(("model.layers.2.", "model.layers.5."))}
    assert {"model.layers.2.memory.bank", "model.layers.5.out_proj.weight"} <= names
    mem = midus.memory_parameter_names(new)
    assert mem == {f"model.layers.{p}.memory.{leaf}" for p in (2, 5) for leaf in ("subkeys", "bank", "proj")}
    pkm = up(base, "midus-pkm", 1)
    assert midus.memory_parameter_names(pkm) == {"model.layers.4.memory.subkeys", "model.layers.4.memory.values"}
    solar = up(base, "solar", 2)  # second copies of base layers 1 and 2
    assert midus.new_parameter_names(solar) == {n for n, _ in solar.named_parameters()
                                                if n.startswith(("model.layers.3.", "model.layers.4."))}
    assert midus.memory_parameter_names(solar) == set()
    with pytest.raises(ValueError, match="midus_upscale"):
        midus.new_parameter_names(base)


def test_import_midus_is_light_and_registers_the_auto_classes():
    code = ("import sys, midus\n"
            "heavy = [m for m in ('midus.train', 'midus.cli', 'midus.data', 'midus.evaluate', 'datasets') "
            "if m in sys.modules]\n"
            "from transformers import AutoConfig, AutoModelForCausalLM\n"
            "c = AutoConfig.for_model('midus')\n"
            "print('HEAVY', heavy, type(c).__name__, type(AutoModelForCausalLM.from_config(c)).__name__)\n")
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HEAVY [] MidusConfig MidusForCausalLM" in proc.stdout, proc.stdout


def test_memory_options_reach_the_layers_and_survive_save_load(tmp_path):
    base = tiny("qwen3")
    new = upscale(base, "midus", placement=[0, 2], n=6, k=3, d_z=8, tau=0.5, query_norm="rms").eval()
    blocks = [new.model.layers[p] for p in new.config.memory_positions]
    assert new.config.memory_positions == [1, 4] and len(blocks) == 2
    for block in blocks:
        mem = block.memory
        assert (mem.n, mem.k, mem.d_z, mem.tau, mem.query_norm_kind) == (6, 3, 8, 0.5, "rms")
        assert mem.bank.shape == (36, 8) and mem.proj.shape == (4, 8, 16) and mem.subkeys.shape == (4, 2, 6, 8)
    with torch.no_grad():
        assert torch.equal(new(token_ids()).logits, base(token_ids()).logits)
    perturb_zero_init(new)
    new.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.memory_options == new.config.memory_options
    assert loaded.config.midus_upscale["placement"] == [0, 2]
    _assert_same_model(new, loaded, token_ids())


def test_midus_config_answers_the_usual_size_fields_from_its_text_config(tmp_path):
    """Tools read config.hidden_size / num_hidden_layers directly; a MidusConfig answers them from
    its text config (the whole up-scaled stack), writes go there, and config.json keeps one copy."""
    from conftest import make_tiny_llama

    base = make_tiny_llama(96)
    big = upscale(base, "midus", num_blocks=2, n=8, k=4, d_z=16)
    c = big.config
    assert c.num_hidden_layers == len(big.model.layers) == base.config.num_hidden_layers + 2
    for name in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size",
                 "max_position_embeddings"):
        assert getattr(c, name) == getattr(base.config, name), name
    big.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "hidden_size" not in saved and saved["text_config"]["hidden_size"] == c.hidden_size
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    loaded.resize_token_embeddings(100)
    assert loaded.config.vocab_size == loaded.config.text_config.vocab_size == 100
