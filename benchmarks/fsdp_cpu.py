"""One process vs DDP vs FSDP2 on a CPU: seconds per step and the model state each rank holds.

    python benchmarks/fsdp_cpu.py --out R.json                                   # one process
    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_cpu.py --out R.json  # DDP
    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_cpu.py --fsdp --out R.json

The default model (SmolLM2-135M) up-scaled with 8 MIDUS memory blocks, CPT on the wiki train
split (``midus.train.train``, the same global batch in every launch: ``--global-batch``
sequences of ``--seq-len`` tokens). Per rank, after training: the bytes of this rank's
parameters (its shards under FSDP) and of its AdamW state, measured on the tensors, beside
:func:`midus.distributed.estimate_memory`'s weights + AdamW terms for the same run; the seconds
of each step, wall and this process's CPU time (the first step is left out of the medians); the
process's peak resident set (VmHWM: on a CPU it includes loading the whole model in every rank
before sharding). Rank 0 writes ``--out``.
"""
import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

import midus
import midus.train as mt
from midus.data import load_corpus, pack_sequences
from midus.runtime import load_model


def local_bytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fsdp", action="store_true")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--trainable", default="new", choices=["new", "all"])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", 1))
    base, tok, _ = load_model("default")
    torch.manual_seed(0)
    model = midus.upscale(base, "midus", num_blocks=8)
    del base
    data = pack_sequences(load_corpus("wiki", tok, split="train"), args.seq_len)
    from midus.distributed import estimate_memory

    est = estimate_memory(model, world, "fsdp" if args.fsdp else "ddp", args.trainable, mixed_precision=False)
    optimizers = []
    build = mt.build_optimizer

    def keep(m, cfg):  # the loop does not hand its optimizer out; take it as it is built
        optimizers.append(build(m, cfg))
        return optimizers[-1]

    mt.build_optimizer = keep
    # Wall time and this process's CPU time (all its threads, gloo's included) per step: on a
    # machine shared with other jobs the CPU time moves less than the wall time.
    times, cpu, last = [], [], [time.time(), time.process_time()]

    def tick(step, _model):
        now, now_cpu = time.time(), time.process_time()
        times.append(now - last[0])
        cpu.append(now_cpu - last[1])
        last[0], last[1] = now, now_cpu

    t0 = time.time()
    res = mt.train(model, data, max_steps=args.steps, micro_batch_size=args.global_batch // world, lr=1e-3,
                   warmup_steps=1, trainable=args.trainable, fsdp=args.fsdp, progress=False, callback=tick)
    wall = time.time() - t0
    opt = optimizers[-1]
    params = sum(local_bytes(p) for p in {id(p): p for p in model.parameters()}.values())
    adam = sum(local_bytes(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    with open("/proc/self/status") as f:
        hwm = int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 1024
    row = {"rank_param_mib": params / 2 ** 20, "rank_adam_mib": adam / 2 ** 20, "vmhwm_mib": hwm,
           "cpu_s_per_step_median": statistics.median(cpu[1:]), "cpu_step_s": cpu,
           "est_param_mib": est["weights"] / 2 ** 20, "est_adam_mib": est["optimizer"] / 2 ** 20}
    rows = [None] * world
    if world > 1:
        dist.all_gather_object(rows, row)
    else:
        rows = [row]
    if int(os.environ.get("RANK", 0)) == 0:
        out = {"mode": ("fsdp" if args.fsdp else "ddp" if world > 1 else "one process"), "world_size": world,
               "trainable": res.trainable, "trainable_params": res.trainable_params, "params": est["P"],
               "steps": res.steps, "global_batch": args.global_batch, "seq_len": args.seq_len,
               "s_per_step_median": statistics.median(times[1:]), "step_s": times, "losses": res.losses,
               "wall_s": wall, "ranks": rows, "threads_per_rank": 1, "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M"), "load_avg": os.getloadavg()}
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        print(json.dumps({k: v for k, v in out.items() if k not in ("step_s", "losses")}))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
