"""midus.hf_trainer: an up-scaled model trained by transformers' Trainer with the memory recipe
(issue 16 item 3)."""
import math
import warnings

import pytest
import torch

import midus
from conftest import logits_without_midus, make_tiny_llama
from midus.hf_trainer import MidusTrainer, PackedDataset, schedule_multiplier

pytest.importorskip("accelerate")  # the Trainer needs it
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments  # noqa: E402

VOCAB = 96
STEPS, LR, WARMUP = 6, 1e-3, 2


def tiny_midus(seed=0):
    return midus.upscale(make_tiny_llama(VOCAB, seed=seed), "midus", num_blocks=2, n=8, k=4, d_z=16)


def sequences(n=24, seq_len=16, seed=0):
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


class RecordLRs(TrainerCallback):
    """The LR of each group when the optimizer steps (the LR that step used), and the gradient
    norms of the memory key/values and of the rest after the Trainer's clipping."""

    def __init__(self):
        self.lrs, self.memory_norms, self.rest_norms = [], [], []
        self.trainer = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        opt = self.trainer.optimizer
        self.lrs.append({g["name"]: g["lr"] for g in opt.param_groups})
        norms = {}
        for g in opt.param_groups:
            grads = [p.grad for p in g["params"] if p.grad is not None]
            norms.setdefault(g["name"] == "memory_kv", []).extend(grads)
        norm = lambda gs: float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in gs])))
        self.memory_norms.append(norm(norms[True]))
        self.rest_norms.append(norm(norms[False]))


def make_trainer(tmp_path, model, callback=None, **kw):
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=STEPS, per_device_train_batch_size=4,
                             learning_rate=LR, warmup_steps=WARMUP, lr_scheduler_type="cosine", weight_decay=0.1,
                             max_grad_norm=kw.pop("max_grad_norm", 1.0), logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
                             disable_tqdm=True)
    trainer = MidusTrainer(model=model, args=args, train_dataset=PackedDataset(sequences()),
                           callbacks=[callback] if callback else None, **kw)
    if callback is not None:
        callback.trainer = trainer
    return trainer


