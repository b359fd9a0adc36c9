"""Subject "ops": pk_topk, hive_gather (with and without projection) and the whole HML op.

Cases (baseline: the eager PyTorch a user writes, ``baselines.py``):
- ``pk_topk``            midus_ops, eager, reference, torch.compile(eager)
- ``hive_gather_proj``   midus_ops, eager, reference, torch.compile(eager), F.embedding_bag + einsum
- ``hive_gather_noproj`` large memory, no projection: the same, plus the bandwidth of a plain device
                         copy measured in the same run (``copy_gbps``) and each version's gathered
                         bytes per second (``gathered_gbps``, ``pct_of_copy``)
- ``hml``                pk_topk + fp32 softmax + hive_gather: midus_ops, eager, reference, compile
On CUDA, where the hive_gather kernel is used, also ``midus_ops[check_indices=False]``: without
the host-side index check (a synchronisation), as the layers call it. The HML op's ``midus_ops``
calls it that way too (its indices come from pk_topk).
Modes: ``fwd`` (under torch.no_grad) and ``fwd_bwd`` (forward with autograd, then backward of a
fixed random output gradient into every float input). Memory: peak above the inputs.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List

import torch

import midus_ops
from midus_ops.reference import hive_gather_ref, pk_topk_ref

from .baselines import (HML_IMPLS, compiled, hive_gather_eager, hive_gather_embedding_bag, hive_gather_trusted,
                        pk_topk_eager)
from .core import Context, Impl, _err, time_ms

# HML shape: docs/design.md §4 (GPU: MIDUS on Llama-3.2-1B; CPU: the CPU shape of docs/design.md §4).
# Large-memory shape: docs/design.md §4 (GPU); CPU: rows / 16, width / 4, bags / 4.
SIZES = {
    "gpu": {"hml": dict(N=8192, H=32, d_k=64, n=32, k=16, d_z=256, d_v=64),
            "large": dict(R=2 ** 20, d_z=1024, N=4096, H=4, k=32), "copy_mib": 2048},
    "cpu": {"hml": dict(N=2048, H=8, d_k=64, n=32, k=16, d_z=128, d_v=64),
            "large": dict(R=2 ** 16, d_z=256, N=1024, H=4, k=32), "copy_mib": 256},
    "quick": {"hml": dict(N=64, H=2, d_k=8, n=6, k=3, d_z=12, d_v=8),
              "large": dict(R=256, d_z=16, N=32, H=2, k=4), "copy_mib": 4},
}
CASES = ("pk_topk", "hive_gather_proj", "hive_gather_noproj", "hml")


def op_modes(fn: Callable, inputs: List, grad: torch.Tensor, out: Callable = lambda r: r) -> Dict[str, Callable]:
    """{"fwd", "fwd_bwd"} callables of ``fn(*inputs)``; the float tensors in ``inputs`` are leaves
    that require grad, and their grads are dropped after each backward."""
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]

    def fwd():
        with torch.no_grad():
            return fn(*inputs)

    def fwd_bwd():
        out(fn(*inputs)).backward(grad)
        for x in leaves:
            x.grad = None
    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def _impls(ctx: Context, fns: Dict[str, Callable], inputs: List, grad, out=lambda r: r, compile_eager=None,
           index_check_variant: bool = False) -> Dict[str, Impl]:
    impls = {name: Impl(modes=op_modes(fn, inputs, grad, out)) for name, fn in fns.items()}
    if index_check_variant and ctx.cuda and midus_ops.has_kernel("hive_gather", torch.device("cuda")):
        # What the layers call: indices trusted, no host-side check (a synchronisation on CUDA).
        impls["midus_ops[check_indices=False]"] = Impl(modes=op_modes(hive_gather_trusted, inputs, grad, out))
    if ctx.compile and compile_eager is not None:
        try:
            impls["compile(eager)"] = Impl(modes=op_modes(compiled(compile_eager), inputs, grad, out))
        except Exception as e:
            impls["compile(eager)"] = Impl(setup_error=_err(e))
    return impls


def _embedding_bag_impl(inputs: List, grad: torch.Tensor) -> Impl:
    """F.embedding_bag in the inputs' dtype; in fp32 where torch has no backward for that dtype
    with per-sample weights (bf16 on CUDA, as of torch 2.11): then the record says float32."""
    try:
        modes = op_modes(hive_gather_embedding_bag, inputs, grad)
        modes["fwd_bwd"]()
        return Impl(modes=modes)
    except (NotImplementedError, RuntimeError) as e:
        f32 = [_leaf(x.float()) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
        return Impl(modes=op_modes(hive_gather_embedding_bag, f32, grad.float()), dtype="float32",
                    note=f"run in fp32: {type(e).__name__} in {inputs[2].dtype} ({str(e)[:120]})")


def bench(ctx: Context) -> None:
    sizes = SIZES[ctx.profile]
    dev, dt = ctx.device, ctx.dtype
    s = sizes["hml"]
    N, H, d_k, n, k, d_z, d_v = (s[x] for x in ("N", "H", "d_k", "n", "k", "d_z", "d_v"))
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return _leaf((torch.randn(*shape, generator=g) * scale).to(device=dev, dtype=dt))

    q = rnd(N, H, d_k)
    subkeys = rnd(H, 2, n, d_k // 2, scale=1 / math.sqrt(d_k))
    bank = rnd(n * n, d_z, scale=0.02)
    proj = rnd(H, d_z, d_v, scale=1 / math.sqrt(d_z))
    weights = _leaf(torch.softmax(torch.randn(N, H, k, generator=g), -1).to(dev, dt))
    indices = torch.randint(0, n * n, (N, H, k), generator=g).to(dev)
    grad_v = torch.randn(N, H, d_v, generator=g).to(dev, dt)
    grad_k = torch.randn(N, H, k, generator=g).to(dev, dt)
    modes = ["fwd", "fwd_bwd"]

    if ctx.wants("pk_topk"):
        impls = _impls(ctx, {"midus_ops": midus_ops.pk_topk, "eager": pk_topk_eager, "reference": pk_topk_ref},
                       [q, subkeys, k], grad_k, out=lambda r: r[0], compile_eager=pk_topk_eager)
        ctx.run_case("ops", "pk_topk", impls, baseline="eager", shape=dict(N=N, H=H, d_k=d_k, n=n, k=k), modes=modes)

    if ctx.wants("hive_gather_proj"):
        inputs = [weights, indices, bank, proj]
        impls = _impls(ctx, {"midus_ops": midus_ops.hive_gather, "eager": hive_gather_eager,
                             "reference": hive_gather_ref}, inputs, grad_v, compile_eager=hive_gather_eager,
                       index_check_variant=True)
        impls["F.embedding_bag"] = _embedding_bag_impl(inputs, grad_v)
        ctx.run_case("ops", "hive_gather_proj", impls, baseline="eager",
                     shape=dict(N=N, H=H, k=k, R=n * n, d_z=d_z, d_v=d_v), modes=modes)

    if ctx.wants("hml"):
        impls = _impls(ctx, HML_IMPLS, [q, subkeys, k, bank, proj], grad_v, compile_eager=HML_IMPLS["eager"])
        ctx.run_case("ops", "hml", impls, baseline="eager", shape=dict(s), modes=modes)

    del q, subkeys, bank, proj, weights, indices, grad_v, grad_k
    ctx._free()
    if ctx.wants("hive_gather_noproj"):
        _large(ctx, sizes, g)


def _large(ctx: Context, sizes, g) -> None:
    s = sizes["large"]
    R, d_z, N, H, k = (s[x] for x in ("R", "d_z", "N", "H", "k"))
    dev, dt = ctx.device, ctx.dtype
    # The ceiling: a plain device copy (bytes read + written per second), measured in this run.
    src = torch.ones(sizes["copy_mib"] * 2 ** 20 // 4, device=dev)
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), reps=ctx.reps, warmup=ctx.warmup, device=dev)
    copy_gbps = 2 * src.numel() * 4 / (t["median"] * 1e-3) / 1e9
    src = dst = None  # free them before the gather's inputs
    ctx._free()
    ctx.log(f"  ops/hive_gather_noproj: device copy {copy_gbps:.1f} GB/s (read + write)")

    weights = _leaf(torch.softmax(torch.randn(N, H, k, generator=g), -1).to(dev, dt))
    indices = torch.randint(0, R, (N, H, k), generator=g).to(dev)
    bank = _leaf((torch.randn(R, d_z, generator=g) * 0.02).to(dev, dt))
    grad = torch.randn(N, H, d_z, generator=g).to(dev, dt)
    inputs = [weights, indices, bank, None]
    impls = _impls(ctx, {"midus_ops": midus_ops.hive_gather, "eager": hive_gather_eager,
                         "reference": hive_gather_ref}, inputs, grad, compile_eager=hive_gather_eager,
                   index_check_variant=True)
    impls["F.embedding_bag"] = _embedding_bag_impl(inputs, grad)
    recs = ctx.run_case("ops", "hive_gather_noproj", impls, baseline="eager", shape=dict(s), modes=["fwd", "fwd_bwd"],
                        extra={"copy_gbps": copy_gbps})
    for r in recs:
        if r["mode"] == "fwd" and "time_ms" in r:
            elt = 4 if r.get("dtype") == "float32" else torch.tensor([], dtype=dt).element_size()
            r["gathered_gbps"] = N * H * k * d_z * elt / (r["time_ms"]["median"] * 1e-3) / 1e9
            r["pct_of_copy"] = 100 * r["gathered_gbps"] / copy_gbps
    if ctx.on_case:
        ctx.on_case()
