"""placement="importance" of midus.upscale and midus.placement (layer and per-head importance)."""
import json
import warnings

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*midus_ops.*")

import midus  # noqa: E402
from midus import upscale  # noqa: E402
from midus.placement import choose_layers, layer_importance  # noqa: E402
from test_upscale import SMALL_MEM, _assert_same_model, tiny, token_ids  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def calibration(n=96, seed=5):
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


class _Identity(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.attention_type = getattr(layer, "attention_type", "full_attention")

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def full_pass_loss(model, windows, skip=None, zero_head=None):
    """Mean next-token NLL of a full forward pass, with a layer replaced by the identity or one
    head's output zeroed: the reference for the partial passes."""
    saved, hook = None, None
    if skip is not None:
        saved = model.model.layers[skip]
        model.model.layers[skip] = _Identity(saved)
    if zero_head is not None:
        layer, h, dh = zero_head

        def pre(module, args):
            x = args[0].clone()
            x[..., h * dh:(h + 1) * dh] = 0
            return (x,)

        hook = model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            logits = model(windows).logits
    finally:
        if saved is not None:
            model.model.layers[skip] = saved
        if hook is not None:
            hook.remove()
    nll = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten(), reduction="sum")
    return float(nll.double()) / (windows.shape[0] * (windows.shape[1] - 1))


@pytest.mark.parametrize("family", ["llama", "gemma3", "phi3"])
def test_layer_scores_equal_full_passes_with_the_layer_skipped(family):
    model = tiny(family)
    ids = calibration()
    res = layer_importance(model, ids, window=32, batch_size=2)
    windows = ids[: 3 * 32].view(3, 32)
    base = full_pass_loss(model, windows)
    assert res["loss"] == pytest.approx(base, abs=1e-6) and res["tokens"] == 3 * 31 and res["windows"] == 3
    for l, score in enumerate(res["scores"]):
        assert score == pytest.approx(full_pass_loss(model, windows, skip=l) - base, abs=1e-5), l


def test_head_scores_equal_full_passes_with_the_head_zeroed_and_sum_to_the_layer_score():
    model = tiny("qwen3")
    ids = calibration()
    res = layer_importance(model, ids, measure="heads", window=32, batch_size=3)
    windows = ids[: 3 * 32].view(3, 32)
    base = full_pass_loss(model, windows)
    assert len(res["head_scores"]) == 4 and all(len(r) == 4 for r in res["head_scores"])
    for l, h in [(0, 0), (2, 3)]:
        assert res["head_scores"][l][h] == pytest.approx(full_pass_loss(model, windows, zero_head=(l, h, 16)) - base,
                                                         abs=1e-5)
    assert res["scores"] == pytest.approx([sum(r) for r in res["head_scores"]])


def test_a_layer_or_head_that_does_nothing_scores_zero():
    model = tiny("llama")
    with torch.no_grad():  # layer 2 writes nothing into the residual stream: skipping it changes nothing
        for module in (model.model.layers[2].self_attn.o_proj, model.model.layers[2].mlp.down_proj):
            module.weight.zero_()
            module.bias.zero_()
        model.model.layers[1].self_attn.o_proj.weight[:, 16:32] = 0  # head 1 of layer 1 writes nothing
    res = layer_importance(model, calibration(), window=32)
    assert res["scores"][2] == 0.0  # (random layers may score below 0: skipping them helps)
    heads = layer_importance(model, calibration(), measure="heads", window=32)
    assert heads["head_scores"][1][1] == 0.0 and heads["scores"][2] == 0.0


def test_choose_layers_takes_the_largest_scores_and_breaks_ties_by_index():
    assert choose_layers([0.1, 0.5, 0.3, 0.5, -0.2], 2) == [1, 3]
    assert choose_layers([0.1, 0.5, 0.3, 0.5, -0.2], 3) == [1, 2, 3]
    assert choose_layers([0.0, 0.0, 0.0], 2) == [0, 1]


