"""The host-side fixes of issue 13's review, beside the emulated kernel tests
(tests/test_cuda_emulated.py, which cover the 99 KiB tile configurations and the per-kernel
shared-memory opt-in under the emulator's sm_86 limits):

  a. TF32: the fp32 GEMMs of the backward stay fp32 when the user enables TF32;
  b. deterministic mode without CUBLAS_WORKSPACE_CONFIG: the backward GEMMs avoid cuBLAS;
  c. the default arch list embeds PTX for GPUs newer than the SASS targets;
  + the 16-bit inf/NaN fix of the tensor-core split, and the Python-side limits agreeing with the
    kernels'.

CPU checks run everywhere; the GPU checks need a GPU and the compiled CUDA kernels.
"""
from __future__ import annotations

import ast
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import midus_ops
from midus_ops.reference import hive_gather_ref
from op_testing import BF16, DT_ID, F16, F32, F64, I64, assert_close, seed

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "csrc" / "cuda" / "kernels"

CUDA_OK = torch.cuda.is_available() and midus_ops.has_kernel("hive_gather_backward", torch.device("cuda")) \
    and midus_ops.has_kernel("pk_topk_backward", torch.device("cuda"))
needs_gpu = pytest.mark.skipif(
    not CUDA_OK, reason=f"needs a GPU and the compiled CUDA kernels (extension: {midus_ops.EXTENSION_ERROR or 'ok'})")


# ------------------------------------------------------------------------------------------------
# CPU checks
# ------------------------------------------------------------------------------------------------
def _default_arch_list() -> str:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DEFAULT_CUDA_ARCH_LIST" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no DEFAULT_CUDA_ARCH_LIST")


def test_default_arch_list_embeds_ptx_for_newer_gpus(monkeypatch):
    """(c) Without a visible GPU the build targets sm_80 and sm_90 SASS plus compute_90 PTX, which
    the driver JIT-compiles on sm_100/sm_120 (no SASS there): torch must turn the list into those
    -gencode flags."""
    arch = _default_arch_list()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch)
    from torch.utils.cpp_extension import _get_cuda_arch_flags
    flags = " ".join(_get_cuda_arch_flags())
    assert "arch=compute_80,code=sm_80" in flags and "arch=compute_90,code=sm_90" in flags, flags
    assert "code=compute_90" in flags, f"no PTX embedded: {flags}"
    assert 'os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST' in (ROOT / "setup.py").read_text()


def test_backward_gemms_only_through_dev_gemm():
    """(a, b) Every GEMM of the CUDA ops goes through one place, CudaDev::gemm, which falls back to
    the deterministic kernel, and whose cuBLAS path (cuda_gemm_no_tf32, out of line in cuda_dev.cpp
    so that nvcc never parses ATen) holds at::NoTF32Guard: no other ATen matmul in csrc/cuda."""
    dev = (ROOT / "csrc" / "cuda" / "cuda_dev.cuh").read_text()
    gemm = dev[dev.index("void gemm(const GemmArgs<acc_t>& g)"):]
    gemm = gemm[:gemm.index("\n  }\n")]
    assert "use_own_gemm()" in gemm and "cuda_gemm_no_tf32(" in gemm
    host = (ROOT / "csrc" / "cuda" / "cuda_dev.cpp").read_text()
    cublas = host[host.index("void cuda_gemm_no_tf32("):]
    cublas = cublas[:cublas.index("\n}\n")]
    assert "const at::NoTF32Guard" in cublas
    matmul = re.compile(r"\bat::(bmm|mm|matmul|addmm|baddbmm|bmm_out|mm_out|einsum|linear)\b|\.(baddbmm_|addmm_|mm|bmm|matmul)\(")
    for p in sorted((ROOT / "csrc" / "cuda").rglob("*.cu*")) + sorted((ROOT / "csrc" / "cuda").glob("*.cpp")):
        text = p.read_text()
        if p.name == "cuda_dev.cpp":
            text = text.replace(cublas, "")
        hits = matmul.findall(text)
        assert not hits, f"{p.relative_to(ROOT)} calls an ATen matmul directly: {hits}"


def test_python_limits_come_from_the_extension():
    """midus_ops.ops routes shapes beyond the CUDA pk_topk limits to the reference. The limits are
    written once (csrc/limits.h), used by the kernels and exported by the extension: no Python copy."""
    limits = (ROOT / "csrc" / "limits.h").read_text()
    assert '#include "../../limits.h"' in (KERNELS / "pk_topk.cuh").read_text()
    assert not re.search(r"constexpr int kPkMax[KN]\b", (KERNELS / "pk_topk.cuh").read_text())
    ops_src = (ROOT / "midus_ops" / "ops.py").read_text()
    assert not re.search(r"CUDA_PK_TOPK_MAX_[KN][^=\n]*= *\d", ops_src), "a Python copy of a kernel limit"
    if not midus_ops.EXTENSION_AVAILABLE:
        pytest.skip(f"extension not built: {midus_ops.EXTENSION_ERROR}")
    assert int(re.search(r"constexpr int kPkMaxK = (\d+);", limits).group(1)) == midus_ops.ops.CUDA_PK_TOPK_MAX_K
    assert int(re.search(r"constexpr int kPkMaxN = (\d+);", limits).group(1)) == midus_ops.ops.CUDA_PK_TOPK_MAX_N


