"""Sharded data parallelism for continued pre-training: PyTorch FSDP2 and distributed checkpoints.

:func:`midus.train.train` with ``fsdp=True`` (``midus train --fsdp`` under ``torchrun``) calls the
functions here; they are usable on their own too.

- Sharding (:func:`shard_model`): ``torch.distributed.fsdp.fully_shard`` on every decoder layer
  and every memory block (the classes in the model's ``_no_split_modules``), on the input
  embedding and the LM head when they are not tied, then on the root (the rest: final norm, tied
  embeddings). Each rank holds 1/N of every parameter, of the
  gradients and of the AdamW state; a unit's parameters are all-gathered just before its forward
  (and again for its backward), so the memory layer's custom ops (``midus_ops::pk_topk``,
  ``hive_gather``) see plain unsharded tensors. Buffers (rotary frequencies, the memory usage
  statistics ``stats.*``) are not sharded: every rank keeps its own copy.
- Precision: "auto" is a bf16 ``MixedPrecisionPolicy`` on CUDA (bf16 compute, fp32 gradient
  reduction, fp32 sharded master weights and optimizer state) and fp32 on a CPU; "bf16" asks for
  the policy on a CPU too (gloo reduces bf16), "fp32" turns it off. No autocast under FSDP: the
  policy casts the parameters itself.
- Checkpoints (:func:`save_checkpoint`, :func:`load_checkpoint`): ``checkpoint-<step>/dcp`` holds
  the model and optimizer state written with ``torch.distributed.checkpoint`` (every rank writes
  its own shards; the folder must be on a file system all ranks see), beside it
  ``scheduler.pt``, ``rng_state.pt`` (every rank's RNG) and ``trainer_state.json`` (the data
  position). A checkpoint loads onto any number of processes (DCP re-shards on load).
- The final model (:func:`gather_model`): the full state dict gathered once onto rank 0's CPU and
  loaded into a plain (unsharded) copy of the model class, whose ``save_pretrained`` writes the
  usual Hugging Face folder (safetensors, and the modeling file for MIDUS models).

Where FSDP cannot run, :func:`init_fsdp` raises a ValueError that says why (no process group:
not launched by ``torchrun``; a torch without ``fully_shard``; a backend that cannot reach the
device), before any collective is entered, so nothing hangs.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

__all__ = ["init_fsdp", "shard_model", "shard_units", "uses_mixed_precision", "is_sharded", "save_checkpoint",
           "load_checkpoint", "checkpoint_format", "gather_model", "save_pretrained", "estimate_memory", "DCP_FORMAT"]

DCP_FORMAT = "fsdp-dcp"  # trainer_state.json "format" of a sharded checkpoint

_LAUNCH_HINT = ("launch with `torchrun --nproc_per_node N -m midus train --fsdp ...` (N >= 1), or call "
                "torch.distributed.init_process_group() before train(..., fsdp=True)")


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise ValueError(f"fsdp: this torch ({torch.__version__}) has no torch.distributed.fsdp.fully_shard "
                         f"(FSDP2, torch >= 2.6); install a newer torch or train without --fsdp") from None
    return fully_shard


def init_fsdp() -> torch.device:
    """The process group FSDP needs, and this process's device.

    Uses the process group if one is initialized; else initializes one from the ``torchrun``
    environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``; NCCL on CUDA, gloo on
    a CPU), also for a single process (``--nproc_per_node 1``). Returns ``cuda:LOCAL_RANK`` or cpu.
    Raises ValueError (naming ``fsdp``) when there is no process group and no torchrun
    environment, when torch has no FSDP2, or when the group's backend cannot reach the device.
    """
    _fully_shard()
    if not dist.is_available():
        raise ValueError("fsdp: this torch was built without torch.distributed")
    cuda = torch.cuda.is_available()
    from .runtime import missing_torchrun_vars, torchrun_env

    local = torchrun_env()[2]
    if not dist.is_initialized():
        missing = missing_torchrun_vars()
        if missing:
            raise ValueError(f"fsdp: no process group (not initialized, and {', '.join(missing)} not set): "
                             f"{_LAUNCH_HINT}")
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    elif cuda:
        torch.cuda.set_device(local)
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    backend = str(dist.get_backend()).lower()
    needed = "nccl" if cuda else "gloo"
    # A "cpu:gloo,cuda:nccl" group serves both; a gloo-only group on GPUs would be slow or fail
    # inside the first reduce-scatter, an NCCL group cannot move CPU tensors at all.
    if needed not in backend and not (cuda and backend in ("cuda", "xccl")):
        raise ValueError(f"fsdp: the process group's backend is {backend!r}, but parameters on {device.type} need "
                         f"{needed}: initialize the group with backend={needed!r} (torchrun and midus do)")
    return device


def uses_mixed_precision(device: torch.device, precision: str) -> bool:
    """Whether :func:`shard_model` puts a bf16 ``MixedPrecisionPolicy`` on the model (the rule of
    :class:`midus.train.TrainConfig` ``precision``: "auto" = bf16 on CUDA only)."""
    return precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda")


def is_sharded(model) -> bool:
    """True when ``fully_shard`` has been applied to ``model`` (an ``FSDPModule``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def shard_units(model) -> List[str]:
    """Names of the submodules :func:`shard_model` makes their own FSDP unit: the decoder layers
    and memory blocks, i.e. the modules whose class is in ``model._no_split_modules`` (the
    classes transformers keeps whole on one device), outermost first, a model without that list
    falling back to the children of ``model.model.layers``; then, when they are not tied, the
    input embedding and the LM head (for a 128k vocabulary each is 0.26-0.53 B parameters: in the
    root unit they would stay gathered for the whole step). Tied ones stay in the root (one
    parameter cannot live in two units). Raises ValueError if no layer is found."""
    classes = set(getattr(model, "_no_split_modules", None) or [])
    units: List[str] = []
    for name, module in model.named_modules():
        if name and type(module).__name__.removeprefix("FSDP") in classes \
                and not any(name.startswith(u + ".") for u in units):
            units.append(name)
    if not units:
        layers = getattr(getattr(model, "model", None), "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            units = [f"model.layers.{i}" for i in range(len(layers))]
    if not units:
        raise ValueError(f"fsdp: found no decoder layers to shard in {type(model).__name__} (no _no_split_modules "
                         f"and no model.layers)")
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    emb, head = (get_in() if get_in else None), (get_out() if get_out else None)
    if emb is not None and head is not None and emb.weight is not head.weight:
        names = {id(m): n for n, m in model.named_modules()}
        units += [names[id(m)] for m in (emb, head) if id(m) in names and names[id(m)]]
    return units


def shard_model(model, device: torch.device, precision: str = "auto", reshard_after_forward: bool = True):
    """Apply FSDP2 to ``model`` in place (returns it): one unit per :func:`shard_units` module, then
    the root. Parameters move to ``device`` unit by unit as they are sharded (a model on the CPU
    never needs to fit on one GPU whole). ``requires_grad`` is kept as set (frozen parameters are
    sharded too, and get neither gradients nor optimizer state). ``reshard_after_forward``: free
    each unit's gathered parameters after its forward (ZeRO-3; False keeps them until the
    backward, ZeRO-2-like: less communication, more memory). A model that is already sharded is
    returned as it is."""
    fully_shard = _fully_shard()
    if is_sharded(model):
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    device = torch.device(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs = {"mesh": mesh}
    if uses_mixed_precision(device, precision):
        # fp32 reduction: gradients of many ranks summed in bf16 lose the small ones.
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for name in shard_units(model):
        fully_shard(model.get_submodule(name), reshard_after_forward=reshard_after_forward, **kwargs)
    # The root's own parameters (embeddings, norm, LM head) are needed first in the backward
    # (the loss) and last in the forward; keeping them gathered saves one all-gather per step.
    fully_shard(model, reshard_after_forward=False, **kwargs)
    return model


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_format(path) -> str:
    """``"fsdp-dcp"`` for a checkpoint written by :func:`save_checkpoint`, ``"safetensors"`` for
    one written by :func:`midus.train.train` without FSDP. Raises FileNotFoundError naming
    ``resume_from`` if ``path`` is not a midus checkpoint."""
    p = Path(path)
    if not (p / "trainer_state.json").is_file():
        raise FileNotFoundError(f"resume_from: {p} is not a midus checkpoint (no trainer_state.json)")
    try:
        fmt = json.loads((p / "trainer_state.json").read_text()).get("format")
    except ValueError:
        raise ValueError(f"resume_from: {p / 'trainer_state.json'} is not valid JSON") from None
    return DCP_FORMAT if fmt == DCP_FORMAT or (p / "dcp").is_dir() else "safetensors"


def _state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def save_checkpoint(checkpoint_dir: str, step: int, model, optimizer, scheduler, trainer_state: dict,
                    keep: int = 2) -> str:
    """Write ``checkpoint_dir/checkpoint-<step>`` (a collective: every rank calls it).

    The model and optimizer state go through ``torch.distributed.checkpoint`` into ``dcp/`` (each
    rank writes its shards, rank 0 the metadata), into a temp folder that rank 0 renames once
    every rank has finished, so a crash leaves no half checkpoint. Keeps the newest ``keep``
    checkpoints. Returns the folder."""
    import torch.distributed.checkpoint as dcp

    from .runtime import rng_state

    rank, world = dist.get_rank(), dist.get_world_size()
    final = Path(checkpoint_dir).absolute() / f"checkpoint-{step}"
    tmp = final.with_name(f".tmp-{final.name}")  # the same name on every rank
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(_state(model, optimizer), checkpoint_id=str(tmp / "dcp"))
    rng = [None] * world
    dist.all_gather_object(rng, rng_state())
    if rank == 0:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng, tmp / "rng_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "format": DCP_FORMAT}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        old = sorted((int(p.name.split("-")[1]), p) for p in final.parent.glob("checkpoint-*")
                     if p.name.split("-")[1].isdigit())
        for _, p in old[: max(0, len(old) - max(1, keep))]:
            shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    return str(final)


def load_checkpoint(path, model, optimizer, scheduler) -> dict:
    """Load a :func:`save_checkpoint` folder into a sharded ``model``, its ``optimizer`` and
    ``scheduler`` (a collective), on any number of processes: DCP re-shards the saved tensors to
    this run's sharding. Restores this rank's RNG state (rank r of a run on another number of
    processes takes the state of rank r mod the saved count, with a warning). Returns the
    trainer state (step, tokens, ...). Raises ValueError for a checkpoint written without FSDP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from .runtime import set_rng_state

    p = Path(path)
    if checkpoint_format(p) != DCP_FORMAT:
        raise ValueError(f"resume_from: {p} was written without fsdp (model.safetensors); resume it without --fsdp "
                         f"(a sharded run starts from the model folder, not from such a checkpoint)")
    state = json.loads((p / "trainer_state.json").read_text())
    sd = _state(model, optimizer)
    dcp.load(sd, checkpoint_id=str(p / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    scheduler.load_state_dict(torch.load(p / "scheduler.pt", weights_only=True))
    rng = torch.load(p / "rng_state.pt", weights_only=False)  # our own file: python + torch RNG states
    rank, world = dist.get_rank(), dist.get_world_size()
    if len(rng) != world and rank == 0:
        print(f"[midus] note: checkpoint {p} was written by {len(rng)} processes, resuming on {world}: the weights "
              f"and optimizer state are re-sharded exactly; each step still trains on the same global batch "
              f"(same sequences), summed in another order, and the per-rank RNG streams (dropout) differ")
    set_rng_state(rng[rank % len(rng)])
    return state


# ----------------------------------------------------------------------------- the final model


def _plain_class(model) -> type:
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def gather_model(model) -> Optional[torch.nn.Module]:
    """A plain (unsharded) copy of a sharded Hugging Face ``model`` on rank 0's CPU; None on the
    other ranks. A collective: every rank calls it.

    The full state dict is gathered once (``full_state_dict=True, cpu_offload=True``: only rank 0
    holds it), loaded into the model class built on the meta device (no second initialisation),
    with tied weights tied again and every buffer (rotary frequencies, memory usage statistics)
    copied from this rank's model. Its ``save_pretrained`` writes a normal Hugging Face folder;
    the sharded ``model`` is left as it was. A model that is not sharded is returned as it is."""
    if not is_sharded(model):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        plain = _plain_class(model)(copy.deepcopy(model.config))
    plain.load_state_dict(full, strict=True, assign=True)
    for name, buf in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        module = plain.get_submodule(owner) if owner else plain
        persistent = leaf not in module._non_persistent_buffers_set
        module.register_buffer(leaf, buf.detach().to("cpu", copy=True), persistent=persistent)
    if getattr(plain.config, "tie_word_embeddings", False) and hasattr(plain, "tie_weights"):
        plain.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(model.generation_config)
    still_meta = [n for n, t in list(plain.named_parameters()) + list(plain.named_buffers()) if t.is_meta]
    if still_meta:
        raise RuntimeError(f"gather_model: tensors left unset: {still_meta[:4]}")
    plain.train(model.training)
    return plain


def save_pretrained(model, path, tokenizer=None, **kwargs) -> None:
    """``save_pretrained`` of a sharded model (a collective): :func:`gather_model`, then rank 0
    writes ``path`` (and the tokenizer). ``kwargs`` go to ``save_pretrained``."""
    plain = gather_model(model)
    if plain is not None:
        plain.save_pretrained(path, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- planning


def estimate_memory(model, world_size: int, strategy: str = "fsdp", trainable: str = "new",
                    mixed_precision: bool = True) -> dict:
    """Bytes of model state per rank for training ``model`` (built on the meta device is enough:
    only shapes are read) with ``strategy`` "ddp" (also one GPU, and the Trainer under DDP) or
    "fsdp" (this module) on ``world_size`` ranks; activations are not included. ``trainable``:
    "new" (the inserted blocks) or "all". ``mixed_precision``: bf16 compute (autocast for DDP,
    the bf16 policy for FSDP), fp32 master weights and AdamW state either way.

    With P parameters (tied ones once), T trainable, N ranks, FSDP units of U1 >= U2 parameters
    (the two largest), Ut the largest unit's trainable parameters, R the root unit's own, and
    b = 2 (bf16) or 4 (fp32) bytes per gathered parameter:

    - ddp:  4P weights + 4T gradients + 4T DDP buckets (N > 1) + 8T AdamW (m, v) + 2T autocast's
      bf16 copies of the trainable weights (mixed precision);
    - fsdp: (4P + 4T + 8T) / N sharded weights, gradients, AdamW; + b(U1 + U2) gathered (the unit
      computing and the one prefetched); + (b + 4)Ut the unsharded gradient of a unit and its fp32
      copy for the reduce-scatter (b Ut without mixed precision); + bR the root, gathered all step.

    Returns a dict of those terms in bytes (``weights``, ``grads``, ``buckets``, ``optimizer``,
    ``autocast``, ``gathered``, ``unit_grads``, ``root``, ``total``) and the counts ``P``, ``T``,
    ``U1``, ``U2``, ``Ut``, ``R``."""
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {strategy!r}")
    if trainable not in ("new", "all"):
        raise ValueError(f"trainable must be 'new' or 'all', got {trainable!r}")
    if int(world_size) < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    from . import new_parameter_names

    params = {}
    for name, p in model.named_parameters():  # tied parameters appear once
        params.setdefault(id(p), (name, p.numel()))
    train_names = new_parameter_names(model) if trainable == "new" else {n for n, _ in params.values()}
    P = sum(n for _, n in params.values())
    T = sum(n for name, n in params.values() if name in train_names)
    units = shard_units(model)

    def in_unit(name, unit):
        return name.startswith(unit + ".")

    sizes = [sum(n for name, n in params.values() if in_unit(name, u)) for u in units]
    trained = [sum(n for name, n in params.values() if in_unit(name, u) and name in train_names) for u in units]
    R = sum(n for name, n in params.values() if not any(in_unit(name, u) for u in units))
    top = sorted(sizes, reverse=True) + [0, 0]
    U1, U2, Ut = top[0], top[1], max(trained + [0])
    N, b = int(world_size), (2 if mixed_precision else 4)
    out = dict(P=P, T=T, U1=U1, U2=U2, Ut=Ut, R=R, weights=0, grads=0, buckets=0, optimizer=0, autocast=0,
               gathered=0, unit_grads=0, root=0)
    if strategy == "ddp":
        out.update(weights=4 * P, grads=4 * T, buckets=4 * T if N > 1 else 0, optimizer=8 * T,
                   autocast=2 * T if mixed_precision else 0)
    else:
        out.update(weights=4 * P / N, grads=4 * T / N, optimizer=8 * T / N, gathered=b * (U1 + U2),
                   unit_grads=(b + 4) * Ut if mixed_precision else b * Ut, root=b * R)
    out["total"] = sum(out[k] for k in ("weights", "grads", "buckets", "optimizer", "autocast", "gathered",
                                        "unit_grads", "root"))
    return out
