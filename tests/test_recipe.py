"""The memory recipe (issue 11): the memory key/values' own LR, schedule and clipping; the learned
temperature; dev/test splits; memory health; the pipeline, `midus study` and the fair `midus
compare` (LR chosen on dev, test reported, seeds, curves)."""
import argparse
import hashlib
import json
import math

import pytest
import torch

import midus
from midus import analyze as A
from midus import compare as cmp
from midus import study as S
from midus.data import dev_test_split, load_corpus, load_documents, split_documents
from midus.pipeline import Experiment, run_experiment
from midus.train import TrainConfig, build_optimizer, build_scheduler, train
from midus_ops import HeadwiseMemoryLayer, ProductKeyMemory, pk_topk

from conftest import TINY_TEXT, make_tiny_llama

VOCAB = 96
MEM = dict(n=8, k=4, d_z=16)


def tiny_midus(seed=0, **opts):
    return midus.upscale(make_tiny_llama(VOCAB, seed=seed), "midus", num_blocks=2, **{**MEM, **opts})


def sequences(n=24, seq_len=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seq_len), generator=g)


# ----------------------------------------------------------------------------- the LR recipe


@pytest.mark.parametrize("field, value", [("memory_lr", 0.0), ("memory_lr", float("nan")), ("memory_lr_scale", -1.0),
                                          ("memory_lr_schedule", "linear"), ("memory_lr_decay_steps", -2),
                                          ("memory_max_grad_norm", -1.0)])
def test_recipe_fields_are_validated_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_the_default_recipe_is_the_studys_and_paper_is_available():
    cfg = TrainConfig()
    assert {f: getattr(cfg, f) for f in midus.train.RECIPE_FIELDS} == midus.train.MEMORY_RECIPES["study"]
    assert midus.train.MEMORY_RECIPES["study"]["memory_lr_scale"] == 10.0
    p = argparse.ArgumentParser()
    midus.train.add_recipe_arguments(p)
    assert midus.train.recipe_from_args(p.parse_args([])) == {}
    assert midus.train.recipe_from_args(p.parse_args(["--memory-recipe", "paper", "--memory-max-grad-norm", "2"])) \
        == {**midus.train.MEMORY_RECIPES["paper"], "memory_max_grad_norm": 2.0}


def test_memory_lr_scale_and_absolute_lr_constant(one_thread):
    peak = 1e-3
    r = train(tiny_midus(), sequences(), max_steps=4, micro_batch_size=2, lr=peak, warmup_steps=2,
              memory_lr_scale=10.0, memory_lr_schedule="constant", progress=False)
    assert [lrs["memory_kv"] for lrs in r.lrs] == pytest.approx([10 * peak] * 4)
    assert r.lrs[0]["decay"] == 0.0  # the rest still warms up
    r = train(tiny_midus(), sequences(), max_steps=3, micro_batch_size=2, lr=peak, memory_lr=2e-3,
              memory_lr_scale=50.0, memory_lr_schedule="constant", progress=False)  # absolute LR wins over the scale
    assert [lrs["memory_kv"] for lrs in r.lrs] == pytest.approx([2e-3] * 3)


@pytest.mark.parametrize("decay_steps", [0, 4])
def test_decay_schedule_goes_linearly_to_the_peak_lr(decay_steps, one_thread):
    peak, scale, total = 1e-3, 10.0, 8
    r = train(tiny_midus(), sequences(), max_steps=total, micro_batch_size=2, lr=peak, warmup_steps=2,
              memory_lr_scale=scale, memory_lr_schedule="decay", memory_lr_decay_steps=decay_steps, progress=False)
    span = decay_steps or total
    expected = [scale * peak + (peak - scale * peak) * min(1.0, t / span) for t in range(total)]
    assert [lrs["memory_kv"] for lrs in r.lrs] == pytest.approx(expected, rel=1e-9)
    assert r.lrs[0]["memory_kv"] == pytest.approx(scale * peak)
    if decay_steps:
        assert r.lrs[-1]["memory_kv"] == pytest.approx(peak)


def test_cosine_memory_schedule_follows_the_rest_at_its_own_peak(one_thread):
    model = tiny_midus()
    opt = build_optimizer(model, TrainConfig(lr=1e-3, memory_lr_scale=3.0, memory_lr_schedule="cosine"))
    sched = build_scheduler(opt, 2, 10)
    for _ in range(10):
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        assert lrs["memory_kv"] == pytest.approx(3.0 * lrs["decay"], rel=1e-9, abs=1e-15)
        opt.step()
        sched.step()


