"""method="lesa" of midus.upscale (LESA, arXiv 2502.13794; spec/HML.md 3.3) and midus.lesa.

Tiny random models of every family (helpers shared with test_upscale.py), a synthetic layer
sequence with a known law, and the real SmolLM2-135M (fixture shared with test_upscale_smollm2.py).
"""
import json
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*midus_ops.*")

import midus  # noqa: E402
from midus import upscale  # noqa: E402
from midus.lesa import LESA_DEFAULTS, coefficient_blocks, predict_layers  # noqa: E402
from test_upscale import COMMON, FAMILIES, _assert_same_model, tiny, token_ids  # noqa: E402
from test_upscale_smollm2 import smol  # noqa: E402,F401  (module-scoped fixture: the real model + ids)
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def lesa(base, num_blocks=2, **kw):
    return upscale(base, "lesa", num_blocks, **kw).eval()


def rel(a, b):
    """Relative Frobenius error of ``a`` as an estimate of ``b``."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ------------------------------------------------------------------------------ the SVD (paper 3.1)

def test_coefficient_blocks_match_the_svd_of_the_concatenation():
    g = torch.Generator().manual_seed(0)
    for d1, d2, L in [(24, 8, 5), (40, 8, 3)]:  # d1 <= L*d2 (Gram path) and d1 > L*d2 (SVD path)
        mats = [torch.randn(d1, d2, generator=g) for _ in range(L)]
        US, U, V = coefficient_blocks(mats)
        R = min(d1, L * d2)
        assert US.shape == (d1, R) and V.shape == (L, R, d2)
        for l in range(L):
            torch.testing.assert_close(US @ V[l], mats[l], atol=1e-4, rtol=1e-4)
        S = torch.linalg.svdvals(torch.cat(mats, dim=1))
        torch.testing.assert_close(US.norm(dim=0), S, atol=1e-4, rtol=1e-4)  # singular values, descending
        torch.testing.assert_close(U.T @ U, torch.eye(R), atol=1e-5, rtol=0)
        # rows of V^T (each direction's coefficients over all L layers) have unit norm
        torch.testing.assert_close(V.square().sum(dim=(0, 2)), torch.ones(R), atol=1e-4, rtol=0)


def test_predictor_learns_a_known_law_between_and_after_layers():
    """Layers on a smooth curve W_l = A + t B + t^2 C (t = l / L): the trained predictors beat
    copying the neighbour, between layers and after the last one (the extrapolation MLP)."""
    g = torch.Generator().manual_seed(1)
    A, B, C = (torch.randn(16, 12, generator=g) for _ in range(3))
    L = 14
    law = [A + (l / L) * B + (l / L) ** 2 * C for l in range(L + 1)]  # l = L: the "next" layer
    held = 6
    kept = [{"w": law[l]} for l in range(L) if l != held]  # train without layer 6 ...
    opts = dict(epochs=50, lr=3e-3, rank=None, seed=0)
    mid, nxt = predict_layers(kept, [held - 1, L - 2], **opts)  # ... predict it, and the layer after the last
    assert rel(mid["w"], law[held]) < 0.5 * rel(law[held - 1], law[held])
    assert rel(nxt["w"], law[L]) < 0.5 * rel(law[L - 1], law[L])
    copied, = predict_layers(kept, [L - 2], **dict(opts, last="copy"))
    assert torch.equal(copied["w"], law[L - 1])


# ---------------------------------------------------------------- up-scaling tiny models (spec 3.3)

def test_layout_config_and_predicted_layers():
    base = tiny("qwen2")  # layer_types and max_window_layers
    new = lesa(base, 2)
    rec = new.config.midus_upscale
    assert type(new) is type(base) and new.config.num_hidden_layers == 6 == len(new.model.layers)
    assert rec["method"] == "lesa" and rec["base_layers"] == [1, 3] and rec["inserted_positions"] == [2, 5]
    assert rec["layer_order"] == [0, 1, 1, 2, 3, 3] and rec["lesa_options"] == LESA_DEFAULTS
    assert [layer.self_attn.layer_idx for layer in new.model.layers] == list(range(6))
    assert new.config.layer_types == [base.config.layer_types[s] for s in rec["layer_order"]]
    assert new.config.max_window_layers == 3  # positions 0, 1, 2 come from base layers 0, 1 (< 2)
    out = new(token_ids(), use_cache=True)
    cache = out.get("past_key_values", out.get("cache"))
    assert cache is not None and len(cache.layers) == 6
    b = {k: v for k, v in base.state_dict().items()}
    for pos, src in enumerate(rec["layer_order"]):
        for name, value in new.model.layers[pos].state_dict().items():
            if pos not in rec["inserted_positions"]:
                assert torch.equal(value, b[f"model.layers.{src}.{name}"]), (pos, name)
    # position 2 sits between base layers 1 and 2; position 5 follows the last layer (3)
    between, after_last = new.model.layers[2].state_dict(), new.model.layers[5].state_dict()
    for name, value in between.items():
        left, right = b[f"model.layers.1.{name}"], b[f"model.layers.2.{name}"]
        if value.dim() == 1:  # norms and biases: the neighbours' mean
            torch.testing.assert_close(value, (left + right) / 2)
        else:  # predicted: neither neighbour, not degenerate (a 10-step MLP on a tiny model shrinks it)
            assert not torch.equal(value, left) and not torch.equal(value, right)
            assert 0.1 < value.norm() / left.norm() < 2.0, name
    for name, value in after_last.items():
        last = b[f"model.layers.3.{name}"]
        if value.dim() == 1:
            assert torch.equal(value, last)
        else:
            assert not torch.equal(value, last)  # extrapolated, not cloned
    assert midus.new_parameter_names(new) == {n for n, _ in new.named_parameters()
                                              if n.startswith(("model.layers.2.", "model.layers.5."))}


def test_last_copy_clones_the_last_layer_and_options_are_recorded():
    base = tiny("llama")
    new = lesa(base, placement=[0, 3], last="copy", rank=4, hidden=32, epochs=2, seed=5)
    rec = new.config.midus_upscale
    assert rec["lesa_options"] == dict(LESA_DEFAULTS, last="copy", rank=4, hidden=32, epochs=2, seed=5)
    assert rec["placement"] == [0, 3] and rec["inserted_positions"] == [1, 5]
    for name, value in new.model.layers[5].state_dict().items():
        assert torch.equal(value, base.model.layers[3].state_dict()[name]), name


def test_deterministic_given_a_seed_and_the_input_is_untouched():
    base = tiny("qwen3")  # q/k norms, tied embeddings
    before = {k: v.clone() for k, v in base.state_dict().items()}
    cfg_before = base.config.to_dict()
    torch.manual_seed(123)
    a = lesa(base, 3)
    rng_after = torch.get_rng_state()
    torch.manual_seed(123)
    b = lesa(base, 3)
    assert torch.equal(rng_after, torch.get_rng_state())  # the global RNG is neither used nor advanced
    c = lesa(base, 3, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and base.config.to_dict() == cfg_before
    base_ptrs = {t.data_ptr() for t in list(base.parameters()) + list(base.buffers())}
    assert not base_ptrs & {t.data_ptr() for t in list(a.parameters()) + list(a.buffers())}
    assert a.lm_head.weight is a.model.embed_tokens.weight


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_with_and_without_cache_and_save_load(family, tmp_path):
    new = lesa(tiny(family), 2)
    prompt = token_ids(1, 8)
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(prompt))
    with_cache = new.generate(prompt, use_cache=True, **kw)
    assert with_cache.shape == (1, 28)
    assert torch.equal(with_cache, new.generate(prompt, use_cache=False, **kw))
    new.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(new)
    _assert_same_model(new, loaded, token_ids())
    assert loaded.config.midus_upscale == json.loads(json.dumps(new.config.midus_upscale))
    assert loaded.config.midus_upscale["lesa_options"]["rank"] == LESA_DEFAULTS["rank"]


def test_bf16_model_stays_bf16_and_trains_everything_by_default():
    from midus.train import resolve_trainable

    new = lesa(tiny("mistral").to(torch.bfloat16), 1)
    assert {p.dtype for p in new.parameters()} == {torch.bfloat16}
    assert resolve_trainable(new, "auto") == {n for n, _ in new.named_parameters()}  # spec 3.4: "all"


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_blocks=5), ValueError, "num_blocks"),
    (dict(num_blocks=0), ValueError, "num_blocks"),
    (dict(num_blocks=2, ranks=8), TypeError, "ranks"),
    (dict(num_blocks=2, n=8), TypeError, r"\['n'\]"),  # a midus memory option
    (dict(num_blocks=2, rank=0), ValueError, "rank"),
    (dict(num_blocks=2, rank=2.5), ValueError, "rank"),
    (dict(num_blocks=2, hidden=-1), ValueError, "hidden"),
    (dict(num_blocks=2, epochs=0), ValueError, "epochs"),
    (dict(num_blocks=2, batch_size=True), ValueError, "batch_size"),
    (dict(num_blocks=2, lr=0.0), ValueError, "lr"),
    (dict(num_blocks=2, norm_weight=2.0), ValueError, "norm_weight"),
    (dict(num_blocks=2, seed="a"), ValueError, "seed"),
    (dict(num_blocks=2, last="mean"), ValueError, "last"),
    (dict(placement=[1, 1]), ValueError, "repeated"),
])
def test_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        upscale(tiny("llama"), "lesa", **kwargs)


def test_bad_input_other_methods_and_too_few_layers():
    with pytest.raises(TypeError, match="method='midus' only"):
        upscale(tiny("llama"), "dus", 2, rank=8)  # a lesa option given to another method
    with pytest.raises(TypeError, match="rank"):
        upscale(tiny("llama"), "midus", 2, rank=8)
    two = LlamaForCausalLM(LlamaConfig(**dict(COMMON, num_hidden_layers=2)))
    with pytest.raises(ValueError, match="at least 3 layers"):
        upscale(two, "lesa", 1)
    with pytest.raises(ValueError, match="after"):
        predict_layers([{"w": torch.ones(2, 2)}] * 3, [3])


# ------------------------------------------------------------------------ the real SmolLM2-135M

def test_real_model_held_out_layers_beat_copying_a_neighbour(smol):
    """Hold out interior layers, train on the rest (the held-out layer's neighbours become adjacent),
    and predict each held-out layer between its neighbours: relative Frobenius error of the predicted
    weights (all seven matrices) against copying either neighbour (what dus / llama_pro start from).
    In the top-``rank`` singular directions (what the MLP predicts) it must also beat the
    neighbours' mean, i.e. the MLP has learned more than averaging."""
    base, _ = smol
    layers = [{k: v.detach() for k, v in layer.named_parameters()} for layer in base.model.layers]
    held = [7, 12, 17, 22]
    kept_idx = [i for i in range(len(layers)) if i not in held]
    kept = [layers[i] for i in kept_idx]
    preds = predict_layers(kept, [kept_idx.index(h - 1) for h in held])
    names = [n for n in layers[0] if layers[0][n].dim() == 2]
    flat = lambda layer: torch.cat([layer[n].flatten() for n in names])  # noqa: E731
    r = LESA_DEFAULTS["rank"]
    sq = {"pred": 0.0, "mean": 0.0}
    for h, pred in zip(held, preds):
        e_pred = rel(flat(pred), flat(layers[h]))
        e_left, e_right = rel(flat(layers[h - 1]), flat(layers[h])), rel(flat(layers[h + 1]), flat(layers[h]))
        e_mean = rel((flat(layers[h - 1]) + flat(layers[h + 1])) / 2, flat(layers[h]))
        print(f"layer {h}: predicted {e_pred:.3f}, copy left {e_left:.3f}, copy right {e_right:.3f}, "
              f"neighbours' mean {e_mean:.3f}")
        assert e_pred < min(e_left, e_right)
        for n in names:  # every weight kind too
            assert rel(pred[n], layers[h][n]) < min(rel(layers[h - 1][n], layers[h][n]),
                                                    rel(layers[h + 1][n], layers[h][n])), (h, n)
    for n in [n for n in names if "gate_proj" not in n and "up_proj" not in n]:  # the largest, left out for time
        U = coefficient_blocks([layer[n] for layer in kept])[1][:, :r]  # the basis the predictor saw
        top = lambda w: U.T @ w.float()  # noqa: E731
        for h, pred in zip(held, preds):
            sq["pred"] += (top(pred[n]) - top(layers[h][n])).square().sum().item()
            sq["mean"] += (top((layers[h - 1][n] + layers[h + 1][n]) / 2) - top(layers[h][n])).square().sum().item()
    print(f"top-{r} directions, squared error summed over held-out layers and 5 kinds: predicted "
          f"{sq['pred']:.2f}, neighbours' mean {sq['mean']:.2f}")
    assert sq["pred"] < sq["mean"]


def test_real_model_lesa_upscale_generates_the_same_with_and_without_cache(smol):
    base, ids = smol
    new = midus.upscale(base, "lesa", 8).eval()
    rec = new.config.midus_upscale
    assert rec["base_layers"] == [2, 6, 10, 14, 17, 21, 25, 29] and new.config.num_hidden_layers == 38
    with torch.no_grad():
        loss, base_loss = new(ids, labels=ids).loss.item(), base(ids, labels=ids).loss.item()
    print(f"loss on the test text: lesa K=8 {loss:.3f}, base {base_loss:.3f}")
    assert loss < 6.0  # still a language model (a random one: ln 49152 = 10.8)
    prompt = ids[:, :8]
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=2,
              attention_mask=torch.ones_like(prompt))
    assert torch.equal(new.generate(prompt, use_cache=True, **kw), new.generate(prompt, use_cache=False, **kw))
