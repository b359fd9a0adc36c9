"""CUDA-only tests of the hive_gather kernels (csrc/cuda/hive_gather*.cu and .cpp; issue 4).

tests/test_ops.py already runs every public-API test on "cuda" when a GPU is visible; this file
adds what only the CUDA kernels have: the shapes that select each kernel (tensor-core fast paths
and generic paths, vectorised and scalar gathers), the tile tails (N not a multiple of the 64- or
32-token tile, d_z past one 256-wide chunk, d_v past one 64-wide tile, k past 32 and past 64),
fp16 values whose read u overflows fp16, the multi-level deterministic bank-gradient reduction
with one key taking every contribution, partial gradients, the two index-check modes, CUDA graph
capture, and tensor-core vs generic agreement. Everything is skipped without a GPU or without the
compiled CUDA kernels.

Which path a shape takes (the conditions in kernels/hive_gather.cuh): the forward tensor-core kernel for
bf16/fp16 with proj, d_z % 8 == 0, k <= 64; the backward one additionally needs d_z <= 256 and
d_v <= 64; everything else runs the generic kernels.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import midus_ops
from op_testing import BF16, DT_ID, F16, F32, F64, I32, I64, assert_close, seed
from midus_ops.reference import hive_gather_ref

CUDA_OK = torch.cuda.is_available() and midus_ops.has_kernel("hive_gather", torch.device("cuda")) \
    and midus_ops.has_kernel("hive_gather_backward", torch.device("cuda"))
pytestmark = [pytest.mark.kernels, pytest.mark.skipif(
    not CUDA_OK, reason=f"needs a GPU and the compiled CUDA kernels (extension: {midus_ops.EXTENSION_ERROR or 'ok'})")]


def rand_inputs(N, H, k, R, d_z, d_v, dtype, idx_dtype, requires_grad=True, idx=None):
    w = torch.randn(N, H, k, dtype=F64).to(dtype).cuda()
    if idx is None:
        idx = torch.randint(0, R, (N, H, k), dtype=idx_dtype)
    idx = idx.to(idx_dtype).cuda()
    bank = torch.randn(R, d_z, dtype=F64).to(dtype).cuda()
    proj = None if d_v is None else (torch.randn(H, d_z, d_v, dtype=F64) / math.sqrt(d_z)).to(dtype).cuda()
    for t in (w, bank, proj):
        if t is not None:
            t.requires_grad_(requires_grad)
    return w, idx, bank, proj


def expected(w, idx, bank, proj, g):
    """Exact (fp64, CPU) output and gradients of the reference on the same inputs."""
    w64 = w.detach().double().cpu().requires_grad_()
    b64 = bank.detach().double().cpu().requires_grad_()
    p64 = None if proj is None else proj.detach().double().cpu().requires_grad_()
    out = hive_gather_ref(w64, idx.cpu(), b64, p64)
    grads = torch.autograd.grad(out, [w64, b64] + ([p64] if p64 is not None else []), g.double().cpu())
    return out, grads


def check_all(w, idx, bank, proj, dtype, factor=1.0, deterministic=False):
    out = midus_ops.hive_gather(w, idx, bank, proj, deterministic=deterministic)
    d_out = bank.shape[1] if proj is None else proj.shape[2]
    assert out.shape == (w.shape[0], w.shape[1], d_out) and out.dtype == dtype and out.is_cuda
    g = torch.randn(out.shape, dtype=F64).to(dtype).cuda()
    inputs = [w, bank] + ([proj] if proj is not None else [])
    grads = torch.autograd.grad(out, inputs, g)
    want_out, want_grads = expected(w, idx, bank, proj, g)
    assert_close(out, want_out, dtype, "out")
    for name, got, want in zip(["weights", "bank", "proj"], grads, want_grads):
        assert got.dtype == dtype
        assert_close(got, want, dtype, f"grad {name}", factor=factor)
    return out, grads


def poison(numel):
    t = torch.full((max(1, 2 * numel),), float("nan"), device="cuda")
    del t


# --------------------------------------------------------------------------------------------
# Kernels against the exact reference, shape by shape
# --------------------------------------------------------------------------------------------
SHAPES = {
    # name: (N, H, k, R, d_z, d_v)
    "hml_like": (200, 4, 16, 1024, 256, 64),      # both tensor-core kernels; N % 64 != 0, N % 32 != 0
    "two_chunks_two_vtiles": (70, 3, 5, 300, 320, 72),  # fwd TC: d_z chunks 256+64, d_v tiles 64+8; bwd generic
    "k40_pad": (33, 2, 40, 100, 24, 40),          # TC: k > 32, d_z 24 -> padded 32, d_v 40 -> padded 48
    "decode": (1, 5, 16, 64, 64, 64),             # N = 1
    "minimal": (65, 1, 1, 7, 8, 1),               # H = 1, k = 1, d_v = 1
    "k70_generic": (50, 2, 70, 90, 16, 8),        # k > 64: generic forward and backward
    "dz12_generic": (20, 3, 4, 30, 12, 5),        # d_z % 8 != 0: generic
    "wide_dv": (40, 2, 3, 50, 64, 130),           # fwd TC with 3 d_v tiles; bwd generic (d_v > 64)
}


@pytest.mark.parametrize("idx_dtype", [I64, I32], ids=DT_ID.get)
@pytest.mark.parametrize("dtype", [BF16, F16, F32, F64], ids=DT_ID.get)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_cuda_matches_reference(shape, dtype, idx_dtype):
    N, H, k, R, d_z, d_v = SHAPES[shape]
    seed("cuda-shape", shape, dtype, idx_dtype)
    w, idx, bank, proj = rand_inputs(N, H, k, R, d_z, d_v, dtype, idx_dtype)
    poison(N * H * max(d_v, d_z) + R * d_z)
    check_all(w, idx, bank, proj, dtype)


NOPROJ = {
    "vec_1024": (64, 4, 32, 4096, 1024),   # the large-memory layer's row width, vectorised loads
    "vec_8": (30, 2, 9, 40, 8),            # one vector per row, k not a multiple of the 8-row batch
    "scalar_12": (25, 3, 5, 33, 12),       # d_z % 8 != 0 (bf16): scalar loads
    "scalar_7": (25, 3, 5, 33, 7),         # odd d_z for every dtype
}


@pytest.mark.parametrize("idx_dtype", [I64, I32], ids=DT_ID.get)
@pytest.mark.parametrize("dtype", [BF16, F16, F32, F64], ids=DT_ID.get)
@pytest.mark.parametrize("shape", list(NOPROJ))
def test_cuda_noproj_matches_reference(shape, dtype, idx_dtype):
    N, H, k, R, d_z = NOPROJ[shape]
    seed("cuda-noproj", shape, dtype, idx_dtype)
    w, idx, bank, _ = rand_inputs(N, H, k, R, d_z, None, dtype, idx_dtype)
    check_all(w, idx, bank, None, dtype)


@pytest.mark.parametrize("dtype", [BF16, F32], ids=DT_ID.get)
def test_cuda_misaligned_bank_uses_scalar_path(dtype):
    """A contiguous bank whose data pointer is not 16-byte aligned (storage offset 1): the
    vectorised and tensor-core paths must not be taken (they would fault or read garbage)."""
    seed("misaligned", dtype)
    N, H, k, R, d_z, d_v = 40, 2, 6, 50, 64, 16
    w, idx, bank0, proj = rand_inputs(N, H, k, R, d_z, d_v, dtype, I64, requires_grad=False)
    flat = torch.empty(R * d_z + 1, dtype=dtype, device="cuda")
    bank = flat[1:].view(R, d_z)
    bank.copy_(bank0)
    assert bank.is_contiguous() and bank.data_ptr() % 16 != 0
    bank.requires_grad_()
    w.requires_grad_()
    proj.requires_grad_()
    check_all(w, idx, bank, proj, dtype)
    check_all(w, idx, bank, None, dtype)


@pytest.mark.parametrize("dtype", [BF16, F32], ids=DT_ID.get)
def test_cuda_infinite_bank_entry_gives_inf_not_nan(dtype):
    """One bank element is +inf and the weights are positive: every output that reads that row
    is +-inf (the sign of proj[h, 3, v]), as in the reference, and every other output is finite.
    The bf16 tensor-core forward splits u into hi + lo bf16 terms: lo must be 0 (not inf - inf =
    NaN) when hi is infinite. (fp16 is left out: its third product, hi(u) x lo(proj), is inf x 0 =
    NaN wherever an fp16 proj value is exact in bf16.)"""
    seed("inf-bank", dtype)
    N, H, k, R, d_z, d_v = 70, 2, 4, 16, 32, 16
    w, idx, bank, proj = rand_inputs(N, H, k, R, d_z, d_v, dtype, I64, requires_grad=False)
    w = w.abs() + 0.1
    idx[::3, :, 0] = 5  # a third of the tokens read row 5
    bank[5, 3] = float("inf")
    out = midus_ops.hive_gather(w, idx, bank, proj)
    want = hive_gather_ref(w.double().cpu(), idx.cpu(), bank.double().cpu(), proj.double().cpu())
    assert bool(torch.isinf(want).any()) and not bool(torch.isnan(want).any()), "test data"
    got = out.double().cpu()
    assert torch.equal(torch.isinf(got), torch.isinf(want)), "infinite outputs differ (NaN or finite instead?)"
    inf = torch.isinf(want)
    assert torch.equal(got[inf], want[inf]), "signs of the infinite outputs differ"
    assert_close(got[~inf], want[~inf], dtype, "finite outputs")


def test_cuda_direct_backward_misaligned_grad_out():
    """A contiguous grad_out whose data pointer is not 16-byte aligned (storage offset 1), given to
    the backward op directly: the vectorised grad_weights kernel must fall back to scalar loads."""
    seed("misaligned-grad-out")
    for dtype, d_z in ((BF16, 64), (F32, 16)):
        N, H, k, R = 30, 2, 6, 40
        w, idx, bank, _ = rand_inputs(N, H, k, R, d_z, None, dtype, I64, requires_grad=False)
        flat = torch.empty(N * H * d_z + 1, dtype=dtype, device="cuda")
        g = flat[1:].view(N, H, d_z)
        g.copy_(torch.randn(N, H, d_z, device="cuda"))
        assert g.is_contiguous() and g.data_ptr() % 16 != 0
        gw, gb, _ = torch.ops.midus_ops.hive_gather_backward(g, w, idx, bank, None, False, True, True, False)
        _, (want_w, want_b) = expected(w, idx, bank, None, g)
        assert_close(gw, want_w, dtype, f"grad weights {DT_ID[dtype]}")
        assert_close(gb, want_b, dtype, f"grad bank {DT_ID[dtype]}")


def test_cuda_fp16_read_beyond_fp16_range():
    """fp16 inputs whose read u (about 1e6) overflows fp16 while the projected output fits: the
    tensor-core forward keeps u in fp32/bf16 terms, never in fp16."""
    seed("fp16-range")
    N, H, k, R, d_z, d_v = 48, 2, 16, 64, 32, 16
    w = torch.full((N, H, k), 300.0, dtype=F16, device="cuda")
    idx = torch.randint(0, R, (N, H, k), device="cuda")
    bank = (200.0 + 50 * torch.rand(R, d_z)).to(F16).cuda()
    proj = (torch.randn(H, d_z, d_v) * 1e-4).to(F16).cuda()
    out = midus_ops.hive_gather(w, idx, bank, proj)
    want = hive_gather_ref(w.double().cpu(), idx.cpu(), bank.double().cpu(), proj.double().cpu())
    assert want.abs().max() < 6e4, "the case must have a representable output"
    assert_close(out, want, F16, "out")


# --------------------------------------------------------------------------------------------
# Partial gradients, frozen bank, H larger than the GPU's block slots
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [BF16, F32], ids=DT_ID.get)
@pytest.mark.parametrize("which", ["weights", "bank", "proj", "weights+proj", "bank+proj"])
def test_cuda_partial_gradients(which, dtype):
    seed("partial", which, dtype)
    N, H, k, R, d_z, d_v = 96, 4, 16, 256, 128, 32
    w, idx, bank, proj = rand_inputs(N, H, k, R, d_z, d_v, dtype, I64, requires_grad=False)
    tensors = dict(weights=w, bank=bank, proj=proj)
    names = which.split("+")
    for n in names:
        tensors[n].requires_grad_()
    out = midus_ops.hive_gather(w, idx, bank, proj)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [tensors[n] for n in names], g)
    _, (gw, gb, gp) = expected(w, idx, bank, proj, g)
    want = dict(weights=gw, bank=gb, proj=gp)
    for n, got in zip(names, grads):
        assert_close(got, want[n], dtype, f"grad {n}")


@pytest.mark.parametrize("flags", [(True, False, False), (False, True, False), (False, False, True),
                                   (True, True, True), (False, False, False)],
                         ids=["w", "bank", "proj", "all", "none"])
def test_cuda_direct_backward_flags(flags):
    """The backward op returns [0] tensors for gradients not requested and exact ones otherwise."""
    seed("flags", flags)
    N, H, k, R, d_z, d_v = 70, 3, 8, 128, 64, 32
    w, idx, bank, proj = rand_inputs(N, H, k, R, d_z, d_v, BF16, I64, requires_grad=False)
    g = torch.randn(N, H, d_v, device="cuda").to(BF16)
    gw, gb, gp = torch.ops.midus_ops.hive_gather_backward(g, w, idx, bank, proj, False, *flags)
    _, (want_w, want_b, want_p) = expected(w, idx, bank, proj, g)
    for need, got, want, name in zip(flags, (gw, gb, gp), (want_w, want_b, want_p), ("w", "bank", "proj")):
        if need:
            assert_close(got, want, BF16, name)
        else:
            assert got.shape == (0,), f"{name} not requested but got shape {tuple(got.shape)}"


def test_cuda_many_heads():
    """H = 300 heads (more than one block per head fits on the GPU): the grad_proj reduction runs
    one token split per head."""
    seed("many-heads")
    w, idx, bank, proj = rand_inputs(40, 300, 2, 64, 16, 8, BF16, I32)
    check_all(w, idx, bank, proj, BF16)


# --------------------------------------------------------------------------------------------
# Determinism and heavy repetition (the bank-gradient segmented reduction)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["one_key", "three_rows", "zipf"])
@pytest.mark.parametrize("with_proj", [True, False], ids=["proj", "noproj"])
def test_cuda_hot_rows_bitwise_deterministic(case, with_proj):
    """131072 contributions: all on one row (one key takes every contribution, so its run crosses
    thousands of chunks and the reduction goes through several carry levels), on three rows, or
    Zipf-distributed. Two runs give the same bits; the values match the exact reference (4x the
    usual tolerance for the hot rows' long sums)."""
    seed("hot", case, with_proj)
    N, H, k, R, d_z, d_v = 4096, 2, 16, 512, 64, (16 if with_proj else None)
    if case == "one_key":
        idx = torch.full((N, H, k), 7)
    elif case == "three_rows":
        idx = torch.tensor([5, 17, 40])[torch.randint(0, 3, (N, H, k))]
    else:
        p = 1.0 / torch.arange(1, R + 1, dtype=F64) ** 1.2
        idx = torch.multinomial(p / p.sum(), N * H * k, replacement=True).view(N, H, k)
    w, idx, bank, proj = rand_inputs(N, H, k, R, d_z, d_v, BF16, I64, idx=idx)
    g = torch.randn(N, H, d_z if d_v is None else d_v, device="cuda").to(BF16)
    inputs = [w, bank] + ([proj] if proj is not None else [])
    runs = []
    for _ in range(2):
        out = midus_ops.hive_gather(w, idx, bank, proj, deterministic=True)
        runs.append([out.detach()] + list(torch.autograd.grad(out, inputs, g)))
    for name, a, b in zip(["out", "weights", "bank", "proj"], runs[0], runs[1]):
        assert torch.equal(a, b), f"{name} differs between two identical runs"
    want_out, want_grads = expected(w, idx, bank, proj, g)
    assert_close(runs[0][0], want_out, BF16, "out")
    for name, got, want in zip(["weights", "bank", "proj"], runs[0][1:], want_grads):
        assert_close(got, want, BF16, f"grad {name}", factor=4.0)
    cold = torch.ones(R, dtype=torch.bool)
    cold[idx.unique().cpu()] = False
    assert torch.equal(runs[0][2][cold.cuda()], torch.zeros_like(runs[0][2][cold.cuda()])), "gradient on an unread row"


def test_cuda_tensor_core_vs_generic(monkeypatch):
    """MIDUS_OPS_CUDA_NO_TC=1 forces the generic kernels: both paths agree to fp32-level error
    before the final bf16 rounding (so within 2 bf16 ulps)."""
    seed("tc-vs-generic")
    w, idx, bank, proj = rand_inputs(130, 4, 16, 512, 256, 64, BF16, I64)
    out_tc = midus_ops.hive_gather(w, idx, bank, proj)
    g = torch.randn_like(out_tc)
    grads_tc = torch.autograd.grad(out_tc, [w, bank, proj], g)
    monkeypatch.setenv("MIDUS_OPS_CUDA_NO_TC", "1")
    out_gen = midus_ops.hive_gather(w, idx, bank, proj)
    grads_gen = torch.autograd.grad(out_gen, [w, bank, proj], g)
    assert_close(out_tc, out_gen.double(), BF16, "out tc vs generic")
    for name, a, b in zip(["weights", "bank", "proj"], grads_tc, grads_gen):
        assert_close(a, b.double(), BF16, f"grad {name} tc vs generic")


# --------------------------------------------------------------------------------------------
# Inputs: non-contiguous, mixed devices; index checks; CUDA graphs
# --------------------------------------------------------------------------------------------
def test_cuda_noncontiguous_bf16():
    seed("noncontig-bf16")
    N, H, k, R, d_z, d_v = 50, 3, 8, 100, 64, 32
    w = torch.randn(H, N, k, device="cuda").to(BF16).transpose(0, 1)
    idx = torch.randint(0, R, (N, H, 2 * k), device="cuda")[..., ::2]
    bank = torch.randn(d_z, R, device="cuda").to(BF16).t()
    proj = (torch.randn(H, d_v, d_z, device="cuda") / 8).to(BF16).transpose(1, 2)
    out = midus_ops.hive_gather(w, idx, bank, proj)
    ref = midus_ops.hive_gather(w.contiguous(), idx.contiguous(), bank.contiguous(), proj.contiguous())
    assert torch.equal(out, ref)


def test_cuda_direct_op_mixed_devices():
    w, idx, bank, proj = rand_inputs(4, 2, 3, 10, 8, 4, F32, I64, requires_grad=False)
    with pytest.raises(RuntimeError, match="device"):
        torch.ops.midus_ops.hive_gather(w.cpu(), idx, bank, proj, False)
    with pytest.raises(RuntimeError, match="proj"):
        torch.ops.midus_ops.hive_gather(w, idx, bank, proj.cpu(), False)


@pytest.mark.parametrize("op", ["forward", "backward"])
@pytest.mark.parametrize("bad", [-1, 10, 2 ** 31 - 1])
def test_cuda_index_error_default_mode(bad, op):
    """Default (synchronous) check: IndexError naming `indices`, the context stays usable."""
    w, idx, bank, proj = rand_inputs(4, 2, 3, 10, 8, 4, BF16, I32, requires_grad=False)
    idx[1, 1, 2] = bad
    with pytest.raises((IndexError, RuntimeError), match="indices"):
        if op == "forward":
            torch.ops.midus_ops.hive_gather(w, idx, bank, proj, False)
        else:
            g = torch.randn(4, 2, 4, device="cuda").to(BF16)
            torch.ops.midus_ops.hive_gather_backward(g, w, idx, bank, proj, False, False, True, False)
    torch.cuda.synchronize()  # no device-side assert was left behind
    idx[1, 1, 2] = 0
    torch.ops.midus_ops.hive_gather(w, idx, bank, proj, False)
    torch.cuda.synchronize()


DEVICE_MODE_SCRIPT = textwrap.dedent("""
    import torch, midus_ops
    w = torch.randn(64, 2, 4, device="cuda").to(torch.bfloat16)
    idx = torch.randint(0, 10, (64, 2, 4), device="cuda")
    idx[33, 1, 2] = {bad}
    bank = torch.randn(10, 16, device="cuda").to(torch.bfloat16)
    proj = torch.randn(2, 16, 8, device="cuda").to(torch.bfloat16)
    out = midus_ops.hive_gather(w, idx, bank, {proj})   # no host check: returns at once
    print("LAUNCHED", flush=True)
    torch.cuda.synchronize()
    print("NO ERROR", flush=True)
""")


@pytest.mark.parametrize("bad", [-3, 10])
@pytest.mark.parametrize("with_proj", [True, False], ids=["proj", "noproj"])
def test_cuda_index_error_device_mode(bad, with_proj):
    """MIDUS_OPS_CUDA_INDEX_CHECK=device: no host check; the kernel's device-side assert fires
    (asynchronously; the process's CUDA context is then unusable, so this runs in a subprocess)
    and its message names `indices`."""
    env = dict(os.environ, MIDUS_OPS_CUDA_INDEX_CHECK="device", PYTHONWARNINGS="ignore")
    code = DEVICE_MODE_SCRIPT.format(bad=bad, proj="proj" if with_proj else "None")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    text = r.stdout + r.stderr
    assert "LAUNCHED" in r.stdout, text
    assert "NO ERROR" not in r.stdout, "an out-of-range index went unnoticed"
    assert r.returncode != 0
    assert "indices out of range" in text, text[-3000:]


def test_cuda_graph_capture_forward():
    """Under CUDA graph capture the host check (a synchronisation) is skipped and the kernels still
    run; replays give the eager result."""
    seed("graph")
    w, idx, bank, proj = rand_inputs(100, 4, 16, 256, 128, 32, BF16, I64, requires_grad=False)
    eager = midus_ops.hive_gather(w, idx, bank, proj)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        midus_ops.hive_gather(w, idx, bank, proj)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = midus_ops.hive_gather(w, idx, bank, proj)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


def test_cuda_compile_fullgraph():
    """torch.compile(fullgraph=True) traces the op on CUDA and its backward matches eager."""
    seed("compile")
    w, idx, bank, proj = rand_inputs(64, 2, 8, 64, 32, 16, BF16, I64)

    def f(w, bank, proj):
        return midus_ops.hive_gather(w, idx, bank, proj).float().square().sum()

    compiled = torch.compile(f, fullgraph=True)
    a = compiled(w, bank, proj)
    ga = torch.autograd.grad(a, [w, bank, proj])
    b = f(w, bank, proj)
    gb = torch.autograd.grad(b, [w, bank, proj])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0)  # the compiled square-sum may sum in another order
    for x, y in zip(ga, gb):
        assert_close(x, y.double(), BF16, "compiled grad")