def test_kernel_headers_stay_free_of_torch():
    """The kernels and their launch logic must build without torch (the emulator includes them)."""
    for p in sorted(KERNELS.glob("*.cuh")):
        text = p.read_text()
        inc = re.findall(r'#include [<"]([^>"]+)[>"]', text)
        emu_branch = text.split("#else")[0] if p.name == "compat.cuh" else text
        assert not any(i.startswith(("ATen", "torch", "c10")) for i in re.findall(r'#include [<"]([^>"]+)[>"]', emu_branch)), \
            f"{p.name} includes torch headers: {inc}"


# ------------------------------------------------------------------------------------------------
# GPU checks
# ------------------------------------------------------------------------------------------------
def _hive_case(dtype, N=300, H=2, k=8, R=4000, d_z=96, d_v=80):
    """Shapes of the generic backward (d_v > 64): grad_bank and grad_proj come from fp32 GEMMs with
    K = H * d_v and K = N terms, where TF32's 10-bit mantissa errs by ~1e-3 relative."""
    w = torch.randn(N, H, k, dtype=F64).to(dtype).cuda().requires_grad_()
    idx = torch.randint(0, R, (N, H, k)).cuda()
    bank = torch.randn(R, d_z, dtype=F64).to(dtype).cuda().requires_grad_()
    proj = (torch.randn(H, d_z, d_v, dtype=F64) / math.sqrt(d_z)).to(dtype).cuda().requires_grad_()
    return w, idx, bank, proj


def _hive_grads(w, idx, bank, proj, g):
    out = midus_ops.hive_gather(w, idx, bank, proj)
    return torch.autograd.grad(out, [w, bank, proj], g)


def _hive_want(w, idx, bank, proj, g):
    ins = [t.detach().double().cpu().requires_grad_() for t in (w, bank, proj)]
    out = hive_gather_ref(ins[0], idx.cpu(), ins[1], ins[2])
    return torch.autograd.grad(out, ins, g.double().cpu())


@needs_gpu
@pytest.mark.parametrize("how", ["allow_tf32", "matmul_precision_high"])
def test_tf32_does_not_reach_the_backward_gemms(how):
    """(a) With TF32 enabled by the user (HF Trainer's tf32=True sets allow_tf32), the fp32
    gradients still have fp32 accuracy: TF32 would be off by ~1e-3 relative."""
    seed("tf32", how)
    old = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    try:
        if how == "allow_tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
        else:
            torch.set_float32_matmul_precision("high")
        w, idx, bank, proj = _hive_case(F32)
        g = torch.randn(w.shape[0], w.shape[1], proj.shape[2], device="cuda")
        got = _hive_grads(w, idx, bank, proj, g)
        q = torch.randn(200, 2, 64, device="cuda", requires_grad=True)
        sk = torch.randn(2, 2, 256, 32, device="cuda", requires_grad=True)
        scores, ids = midus_ops.pk_topk(q, sk, 16)
        gs = torch.randn_like(scores)
        gq, gk = torch.autograd.grad(scores, [q, sk], gs)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old[0]
        torch.set_float32_matmul_precision(old[1])
    for name, a, b in zip(["weights", "bank", "proj"], got, _hive_want(w, idx, bank, proj, g)):
        assert_close(a, b, F32, f"hive_gather grad {name} under TF32")
    q64, sk64 = q.detach().double().cpu().requires_grad_(), sk.detach().double().cpu().requires_grad_()
    from op_testing import scores_at
    want_q, want_k = torch.autograd.grad(scores_at(q64, sk64, ids.cpu()), [q64, sk64], gs.double().cpu())
    assert_close(gq, want_q, F32, "pk_topk grad q under TF32")
    assert_close(gk, want_k, F32, "pk_topk grad subkeys under TF32")


