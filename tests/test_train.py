"""midus.train: optimizer groups of spec 3.4, trainable sets, accumulation, exact resume, DDP
(issue 3 item 3)."""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import midus
from conftest import make_tiny_llama
from midus.train import TrainConfig, build_optimizer, build_scheduler, latest_checkpoint, train

TESTS = os.path.dirname(os.path.abspath(__file__))
# Subprocesses import the same midus as this process: the installed one, or the source tree.
MIDUS_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(midus.__file__)))
VOCAB = 96
MEM = dict(n=8, k=4, d_z=16)


def tiny_midus(seed=0, dropout=0.0, **opts):
    base = make_tiny_llama(VOCAB, seed=seed)
    base.config.attention_dropout = dropout
    for layer in base.model.layers:  # attention modules read the dropout at construction
        layer.self_attn.attention_dropout = dropout
    return midus.upscale(base, "midus", num_blocks=2, **{**MEM, **opts})


def sequences(n=24, seq_len=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seq_len), generator=g)


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def expected_cosine(step, peak, warmup, total):
    """Linear warm-up then cosine to 0 (the formula of transformers' get_cosine_schedule_with_warmup)."""
    if step < warmup:
        return peak * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("memory", ["hml", "pkm"])
def test_param_groups_follow_spec(memory):
    model = tiny_midus(memory=memory, pkm_heads=2, pkm_d_k=16)
    cfg = TrainConfig(lr=2e-3, weight_decay=0.05, trainable="all", **midus.train.MEMORY_RECIPES["paper"])
    midus.train.resolve_trainable(model, "all")
    opt = build_optimizer(model, cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    leaves = ("subkeys", "bank", "proj") if memory == "hml" else ("subkeys", "values")
    kv = {n for n, _ in model.named_parameters() if ".memory." in n and n.rsplit(".", 1)[1] in leaves}
    assert kv and by_group["memory_kv"] == kv
    assert groups["memory_kv"]["weight_decay"] == 0.0 and groups["memory_kv"]["constant_lr"]
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    norms = {n for n in names.values() if "norm" in n}
    assert norms and norms <= by_group["no_decay"]
    assert "model.layers.0.self_attn.q_proj.weight" in by_group["decay"]
    if memory == "pkm":  # the PKM query projection is an ordinary matrix
        assert any(n.endswith("memory.query.weight") for n in by_group["decay"])
    # Every trainable parameter in exactly one group (tied embeddings counted once).
    all_named = [n for g in by_group.values() for n in g]
    assert len(all_named) == len(set(all_named)) == len({id(p) for p in model.parameters()})


def test_lr_schedule_constant_for_memory_cosine_for_the_rest():
    model = tiny_midus()
    peak, warmup, total = 1e-2, 3, 10
    result = train(model, sequences(), max_steps=total, micro_batch_size=2, lr=peak, warmup_steps=warmup,
                   progress=False, **midus.train.MEMORY_RECIPES["paper"])
    assert len(result.lrs) == total
    for step, lrs in enumerate(result.lrs):
        assert lrs["memory_kv"] == pytest.approx(peak)  # constant, no warm-up, no decay
        for name in ("decay", "no_decay"):
            assert lrs[name] == pytest.approx(expected_cosine(step, peak, warmup, total), abs=1e-12)
    assert result.lrs[0]["decay"] == 0.0 and result.lrs[warmup]["decay"] == pytest.approx(peak)
    assert result.lrs[-1]["decay"] < 0.05 * peak
    # The scheduler on its own, checked against the formula at arbitrary steps.
    opt = build_optimizer(model, TrainConfig(lr=peak, **midus.train.MEMORY_RECIPES["paper"]))
    sched = build_scheduler(opt, 5, 50)
    for step in range(50):
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        assert lrs["memory_kv"] == pytest.approx(peak)
        assert lrs["decay"] == pytest.approx(expected_cosine(step, peak, 5, 50), abs=1e-12)
        opt.step()
        sched.step()


def test_trainable_new_freezes_base_and_trains_new_blocks():
    model = tiny_midus()
    new = midus.new_parameter_names(model)
    before = params(model)
    result = train(model, sequences(), max_steps=4, micro_batch_size=2, lr=1e-2, warmup_steps=0, progress=False)
    assert result.trainable == "new"  # midus default
    after = params(model)
    assert result.trainable_params == sum(p.numel() for n, p in model.named_parameters() if n in new)
    for name in before:
        if name in new:
            continue
        assert torch.equal(before[name], after[name]), f"base parameter {name} changed"
    changed = [n for n in new if not torch.equal(before[n], after[n])]
    assert any(n.endswith("memory.bank") for n in changed)
    assert any(n.endswith("self_attn.q_proj.weight") for n in changed)


def test_trainable_defaults_by_method():
    base = make_tiny_llama(VOCAB)
    for method, expected in (("dus", "all"), ("solar", "all"), ("llama_pro", "new"), ("midus", "new")):
        model = midus.upscale(base, method, num_blocks=2, **(MEM if method == "midus" else {}))
        names = midus.train.resolve_trainable(model, "auto")
        n_all = len(dict(model.named_parameters()))
        assert (len(names) == n_all) == (expected == "all"), method
    model = midus.upscale(base, "dus", num_blocks=2)
    assert midus.train.resolve_trainable(model, "new") == midus.new_parameter_names(model)
    with pytest.raises(ValueError, match="trainable"):
        TrainConfig(trainable="some")


def test_grad_accumulation_matches_one_big_batch():
    a, b = tiny_midus(), tiny_midus()
    ra = train(a, sequences(), max_steps=3, micro_batch_size=4, grad_accum=1, lr=1e-3, warmup_steps=0,
               progress=False)
    rb = train(b, sequences(), max_steps=3, micro_batch_size=2, grad_accum=2, lr=1e-3, warmup_steps=0,
               progress=False)
    assert ra.losses == pytest.approx(rb.losses, rel=1e-5)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)


