"""MIDUS models in the Hugging Face workflows users run on them (issue 12): the base's attention
implementation, usage statistics after from_pretrained, PEFT LoRA with the usual targets, and
padded batches. Tiny random models of tests/test_upscale.py, on CPU.
"""
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*midus_ops.*")

import midus  # noqa: E402
import midus_ops  # noqa: E402
from midus_ops import HeadwiseMemoryLayer, ProductKeyMemory  # noqa: E402
from test_upscale import VARIANTS, perturb_zero_init, tiny, token_ids, up  # noqa: E402
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


# ------------------------------------------------------------------ usage statistics after loading (item 2)

@pytest.mark.parametrize("device_map", [None, "cpu"])
@pytest.mark.parametrize("variant", MIDUS_VARIANTS)
def test_usage_statistics_are_empty_after_from_pretrained(variant, device_map, tmp_path):
    """transformers #25555 kind: non-persistent buffers are not in the checkpoint, and
    from_pretrained allocates them empty (uninitialised memory: tokens like 4.7e-310, NaN counts).
    They must start at zero, and count the tokens of a forward exactly."""
    new = up(tiny("llama"), variant)
    perturb_zero_init(new)
    for layer in memory_layers(new):  # statistics the saved model had must not come back either
        layer.stats.slot_counts.fill_(7.0)
        layer.stats.tokens.fill_(3.0)
    new.save_pretrained(tmp_path)
    for _ in range(3):  # fresh allocations each time: garbage differs from run to run
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map=device_map).eval()
        layers = memory_layers(loaded)
        assert len(layers) == 2
        for layer in layers:
            for name, buf in layer.stats.named_buffers():
                assert torch.equal(buf, torch.zeros_like(buf)), (name, buf)
            s = layer.memory_stats()
            assert s["tokens"].item() == 0
            assert torch.isnan(s["weight_entropy"]).all() and torch.isnan(s["kl_from_uniform"]).all()
        with torch.no_grad():
            loaded(token_ids(2, 10))
        for layer in layers:
            s = layer.memory_stats()
            assert s["tokens"].item() == 20
            assert torch.isfinite(s["weight_entropy"]).all() and (s["weight_entropy"] > 0).all()
            assert (s["weight_entropy"] <= torch.log(torch.tensor(float(layer.k))) + 1e-9).all()
            assert layer.stats.slot_counts.sum().item() == 20 * layer.num_heads * layer.k


def test_memory_parameter_missing_from_the_checkpoint_gets_the_layers_init(tmp_path):
    """A memory parameter absent from the checkpoint is allocated empty by from_pretrained: it must
    get the layer's own init (bank = 0, so the block is the identity), not uninitialised memory,
    while every loaded parameter keeps its saved value."""
    from safetensors.torch import load_file, save_file

    new = up(tiny("llama"), "midus-hml")
    perturb_zero_init(new)
    new.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = "model.layers.2.memory.bank"
    del weights[dropped]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == {dropped}
    sd = loaded.state_dict()
    assert torch.equal(sd[dropped], torch.zeros_like(sd[dropped]))
    for key, value in weights.items():
        assert torch.equal(sd[key], value), key


_REMOTE_STATS = r"""
import json, sys, torch, warnings
warnings.filterwarnings("ignore")
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
bufs = [b for n, b in m.named_buffers() if ".memory.stats." in n]
print("RESULT" + json.dumps(dict(n=len(bufs), zero=all(bool((b == 0).all()) for b in bufs),
                                 cls=type(m).__module__)))
"""


def test_usage_statistics_are_empty_after_remote_code_loading(tmp_path):
    import json
    import os
    import subprocess
    import sys

    new = up(tiny("llama"), "midus-hml-copy")
    new.save_pretrained(tmp_path / "model")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(midus.__file__)))
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([repo] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, "-c", _REMOTE_STATS, str(tmp_path / "model")], capture_output=True,
                          text=True, env=env, cwd=str(tmp_path), timeout=300)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    out = json.loads(line[0][len("RESULT"):])
    assert out["cls"].startswith("transformers_modules.") and out["n"] == 2 * 3 and out["zero"], out


