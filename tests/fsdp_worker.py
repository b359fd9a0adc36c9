"""Worker of tests/test_fsdp.py, launched by torchrun (gloo, CPU): ``fsdp_worker.py MODE SPEC.json``.

MODE "checks" (2 processes): a MIDUS model's key/values shard and gather back exactly, the usage
statistics survive sharding, a tiny Qwen3 (tied embeddings, PKM memory) trains under FSDP, a
checkpoint written without FSDP is refused, and, last (it ends the process group), the command
line resumes a sharded checkpoint. MODE "resume1" (1 process): a 2-process checkpoint loads onto
one process (state compared by the test) and training continues from it.

Also imported by the test for the shared settings and model builders.
"""
import json
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

VOCAB = 96
MEM = dict(n=8, k=4, d_z=16)
# The run every comparison shares (the CLI flags of cli_args say the same).
CFG = dict(max_steps=4, micro_batch_size=2, lr=1e-3, warmup_steps=1, max_grad_norm=0.005, trainable="new",
           memory_lr_scale=10.0, memory_lr_schedule="decay", memory_max_grad_norm=0.01, save_every=2,
           progress=False)
SEQ_LEN = 16


def cli_args(model, data, output, checkpoint_dir, resume=None):
    args = ["train", "--fsdp", "--model", str(model), "--data", str(data), "--seq-len", str(SEQ_LEN),
            "--batch-size", str(CFG["micro_batch_size"]), "--steps", str(CFG["max_steps"]), "--lr", str(CFG["lr"]),
            "--warmup", str(CFG["warmup_steps"]), "--max-grad-norm", str(CFG["max_grad_norm"]),
            "--trainable", CFG["trainable"], "--memory-lr-scale", str(CFG["memory_lr_scale"]),
            "--memory-lr-schedule", CFG["memory_lr_schedule"], "--memory-max-grad-norm",
            str(CFG["memory_max_grad_norm"]), "--save-every", str(CFG["save_every"]), "--output", str(output),
            "--checkpoint-dir", str(checkpoint_dir), "--no-progress"]
    return args + (["--resume", str(resume)] if resume else [])


def corpus(model_dir, text_file):
    from transformers import AutoTokenizer

    from midus.data import load_corpus, pack_sequences

    return pack_sequences(load_corpus(text_file, AutoTokenizer.from_pretrained(model_dir), split="all"), SEQ_LEN)


def tiny_qwen3_midus(seed=0):
    """A random Qwen3 (q/k norms, tied embeddings) with two PKM memory blocks."""
    import midus
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    return midus.upscale(Qwen3ForCausalLM(cfg).eval(), "midus", num_blocks=2, memory="pkm", pkm_heads=2,
                         pkm_d_k=16, **MEM)


def qwen3_data():
    return torch.randint(0, VOCAB, (16, SEQ_LEN), generator=torch.Generator().manual_seed(1))


QWEN3_CFG = dict(max_steps=3, lr=1e-3, warmup_steps=0, max_grad_norm=0.05, trainable="all", progress=False)


def _save(tensors, path):
    from safetensors.torch import save_file

    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(path))


