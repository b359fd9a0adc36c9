"""midus.analyze: head importance, fixed retrieval, memory usage (spec/HML.md 3.5) on tiny models."""
import argparse
import json
import math

import pytest
import torch

import midus
from midus import analyze as A
from midus.evaluate import perplexity
from midus_ops import HeadwiseMemoryLayer, ProductKeyMemory, pk_topk

from conftest import TINY_TEXT, make_tiny_llama

WINDOW = 32
TOKENS = 4 * WINDOW


def _randomise(model, std=0.5, seed=1):
    """Non-zero banks/values so the memory changes the loss (a fresh block is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in A.memory_blocks(model):
            table = m.bank if isinstance(m, HeadwiseMemoryLayer) else m.values
            table.copy_(torch.randn(table.shape, generator=g) * std)
    return model


def _loss(model, ids):
    """Mean next-token NLL over the disjoint windows, straight from the logits (no hooks)."""
    x = ids.view(-1, WINDOW)
    with torch.no_grad():
        logits = model(input_ids=x, use_cache=False).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(),
                                            reduction="none")
    return float(nll.double().sum()) / nll.numel()


@pytest.fixture(scope="module")
def setup(one_thread, tiny_tokenizer):
    base = make_tiny_llama(len(tiny_tokenizer), seed=0, layers=4)
    ids = torch.tensor(tiny_tokenizer(TINY_TEXT)["input_ids"][:TOKENS], dtype=torch.long)
    assert ids.numel() == TOKENS
    # tau != 1 (the default 1 skips the division): a lost temperature shows in the losses
    hml = _randomise(midus.upscale(base, "midus", num_blocks=2, n=8, k=4, d_z=16, tau=0.5).eval())
    pkm = _randomise(midus.upscale(base, "midus", num_blocks=2, memory="pkm", n=8, k=4, pkm_heads=2,
                                   pkm_d_k=16, tau=0.5).eval(), std=0.2)
    base_loss = _loss(base, ids)
    return {"base": base, "ids": ids, "hml": hml, "pkm": pkm, "base_loss": base_loss}


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_replacement_forward_reproduces_layer_exactly(one_thread, tau):
    torch.manual_seed(0)
    for query_norm in ("none", "rms"):
        hml = HeadwiseMemoryLayer(4, 16, n=8, k=4, d_z=32, query_norm=query_norm, tau=tau).eval()
        torch.nn.init.normal_(hml.bank)
        o = torch.randn(3, 5, 4, 16)
        assert torch.equal(A.memory_forward(hml, o), hml(o))
    pkm = ProductKeyMemory(32, num_heads=3, n=8, k=4, d_k=16, tau=tau).eval()
    x = torch.randn(2, 7, 32)
    assert torch.equal(A.memory_forward(pkm, x), pkm(x))
    # the recorded weights against softmax(scores / tau) computed here
    seen = []
    A.memory_forward(pkm, x, record=lambda idx, w: seen.append(w))
    scores, _ = pk_topk((x.reshape(-1, 32) @ pkm.query.weight.detach().t()).view(-1, 3, 16), pkm.subkeys.detach(), 4)
    torch.testing.assert_close(seen[0], torch.softmax(scores.double() / tau, -1).float())
    # the override installs and removes an instance forward, statistics untouched
    hml.reset_memory_stats()
    with A.override_memory({hml: A.zero_heads([1])}):
        r = hml(o)
    assert torch.count_nonzero(r[..., 1, :]) == 0 and torch.count_nonzero(r[..., 0, :]) > 0
    assert "forward" not in hml.__dict__ and float(hml.memory_stats()["tokens"]) == 0
    assert torch.equal(hml(o), A.memory_forward(hml, o))


def test_slot_scores_match_pk_topk(one_thread):
    torch.manual_seed(1)
    hml = HeadwiseMemoryLayer(3, 16, n=8, k=5, d_z=8)
    q = torch.randn(11, 3, 16)
    scores, idx = pk_topk(q, hml.subkeys, hml.k)
    torch.testing.assert_close(A.slot_scores(hml, q, idx), scores.float(), rtol=1e-5, atol=1e-5)
    # a fixed [H, m] slot set gives one score per token
    fixed = torch.randint(0, 64, (3, 6))
    s = A.slot_scores(hml, q, fixed)
    assert s.shape == (11, 3, 6)
    a, b = fixed[1, 2] // 8, fixed[1, 2] % 8
    want = q[4, 1, :8] @ hml.subkeys[1, 0, a] + q[4, 1, 8:] @ hml.subkeys[1, 1, b]
    torch.testing.assert_close(s[4, 1, 2], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["hml", "pkm"])
def test_override_runs_in_a_padded_batch(setup, kind):
    """A MIDUS block hands its memory the padding mask (token_mask); the replacement forward of
    override_memory takes it too, and gives the layer's output."""
    model, ids = setup[kind], setup["ids"][:16].view(2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        with A.override_memory({m: None for _, m in A.memory_blocks(model)}):
            got = model(ids, attention_mask=mask).logits
    assert torch.equal(got, want)


def test_patched_model_loss_is_the_models_loss(setup):
    model, ids = setup["hml"], setup["ids"]
    own = _loss(model, ids)  # the layers' own forward
    learned = A.retrieval_loss(model, ids, "learned", "learned", window=WINDOW)
    assert learned == own
    # the same number as midus.evaluate (which sums fp32 NLL per window)
    assert learned == pytest.approx(perplexity(model, ids, window=WINDOW, stride=WINDOW).nll, abs=1e-5)
    want = own
    assert abs(want - setup["base_loss"]) > 1e-3  # the random banks matter
    # 2-D windows are used as given
    assert A.retrieval_loss(model, ids.view(-1, WINDOW), window=999) == learned


@pytest.mark.parametrize("kind", ["hml", "pkm"])
def test_head_importance(setup, kind):
    model, ids = setup[kind], setup["ids"]
    blocks = A.memory_blocks(model)
    assert len(blocks) == 2
    # block 0 gets a zero bank: zeroing its heads changes nothing, exactly
    p0, m0 = blocks[0]
    table = m0.bank if kind == "hml" else m0.values
    saved = table.detach().clone()
    with torch.no_grad():
        table.zero_()
    try:
        res = A.head_importance(model, ids, window=WINDOW, batch_size=3)
        learned = _loss(model, ids)
        # the partial pass (from the block's recorded input) equals a full pass
        p1 = blocks[1][0]
        full = A._Evaluator(model, ids, WINDOW, 3).loss({p1: A.zero_heads([1])})
    finally:
        with torch.no_grad():
            table.copy_(saved)
    H = m0.num_heads
    assert res["loss"] == learned
    b0, b1 = res["blocks"]
    assert (b0["position"], b1["position"], b0["heads"], b0["kind"]) == (p0, p1, H, kind)
    assert b0["delta"] == [0.0] * H and b0["block_zeroed_delta"] == 0.0
    assert any(abs(d) > 1e-4 for d in b1["delta"])
    assert b1["loss_zeroed"][1] == pytest.approx(full, abs=1e-10)
    assert res["passes"] == 1 + 2 * (H + 1) and res["tokens"] == 4 * (WINDOW - 1)


@pytest.mark.parametrize("kind", ["hml", "pkm"])
def test_fixed_retrieval(setup, kind):
    model, ids = setup[kind], setup["ids"]
    res = A.fixed_retrieval(model, ids, window=WINDOW, batch_size=4, seed=3)
    losses = res["losses"]
    learned = _loss(model, ids)
    assert losses["learned"] == learned
    # every head of every block zeroed: the blocks are the identity, the base model's loss
    assert losses["no_memory"] == setup["base_loss"]
    assert set(losses) == {"learned", "fixed/top/uniform", "fixed/top/scores", "fixed/first/uniform",
                           "fixed/first/scores", "random/uniform", "random/scores", "no_memory"}
    assert abs(losses["random/uniform"] - learned) > 1e-4 and abs(losses["fixed/top/uniform"] - learned) > 1e-4
    # the learned indices with weights recomputed from their scores reproduce the learned loss
    assert A.retrieval_loss(model, ids, "learned", "scores", window=WINDOW) == pytest.approx(learned, abs=1e-5)
    # random slots are seeded
    assert A.retrieval_loss(model, ids, "random", "uniform", seed=3, window=WINDOW) == losses["random/uniform"]
    assert A.retrieval_loss(model, ids, "random", "uniform", seed=4, window=WINDOW) != losses["random/uniform"]
    # the "top" rule: the k most-read slots per head, counted by the layer itself
    for p, m in A.memory_blocks(model):
        m.reset_memory_stats()
    perplexity(model, ids, window=WINDOW, stride=WINDOW)
    for p, m in A.memory_blocks(model):
        counts = m.stats.slot_counts
        top = torch.tensor(res["fixed_slots"]["top"][str(p)])
        assert top.shape == (m.num_heads, m.k)
        chosen = counts.gather(1, top)
        rest = counts.clone().scatter_(1, top, -1.0)
        assert bool((chosen.min(1).values >= rest.max(1).values).all())
        m.reset_memory_stats()
    # fixed slots given explicitly as the learned "first" set reproduce that variant
    first = {int(p): torch.tensor(s) for p, s in res["fixed_slots"]["first"].items()}
    assert A.retrieval_loss(model, ids, "fixed", "scores", fixed_slots=first, window=WINDOW) == \
        losses["fixed/first/scores"]


def test_fixed_retrieval_rejects_bad_arguments(setup):
    model, ids = setup["hml"], setup["ids"]
    with pytest.raises(ValueError, match="slots"):
        A.retrieval_loss(model, ids, "sometimes", window=WINDOW)
    with pytest.raises(ValueError, match="weighting"):
        A.retrieval_loss(model, ids, "random", "learned", window=WINDOW)
    with pytest.raises(ValueError, match="fixed_slots"):
        A.retrieval_loss(model, ids, "fixed", "uniform", window=WINDOW)
    with pytest.raises(ValueError, match="rule"):
        A.fixed_retrieval(model, ids, rules=("middle",), window=WINDOW)
    with pytest.raises(ValueError, match="window"):
        A.memory_usage(model, ids[:10], window=WINDOW)
    with pytest.raises(ValueError, match="batch_size"):
        A.memory_usage(model, ids, window=WINDOW, batch_size=0)


@pytest.mark.parametrize("kind", ["hml", "pkm"])
def test_memory_usage(setup, kind):
    model, ids = setup[kind], setup["ids"]
    blocks = A.memory_blocks(model)
    m = blocks[0][1]
    m.reset_memory_stats()
    m.eval()
    m(torch.randn(5, m.num_heads, m.head_dim) if kind == "hml" else torch.randn(5, m.d_model))
    before = {k: v.clone() for k, v in m.memory_stats().items()}
    res = A.memory_usage(model, ids, window=WINDOW)
    after = m.memory_stats()
    assert all(torch.equal(before[k], after[k]) or (before[k].isnan() == after[k].isnan()).all() for k in before)
    assert res["loss"] == _loss(model, ids)
    for rec, (p, mem) in zip(res["blocks"], blocks):
        H = mem.num_heads
        assert rec["position"] == p and len(rec["slot_usage"]) == H
        assert all(0 < u <= 1 for u in rec["slot_usage"])
        assert all(0 <= kl <= rec["max_kl"] + 1e-9 for kl in rec["kl_from_uniform"])
        assert all(0 <= e <= math.log(mem.k) + 1e-9 for e in rec["weight_entropy"])
    # cross-check the fraction of slots read against the retrieval the analysis sees
    seen = {}
    ev = A._Evaluator(model, ids, WINDOW, 4)
    p0, m0 = blocks[0]
    ev.loss(record={p0: lambda idx, w: seen.setdefault("idx", []).append(idx)})
    idx = torch.cat(seen["idx"])
    used = [torch.unique(idx[:, h]).numel() / (m0.n * m0.n) for h in range(m0.num_heads)]
    assert res["blocks"][0]["slot_usage"] == pytest.approx(used, abs=1e-12)
    m.reset_memory_stats()


def test_run_analyses_writes_json_and_png(setup, tmp_path):
    model, ids = setup["hml"], setup["ids"]
    results = A.run_analyses(model, ids, tmp_path / "out", window=WINDOW)
    assert set(results) == {"heads", "fixed", "usage"}
    for name, stem in (("heads", "head_importance"), ("fixed", "fixed_retrieval"), ("usage", "memory_usage")):
        path = tmp_path / "out" / f"{stem}.json"
        data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
        assert data["analysis"] == results[name]["analysis"] and data["tokens"] == 4 * (WINDOW - 1)
        png = (tmp_path / "out" / f"{stem}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    with pytest.raises(ValueError, match="analyses"):
        A.run_analyses(model, ids, tmp_path / "x", analyses=("heads", "bogus"))


def test_models_without_memory_blocks_are_refused(setup, tmp_path):
    base, ids = setup["base"], setup["ids"]
    dus = midus.upscale(base, "dus", num_blocks=1)
    for model in (base, dus):
        for fn in (A.head_importance, A.fixed_retrieval, A.memory_usage):
            with pytest.raises(ValueError, match="no memory blocks"):
                fn(model, ids, window=WINDOW)
        with pytest.raises(ValueError, match="no memory blocks"):
            A.run_analyses(model, ids, tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_cli_subcommand(setup, tmp_path, tiny_tokenizer, tiny_text_file, capsys):
    from midus.cli import CLIError

    folder = tmp_path / "tiny-midus"
    setup["hml"].save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    parser = argparse.ArgumentParser()
    A.add_arguments(parser)
    out = tmp_path / "analysis"
    args = parser.parse_args(["--model", str(folder), "--data", tiny_text_file, "--tokens", "200", "--window", "64",
                              "--analyses", "usage,heads", "--output", str(out), "--no-progress"])
    assert A.run(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["head_importance.json", "head_importance.png",
                                                     "memory_usage.json", "memory_usage.png"]
    assert "head importance" in capsys.readouterr().out
    assert json.loads((out / "memory_usage.json").read_text())["window"] == 64
    with pytest.raises(CLIError, match="--analyses"):
        A.run(parser.parse_args(["--model", str(folder), "--analyses", "heads,foo"]))
    base_dir = tmp_path / "base"
    setup["base"].save_pretrained(base_dir)
    tiny_tokenizer.save_pretrained(base_dir)
    with pytest.raises(ValueError, match="no memory blocks"):
        A.run(parser.parse_args(["--model", str(base_dir), "--data", tiny_text_file, "--output", str(out)]))