# ------------------------------------------------------------------ PEFT LoRA (item 3)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # what most fine-tuning recipes use
LORA_VARIANTS = dict(VARIANTS, lesa=("lesa", dict(rank=4, hidden=8, epochs=1)))


@pytest.mark.parametrize("variant", list(LORA_VARIANTS))
def test_peft_lora_with_the_usual_targets(variant, tmp_path):
    """LlamaFactory #5640 kind: LoRA on q/k/v/o_proj must apply to every method's model (the HML
    block's attention had o_proj = nn.Identity(), which PEFT refuses), reach the memory blocks'
    q/k/v projections, and merge, save and reload to the same logits."""
    import peft  # in the test extras (setup.py): missing, this fails rather than skips
    from midus import upscale

    method, opts = LORA_VARIANTS[variant]
    new = upscale(tiny("llama"), method, 2, **opts).eval()
    perturb_zero_init(new)
    new.save_pretrained(tmp_path / "base")
    names = {n for n, _ in new.named_modules()}
    ids = token_ids()
    with torch.no_grad():
        before = new(ids).logits

    # init_lora_weights=False: random B as well as A, so the adapters change the logits
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS,
                             init_lora_weights=False)
    model = peft.get_peft_model(new, config).eval()
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if n.endswith(".lora_A")}
    wanted = {"base_model.model." + n for n in names if n.rsplit(".", 1)[-1] in LORA_TARGETS}
    assert adapted == wanted
    for p in new.config.midus_upscale["inserted_positions"]:  # the new blocks are adapted too
        assert f"base_model.model.model.layers.{p}.self_attn.q_proj" in adapted
    with torch.no_grad():
        lora = model(ids).logits
    assert not torch.allclose(lora, before, atol=1e-4)

    model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, lora)

    merged = model.merge_and_unload().eval()
    assert {n for n, _ in merged.named_modules()} == names
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, lora, rtol=1e-4, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(again) is type(new)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, lora, rtol=1e-4, atol=1e-5)


def test_hml_block_attention_has_no_output_projection_module():
    """The HML block's attention is the family's class without o_proj: nothing named o_proj in the
    block, while the parameter names stay model.layers.{p}.self_attn.{q,k,v}_proj.* and the
    attention still returns the heads' outputs, concatenated (head-major)."""
    base = tiny("qwen3")
    for variant in ("midus-hml", "midus-hml-copy"):
        new = up(base, variant)
        for p in new.config.memory_positions:
            block = new.model.layers[p]
            assert not any(n.endswith("o_proj") for n, _ in block.named_modules())
            assert isinstance(block.self_attn, type(base.model.layers[0].self_attn))
            assert {n.split(".")[0] for n, _ in block.self_attn.named_parameters()} == {
                "q_proj", "k_proj", "v_proj", "q_norm", "k_norm"}
            assert (block.out_proj is not None) == (variant == "midus-hml-copy")


@pytest.mark.parametrize("variant", MIDUS_VARIANTS)
def test_whole_model_pickles(variant, tmp_path):
    """torch.save(model) pickles classes by name: the per-family classes modeling_midus makes
    (the stack model, the HML block's attention) must be reachable in their module."""
    new = up(tiny("mistral"), variant)
    perturb_zero_init(new)
    torch.save(new, tmp_path / "model.pt")
    again = torch.load(tmp_path / "model.pt", weights_only=False).eval()
    with torch.no_grad():
        assert torch.equal(again(token_ids()).logits, new(token_ids()).logits)


# ------------------------------------------------------------------ padding (item 4)