def test_exact_resume(tmp_path, capsys):
    """6 steps straight == 3 steps + resume + 3 steps (dropout on, so RNG states matter too)."""
    data = sequences(n=20)
    kw = dict(max_steps=6, micro_batch_size=4, lr=5e-3, warmup_steps=2, progress=False, trainable="all")
    straight = tiny_midus(dropout=0.2)
    r1 = train(straight, data, checkpoint_dir=str(tmp_path / "a"), save_every=3, keep_checkpoints=5, **kw)
    assert latest_checkpoint(tmp_path / "a").endswith("checkpoint-6")
    log = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    assert [r["step"] for r in log] == list(range(1, 7)) and all(r["loss"] > 0 for r in log)

    # An interrupted run (max_seconds: stops and checkpoints after its first step) ...
    train(tiny_midus(dropout=0.2), data, checkpoint_dir=str(tmp_path / "b"), max_seconds=1e-9, **kw)
    assert latest_checkpoint(tmp_path / "b").endswith("checkpoint-1")
    assert "stopping after step 1 of 6: the time limit" in capsys.readouterr().err
    # ... and a FRESH model (other seed) resuming from step 3 of the straight run.
    resumed = tiny_midus(seed=7, dropout=0.2)
    r2 = train(resumed, data, checkpoint_dir=str(tmp_path / "b"), resume_from=str(tmp_path / "a" / "checkpoint-3"),
               **kw)
    assert r2.steps == 6 and len(r2.losses) == 3
    assert r2.losses == r1.losses[3:]  # bitwise: same data position, RNG, optimizer and schedule
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n
    # "latest" picks the newest checkpoint; resuming a finished run trains no more steps.
    r3 = train(tiny_midus(dropout=0.2), data, checkpoint_dir=str(tmp_path / "a"), resume_from="latest", **kw)
    assert r3.steps == 6 and r3.losses == []
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train(tiny_midus(), data, resume_from=str(tmp_path / "nowhere"), **kw)


def test_too_little_data_is_a_clear_error():
    with pytest.raises(ValueError, match="3 sequences; one optimizer step needs 4"):
        train(tiny_midus(), sequences(n=3), max_steps=1, micro_batch_size=4, progress=False)
    with pytest.raises(ValueError, match="int64"):
        train(tiny_midus(), sequences().float(), max_steps=1, progress=False)


_WORKER = textwrap.dedent("""
    import json, sys, warnings
    warnings.filterwarnings("ignore")
    sys.path.insert(0, {tests!r})
    import torch, midus
    from safetensors.torch import save_file
    from conftest import make_tiny_llama
    from midus.train import train, dist_info
    torch.manual_seed(0)
    base = make_tiny_llama({vocab}, seed=0)
    model = midus.upscale(base, "midus", num_blocks=2, n=8, k=4, d_z=16)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, {vocab}, (16, 16), generator=g)
    res = train(model, data, max_steps=3, micro_batch_size=int(sys.argv[2]), lr=1e-3, warmup_steps=0,
                trainable="all", progress=False)
    rank, world, _ = dist_info()
    sd = {{k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}}
    save_file(sd, f"{{sys.argv[1]}}/rank{{rank}}of{{world}}.safetensors", metadata={{"losses": json.dumps(res.losses)}})
""")


def test_ddp_two_processes_match_one_process(tmp_path):
    """torchrun 2 x gloo with micro-batch 2 == 1 process with micro-batch 4 (same global batch)."""
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER.format(tests=TESTS, vocab=VOCAB))
    env = {**os.environ, "PYTHONPATH": MIDUS_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    run = dict(env=env, capture_output=True, text=True, timeout=600)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(worker), str(tmp_path), "2"], **run)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = subprocess.run([sys.executable, str(worker), str(tmp_path), "4"], **run)
    assert one.returncode == 0, one.stderr[-3000:]
    r0, r1, single = (load_file(tmp_path / f) for f in ("rank0of2.safetensors", "rank1of2.safetensors",
                                                       "rank0of1.safetensors"))
    assert r0.keys() == r1.keys() == single.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks disagree on {k}"  # DDP keeps replicas identical
        # Tolerance 1e-5 = lr / 100: the all-reduce sums the two halves' gradients in another order
        # than one backward over the whole batch (fp32 rounding), and Adam's normalised first steps
        # carry that into the weights (measured: 1.5e-6). A wrong batch split or a missing
        # all-reduce moves weights by about lr = 1e-3 per step.
        torch.testing.assert_close(r0[k], single[k], rtol=0, atol=1e-5, msg=k)
    with safe_open(tmp_path / "rank0of2.safetensors", "pt") as f2, \
            safe_open(tmp_path / "rank0of1.safetensors", "pt") as f1:
        ddp_losses, one_losses = json.loads(f2.metadata()["losses"]), json.loads(f1.metadata()["losses"])
    assert ddp_losses == pytest.approx(one_losses, rel=1e-5)  # loss averaged over ranks = global batch loss


def test_sequences_of_one_token_are_an_error():
    # one token has no next-token target: the loss would be NaN
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        train(make_tiny_llama(64), torch.randint(0, 64, (8, 1)), TrainConfig(max_steps=1, micro_batch_size=2, progress=False))