def checks(spec):
    import torch.distributed as dist

    import midus
    import midus.cli
    import midus.distributed as D
    from conftest import make_tiny_llama
    from midus.train import train
    from midus_ops import HeadwiseMemoryLayer

    out = Path(spec["out"])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report = {}

    # 1. Key/values with random values (a fresh bank is all zeros) shard and gather back exactly.
    model = midus.upscale(make_tiny_llama(VOCAB), "midus", num_blocks=2, **MEM)
    kv = sorted(midus.memory_parameter_names(model))
    g = torch.Generator().manual_seed(3)  # the same values on every rank
    with torch.no_grad():
        for n in kv:
            model.get_parameter(n).copy_(torch.randn(model.get_parameter(n).shape, generator=g))
    full = {k: v.clone() for k, v in model.state_dict().items()}
    D.shard_model(model, torch.device("cpu"))
    report["units"] = D.shard_units(model)
    report["local_params"] = sum(p.to_local().numel() for p in model.parameters())
    report["params"] = sum(v.numel() for v in full.values())
    report["kv"] = {n: {"local_is_chunk": torch.equal(model.get_parameter(n).to_local(),
                                                      torch.chunk(full[n], world, dim=0)[rank]),
                        "full_tensor_equal": torch.equal(model.get_parameter(n).full_tensor(), full[n]),
                        "sharded": model.get_parameter(n).to_local().numel() < full[n].numel()} for n in kv}
    # The usage statistics: plain float64 buffers on every rank, recorded by an eval forward.
    layers = [m for m in model.modules() if isinstance(m, HeadwiseMemoryLayer)]
    x = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(10 + rank))
    model.eval()
    with torch.no_grad():
        model(input_ids=x)
    report["stats"] = [{"dtypes": sorted({str(b.dtype) for b in m.stats.buffers()}),
                        "plain": all(type(b) is torch.Tensor for b in m.stats.buffers()),
                        "tokens": float(m.stats.tokens), "reads": float(m.stats.slot_counts.sum())} for m in layers]
    plain = D.gather_model(model)
    if rank == 0:
        sd = plain.state_dict()
        report["gather_keys_equal"] = set(sd) == set(full)
        report["gather_equal"] = [k for k in full if not torch.equal(sd[k], full[k])]
        report["gathered_stats_equal"] = all(
            torch.equal(a, b) for a, b in zip([b for m in plain.modules() if isinstance(m, HeadwiseMemoryLayer)
                                               for b in m.stats.buffers()],
                                              [b for m in layers for b in m.stats.buffers()]))
        report["gathered_class"] = type(plain).__name__

    # 2. A second family: Qwen3, tied embeddings, PKM memory, all parameters trained.
    qwen = tiny_qwen3_midus()
    res = train(qwen, qwen3_data(), micro_batch_size=2, fsdp=True, log_file=str(out / "qwen3_log.jsonl"), **QWEN3_CFG)
    report["qwen3_losses"] = res.losses
    plain = D.gather_model(qwen)
    if rank == 0:
        report["qwen3_tied"] = plain.lm_head.weight is plain.model.embed_tokens.weight
        _save(plain.state_dict(), out / "qwen3_fsdp.safetensors")

    # 3. A checkpoint written without FSDP is refused by name, on every rank (no hang).
    try:
        train(tiny_qwen3_midus(), qwen3_data(), micro_batch_size=2, fsdp=True, resume_from=spec["plain_checkpoint"],
              **QWEN3_CFG)
        report["refused"] = None
    except ValueError as err:
        report["refused"] = str(err)

    if rank == 0:
        (out / "checks.json").write_text(json.dumps(report, indent=1))
    dist.barrier()
    # 4. Last: the command line resumes the 2-process run from its step-2 checkpoint (it ends the group).
    code = midus.cli.main(spec["cli_resume"])
    assert code == 0, code


def resume1(spec):
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from transformers import AutoModelForCausalLM

    import midus  # noqa: F401
    import midus.distributed as D
    from midus.train import TrainConfig, build_optimizer, build_scheduler, resolve_trainable, train

    out = Path(spec["out"])
    data = corpus(spec["model"], spec["text"])
    cfg = TrainConfig(**{**CFG, "micro_batch_size": 2 * CFG["micro_batch_size"]}, fsdp=True)  # same global batch
    # Right after loading the 2-process checkpoint: the whole state, gathered, for the test to compare.
    device = D.init_fsdp()
    assert dist.get_world_size() == 1
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    resolve_trainable(model, cfg.trainable)
    D.shard_model(model, device)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg.warmup_steps, cfg.max_steps)
    state = D.load_checkpoint(spec["checkpoint"], model, opt, sched)
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    torch.save({"model": msd, "optim": osd, "step": state["step"], "lrs": [g["lr"] for g in opt.param_groups],
                "scheduler": sched.state_dict()}, out / "loaded1.pt")
    # ... and training on to the end, on one process.
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    res = train(model, data, cfg, resume_from=spec["checkpoint"], checkpoint_dir=str(out / "ck1"))
    D.save_pretrained(model, out / "resumed1")
    (out / "resume1.json").write_text(json.dumps({"losses": res.losses, "steps": res.steps}))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    mode, spec_file = sys.argv[1], sys.argv[2]
    {"checks": checks, "resume1": resume1}[mode](json.loads(Path(spec_file).read_text()))
