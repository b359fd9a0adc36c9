"""Contexts a user brings to the ops and layers: autocast, model-wide dtype casts, second-order
autograd, meta tensors, non-finite scores and empty batches."""
import pytest
import torch

import midus_ops
from midus_ops import HeadwiseMemoryLayer, ProductKeyMemory, hive_gather, pk_topk
from midus_ops.reference import hive_gather_ref, pk_topk_ref
from op_testing import fallback_allowed, missing_extension_message


def _hml_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(24, 3, 8, generator=g)
    subkeys = torch.randn(3, 2, 6, 4, generator=g)
    bank = torch.randn(36, 10, generator=g)
    proj = torch.randn(3, 10, 8, generator=g)
    return q, subkeys, bank, proj


def test_ops_under_cpu_autocast_compute_in_their_input_dtype(impl):
    # Inside the kernels, autocast would recast their own matmuls (fp32 in, bf16 out) and break
    # them; the ops must give the same fp32 results (and gradients) inside and outside autocast.
    # The reference too (the fallback, and what runs on CUDA by default): its einsums in bf16
    # would pick other slots. The reference's backward is autograd's, which autocast reaches when
    # it runs inside the region; PyTorch's advice is to leave the region first, as done here.
    q, subkeys, bank, proj = _hml_inputs()

    def forward():
        leaves = [t.clone().requires_grad_() for t in (q, subkeys, bank, proj)]
        scores, idx = pk_topk(leaves[0], leaves[1], 3)
        return hive_gather(torch.softmax(scores, -1), idx, leaves[2], leaves[3]), leaves

    def backward(out, leaves):
        out.square().sum().backward()
        return [out.detach()] + [t.grad for t in leaves]

    plain = backward(*forward())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, leaves = forward()
        if impl == "kernel":
            inside = backward(out, leaves)
    if impl == "reference":
        inside = backward(out, leaves)
    for a, b in zip(plain, inside):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_layer_forward_backward_under_autocast_and_after_bf16_cast():
    layer = HeadwiseMemoryLayer(2, 8, n=4, k=2, d_z=6)
    torch.nn.init.normal_(layer.bank)
    x = torch.randn(5, 2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).sum().backward()
    assert layer.bank.grad is not None and layer.bank.grad.abs().sum() > 0
    # .bfloat16() / .half() cast parameters, not the usage statistics (counts in bf16 stop at 256)
    for cast in (lambda m: m.bfloat16(), lambda m: m.half(), lambda m: m.to(torch.bfloat16)):
        for module, inp in [(HeadwiseMemoryLayer(2, 8, n=4, k=2, d_z=6), torch.randn(300, 2, 8)),
                            (ProductKeyMemory(16, num_heads=2, n=4, k=2, d_k=8), torch.randn(300, 16))]:
            module = cast(module).eval()
            out = module(inp.to(next(module.parameters()).dtype))
            assert out.dtype == next(module.parameters()).dtype
            assert module.stats.slot_counts.dtype == torch.float64
            assert module.memory_stats()["tokens"].item() == 300


@pytest.mark.kernels  # the compiled ops' autograd: fails without the extension (conftest)
@pytest.mark.skipif(not midus_ops.EXTENSION_AVAILABLE and fallback_allowed(), reason=missing_extension_message())
def test_double_backward_raises_instead_of_silent_zeros():
    q, subkeys, bank, proj = (t.double().requires_grad_() for t in _hml_inputs())
    scores, idx = pk_topk(q, subkeys, 3)
    out = hive_gather(torch.softmax(scores, -1), idx, bank, proj)
    (g_bank,) = torch.autograd.grad(out.square().sum(), bank, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g_bank.sum().backward()


def test_meta_tensors_give_shapes():
    w = torch.empty(7, 3, 4, device="meta")
    idx = torch.empty(7, 3, 4, dtype=torch.long, device="meta")
    bank = torch.empty(36, 10, device="meta")
    proj = torch.empty(3, 10, 8, device="meta")
    assert hive_gather(w, idx, bank, proj).shape == (7, 3, 8)
    assert hive_gather(w, idx, bank).shape == (7, 3, 10)
    layer = HeadwiseMemoryLayer(3, 8, n=6, k=4, d_z=10).to("meta")
    assert layer(torch.empty(2, 5, 3, 8, device="meta")).shape == (2, 5, 3, 8)


@pytest.mark.parametrize("simd_rows", [1, 16], ids=["scalar", "avx2"])
def test_infinite_scores_follow_the_reference(simd_rows):
    # inf + (-inf) = NaN, which ranks first: rows with non-finite stage-1 scores are not pruned.
    q = torch.full((simd_rows, 1, 2), float("inf"))
    subkeys = torch.tensor([[[[1.0], [1.0], [-1.0]], [[1.0], [-1.0], [-1.0]]]])
    s, i = pk_topk(q, subkeys, 3)
    s_ref, i_ref = pk_topk_ref(q, subkeys, 3)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(s, s_ref, equal_nan=True)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(64, 2, 8, generator=g) * 1e30  # overflows fp32 in the scores
    subkeys = torch.randn(2, 2, 12, 4, generator=g) * 1e10
    s, i = pk_topk(q, subkeys, 5)
    s_ref, i_ref = pk_topk_ref(q, subkeys, 5)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(s, s_ref, equal_nan=True)


def test_empty_batches():
    assert ProductKeyMemory(16, num_heads=2, n=4, k=2, d_k=8)(torch.randn(0, 16)).shape == (0, 16)
    assert HeadwiseMemoryLayer(2, 8, n=4, k=2, d_z=6)(torch.randn(0, 3, 2, 8)).shape == (0, 3, 2, 8)
    w, idx, bank = torch.randn(0, 2, 3), torch.zeros(0, 2, 3, dtype=torch.long), torch.randn(9, 4)
    assert torch.equal(hive_gather(w, idx, bank), hive_gather_ref(w, idx, bank))


def test_numpy_integers_are_taken_as_ints_and_saved_as_ints(tmp_path):
    """k, n, K from numpy (a sweep over np.arange, a config read by pandas) are ints to the user:
    accepted everywhere an int is, stored as Python ints (the saved config is JSON); floats and
    bools are still refused by name."""
    import json

    import numpy as np

    import midus
    from conftest import make_tiny_llama

    q, subkeys, bank, proj = _hml_inputs()
    want = pk_topk(q, subkeys, 3)
    got = pk_topk(q, subkeys, np.int64(3))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    layer = HeadwiseMemoryLayer(num_heads=np.int32(2), head_dim=8, n=np.int64(6), k=np.int64(3), d_z=10)
    assert type(layer.k) is int and type(layer.n) is int and type(layer.num_heads) is int
    pkm = ProductKeyMemory(d_model=np.int64(16), num_heads=2, n=6, k=np.int64(3), d_k=8)
    assert type(pkm.k) is int and type(pkm.d_model) is int
    big = midus.upscale(make_tiny_llama(96), "midus", num_blocks=np.int64(2), n=np.int64(8), k=np.int64(4), d_z=16)
    big.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["midus_upscale"]["num_blocks"] == 2
    for bad, exc in ((3.0, TypeError), (True, TypeError)):
        with pytest.raises(exc, match="k must be an int"):
            pk_topk(q, subkeys, bad)
    with pytest.raises(ValueError, match="k must be a positive int"):
        HeadwiseMemoryLayer(num_heads=2, head_dim=8, n=6, k=3.0, d_z=10)
    with pytest.raises(TypeError, match="num_blocks must be an int"):
        midus.upscale(make_tiny_llama(96), "midus", num_blocks=2.0)