@needs_gpu
def test_deterministic_mode_without_cublas_workspace_config():
    """(b) torch.use_deterministic_algorithms(True), not warn_only, and no CUBLAS_WORKSPACE_CONFIG:
    the backward runs (our own GEMM kernel instead of cuBLAS), bitwise the same twice, and agrees
    with the cuBLAS path (MIDUS_OPS_CUDA_GEMM=cublas) to fp32 accuracy."""
    code = textwrap.dedent("""
        import math, torch, midus_ops
        from midus_ops.reference import hive_gather_ref
        torch.manual_seed(0)
        N, H, k, R, dz, dv = 200, 2, 8, 3000, 96, 80
        w = torch.randn(N, H, k, device="cuda", requires_grad=True)
        idx = torch.randint(0, R, (N, H, k), device="cuda")
        bank = torch.randn(R, dz, device="cuda", requires_grad=True)
        proj = (torch.randn(H, dz, dv, device="cuda") / math.sqrt(dz)).requires_grad_()
        g = torch.randn(N, H, dv, device="cuda")
        q = torch.randn(100, 2, 64, device="cuda", requires_grad=True)
        sk = torch.randn(2, 2, 128, 32, device="cuda", requires_grad=True)
        torch.use_deterministic_algorithms(True)
        def grads():
            out = midus_ops.hive_gather(w, idx, bank, proj)
            s, _ = midus_ops.pk_topk(q, sk, 8)
            return torch.autograd.grad(out, [w, bank, proj], g) + torch.autograd.grad(s, [q, sk], torch.ones_like(s))
        a, b = grads(), grads()
        assert all(torch.equal(x, y) for x, y in zip(a, b)), "not bitwise deterministic"
        torch.save([x.cpu() for x in a], "grads.pt")
    """)
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env.pop("MIDUS_OPS_CUDA_GEMM", None)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([sys.executable, "-c", code], cwd=d, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        own = torch.load(os.path.join(d, "grads.pt"))
        env2 = dict(env, CUBLAS_WORKSPACE_CONFIG=":4096:8", MIDUS_OPS_CUDA_GEMM="cublas")
        r = subprocess.run([sys.executable, "-c", code], cwd=d, env=env2, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        cub = torch.load(os.path.join(d, "grads.pt"))
    for a, b in zip(own, cub):
        assert_close(a, b.double(), F32, "own GEMM vs cuBLAS")


@needs_gpu
@pytest.mark.parametrize("dtype", [BF16, F16], ids=DT_ID.get)
def test_infinite_values_through_the_tensor_core_split(dtype):
    """An infinite bank entry and an infinite proj entry give +-inf outputs as in the reference,
    for fp16 too (0 x inf in the hi/lo correction terms used to make NaN)."""
    seed("inf-split", dtype)
    N, H, k, R, d_z, d_v = 70, 2, 4, 16, 32, 16
    w = (torch.rand(N, H, k, dtype=F64) + 0.1).to(dtype).cuda()
    idx = torch.randint(0, R, (N, H, k)).cuda()
    idx[::3, :, 0] = 5
    bank = torch.randn(R, d_z, dtype=F64).to(dtype).cuda()
    bank[5, 3] = float("inf")
    proj = (torch.randn(H, d_z, d_v, dtype=F64) / 8).to(dtype).cuda()
    proj[1, 7, 2] = float("-inf")
    out = midus_ops.hive_gather(w, idx, bank, proj).double().cpu()
    want = hive_gather_ref(w.double().cpu(), idx.cpu(), bank.double().cpu(), proj.double().cpu())
    assert torch.equal(torch.isnan(out), torch.isnan(want)) and torch.equal(torch.isinf(out), torch.isinf(want))
    inf = torch.isinf(want)
    assert bool(inf.any()) and torch.equal(out[inf], want[inf])
    fin = ~inf & ~torch.isnan(want)
    assert_close(out[fin], want[fin], dtype, "finite outputs")


@needs_gpu
@pytest.mark.parametrize("fwd_tile,bwd_tile", [("32", "16"), ("64", "32")])
def test_small_shared_memory_tiles_on_this_gpu(fwd_tile, bwd_tile):
    """The tile configurations chosen on sm_86/89 (99 KiB), forced here by the environment, agree
    with the reference on this GPU (the emulator checks them under sm_86's limit)."""
    code = textwrap.dedent("""
        import math, torch, midus_ops
        from midus_ops.reference import hive_gather_ref
        from op_testing import assert_close
        torch.manual_seed(1)
        N, H, k, R, dz, dv = 100, 2, 32, 500, 256, 64
        for dt in (torch.bfloat16, torch.float16):
            w = torch.randn(N, H, k, dtype=torch.float64).to(dt).cuda().requires_grad_()
            idx = torch.randint(0, R, (N, H, k)).cuda()
            bank = torch.randn(R, dz, dtype=torch.float64).to(dt).cuda().requires_grad_()
            proj = (torch.randn(H, dz, dv, dtype=torch.float64) / 16).to(dt).cuda().requires_grad_()
            out = midus_ops.hive_gather(w, idx, bank, proj)
            g = torch.randn_like(out)
            got = torch.autograd.grad(out, [w, bank, proj], g)
            ins = [t.detach().double().cpu().requires_grad_() for t in (w, bank, proj)]
            ref = hive_gather_ref(ins[0], idx.cpu(), ins[1], ins[2])
            assert_close(out, ref, dt, "out")
            for a, b in zip(got, torch.autograd.grad(ref, ins, g.double().cpu())):
                assert_close(a, b, dt, "grad")
    """)
    env = dict(os.environ, MIDUS_OPS_CUDA_FWD_TC_TILE=fwd_tile, MIDUS_OPS_CUDA_BWD_TC_TILE=bwd_tile)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