def _grads_at_step(model, monkeypatch, **cfg):
    """Gradients as the optimizer sees them at its first step (after clipping)."""
    seen = {}
    real = midus.train.build_optimizer

    def build(m, c):
        opt = real(m, c)

        def hook(optimizer, args, kwargs):
            if not seen:
                names = {id(p): n for n, p in m.named_parameters()}
                for g in optimizer.param_groups:
                    for p in g["params"]:
                        seen[names[id(p)]] = (g["name"], p.grad.detach().clone())

        opt.register_step_pre_hook(hook)
        return opt

    monkeypatch.setattr(midus.train, "build_optimizer", build)
    train(model, sequences(), max_steps=1, micro_batch_size=4, lr=1e-3, warmup_steps=0, progress=False,
          trainable="all", **cfg)
    return seen


def _norm(grads, group=None, exclude=None):
    sel = [g for name, (grp, g) in grads.items() if (group is None or grp == group) and grp != exclude]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in sel])))


def test_separate_clipping_of_the_memory_leaves_the_rest_alone(one_thread, monkeypatch):
    free = _grads_at_step(tiny_midus(), monkeypatch, max_grad_norm=0.0)
    assert _norm(free, "memory_kv") > 1e-3  # something to clip
    sep = _grads_at_step(tiny_midus(), monkeypatch, max_grad_norm=0.0, memory_max_grad_norm=1e-4)
    assert _norm(sep, "memory_kv") == pytest.approx(1e-4, rel=1e-3)
    for name, (grp, g) in sep.items():
        if grp != "memory_kv":
            assert torch.equal(g, free[name][1]), name  # not scaled by the memory's clipping
    # Joint clipping (the default) scales everything by one factor.
    joint = _grads_at_step(tiny_midus(), monkeypatch, max_grad_norm=1e-4)
    assert _norm(joint) == pytest.approx(1e-4, rel=1e-3)
    # Separate clipping: the rest keeps its own limit, computed without the memory.
    both = _grads_at_step(tiny_midus(), monkeypatch, max_grad_norm=1e-3, memory_max_grad_norm=1e-4)
    assert _norm(both, exclude="memory_kv") == pytest.approx(1e-3, rel=1e-3)
    assert _norm(both, "memory_kv") == pytest.approx(1e-4, rel=1e-3)