def _left_padded(lengths, T=8, seed=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
        ids[b, :T - n] = 0  # the pad token
    return ids, mask


@pytest.mark.parametrize("variant", MIDUS_VARIANTS)
def test_usage_statistics_leave_out_padding(variant):
    """XLM #171 kind: in a left-padded batch the memory layers must count the real tokens only
    (16 of 24 here), exactly the reads of those tokens; the logits of the real tokens stay those
    of each sequence run alone. fp64, so that batching cannot flip a near-tie."""
    lengths = [8, 5, 3]
    new = up(tiny("llama"), variant).double()
    perturb_zero_init(new)
    ids, mask = _left_padded(lengths)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)  # what generate passes with left padding
    layers = memory_layers(new)
    inputs = {}  # each memory layer's input in the padded batch, to recount its reads here
    hooks = [layer.register_forward_pre_hook(lambda m, args: inputs.__setitem__(m, args[0])) for layer in layers]
    with torch.no_grad():
        logits = new(ids, attention_mask=mask, position_ids=position_ids).logits
    for h in hooks:
        h.remove()
    real = mask.bool()
    for layer in layers:
        s = layer.memory_stats()
        assert s["tokens"].item() == sum(lengths) == 16
        assert layer.stats.slot_counts.sum().item() == 16 * layer.num_heads * layer.k
        # the reads of the real tokens, recomputed from the layer's input
        x = inputs[layer][real]
        if isinstance(layer, HeadwiseMemoryLayer):
            q = x.reshape(-1, layer.num_heads, layer.head_dim)
        else:
            q = (x @ layer.query.weight.t()).view(-1, layer.num_heads, layer.d_k)
        scores, idx = midus_ops.pk_topk(q, layer.subkeys, layer.k)
        counts = torch.zeros_like(layer.stats.slot_counts)
        for h in range(layer.num_heads):
            counts[h].index_add_(0, idx[:, h].flatten(), torch.ones(idx[:, h].numel(), dtype=counts.dtype))
        assert torch.equal(layer.stats.slot_counts, counts)
        w = torch.softmax(scores / layer.tau, -1)
        torch.testing.assert_close(s["weight_entropy"], -(w * w.log()).sum(-1).mean(0))
    with torch.no_grad():
        for b, n in enumerate(lengths):
            alone = new(ids[b:b + 1, -n:]).logits[0]
            torch.testing.assert_close(logits[b, -n:], alone, rtol=1e-9, atol=1e-9)


def test_usage_statistics_during_batched_generation():
    """generate passes the padding mask of prompt + generated tokens; each step counts its new
    tokens only: the 16 real prompt tokens, then 3 per step after the first."""
    new = up(tiny("qwen2"), "midus-hml")
    perturb_zero_init(new)
    ids, mask = _left_padded([8, 5, 3])
    new.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    for layer in memory_layers(new):
        assert layer.memory_stats()["tokens"].item() == 16 + 3 * 3


# ------------------------------------------------------------------ offloading (accelerate)

@pytest.mark.parametrize("variant", MIDUS_VARIANTS)
def test_offloaded_memory_blocks_compute_the_same(variant, tmp_path):
    """With the memory blocks offloaded to disk (accelerate's hooks load each module's weights
    for its own forward; on a GPU, CPU offloading uses the same hooks), the logits are the
    in-memory model's: the PKM read its query Linear's weight without calling the module, which
    then stayed on the meta device (NaN logits)."""
    new = up(tiny("qwen2"), variant)
    perturb_zero_init(new)
    new.save_pretrained(tmp_path / "model")
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "lm_head": "cpu", "model.rotary_emb": "cpu"}
    blocks = set(new.config.memory_positions)
    for i in range(len(new.model.layers)):
        device_map[f"model.layers.{i}"] = "disk" if i in blocks else "cpu"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map,
                                                  offload_folder=str(tmp_path / "offload")).eval()
    for p in blocks:  # really offloaded: nothing of the block resident
        assert {t.device.type for t in loaded.model.layers[p].parameters()} == {"meta"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(token_ids()).logits, new(token_ids()).logits, rtol=0, atol=0)
    for layer in memory_layers(loaded):
        assert layer.memory_stats()["tokens"].item() == 20
