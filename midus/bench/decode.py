"""Subject "decode": the HML forward at decode sizes, N = 1, 8, 64 tokens, eager and in a CUDA graph.

Implementations (forward only, torch.no_grad, eval mode, usage statistics off): ``hml``
(HeadwiseMemoryLayer with midus_ops), ``hml[eager]`` (the same layer on the eager PyTorch ops),
``ffn`` (the baseline: the SwiGLU FFN the memory layer stands in for), and on CUDA the same three
captured once in a CUDA graph and replayed (``hml+graph``, ``hml+graph[eager]``, ``ffn+graph``):
the launch overhead gone, what is left is the kernels. A graph whose capture fails (an op that
synchronises with the host, such as the reference's index check) is recorded with the error.
Target (docs/benchmarks.md §3): the fused HML forward at N=1 under a quarter of the FFN's time.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn

import midus_ops
from midus_ops import HeadwiseMemoryLayer

from .baselines import SwiGLU, eager_ops
from .core import Context, Impl, _err, count_params, env_var, tensor_mib

# GPU: MIDUS-1B HML (32 heads of 64, n=32, k=16, d_z=256) against FFN 2048 -> 8192 -> 2048.
# CPU: 8 heads of 64, d_z=128, FFN 512 -> 2048 -> 512.
SIZES = {
    "gpu": dict(H=32, d_h=64, n=32, k=16, d_z=256, d_ff=8192, tokens=(1, 8, 64)),
    "cpu": dict(H=8, d_h=64, n=32, k=16, d_z=128, d_ff=2048, tokens=(1, 8, 64)),
    "quick": dict(H=2, d_h=8, n=6, k=3, d_z=12, d_ff=64, tokens=(1, 8, 64)),
}
CASES = ("N=1", "N=8", "N=64")


def cuda_graph(fn: nn.Module, x: torch.Tensor, eager: bool = False) -> Callable[[], None]:
    """Capture ``fn(static_x)`` in a CUDA graph (after warm-up on a side stream, as torch.cuda.graphs
    requires) and return its replay. midus_ops is asked for the device-side index check, which does
    not synchronise with the host (a host synchronisation cannot be captured)."""
    static_x = x.clone()
    with torch.no_grad(), env_var("MIDUS_OPS_CUDA_INDEX_CHECK", "device"):
        with eager_ops(fn) if eager else nullcontext():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    fn(static_x)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = fn(static_x)

    def replay():  # holds the graph's static input and output alive with it
        graph.replay()
        return static_out
    return replay


def _fwd(module: nn.Module, x: torch.Tensor, eager: bool = False) -> Callable[[], torch.Tensor]:
    def f():
        with torch.no_grad():
            if eager:
                with eager_ops(module):
                    return module(x)
            return module(x)
    return f


def bench(ctx: Context) -> None:
    s = SIZES[ctx.profile]
    dev, dt = ctx.device, ctx.dtype
    H, d_h = s["H"], s["d_h"]
    torch.manual_seed(0)
    hml = HeadwiseMemoryLayer(H, d_h, n=s["n"], k=s["k"], d_z=s["d_z"])
    nn.init.normal_(hml.bank, std=0.02)
    hml.track_stats = False
    ffn = SwiGLU(H * d_h, s["d_ff"])
    for m in (hml, ffn):
        m.to(dev, dt).eval()
    kw = lambda m: dict(params=count_params(m), param_mib=tensor_mib(m))  # noqa: E731
    # The public hive_gather on CUDA without its kernel runs the reference, whose index check reads
    # the indices on the host: not capturable, so it is not tried (a failed capture is costly).
    capturable = midus_ops.has_kernel("hive_gather", torch.device("cuda")) if ctx.cuda else False
    for N in s["tokens"]:
        case = f"N={N}"
        if not ctx.wants(case):
            continue
        x_heads = torch.randn(N, H, d_h, device=dev, dtype=dt)
        x = torch.randn(N, H * d_h, device=dev, dtype=dt)
        impls = {
            "ffn": Impl(modes={"fwd": _fwd(ffn, x)}, tokens=N, **kw(ffn)),
            "hml": Impl(modes={"fwd": _fwd(hml, x_heads)}, tokens=N, **kw(hml)),
            "hml[eager]": Impl(modes={"fwd": _fwd(hml, x_heads, eager=True)}, tokens=N, **kw(hml)),
        }
        if ctx.cuda:
            for name, module, inp, eager in (("ffn+graph", ffn, x, False), ("hml+graph", hml, x_heads, False),
                                             ("hml+graph[eager]", hml, x_heads, True)):
                if name == "hml+graph" and not capturable:
                    impls[name] = Impl(setup_error="not capturable: midus_ops runs the reference on CUDA here "
                                                   "(no hive_gather kernel), whose index check syncs with the host")
                    continue
                try:
                    impls[name] = Impl(modes={"fwd": cuda_graph(module, inp, eager)}, tokens=N, **kw(module))
                except Exception as e:
                    impls[name] = Impl(setup_error=f"CUDA graph capture failed: {_err(e)}")
                    try:
                        torch.cuda.synchronize()
                    except Exception:  # a capture error already reported above
                        pass
        ctx.run_case("decode", case, impls, baseline="ffn",
                     shape=dict(N=N, H=H, d_h=d_h, n=s["n"], k=s["k"], d_z=s["d_z"], d_ff=s["d_ff"]), modes=["fwd"])