def test_recipe_is_recorded_in_log_checkpoint_and_saved_config(tmp_path, one_thread):
    model = tiny_midus()
    train(model, sequences(), max_steps=3, micro_batch_size=2, lr=1e-3, memory_lr_scale=4.0,
          memory_lr_schedule="decay", memory_max_grad_norm=0.5, checkpoint_dir=str(tmp_path / "ck"), progress=False)
    log = [json.loads(x) for x in open(tmp_path / "ck" / "log.jsonl")]
    assert log[0]["config"]["memory_lr_scale"] == 4.0 and "config" not in log[1]
    assert all("memory_grad_norm" in r for r in log)
    state = json.loads((tmp_path / "ck" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["config"]["memory_lr_schedule"] == "decay"
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["midus_train"]
    assert saved["memory_start_lr"] == pytest.approx(4e-3) and saved["memory_max_grad_norm"] == 0.5
    assert saved["steps"] == 3 and saved["lr"] == 1e-3


def test_exact_resume_with_a_decaying_memory_lr(tmp_path, one_thread):
    kw = dict(max_steps=6, micro_batch_size=4, lr=5e-3, warmup_steps=2, progress=False, memory_lr_scale=8.0,
              memory_lr_schedule="decay", memory_lr_decay_steps=4, memory_max_grad_norm=0.3)
    data = sequences(n=20)
    straight = tiny_midus()
    r1 = train(straight, data, checkpoint_dir=str(tmp_path / "a"), save_every=3, keep_checkpoints=5, **kw)
    resumed = tiny_midus(seed=5)
    r2 = train(resumed, data, checkpoint_dir=str(tmp_path / "b"), resume_from=str(tmp_path / "a" / "checkpoint-3"),
               **kw)
    assert r2.losses == r1.losses[3:]
    assert [x["memory_kv"] for x in r2.lrs] == [x["memory_kv"] for x in r1.lrs[3:]]
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


def test_resume_refuses_other_settings_and_follows_a_longer_run(tmp_path, one_thread):
    """A checkpoint resumes only with the settings that made its optimizer state and LRs; a longer
    max_steps is allowed and the LRs then follow the new total, as a straight run to it would."""
    kw = dict(micro_batch_size=4, lr=5e-3, warmup_steps=1, progress=False)
    data = sequences(n=20)
    train(tiny_midus(), data, max_steps=2, checkpoint_dir=str(tmp_path / "a"), **kw)
    ck = str(tmp_path / "a" / "checkpoint-2")
    for change, match in [(dict(memory_lr_scale=1.0, memory_lr_schedule="constant"), "memory_lr_scale 10.0 -> 1.0"),
                          (dict(lr=1e-3), "lr 0.005 -> 0.001"), (dict(seed=3), "seed")]:
        model = tiny_midus(seed=5)
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(ValueError, match=match):
            train(model, data, max_steps=4, resume_from=ck, **{**kw, **change})
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # refused before loading
    straight = train(tiny_midus(), data, max_steps=4, **kw)
    longer = train(tiny_midus(seed=5), data, max_steps=4, resume_from=ck, **kw)
    for got, want in zip(longer.lrs, straight.lrs[2:]):
        assert got == pytest.approx(want, rel=1e-12)


def test_recipe_flag_conflicts_are_refused():
    from midus.train import recipe_from_args

    with pytest.raises(ValueError, match="--memory-lr and --memory-lr-scale"):
        recipe_from_args(argparse.Namespace(memory_recipe=None, memory_lr=1e-3, memory_lr_scale=10.0))
    with pytest.raises(ValueError, match="memory_lr_decay_steps"):
        TrainConfig(memory_lr_schedule="constant", memory_lr_decay_steps=5)
    for bad in (float("inf"), float("nan"), 0.0):
        with pytest.raises(ValueError, match="lr"):
            TrainConfig(lr=bad)
    with pytest.raises(ValueError, match="save_every"):
        TrainConfig(save_every=-1)
    # a bad value is named by its flag, before anything loads
    with pytest.raises(ValueError, match="^--memory-lr-decay-steps: memory_lr_decay_steps must be >= 0"):
        recipe_from_args(argparse.Namespace(memory_recipe=None, memory_lr_schedule="decay", memory_lr_decay_steps=-3))


def test_cli_train_names_a_bad_recipe_flag_before_loading_a_model(tmp_path, capsys):
    from midus.cli import main

    assert main(["train", "--model", str(tmp_path / "no-such-model"), "--data", "wiki", "--steps", "1",
                 "--output", str(tmp_path / "out"), "--memory-lr", "-1"]) == 1
    err = capsys.readouterr().err
    assert "--memory-lr: memory_lr must be a positive number" in err and "no-such-model" not in err, err
    assert "does not beat" in A.retrieval_gain_words(-0.011) and "beats random slots by 0.100" in \
        A.retrieval_gain_words(0.1)


# ----------------------------------------------------------------------------- learned temperature


@pytest.mark.parametrize("kind", ["hml", "pkm"])
def test_learned_temperature_weights_and_gradient(kind, one_thread):
    torch.manual_seed(0)
    if kind == "hml":
        layer = HeadwiseMemoryLayer(3, 8, n=6, k=4, d_z=8, tau=0.5, learn_tau=True).double()
        x = torch.randn(5, 3, 8, dtype=torch.float64)
        q = x
    else:
        layer = ProductKeyMemory(12, num_heads=3, n=6, k=4, d_k=8, tau=0.5, learn_tau=True).double()
        x = torch.randn(5, 12, dtype=torch.float64)
        q = torch.nn.functional.linear(x, layer.query.weight).view(5, 3, 8)
    assert torch.allclose(layer.log_tau, torch.full((3,), math.log(0.5), dtype=torch.float64))
    with torch.no_grad():
        layer.log_tau.copy_(torch.tensor([-1.0, 0.2, 0.9], dtype=torch.float64))
        (layer.bank if kind == "hml" else layer.values).normal_()
    scores, _ = pk_topk(q, layer.subkeys, layer.k)
    expected = torch.softmax(scores / torch.tensor([math.exp(-1.0), math.exp(0.2), math.exp(0.9)],
                                                   dtype=torch.float64).view(1, 3, 1), dim=-1)
    assert torch.allclose(layer.topk_weights(scores), expected, rtol=1e-12, atol=1e-14)
    # Sharper heads (smaller tau) have lower weight entropy.
    ent = -(expected * expected.log()).sum(-1).mean(0)
    assert ent[0] < ent[1] < ent[2]
    layer.log_tau.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: _with_log_tau(layer, t, x), (layer.log_tau.detach().clone()
                                                                           .requires_grad_(True),))


def _with_log_tau(layer, log_tau, x):
    saved = layer.log_tau
    try:
        del layer.log_tau
        layer.log_tau = log_tau
        return layer(x)
    finally:
        del layer.log_tau
        layer.log_tau = saved


def test_learned_temperature_through_upscale_save_load_and_analyses(tmp_path, one_thread):
    model = tiny_midus(learn_tau=True, tau=0.7)
    names = midus.memory_parameter_names(model)
    assert {n for n in names if n.endswith("log_tau")} == {f"model.layers.{p}.memory.log_tau"
                                                            for p in model.config.memory_positions}
    assert not any(n.endswith("log_tau") for n in midus.memory_parameter_names(tiny_midus()))
    opt = build_optimizer(model, TrainConfig(memory_lr_scale=10.0))
    group = next(g for g in opt.param_groups if g["name"] == "memory_kv")
    assert sum(p.numel() for p in group["params"]) == sum(p.numel() for n, p in model.named_parameters()
                                                          if n in names)
    with torch.no_grad():
        for _, m in A.memory_blocks(model):
            m.bank.normal_()
            m.log_tau.uniform_(-1, 1)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    # The analyses' replacement forward still reproduces the layer bit for bit.
    o = torch.randn(7, model.config.text_config.num_attention_heads, 16)
    _, m = A.memory_blocks(model)[0]
    with torch.no_grad():
        assert torch.equal(A.memory_forward(m, o), m(o))


def test_old_configs_without_learn_tau_load_as_fixed_tau(tmp_path):
    model = tiny_midus()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["learn_tau"]
    del cfg["midus_upscale"]["memory_options"]["learn_tau"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = type(model).from_pretrained(tmp_path)
    assert loaded.config.learn_tau is False
    assert all(m.log_tau is None for _, m in A.memory_blocks(loaded))


# ----------------------------------------------------------------------------- data and health


def test_dev_test_halves_partition_the_validation_documents(tiny_text_file, tiny_tokenizer):
    docs = load_documents(tiny_text_file)
    _, val = split_documents(docs, 0.2)
    dev, test = dev_test_split(val)
    assert len(dev) == (len(val) + 1) // 2 and len(test) == len(val) // 2
    assert not set(dev) & set(test) and sorted(dev + test) == sorted(val)
    assert dev_test_split(list(reversed(val)))[0] == list(reversed(dev))  # by name, not by order
    names = sorted(val, key=lambda d: hashlib.sha1(d[0].encode()).hexdigest())
    assert names[0] in dev and names[1] in test
    ids = {s: load_corpus(tiny_text_file, tiny_tokenizer, split=s, val_fraction=0.2) for s in ("val", "dev", "test")}
    assert ids["dev"].numel() + ids["test"].numel() == ids["val"].numel()
    with pytest.raises(ValueError, match="split"):
        load_corpus(tiny_text_file, tiny_tokenizer, split="holdout")
    with pytest.raises(ValueError, match="at least 2"):
        dev_test_split(val[:1])


def test_memory_health_of_a_zero_bank_and_of_a_random_one(tiny_tokenizer, one_thread):
    base = make_tiny_llama(len(tiny_tokenizer))
    model = midus.upscale(base, "midus", num_blocks=2, **MEM).eval()
    ids = torch.tensor(tiny_tokenizer(TINY_TEXT)["input_ids"][:128], dtype=torch.long)
    h = A.memory_health(model, ids, window=32)
    assert h["retrieval_gain"] == 0.0  # a zero bank reads zeros, whatever the slots
    assert h["max_entropy"] == pytest.approx(math.log(4)) and 0 < h["entropy_ratio"] <= 1
    assert 0 < h["slot_usage"] <= 1 and h["tokens"] == 4 * 31
    with torch.no_grad():
        for _, m in A.memory_blocks(model):
            m.bank.normal_(std=2.0)
            m.subkeys.mul_(20.0)  # sharp scores: low entropy
    h2 = A.memory_health(model, ids, window=32)
    assert h2["entropy_ratio"] < h["entropy_ratio"] and h2["retrieval_gain"] != 0.0
    assert h2["learned_loss"] == pytest.approx(A.memory_usage(model, ids, window=32)["loss"], rel=1e-12)


# ----------------------------------------------------------------------------- pipeline, study, compare


def test_pipeline_curve_and_identity_at_insertion(tiny_model_dir, tiny_text_file, one_thread):
    exp = Experiment(model=tiny_model_dir, data=tiny_text_file, val_fraction=0.2, method="midus", num_blocks=2,
                     upscale_options=dict(MEM), train={"max_steps": 4, "micro_batch_size": 2, "lr": 1e-2,
                                                       "warmup_steps": 1, "memory_lr_scale": 3.0},
                     seq_len=16, eval_splits=("dev", "test"), eval_tokens=96, window=16, eval_base=True,
                     eval_before=True, curve_steps=[0, 2, 4], health=True, health_tokens=64)
    row = run_experiment(exp, log=lambda m: None)
    assert [p["step"] for p in row["curve"]] == [0, 2, 4]
    assert row["curve"][0]["ppl"] == pytest.approx(row["ppl_base"]["dev"], rel=1e-5)  # identity at insertion
    assert row["ppl_before"]["dev"] == pytest.approx(row["ppl_base"]["dev"], rel=1e-5)
    assert row["curve"][-1]["ppl"] == pytest.approx(row["ppl"]["dev"], rel=1e-9)
    assert set(row["ppl"]) == {"dev", "test"} and row["ppl"]["dev"] != row["ppl"]["test"]
    assert row["recipe"]["memory_start_lr"] == pytest.approx(3e-2) and row["train_steps"] == 4
    assert row["health"]["tokens"] > 0 and row["memory_options"]["n"] == 8
    assert row["peak_memory_mib"] > 0 and json.dumps(row)


def _study_args(tmp_path, model, text, *extra):
    p = argparse.ArgumentParser()
    S.add_arguments(p)
    return p.parse_args(["--model", model, "--data", text, "--steps", "2", "--points", "2", "--seeds", "1",
                         "--batch-size", "2", "--seq-len", "16", "--eval-tokens", "64", "--window", "16",
                         "--health-tokens", "32", "--warmup", "1", "--num-blocks", "2", "--output",
                         str(tmp_path / "study"), *extra])


def test_study_runs_resumes_and_chooses_on_dev(tmp_path, tiny_model_dir, tiny_text_file, capsys, monkeypatch):
    monkeypatch.setitem(S.RECIPES, "tiny-a", dict(label="a", train={"memory_lr_scale": 1.0}, memory=dict(MEM),
                                                   source="test"))
    monkeypatch.setitem(S.RECIPES, "tiny-b", dict(label="b", train={"memory_lr_scale": 30.0},
                                                   memory={**MEM, "learn_tau": True}, source="test"))
    args = _study_args(tmp_path, tiny_model_dir, tiny_text_file, "--recipes", "tiny-a,tiny-b", "--baselines", "none")
    # The workers are fresh processes: the recipes' definitions reach them in the study's config.
    assert S.run(args) == 0
    out = tmp_path / "study"
    rep = json.loads((out / "study.json").read_text())
    dev = {s["name"]: s["dev_ppl"] for s in rep["summary"]}
    assert rep["chosen"] == min(dev, key=dev.get)
    assert all([p["step"] for p in s["curve"]] == [0, 1, 2] for s in rep["summary"])
    assert (out / "study.png").read_bytes()[:4] == b"\x89PNG" and "(chosen)" in (out / "study.md").read_text()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert S.run(args) == 0  # resumes: nothing left to run
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == before
    assert "0 to run" in capsys.readouterr().err and rep["missing"] == []
    # A grid stopped early says which runs are missing instead of reporting a smaller grid as whole.
    (out / "runs" / "tiny-b__s0.json").unlink()
    (out / "runs" / ".tiny-b__s0.spec.json").write_text("{}")  # left by an interrupted worker
    rep = S.report(str(out))
    assert rep["missing"] == ["tiny-b seed 0"] and "Not run" in (out / "study.md").read_text()
    # Resuming under another budget, or with a recipe defined otherwise, is refused by name: the old
    # runs would be reported as if made under the new settings.
    with pytest.raises(ValueError, match="steps"):
        S.run(_study_args(tmp_path, tiny_model_dir, tiny_text_file, "--recipes", "tiny-a,tiny-b", "--baselines",
                          "none", "--steps", "3"))
    monkeypatch.setitem(S.RECIPES, "tiny-a", dict(S.RECIPES["tiny-a"], train={"memory_lr_scale": 2.0}))
    with pytest.raises(ValueError, match="recipe tiny-a"):
        S.run(args)
    assert not (out / "runs" / "tiny-b__s0.json").exists()  # refused before any work


def test_study_recipes_run_what_their_names_say():
    """Every recipe spells out the whole memory recipe, so TrainConfig's default (now the study's
    choice) cannot leak into 'paper' or the constant-LR recipes."""
    from midus.train import MEMORY_RECIPES, RECIPE_FIELDS

    assert S.RECIPES["paper"]["train"] == MEMORY_RECIPES["paper"]
    for name, r in S.RECIPES.items():
        assert set(r["train"]) == set(RECIPE_FIELDS), name
        cfg = TrainConfig(**S._experiment({**S._defaults(), "recipe_defs": S.RECIPES}, {"name": name, "kind": "recipe",
                                                                                         "seed": 0}).train)
        assert cfg.memory_lr_scale == (1.0 if name == "paper" else 10.0), name
        assert cfg.memory_lr_schedule == ("decay" if "decay" in name else "constant"), name
    # A recipe recorded before it spelled out its fields meant the defaults of the time (the paper's).
    old = S._experiment({**S._defaults(), "recipe_defs": {"lr10": {"train": {"memory_lr_scale": 10.0},
                                                                   "memory": {}}}},
                        {"name": "lr10", "kind": "recipe", "seed": 0}).train
    assert TrainConfig(**old).memory_lr_schedule == "constant"


def test_study_refuses_bad_settings():
    with pytest.raises(ValueError, match="recipes"):
        S._check({**S._defaults(), "recipes": ["nope"]})
    with pytest.raises(ValueError, match="each at most once"):
        S._check({**S._defaults(), "recipes": ["paper", "paper"]})
    with pytest.raises(ValueError, match="lr"):
        S._check({**S._defaults(), "lr": float("inf")})


def test_study_refuses_a_bad_model_or_placement_before_any_run(tmp_path, tiny_model_dir, tiny_text_file):
    with pytest.raises(FileNotFoundError, match="--model"):
        S.run(_study_args(tmp_path, str(tmp_path / "nowhere"), tiny_text_file, "--recipes", "paper"))
    with pytest.raises(ValueError, match="--placement"):
        S.run(_study_args(tmp_path, tiny_model_dir, tiny_text_file, "--recipes", "paper", "--placement", "2,x"))
    assert not (tmp_path / "study").exists()
    with pytest.raises(ValueError, match="points"):
        S._check({**S._defaults(), "points": 500})


def _cmp_args(model_dir, text_file, out, *extra):
    p = argparse.ArgumentParser()
    cmp.add_arguments(p)
    return p.parse_args(["--model", model_dir, "--data", text_file, "--val-fraction", "0.2", "--num-blocks", "2",
                         "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "96",
                         "--window", "32", "--tasks", "none", "--output", str(out), *extra])


def test_compare_chooses_lr_on_dev_reports_test_over_seeds(tmp_path, tiny_model_dir, tiny_text_file, one_thread):
    args = _cmp_args(tiny_model_dir, tiny_text_file, tmp_path / "out", "--methods", "base,midus", "--lr", "1e-4,3e-2",
                     "--seeds", "2", "--curves", "--points", "2", "--memory-lr-scale", "5")
    cfg = cmp.config_from_args(args)
    assert cfg.lrs == [1e-4, 3e-2] and cfg.recipe == {"memory_lr_scale": 5.0}
    report = cmp.compare(cfg, output_dir=str(tmp_path / "out"), in_process=True)
    base, mid = report["rows"]
    grid = {g["lr"]: g for g in mid["lr_grid"]}
    assert mid["chosen_lr"] == min(grid, key=lambda lr: grid[lr]["dev_ppl"])
    assert mid["seeds"] == [0, 1] and len(mid["curves"]) == 2
    assert mid["recipe"]["memory_start_lr"] == pytest.approx(5 * mid["chosen_lr"])
    # test perplexity of the chosen LR's seed-0 run is one of the two averaged
    chosen_test = grid[mid["chosen_lr"]]["test_ppl"]
    assert min(chosen_test, 2 * mid["test_ppl"] - chosen_test) <= mid["test_ppl"] <= max(chosen_test,
                                                                                       2 * mid["test_ppl"] - chosen_test)
    assert mid["test_ppl_spread"] == pytest.approx(abs(chosen_test - mid["test_ppl"]), rel=1e-9)
    assert base["ppl"] == base["test_ppl"] and "chosen_lr" not in base
    md = (tmp_path / "out" / "compare.md").read_text()
    assert f"**{mid['chosen_lr']:g}**" in md and "dev half" in md and "2 seeds" in md
    assert (tmp_path / "out" / "compare_curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("extra, match", [(["--lr", "1e-3,x"], "--lr"), (["--lr", "1e-3,1e-3"], "once"),
                                          (["--seeds", "0"], "seeds"), (["--memory-lr-scale", "-2"], "--memory-lr-scale: memory_lr_scale"),
                                          (["--placement", "0,2", "--methods", "solar"], "placement")])
def test_compare_refuses_bad_grid_and_recipe(extra, match, tmp_path, tiny_model_dir, tiny_text_file, capsys):
    from midus.cli import main

    argv = ["compare", "--model", tiny_model_dir, "--data", tiny_text_file, "--val-fraction", "0.2", "--tasks", "none",
            "--num-blocks", "2", "--output", str(tmp_path / "out")] + extra
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_cli_train_takes_the_recipe(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    from midus.cli import main

    up = tmp_path / "up"
    assert main(["upscale", "--model", tiny_model_dir, "--output", str(up), "--num-blocks", "2", "--n", "8", "--k",
                 "4", "--d-z", "16", "--learn-tau"]) == 0
    assert json.loads((up / "config.json").read_text())["learn_tau"] is True
    out = tmp_path / "trained"
    assert main(["train", "--model", str(up), "--data", tiny_text_file, "--output", str(out), "--seq-len", "16",
                 "--batch-size", "2", "--steps", "3", "--lr", "1e-3", "--warmup", "1", "--memory-lr-scale", "10",
                 "--memory-lr-schedule", "decay", "--no-progress"]) == 0
    log = [json.loads(x) for x in open(out / "train_log.jsonl")]
    assert [r["lr"]["memory_kv"] for r in log] == pytest.approx([1e-2, 1e-2 - 9e-3 / 3, 1e-2 - 18e-3 / 3])
    assert json.loads((out / "config.json").read_text())["midus_train"]["memory_lr_schedule"] == "decay"


def test_compare_resumes_with_the_same_settings_only(tmp_path, tiny_model_dir, tiny_text_file, one_thread, capsys):
    out = tmp_path / "out"
    first = _cmp_args(tiny_model_dir, tiny_text_file, out, "--methods", "base,midus", "--lr", "1e-2")
    assert cmp.run(first) == 0
    before = json.loads((out / "compare.json").read_text())
    more = _cmp_args(tiny_model_dir, tiny_text_file, out, "--methods", "base,dus,midus", "--lr", "1e-2", "--resume")
    assert cmp.run(more) == 0
    after = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in after["rows"]] == ["base", "dus", "midus"]
    assert after["rows"][0] == before["rows"][0] and after["rows"][2] == before["rows"][1]  # kept, not rerun
    assert "kept from the earlier run" in capsys.readouterr().err
    other = _cmp_args(tiny_model_dir, tiny_text_file, out, "--methods", "base,midus", "--lr", "1e-3", "--resume")
    with pytest.raises(ValueError, match="lrs"):
        cmp.run(other)
    # the recipe is compared as it took effect: the default spelled as a named recipe is the same
    # recipe, another memory LR is not
    same = _cmp_args(tiny_model_dir, tiny_text_file, out, "--methods", "base,midus", "--lr", "1e-2",
                     "--memory-recipe", "study", "--resume")
    assert cmp.run(same) == 0
    changed = _cmp_args(tiny_model_dir, tiny_text_file, out, "--methods", "base,midus", "--lr", "1e-2",
                        "--memory-lr-scale", "3", "--resume")
    with pytest.raises(ValueError, match=r"other settings \(recipe\)"):
        cmp.run(changed)
    assert json.loads((out / "compare.json").read_text())["rows"] == after["rows"][:1] + after["rows"][2:]
