"""Tests of the memory layers (spec/HML.md section 2; issue 2): ``HeadwiseMemoryLayer`` (HML with
HIVE, 2.1) and ``ProductKeyMemory`` (2.2).

Layer outputs are checked against direct computations from the reference operators
(``midus_ops.reference``) in float64, where near-ties cannot flip a selection, so the layers'
plumbing (reshapes, softmax, dtype casts, head handling) is what is under test. Devices are a
parameter (``DEVICES``) as in tests/test_ops.py; the torch.compile tests are CPU-only.
"""
from __future__ import annotations

import copy
import math
import zlib

import pytest
import torch
from torch import nn

import midus_ops
from midus_ops import HeadwiseMemoryLayer, ProductKeyMemory
from midus_ops.reference import pk_topk_ref

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def seed(*parts) -> int:
    s = zlib.crc32(repr(parts).encode())
    torch.manual_seed(s)
    return s


def randomize_(layer: nn.Module) -> nn.Module:
    """Give the zero-initialised bank (or values) random non-zero content, so outputs and
    gradients are not trivially zero."""
    with torch.no_grad():
        if isinstance(layer, HeadwiseMemoryLayer):
            layer.bank.normal_()
        else:
            layer.values.normal_()
    return layer


def softmax_fp32(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """Spec 2.1: weights = softmax(scores / tau) computed in fp32 (the layers do so whatever the
    input dtype, fp64 included), returned in fp64. So fp64 layer results carry fp32 rounding
    from the softmax (~1e-7 relative), and the fp64 comparisons below use rtol ~1e-5."""
    return torch.softmax(scores.float() / tau, dim=-1).double()


# Tolerances of fp64 layer results against the fp64 direct computations: only the fp32 softmax
# (identical in both, up to a 1-ulp fp32 flip of a score rounded from fp64) separates them.
# Gradients pass through the fp32 softmax backward: a few fp32 ulps amplified by the sum.
OUT_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


def hml_direct(layer: HeadwiseMemoryLayer, o: torch.Tensor, tau: float) -> torch.Tensor:
    """r = hive_gather(softmax(pk_topk(norm(o)) / tau), bank, proj) from the reference ops,
    written out: r[t, h] = sum_j w[t, h, j] * (bank[idx[t, h, j]] @ proj[h]). ``tau`` is the one
    the test built the layer with (not read back from the layer: that would test nothing)."""
    H, d_h = layer.num_heads, layer.head_dim
    q = o.reshape(-1, H, d_h)
    if layer.query_norm is not None:
        qf = q.double()
        q = qf * torch.rsqrt(qf.pow(2).mean(-1, keepdim=True) + layer.query_norm.eps) * layer.query_norm.weight.double()
    scores, idx = pk_topk_ref(q.double(), layer.subkeys.double(), layer.k)
    w = softmax_fp32(scores, tau)
    values = torch.einsum("rz,hzv->hrv", layer.bank.double(), layer.proj.double())   # [H, R, d_h]
    heads = torch.arange(H, device=o.device).view(1, H, 1)
    r = (w[..., None] * values[heads, idx]).sum(dim=2)
    return r.reshape(o.shape)


def pkm_direct(layer: ProductKeyMemory, x: torch.Tensor, tau: float) -> torch.Tensor:
    """out[t] = sum_h sum_j w[t, h, j] * values[idx[t, h, j]] from the reference pk_topk, with
    w = softmax(scores / tau) (tau as for hml_direct)."""
    q = (x.reshape(-1, layer.d_model).double() @ layer.query.weight.double().t()).view(-1, layer.num_heads, layer.d_k)
    scores, idx = pk_topk_ref(q, layer.subkeys.double(), layer.k)
    w = softmax_fp32(scores, tau)
    out = (w[..., None] * layer.values.double()[idx]).sum(dim=(1, 2))
    return out.reshape(*x.shape[:-1], layer.d_out)


# ============================================================================================
# HeadwiseMemoryLayer
# ============================================================================================
def test_hml_parameter_shapes():
    layer = HeadwiseMemoryLayer(num_heads=3, head_dim=10, n=7, k=4, d_z=24)
    assert layer.subkeys.shape == (3, 2, 7, 5)
    assert layer.bank.shape == (49, 24)
    assert layer.proj.shape == (3, 24, 10)
    assert {name for name, _ in layer.named_parameters()} == {"subkeys", "bank", "proj"}
    rms = HeadwiseMemoryLayer(num_heads=3, head_dim=10, n=7, k=4, d_z=24, query_norm="rms")
    assert {name for name, _ in rms.named_parameters()} == {"subkeys", "bank", "proj", "query_norm.weight"}
    assert rms.query_norm.weight.shape == (3, 10)


def test_hml_defaults():
    """[project] defaults of spec 2.1: n = 32, k = 16, d_z = 256, tau = 1, query_norm 'none'."""
    layer = HeadwiseMemoryLayer(num_heads=2, head_dim=8)
    assert (layer.n, layer.k, layer.d_z, layer.tau) == (32, 16, 256, 1.0)
    assert layer.query_norm is None
    assert layer.bank.shape == (1024, 256)


def test_hml_init_statistics():
    """Spec 2.1: subkeys ~ N(0, 1/d_k) (d_k = head_dim, the query width), proj ~ N(0, 1/d_z),
    bank exactly 0. With 8192 sub-key and 65536 proj entries the sample std is within ~1% (one
    standard error is std/sqrt(2m)), so 5% tolerances fail only for a wrong init scale."""
    seed("init")
    H, d_h, n, d_z = 4, 64, 32, 256
    layer = HeadwiseMemoryLayer(num_heads=H, head_dim=d_h, n=n, k=8, d_z=d_z)
    sk, proj = layer.subkeys.detach(), layer.proj.detach()
    assert abs(sk.std().item() - 1 / math.sqrt(d_h)) < 0.05 / math.sqrt(d_h)
    assert abs(sk.mean().item()) < 5 * (1 / math.sqrt(d_h)) / math.sqrt(sk.numel())
    assert abs(proj.std().item() - 1 / math.sqrt(d_z)) < 0.05 / math.sqrt(d_z)
    assert abs(proj.mean().item()) < 5 * (1 / math.sqrt(d_z)) / math.sqrt(proj.numel())
    assert torch.equal(layer.bank.detach(), torch.zeros_like(layer.bank))
    # Each head draws its own sub-keys and projection (not one copy broadcast).
    assert not torch.equal(sk[0], sk[1]) and not torch.equal(proj[0], proj[1])
    # reset_parameters restores the same init.
    with torch.no_grad():
        layer.bank.fill_(1.0)
    layer.reset_parameters()
    assert torch.equal(layer.bank.detach(), torch.zeros_like(layer.bank))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead", [(5,), (2, 3), ()], ids=["N", "B,T", "single"])
def test_hml_output_shape_and_value(lead, device):
    """Any leading dims; the output equals the direct reference computation (fp64)."""
    seed("hml-shape", lead)
    layer = randomize_(HeadwiseMemoryLayer(num_heads=3, head_dim=8, n=6, k=3, d_z=12)).double().to(device)
    o = torch.randn(*lead, 3, 8, dtype=torch.float64, device=device)
    r = layer(o)
    assert r.shape == o.shape and r.dtype == o.dtype
    torch.testing.assert_close(r, hml_direct(layer, o, 1.0), **OUT_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tau", [1.0, 0.4, 2.5])
def test_hml_float32_matches_direct(tau, device):
    """fp32 parameters and input: the layer (C++ kernels on CPU) against the fp64 direct
    computation with fp32 tolerances (the random inputs have no near-ties at this size), at the
    default temperature and at two others (tau = 1 skips the division)."""
    seed("hml-fp32", tau)
    layer = randomize_(HeadwiseMemoryLayer(num_heads=4, head_dim=16, n=8, k=4, d_z=20, tau=tau)).to(device)
    o = torch.randn(6, 5, 4, 16, device=device)
    torch.testing.assert_close(layer(o).double(), hml_direct(layer, o, tau), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_hml_zero_bank_zero_output_but_bank_gradient(device):
    """Spec 2.1 / 3.1: with the initial zero bank the layer outputs exactly zero (the MIDUS block
    starts as the identity), yet the bank gets a gradient, non-zero on exactly the slots read."""
    seed("zero-bank")
    layer = HeadwiseMemoryLayer(num_heads=2, head_dim=8, n=6, k=3, d_z=10).to(device)
    o = torch.randn(7, 2, 8, device=device)
    r = layer(o)
    assert torch.equal(r, torch.zeros_like(r))
    (r * torch.randn_like(r)).sum().backward()
    gb = layer.bank.grad
    assert gb is not None and bool(gb.abs().sum() > 0)
    _, idx = midus_ops.pk_topk(o, layer.subkeys.detach(), layer.k)
    read = torch.zeros(layer.n ** 2, dtype=torch.bool, device=device)
    read[idx.flatten()] = True
    assert bool((gb[~read] == 0).all()), "gradient on a slot nobody read"
    assert bool((gb[read] != 0).any(dim=1).all()), "a slot that was read got no gradient"
    # u = 0, so proj's gradient is 0; the output does not depend on subkeys while the bank is 0.
    assert torch.equal(layer.proj.grad, torch.zeros_like(layer.proj))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tau", [1.0, 0.4])
def test_hml_gradients_match_direct(tau, device):
    """Gradients of every parameter and of the input (fp64) against autograd through the direct
    reference computation."""
    seed("hml-grad", tau)
    layer = randomize_(HeadwiseMemoryLayer(num_heads=2, head_dim=6, n=5, k=3, d_z=7, query_norm="rms", tau=tau))
    layer = layer.double().to(device)
    with torch.no_grad():
        layer.query_norm.weight.uniform_(0.5, 1.5)
    o = torch.randn(4, 2, 6, dtype=torch.float64, device=device, requires_grad=True)
    g = torch.randn(4, 2, 6, dtype=torch.float64, device=device)
    params = [o] + list(layer.parameters())
    got = torch.autograd.grad(layer(o), params, g)
    want = torch.autograd.grad(hml_direct(layer, o, tau), params, g)
    for p, a, b in zip(["input"] + [n for n, _ in layer.named_parameters()], got, want):
        torch.testing.assert_close(a, b, **GRAD_TOL, msg=lambda m: f"grad {p}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_hml_rms_query_norm(device):
    """query_norm='rms' normalises each head's query: the output is invariant to rescaling the
    input (it is not without the norm: the softmax sharpens), and the norm scale trains."""
    seed("rms")
    rms = randomize_(HeadwiseMemoryLayer(num_heads=3, head_dim=8, n=6, k=3, d_z=10, query_norm="rms")).to(device)
    none = copy.deepcopy(rms)
    none.query_norm = None
    o = torch.randn(5, 3, 8, device=device)
    torch.testing.assert_close(rms(o), rms(3.0 * o), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(none(o), none(3.0 * o), rtol=1e-3, atol=1e-4)
    rms(o).square().sum().backward()
    assert rms.query_norm.weight.grad is not None and bool(rms.query_norm.weight.grad.abs().sum() > 0)


@pytest.mark.parametrize("device", DEVICES)
def test_hml_bf16_input(device):
    """bf16 input with fp32 parameters runs in bf16 and returns bf16; parameters keep fp32
    gradients. Close to the fp32 result where the selection agrees (most tokens)."""
    seed("bf16")
    layer = randomize_(HeadwiseMemoryLayer(num_heads=2, head_dim=16, n=8, k=4, d_z=12)).to(device)
    o = torch.randn(10, 2, 16, device=device)
    r = layer(o.bfloat16())
    assert r.dtype == torch.bfloat16 and r.shape == o.shape
    assert bool(torch.isfinite(r).all()) and bool(r.abs().sum() > 0)
    r.float().square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert bool(torch.isfinite(p.grad).all()), name
    # Against fp32 on the same (bf16-rounded) input: a bf16 result is ~2^-8 relative off, a
    # flipped selection O(1). Require most elements to agree to bf16 precision.
    r32 = layer(o.bfloat16().float())
    close = torch.isclose(r.float(), r32, rtol=3e-2, atol=3e-2 * r32.abs().max().item())
    assert close.float().mean().item() > 0.8


def test_hml_bad_constructor_args():
    with pytest.raises(ValueError, match="head_dim"):
        HeadwiseMemoryLayer(num_heads=2, head_dim=7)
    with pytest.raises(ValueError, match=r"\bk\b"):
        HeadwiseMemoryLayer(num_heads=2, head_dim=8, n=4, k=5)
    with pytest.raises(ValueError, match=r"\bk\b"):
        HeadwiseMemoryLayer(num_heads=2, head_dim=8, n=4, k=0)
    with pytest.raises(ValueError, match="query_norm"):
        HeadwiseMemoryLayer(num_heads=2, head_dim=8, query_norm="layer")
    with pytest.raises(ValueError, match="tau"):
        HeadwiseMemoryLayer(num_heads=2, head_dim=8, tau=0.0)


@pytest.mark.parametrize("shape", [(5, 3, 8), (5, 2, 6), (8,), (5, 2, 8, 1)])
def test_hml_bad_input_shape(shape):
    layer = HeadwiseMemoryLayer(num_heads=2, head_dim=8, n=4, k=2, d_z=6)
    with pytest.raises(ValueError, match=r"\[\.\.\., 2, 8\]"):
        layer(torch.randn(*shape))


# ============================================================================================
# memory_stats
# ============================================================================================
@pytest.mark.parametrize("cls", ["hml", "pkm"])
def test_memory_stats(cls):
    """After eval-mode forwards: per-head slot usage (fraction of slots read), KL of slot use from
    uniform, mean entropy of the top-k weights and the token count, each recomputed here from
    pk_topk on the same queries. Training-mode forwards are not recorded; reset zeroes."""
    seed("stats", cls)
    H, n, k, tau = 3, 5, 3, 0.7
    if cls == "hml":
        layer = randomize_(HeadwiseMemoryLayer(num_heads=H, head_dim=8, n=n, k=k, d_z=6, tau=tau))
        batches = [torch.randn(4, 6, H, 8), torch.randn(7, H, 8)]
        queries = [b.reshape(-1, H, 8) for b in batches]
    else:
        layer = randomize_(ProductKeyMemory(d_model=12, num_heads=H, n=n, k=k, d_k=8, tau=tau))
        batches = [torch.randn(4, 6, 12), torch.randn(7, 12)]
        queries = [(b.reshape(-1, 12) @ layer.query.weight.detach().t()).view(-1, H, 8) for b in batches]
    stats0 = layer.memory_stats()
    assert stats0["tokens"].item() == 0 and torch.equal(stats0["slot_usage"], torch.zeros(H, dtype=torch.float64))

    layer.train()
    layer(batches[0])
    assert layer.memory_stats()["tokens"].item() == 0, "training-mode forwards must not be recorded"
    layer.eval()
    with torch.no_grad():
        for b in batches:
            layer(b)
    stats = layer.memory_stats()

    counts = torch.zeros(H, n * n, dtype=torch.float64)
    ent_sum = torch.zeros(H, dtype=torch.float64)
    for q in queries:
        scores, idx = midus_ops.pk_topk(q, layer.subkeys.detach(), k)
        for h in range(H):
            counts[h].index_add_(0, idx[:, h].flatten(), torch.ones(idx[:, h].numel(), dtype=torch.float64))
        w = torch.softmax(scores.double() / tau, dim=-1)
        ent_sum += -(w * w.log()).sum(-1).sum(0)
    n_tokens = sum(q.shape[0] for q in queries)
    p = counts / counts.sum(-1, keepdim=True)
    kl = math.log(n * n) + torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)

    assert stats["tokens"].item() == n_tokens == 31
    for key in ("slot_usage", "kl_from_uniform", "weight_entropy"):
        assert stats[key].shape == (H,), key
    assert bool(((stats["slot_usage"] >= 0) & (stats["slot_usage"] <= 1)).all())
    assert bool((stats["kl_from_uniform"] >= -1e-12).all())
    assert bool(((stats["weight_entropy"] >= 0) & (stats["weight_entropy"] <= math.log(k) + 1e-12)).all())
    torch.testing.assert_close(stats["slot_usage"], (counts > 0).double().mean(-1))
    torch.testing.assert_close(stats["kl_from_uniform"], kl)
    torch.testing.assert_close(stats["weight_entropy"], ent_sum / n_tokens, rtol=1e-5, atol=1e-6)
    # With 31 tokens x 3 reads over 25 slots, usage is strictly between 0 and 1 for some head.
    assert bool((stats["slot_usage"] > 0).all())

    layer.reset_memory_stats()
    s = layer.memory_stats()
    assert s["tokens"].item() == 0
    assert torch.equal(s["slot_usage"], torch.zeros(H, dtype=torch.float64))


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.long, torch.float32])
@pytest.mark.parametrize("cls", ["hml", "pkm"])
def test_memory_stats_token_mask(cls, mask_dtype):
    """token_mask (the padding mask) leaves tokens out of the statistics, exactly as if only the
    kept tokens had been given; the output is the same with or without it. A left-out row whose
    input is NaN (what a fully masked attention row can give) does not poison the statistics."""
    seed("stats-mask", cls)
    H = 3
    if cls == "hml":
        make = lambda: randomize_(HeadwiseMemoryLayer(num_heads=H, head_dim=8, n=5, k=3, d_z=6, tau=0.7))
        x = torch.randn(3, 6, H, 8)
    else:
        make = lambda: randomize_(ProductKeyMemory(d_model=12, num_heads=H, n=5, k=3, d_k=8, tau=0.7))
        x = torch.randn(3, 6, 12)
    masked = make().eval()
    kept = copy.deepcopy(masked)
    mask = torch.rand(3, 6) > 0.4
    mask[0, 0], mask[1, 0] = True, False
    x[1, 0] = float("nan")  # left out by the mask
    with torch.no_grad():
        y = masked(x, token_mask=mask.to(mask_dtype))
        kept(x[mask])
        unmasked = copy.deepcopy(masked)
        torch.testing.assert_close(y[mask], unmasked(x)[mask], rtol=0, atol=0)
    a, b = masked.memory_stats(), kept.memory_stats()
    assert a["tokens"].item() == int(mask.sum()) and torch.equal(masked.stats.slot_counts, kept.stats.slot_counts)
    for key in ("slot_usage", "kl_from_uniform", "weight_entropy"):  # (PKM: its fp32 query matmul
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-9)  # blocks N=18 and N=kept apart)
    assert torch.isfinite(a["weight_entropy"]).all()


@pytest.mark.parametrize("cls", ["hml", "pkm"])
def test_token_mask_bad_input(cls):
    if cls == "hml":
        layer, x = HeadwiseMemoryLayer(num_heads=2, head_dim=8, n=4, k=2, d_z=6), torch.randn(2, 5, 2, 8)
    else:
        layer, x = ProductKeyMemory(d_model=12, num_heads=2, n=4, k=2, d_k=8), torch.randn(2, 5, 12)
    with pytest.raises(ValueError, match=r"token_mask.*\(2, 5\)"):
        layer(x, token_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="token_mask"):
        layer(x, token_mask=[[1] * 5] * 2)
    with pytest.raises(ValueError, match="token_mask"):
        layer(x, token_mask=torch.ones(2, 5, dtype=torch.bool, device="meta"))


@pytest.mark.parametrize("cls", ["hml", "pkm"])
def test_memory_stats_of_a_layer_built_under_inference_mode(cls):
    """A layer built (or a model loaded) under torch.inference_mode() has inference-tensor
    buffers; recording statistics later, outside that mode, must work (an in-place update of an
    inference tensor outside the mode raises), and so must reset. Kind: sglang #33470."""
    seed("inference-mode", cls)
    with torch.inference_mode():
        if cls == "hml":
            layer, x = randomize_(HeadwiseMemoryLayer(num_heads=2, head_dim=8, n=4, k=2, d_z=6)), torch.randn(5, 2, 8)
        else:
            layer, x = randomize_(ProductKeyMemory(d_model=12, num_heads=2, n=4, k=2, d_k=8)), torch.randn(5, 12)
    assert layer.stats.tokens.is_inference()
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert layer.memory_stats()["tokens"].item() == 5
    with torch.inference_mode():  # and inside the mode again
        layer(x)
    assert layer.memory_stats()["tokens"].item() == 10
    layer.reset_memory_stats()
    assert layer.memory_stats()["tokens"].item() == 0


@pytest.mark.parametrize("cls", ["hml", "pkm"])
def test_stats_not_in_state_dict(cls):
    """Usage statistics are buffers but never checkpoint content: the state_dict holds exactly
    the parameters, and loads into a fresh layer with strict=True."""
    if cls == "hml":
        layer, fresh = (HeadwiseMemoryLayer(num_heads=2, head_dim=8, n=4, k=2, d_z=6) for _ in range(2))
        x = torch.randn(5, 2, 8)
    else:
        layer, fresh = (ProductKeyMemory(d_model=12, num_heads=2, n=4, k=2, d_k=8) for _ in range(2))
        x = torch.randn(5, 12)
    layer.eval()
    layer(x)
    assert layer.memory_stats()["tokens"].item() == 5
    sd = layer.state_dict()
    assert set(sd) == {name for name, _ in layer.named_parameters()}
    fresh.load_state_dict(sd, strict=True)


# ============================================================================================
# ProductKeyMemory
# ============================================================================================
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d_out,tau", [(None, 1.0), (10, 1.0), (10, 0.4)])
def test_pkm_matches_direct(d_out, tau, device):
    """Output = sum over memory heads of the weighted value rows (fp64, no near-ties)."""
    seed("pkm", d_out, tau)
    layer = ProductKeyMemory(d_model=12, num_heads=3, n=6, k=4, d_k=8, d_out=d_out, tau=tau).double().to(device)
    x = torch.randn(2, 5, 12, dtype=torch.float64, device=device)
    y = layer(x)
    assert y.shape == (2, 5, d_out or 12) and y.dtype == x.dtype
    torch.testing.assert_close(y, pkm_direct(layer, x, tau), **OUT_TOL)
    # Gradients of every parameter and the input through the same direct computation.
    x.requires_grad_()
    g = torch.randn(2, 5, d_out or 12, dtype=torch.float64, device=device)
    params = [x] + list(layer.parameters())
    got = torch.autograd.grad(layer(x), params, g)
    want = torch.autograd.grad(pkm_direct(layer, x, tau), params, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **GRAD_TOL)


def test_pkm_init():
    seed("pkm-init")
    layer = ProductKeyMemory(d_model=64, num_heads=4, n=32, k=8, d_k=64)
    assert layer.query.weight.shape == (4 * 64, 64) and layer.query.bias is None
    assert layer.subkeys.shape == (4, 2, 32, 32) and layer.values.shape == (1024, 64)
    assert abs(layer.values.std().item() - 1 / 8) < 0.05 / 8          # N(0, 1/d_out), 65536 draws
    assert abs(layer.subkeys.std().item() - 1 / 8) < 0.05 / 8         # N(0, 1/d_k), 8192 draws
    zero = ProductKeyMemory(d_model=64, num_heads=4, n=32, k=8, d_k=64, value_init="zeros")
    assert torch.equal(zero.values.detach(), torch.zeros_like(zero.values))


@pytest.mark.parametrize("device", DEVICES)
def test_pkm_zero_values_zero_output(device):
    seed("pkm-zero")
    layer = ProductKeyMemory(d_model=12, num_heads=2, n=5, k=3, d_k=6, value_init="zeros").to(device)
    x = torch.randn(3, 4, 12, device=device)
    y = layer(x)
    assert torch.equal(y, torch.zeros_like(y))
    (y * torch.randn_like(y)).sum().backward()
    assert bool(layer.values.grad.abs().sum() > 0)


@pytest.mark.parametrize("device", DEVICES)
def test_pkm_bf16_input(device):
    seed("pkm-bf16")
    layer = ProductKeyMemory(d_model=16, num_heads=2, n=6, k=3, d_k=8).to(device)
    y = layer(torch.randn(4, 16, device=device).bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == (4, 16) and bool(torch.isfinite(y).all())
    y.float().sum().backward()
    assert layer.values.grad.dtype == torch.float32 and layer.query.weight.grad is not None


def test_pkm_bad_args():
    with pytest.raises(ValueError, match="d_k"):
        ProductKeyMemory(d_model=8, d_k=7)
    with pytest.raises(ValueError, match=r"\bk\b"):
        ProductKeyMemory(d_model=8, n=4, k=5, d_k=8)
    with pytest.raises(ValueError, match="value_init"):
        ProductKeyMemory(d_model=8, d_k=8, value_init="ones")
    with pytest.raises(ValueError, match="tau"):
        ProductKeyMemory(d_model=8, d_k=8, tau=-1.0)
    layer = ProductKeyMemory(d_model=8, num_heads=2, n=4, k=2, d_k=8)
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        layer(torch.randn(3, 9))


# ============================================================================================
# torch.compile(fullgraph=True): forward and backward match eager
# ============================================================================================
class _HMLBlock(nn.Module):
    """A tiny MIDUS-like block: a linear map makes per-head 'attention outputs', HML reads the
    memory, a residual adds it back."""

    def __init__(self, H=2, d_h=8):
        super().__init__()
        self.H, self.d_h = H, d_h
        self.inp = nn.Linear(H * d_h, H * d_h)
        self.hml = randomize_(HeadwiseMemoryLayer(num_heads=H, head_dim=d_h, n=6, k=3, d_z=12, query_norm="rms"))

    def forward(self, x):
        o = self.inp(x).unflatten(-1, (self.H, self.d_h))
        return x + self.hml(o).flatten(-2)


class _PKMBlock(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.pkm = randomize_(ProductKeyMemory(d_model=d, num_heads=2, n=6, k=3, d_k=8))

    def forward(self, x):
        return x + self.pkm(self.norm(x))


@pytest.mark.compile
@pytest.mark.parametrize("block", [_HMLBlock, _PKMBlock], ids=["hml", "pkm"])
def test_compile_fullgraph_matches_eager(block):
    """One compile per layer (slow on 2 cores), tiny static shapes. fullgraph=True fails on any
    graph break, e.g. a data-dependent Python branch or an untraceable call in the public ops.
    Tolerances: inductor may fuse and reorder fp32 arithmetic (~1e-6 relative); the random
    inputs have no near-ties that such differences could flip."""
    seed("compile", block.__name__)
    torch._dynamo.reset()
    eager = block()
    compiled_mod = copy.deepcopy(eager)
    x = torch.randn(3, 4, 16)
    compiled = torch.compile(compiled_mod, fullgraph=True, dynamic=False)
    y_eager, y_comp = eager(x), compiled(x)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y_eager)
    y_eager.backward(g)
    y_comp.backward(g)
    for (name, p), (_, pc) in zip(eager.named_parameters(), compiled_mod.named_parameters()):
        assert p.grad is not None and pc.grad is not None, name
        torch.testing.assert_close(pc.grad, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")
