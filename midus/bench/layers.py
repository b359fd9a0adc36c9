"""Subject "layers": HeadwiseMemoryLayer and ProductKeyMemory against a SwiGLU FFN of the same width.

One case, N tokens of width d = H * d_h. Implementations: ``ffn`` (the baseline: Llama's SwiGLU,
d -> 4d -> d), ``hml`` (HeadwiseMemoryLayer on [N, H, d_h], the per-head outputs it reads),
``pkm`` (ProductKeyMemory on [N, d]), and their ``[eager]`` twins (the same modules running the
eager PyTorch ops, ``baselines.eager_ops``). Modes ``fwd`` (no_grad) and ``fwd_bwd`` (gradients for
the input and every parameter). Peak memory counts the parameters plus the peak above them.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn

from midus_ops import HeadwiseMemoryLayer, ProductKeyMemory

from .baselines import SwiGLU, with_eager_ops
from .core import Context, Impl, count_params, tensor_mib

# GPU: the Llama-3.2-1B width (d=2048, 32 heads of 64, FFN 8192), 4 x 2048 tokens, HML defaults.
# CPU: d=512 (8 heads of 64, FFN 2048), 2048 tokens, d_z=128 (the CPU shape of docs/design.md §4).
SIZES = {
    "gpu": dict(N=8192, H=32, d_h=64, d_ff=8192, n=32, k=16, d_z=256, pkm_heads=4, pkm_d_k=128),
    "cpu": dict(N=2048, H=8, d_h=64, d_ff=2048, n=32, k=16, d_z=128, pkm_heads=4, pkm_d_k=64),
    "quick": dict(N=32, H=2, d_h=8, d_ff=64, n=6, k=3, d_z=12, pkm_heads=2, pkm_d_k=8),
}
CASES = ("layer",)


def module_modes(module: nn.Module, x: torch.Tensor, grad: torch.Tensor,
                 wrap: Callable[[Callable], Callable] = lambda f: f) -> Dict[str, Callable]:
    """{"fwd", "fwd_bwd"} of ``module(x)``; grads of the input and parameters dropped after each backward."""
    call = wrap(module)

    def fwd():
        with torch.no_grad():
            return call(x)

    def fwd_bwd():
        call(x).backward(grad)
        x.grad = None
        module.zero_grad(set_to_none=True)
    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def module_impl(module: nn.Module, modes: Dict[str, Callable], **kw) -> Impl:
    return Impl(modes=modes, params=count_params(module), param_mib=tensor_mib(module), **kw)


def bench(ctx: Context) -> None:
    s = SIZES[ctx.profile]
    N, H, d_h, d_ff = s["N"], s["H"], s["d_h"], s["d_ff"]
    d = H * d_h
    dev, dt = ctx.device, ctx.dtype
    torch.manual_seed(0)
    hml = HeadwiseMemoryLayer(H, d_h, n=s["n"], k=s["k"], d_z=s["d_z"])
    nn.init.normal_(hml.bank, std=0.02)  # a trained bank; the zero init would make the output zero
    pkm = ProductKeyMemory(d, num_heads=s["pkm_heads"], n=s["n"], k=s["k"], d_k=s["pkm_d_k"])
    ffn = SwiGLU(d, d_ff)
    for m in (hml, pkm, ffn):
        m.to(dev, dt).train()
    x_heads = torch.randn(N, H, d_h, device=dev, dtype=dt, requires_grad=True)
    x = torch.randn(N, d, device=dev, dtype=dt, requires_grad=True)
    g_heads = torch.randn(N, H, d_h, device=dev, dtype=dt)
    g = torch.randn(N, d, device=dev, dtype=dt)
    impls = {
        "ffn": module_impl(ffn, module_modes(ffn, x, g)),
        "hml": module_impl(hml, module_modes(hml, x_heads, g_heads)),
        "hml[eager]": module_impl(hml, module_modes(hml, x_heads, g_heads, with_eager_ops)),
        "pkm": module_impl(pkm, module_modes(pkm, x, g)),
        "pkm[eager]": module_impl(pkm, module_modes(pkm, x, g, with_eager_ops)),
    }
    shape = dict(N=N, d=d, H=H, d_h=d_h, d_ff=d_ff, n=s["n"], k=s["k"], d_z=s["d_z"], pkm_heads=s["pkm_heads"],
                 pkm_d_k=s["pkm_d_k"], slots=s["n"] ** 2, flops_ffn_fwd=6 * N * d * d_ff)
    ctx.run_case("layers", "layer", impls, baseline="ffn", shape=shape, modes=["fwd", "fwd_bwd"])