def expected_cosine(step, peak, warmup, total):
    if step < warmup:
        return peak * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def test_trainer_trains_new_blocks_with_the_memory_recipe_and_saves_a_loadable_folder(tmp_path, one_thread):
    model = tiny_midus()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    new = midus.new_parameter_names(model)
    rec = RecordLRs()
    trainer = make_trainer(tmp_path, model, rec, trainable="new", memory_lr_scale=10.0, memory_lr_schedule="decay",
                           memory_lr_decay_steps=4, memory_max_grad_norm=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()

    # Only the inserted blocks moved (bitwise equality elsewhere), and they did move.
    after = model.state_dict()
    for name in before:
        if name not in new:
            assert torch.equal(before[name], after[name]), f"base parameter {name} changed"
    assert any(n.endswith("memory.bank") and not torch.equal(before[n], after[n]) for n in new)
    assert any(n.endswith("self_attn.q_proj.weight") and not torch.equal(before[n], after[n]) for n in new)
    # Frozen parameters hold no optimizer state; the memory group has no weight decay.
    opt = trainer.optimizer
    groups = {g["name"]: g for g in opt.param_groups}
    frozen = {id(p) for n, p in model.named_parameters() if n not in new}
    assert frozen and not any(id(p) in frozen for p in opt.state)
    assert groups["memory_kv"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    assert opt.param_groups[0]["name"] == "decay"  # the Trainer's logged learning_rate is the peak-LR group's

    # The memory LR followed the recipe: 10 x LR, decaying linearly to LR over 4 steps, then LR;
    # the other groups followed the Trainer's warm-up + cosine.
    assert len(rec.lrs) == STEPS
    for step, lrs in enumerate(rec.lrs):
        assert lrs["memory_kv"] == pytest.approx(10 * LR + (LR - 10 * LR) * min(1.0, step / 4), rel=1e-12)
        assert lrs["decay"] == pytest.approx(expected_cosine(step, LR, WARMUP, STEPS), abs=1e-15)
        assert lrs["no_decay"] == lrs["decay"]
    logs = [r for r in trainer.state.log_history if "loss" in r]
    # The logged memory_lr is the LR each step used (as the Trainer's learning_rate is logged).
    assert [r["memory_lr"] for r in logs] == pytest.approx([lrs["memory_kv"] for lrs in rec.lrs])
    assert [r["learning_rate"] for r in logs] == pytest.approx([lrs["decay"] for lrs in rec.lrs])
    # Separate clipping: the memory key/values end at 0.01 (their norm is far above it), the rest
    # are clipped to max_grad_norm = 1 on their own (their norm is below it: left as they are).
    assert all("memory_grad_norm" in r for r in logs)
    assert all(n == pytest.approx(0.01, rel=1e-4) for n in rec.memory_norms)
    assert all(r["memory_grad_norm"] > 0.01 for r in logs)
    assert all(n <= 1.0 + 1e-6 for n in rec.rest_norms)

    # save_model: a folder that loads with `import midus` (this process) ...
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded, midus.MidusForCausalLM)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    # ... and without it (trust_remote_code: the copied modeling file), same logits.
    x = sequences(n=2, seed=5)
    with torch.no_grad():
        want = loaded(input_ids=x).logits
    torch.testing.assert_close(logits_without_midus(out, x, tmp_path), want, rtol=0, atol=0)


def test_trainer_recipe_defaults_and_all_parameters(tmp_path, one_thread):
    """trainable='all' trains the base too; the default memory recipe is midus train's (the study's:
    10x the peak LR decaying linearly to it over all steps, no warm-up) beside the Trainer's schedule."""
    model = tiny_midus()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    rec = RecordLRs()
    trainer = make_trainer(tmp_path, model, rec, trainable="all")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert [lrs["memory_kv"] for lrs in rec.lrs] == pytest.approx([10 * LR - 9 * LR * s / STEPS for s in range(STEPS)],
                                                                  rel=1e-12)
    assert not torch.equal(before["model.embed_tokens.weight"], model.model.embed_tokens.weight)
    assert "memory_grad_norm" not in trainer.state.log_history[0]


def test_trainer_bad_settings_name_the_argument(tmp_path):
    model = tiny_midus()
    with pytest.raises(ValueError, match="memory_lr_schedule"):
        make_trainer(tmp_path, model, memory_lr_schedule="warp")
    with pytest.raises(ValueError, match="memory_lr_scale"):
        make_trainer(tmp_path, model, memory_lr_scale=0)
    with pytest.raises(ValueError, match="trainable"):
        make_trainer(tmp_path, model, trainable="some")
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        schedule_multiplier("reduce_lr_on_plateau", 0, 10)
    with pytest.raises(ValueError, match="int64"):
        PackedDataset(sequences().float())
    with pytest.raises(ValueError, match="model"):
        MidusTrainer(args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True),
                     model_init=tiny_midus)


def test_trainer_example_command(tmp_path, tiny_model_dir, tiny_text_file, one_thread):
    """python -m midus.hf_trainer: a tiny up-scaled folder trained 2 steps, the output loads."""
    from midus.hf_trainer import main

    up = tmp_path / "up"
    midus.upscale(AutoModelForCausalLM.from_pretrained(tiny_model_dir), "midus", num_blocks=1, n=8, k=4,
                  d_z=16).save_pretrained(up)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(up)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["--model", str(up), "--data", tiny_text_file, "--output", str(tmp_path / "out"), "--steps", "2",
                     "--seq-len", "16", "--batch-size", "2", "--memory-lr-scale", "10"])
    assert code == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.midus_upscale["method"] == "midus"
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert main(["--model", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o2")]) == 1
