"""Subject "scaling": time and memory of the HML op as N, n, k and d_z grow, one at a time.

Around a base shape (the ops subject's, with fewer tokens on CPU), each sweep changes one size:
N (tokens), n (sub-keys per half: n*n slots, 16 to 256), k (slots read) and d_z (bank width).
Implementations: ``midus_ops`` and ``eager`` (the baseline), forward and forward+backward. Each
point is one case (``sweep``, ``x``) and records ``gflop``, the arithmetic of the op at that point
(scoring 2*N*H*n*d_k, gather 2*N*H*k*d_z, projection 2*N*H*d_z*d_v), so that the plots can show
how the cost follows the work.
"""
from __future__ import annotations

import math

import torch

from .baselines import HML_IMPLS
from .core import Context, Impl
from .ops import _leaf, op_modes

SIZES = {
    "gpu": dict(base=dict(N=8192, H=32, d_k=64, n=32, k=16, d_z=256, d_v=64),
                sweeps=dict(N=[1024, 2048, 4096, 8192, 16384], n=[16, 32, 64, 128, 256], k=[4, 8, 16, 32],
                            d_z=[64, 128, 256, 512, 1024])),
    "cpu": dict(base=dict(N=1024, H=8, d_k=64, n=32, k=16, d_z=128, d_v=64),
                sweeps=dict(N=[256, 512, 1024, 2048], n=[16, 32, 64, 128, 256], k=[4, 8, 16, 32],
                            d_z=[64, 128, 256, 512]), reps=5),
    "quick": dict(base=dict(N=32, H=2, d_k=8, n=6, k=3, d_z=12, d_v=8),
                  sweeps=dict(N=[16, 32], n=[4, 8], k=[2, 3], d_z=[8, 16])),
}
SWEEPS = ("N", "n", "k", "d_z")
CASES = tuple(f"{p}={v}" for prof in SIZES.values() for p, vs in prof["sweeps"].items() for v in vs)


def gflop(N, H, d_k, n, k, d_z, d_v) -> float:
    return 2 * N * H * (n * d_k + k * d_z + d_z * d_v) / 1e9


def bench(ctx: Context) -> None:
    prof = SIZES[ctx.profile]
    dev, dt = ctx.device, ctx.dtype
    reps = min(ctx.reps, prof.get("reps", ctx.reps))
    for sweep in SWEEPS:
        for x in prof["sweeps"][sweep]:
            case = f"{sweep}={x}"
            if not ctx.wants(case) and not ctx.wants(sweep):
                continue
            s = {**prof["base"], sweep: x}
            N, H, d_k, n, k, d_z, d_v = (s[key] for key in ("N", "H", "d_k", "n", "k", "d_z", "d_v"))
            g = torch.Generator().manual_seed(0)

            def rnd(*shape, scale=1.0):
                return _leaf((torch.randn(*shape, generator=g) * scale).to(dev, dt))

            inputs = [rnd(N, H, d_k), rnd(H, 2, n, d_k // 2, scale=1 / math.sqrt(d_k)), k,
                      rnd(n * n, d_z, scale=0.02), rnd(H, d_z, d_v, scale=1 / math.sqrt(d_z))]
            grad = torch.randn(N, H, d_v, generator=g).to(dev, dt)
            impls = {name: Impl(modes=op_modes(HML_IMPLS[name], inputs, grad)) for name in ("midus_ops", "eager")}
            ctx.run_case("scaling", case, impls, baseline="eager", shape=s, modes=["fwd", "fwd_bwd"], reps=reps,
                         extra={"sweep": sweep, "x": x, "base": prof["base"],
                                "gflop": gflop(N, H, d_k, n, k, d_z, d_v)})
            del inputs, grad, impls
            ctx._free()