@pytest.mark.parametrize("method", ["midus", "llama_pro", "opt_deus"])
def test_upscale_with_importance_placement_records_prints_and_is_deterministic(method, capsys, tmp_path):
    base = tiny("llama")
    opts = SMALL_MEM if method == "midus" else {}
    new = upscale(base, method, 2, placement="importance", calibration=calibration(), **opts).eval()
    rec = new.config.midus_upscale
    imp = rec["importance"]
    assert rec["placement"] == "importance" and imp["measure"] == "layer" and len(imp["scores"]) == 4
    assert rec["base_layers"] == imp["chosen"] == choose_layers(imp["scores"], 2)
    err = capsys.readouterr().err
    assert f"new blocks after base layers {rec['base_layers']}" in err
    again = upscale(base, method, 2, placement="importance", calibration=calibration(), **opts)
    assert again.config.midus_upscale["importance"]["scores"] == imp["scores"]  # bit for bit
    with torch.no_grad():  # still the identity at insertion
        assert torch.equal(new(token_ids()).logits, base(token_ids()).logits)
    new.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.midus_upscale == json.loads(json.dumps(rec))
    _assert_same_model(new, loaded, token_ids())


def test_head_importance_placement_for_midus():
    base = tiny("qwen2")
    new = upscale(base, "midus", 1, placement="importance", calibration=calibration().view(3, 32),
                  importance="heads", **SMALL_MEM)
    imp = new.config.midus_upscale["importance"]
    assert imp["measure"] == "heads" and len(imp["head_scores"]) == 4 and imp["windows"] == 3
    assert new.config.memory_positions == [imp["chosen"][0] + 1]


@pytest.mark.parametrize("kwargs,match", [
    (dict(placement="importance"), "calibration"),
    (dict(placement="distributed", calibration=calibration()), "calibration"),
    (dict(placement="importance", calibration=calibration().float()), "calibration"),
    (dict(placement="importance", calibration=calibration()[:1]), "calibration"),
    (dict(placement="importance", calibration=torch.zeros(2, 2, 2, dtype=torch.long)), "calibration"),
    (dict(placement="importance", calibration=calibration(), importance="neurons"), "importance"),
    (dict(placement="distributed", importance="neurons"), "importance"),
])
def test_bad_calibration_input_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        upscale(tiny("llama"), "dus", 2, **kwargs)


def test_num_blocks_out_of_range_with_importance():
    with pytest.raises(ValueError, match="num_blocks"):
        upscale(tiny("llama"), "dus", 5, placement="importance", calibration=calibration())


def test_placement_indices_says_importance_needs_upscale():
    with pytest.raises(ValueError, match="calibration"):
        midus.placement_indices(8, 2, "importance")


def test_cli_upscale_with_importance_placement(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    from midus.cli import main

    out = tmp_path / "imp"
    assert main(["upscale", "--model", tiny_model_dir, "--output", str(out), "--method", "llama_pro",
                 "--num-blocks", "2", "--placement", "importance", "--importance", "heads", "--data", tiny_text_file,
                 "--calibration-tokens", "300"]) == 0
    rec = json.loads((out / "config.json").read_text())["midus_upscale"]
    assert rec["placement"] == "importance" and rec["importance"]["measure"] == "heads"
    assert rec["importance"]["tokens"] <= 300
    printed = capsys.readouterr()
    assert f"after base layers {rec['base_layers']}" in printed.out
    assert main(["upscale", "--model", tiny_model_dir, "--output", str(tmp_path / "x"), "--importance", "heads"]) == 1
    assert "--importance" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_pipeline_measures_importance_on_the_training_text(tiny_model_dir, tiny_text_file):
    from midus.pipeline import Experiment, run_experiment

    row = run_experiment(Experiment(model=tiny_model_dir, data=tiny_text_file, method="opt_deus", num_blocks=1,
                                    placement="importance", calibration_tokens=200, eval_splits=("val",),
                                    eval_tokens=64, window=32, device="cpu"), log=lambda msg: None)
    assert len(row["base_layers"]) == 1 and row["layers"] == 5
