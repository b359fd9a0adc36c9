"""The public memory operators: input checks, fake (meta) kernels and autograd.

The op schemas and kernels live in C++ (``csrc/``, ``TORCH_LIBRARY(midus_ops, ...)``). This module
registers what the compiler and autograd need (``register_fake``, ``register_autograd``), as
pytorch/extension-cpp does. When the extension cannot load, or has no kernel for a device, the
public functions run the pure-PyTorch reference instead (``midus_ops.reference``).
"""
from __future__ import annotations

import operator
import os
import warnings
from typing import Optional, Tuple

import torch

from .reference import hive_gather_ref, pk_topk_ref

__all__ = ["pk_topk", "hive_gather", "EXTENSION_AVAILABLE", "EXTENSION_ERROR", "MidusExtensionWarning",
           "has_kernel", "BUILD_INFO"]


class MidusExtensionWarning(RuntimeWarning):
    """The compiled extension ``midus_ops._C`` could not be used; the reference runs instead."""


# The argument names of each op's schema, as csrc/midus_ops.cpp defines them and this file calls them.
_SCHEMAS = {
    "pk_topk": ("q", "subkeys", "k"),
    "pk_topk_backward": ("grad_scores", "q", "subkeys", "indices", "need_q", "need_subkeys", "check_indices"),
    "hive_gather": ("weights", "indices", "bank", "proj", "deterministic", "check_indices"),
    "hive_gather_backward": ("grad_out", "weights", "indices", "bank", "proj", "deterministic", "need_weights",
                             "need_bank", "need_proj", "check_indices"),
}


def _schema_problems() -> Optional[str]:
    """What is wrong with the ops the loaded extension registered, or None."""
    problems = []
    for op, names in _SCHEMAS.items():
        try:
            schema = getattr(torch.ops.midus_ops, op).default._schema
        except (AttributeError, RuntimeError):
            problems.append(f"no midus_ops::{op}")
            continue
        got = tuple(a.name for a in schema.arguments)
        if got != names:
            problems.append(f"midus_ops::{op}({', '.join(got)}) where ({', '.join(names)}) is expected")
    return "; ".join(problems) or None


def _shadowed_build() -> Optional[str]:
    """Another ``midus_ops`` folder on ``sys.path`` that holds a built ``_C``, hidden by this one:
    what a user meets running Python from the repository root, whose source folder (without the
    extension, which ``pip install .`` put into site-packages) is found first."""
    import glob
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        other = os.path.abspath(os.path.join(entry or os.getcwd(), "midus_ops"))
        if other != here and (glob.glob(os.path.join(other, "_C*.so")) or glob.glob(os.path.join(other, "_C*.pyd"))):
            return other
    return None


def _load_extension() -> Optional[str]:
    if os.environ.get("MIDUS_OPS_DISABLE_EXTENSION", "") not in ("", "0"):
        return "disabled by MIDUS_OPS_DISABLE_EXTENSION"
    import importlib.util
    try:
        if importlib.util.find_spec(f"{__package__}._C") is None:
            other = _shadowed_build()
            if other:
                return (f"this is the source folder {os.path.dirname(os.path.abspath(__file__))}, which hides the "
                        f"installed midus_ops with its extension at {other}: run Python from another directory "
                        f"(not the repository root)")
            return f"not built: no {__package__}/_C*.so beside {os.path.dirname(__file__)}/__init__.py"
        from . import _C  # (loading it registers torch.ops.midus_ops.*)
    except Exception as e:  # e.g. built against another torch: undefined symbols
        return f"{type(e).__name__}: {e}"
    # A module that loads but registers other ops (a stale build of an older midus_ops, or a
    # foreign one) would crash the registrations below: fall back instead, saying what is wrong.
    problems = _schema_problems()
    if problems:
        return (f"{getattr(_C, '__file__', _C)} loaded but does not register the ops of this midus_ops (a stale "
                f"or foreign build): {problems}")
    return None


EXTENSION_ERROR: Optional[str] = _load_extension()
EXTENSION_AVAILABLE: bool = EXTENSION_ERROR is None
if not EXTENSION_AVAILABLE:
    warnings.warn(
        f"midus_ops: the compiled extension midus_ops._C is not available ({EXTENSION_ERROR}); "
        f"pk_topk and hive_gather fall back to the slow pure-PyTorch reference."
        + ("" if "hides the installed" in EXTENSION_ERROR else
           f" Rebuild with `pip install --no-build-isolation .` against the torch you run ({torch.__version__})."),
        MidusExtensionWarning,
        stacklevel=2,
    )



def _build_info() -> Optional[dict]:
    """What setup.py built the loaded extension with (csrc/build_info.cpp), or None without one."""
    if not EXTENSION_AVAILABLE:
        return None
    import ctypes
    import json

    from . import _C
    try:
        fn = ctypes.CDLL(_C.__file__).midus_ops_build_info  # the already loaded library, not a second copy
    except (OSError, AttributeError):  # built before the build info existed
        return None
    fn.restype = ctypes.c_char_p
    return json.loads(fn().decode())


# The build of the loaded extension: with_cuda (CUDA kernels compiled in), requested (MIDUS_BUILD),
# why, cuda_arch_list, torch and torch_cuda (built against), cuda_home, cuda_toolkit, max_jobs.
# None when the extension is not loaded.
BUILD_INFO: Optional[dict] = _build_info()

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)


# The CUDA kernels compile (CI proves it) but have not yet run on a GPU: until a GPU run has
# validated them, the public ops use them only when MIDUS_OPS_CUDA_KERNELS=1 and otherwise run the
# reference on CUDA tensors. (torch.ops.midus_ops.* always dispatches to them.)
CUDA_KERNELS_SETTING: str = os.environ.get("MIDUS_OPS_CUDA_KERNELS", "")  # as given (benchmarks record it)
CUDA_KERNELS_ENABLED: bool = CUDA_KERNELS_SETTING not in ("", "0")

# The CUDA pk_topk kernel's limits, as the extension was built with them (csrc/limits.h): beyond
# them the public op runs the reference on CUDA tensors (the direct op raises an error naming k or
# n). None without the extension (every op then runs the reference anyway).
def _extension_constant(name: str) -> Optional[int]:
    if not EXTENSION_AVAILABLE:
        return None
    from . import _C
    return getattr(_C, name, None)  # None: a build older than the constant (its kernels are then not used)


CUDA_PK_TOPK_MAX_K: Optional[int] = _extension_constant("CUDA_PK_TOPK_MAX_K")
CUDA_PK_TOPK_MAX_N: Optional[int] = _extension_constant("CUDA_PK_TOPK_MAX_N")

# Which (op, device type) pairs have a compiled kernel, read once: a plain dict lookup is what
# torch.compile can trace (the dispatcher query itself would break the graph).
_KERNELS = {
    (op, dev): EXTENSION_AVAILABLE and (dev != "cuda" or CUDA_KERNELS_ENABLED)
    and torch._C._dispatch_has_kernel_for_dispatch_key(f"midus_ops::{op}", key)
    for op in ("pk_topk", "pk_topk_backward", "hive_gather", "hive_gather_backward")
    for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"), ("meta", "Meta"))
}


def has_kernel(op_name: str, device: torch.device) -> bool:
    """True when the compiled extension has a kernel of ``midus_ops::<op_name>`` for ``device``
    (e.g. "pk_topk", "hive_gather_backward"); elsewhere the public op runs the reference."""
    return _KERNELS.get((op_name, device.type), False)


def _check(cond: bool, msg: str, exc=ValueError) -> None:
    if not cond:
        raise exc(msg)


def _check_float(name: str, t: torch.Tensor) -> None:
    _check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    _check(t.dtype in _FLOAT_DTYPES,
           f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}", TypeError)


def _check_same_device(**tensors: torch.Tensor) -> None:
    items = list(tensors.items())
    name0, t0 = items[0]
    for name, t in items[1:]:
        _check(t.device == t0.device,
               f"{name} is on {t.device} but {name0} is on {t0.device}: all inputs must be on one device")


# --------------------------------------------------------------------------------------------
# pk_topk
# --------------------------------------------------------------------------------------------
def pk_topk(q: torch.Tensor, subkeys: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Product-key scoring and top-k, per head (docs/design.md §1.1; Lample et al. 2019, sec. 3.2).

    For each token t and head h, with q[t, h] = [q1; q2] split in halves: s1 = K1_h q1 and
    s2 = K2_h q2 (n scores each), the top-k of each, and the top-k of the k*k candidate sums.

    Args:
        q: [N, H, d_k] queries (d_k even); float32, float64, bfloat16 or float16.
        subkeys: [H, 2, n, d_k / 2] sub-keys, same dtype and device as ``q``.
        k: memories per (token, head), an int with 1 <= k <= n.

    Returns:
        scores: [N, H, k], dtype of ``q``, sorted descending (computed with fp32 accumulation).
        indices: [N, H, k] int64, a * n + b in [0, n * n). Ties go to the lower index.

    Gradients flow to ``q`` and ``subkeys`` through the selected sub-key scores only.

    On CUDA the compiled kernel handles k <= 64 and n <= 4096; larger shapes run the reference.

    Raises:
        TypeError: a non-tensor, a non-float dtype, ``q``/``subkeys`` dtypes differ, ``k`` not int.
        ValueError: wrong ranks, odd d_k, H or d_k mismatch, k outside [1, n], mixed devices.
    """
    _check_float("q", q)
    _check_float("subkeys", subkeys)
    _check(q.dim() == 3, f"q must have shape [N, H, d_k], got {tuple(q.shape)}")
    _check(subkeys.dim() == 4 and subkeys.shape[1] == 2,
           f"subkeys must have shape [H, 2, n, d_k / 2], got {tuple(subkeys.shape)}")
    _check(q.dtype == subkeys.dtype, f"q is {q.dtype} but subkeys is {subkeys.dtype}: use one dtype", TypeError)
    _check_same_device(q=q, subkeys=subkeys)
    N, H, d_k = q.shape
    _check(d_k % 2 == 0 and d_k > 0, f"q: d_k must be even and positive, got d_k = {d_k}")
    _check(subkeys.shape[0] == H, f"subkeys has {subkeys.shape[0]} heads but q has H = {H}")
    _check(subkeys.shape[3] == d_k // 2,
           f"subkeys has sub-key width {subkeys.shape[3]} but q has d_k / 2 = {d_k // 2}")
    _check(not isinstance(k, bool) and hasattr(type(k), "__index__"), f"k must be an int, got {type(k).__name__}",
           TypeError)
    k = operator.index(k)  # numpy and other integer types: the op schema takes a Python int
    n = subkeys.shape[2]
    _check(1 <= k <= n, f"k must satisfy 1 <= k <= n = {n} (subkeys.shape[2]), got k = {k}")
    if has_kernel("pk_topk", q.device) and (q.device.type != "cuda" or (
            CUDA_PK_TOPK_MAX_K is not None and k <= CUDA_PK_TOPK_MAX_K and n <= CUDA_PK_TOPK_MAX_N)):
        return torch.ops.midus_ops.pk_topk(q, subkeys, k)
    return pk_topk_ref(q, subkeys, k)


# --------------------------------------------------------------------------------------------
# hive_gather
# --------------------------------------------------------------------------------------------
def hive_gather(
    weights: torch.Tensor,
    indices: torch.Tensor,
    bank: torch.Tensor,
    proj: Optional[torch.Tensor] = None,
    *,
    deterministic: bool = False,
    check_indices: bool = True,
) -> torch.Tensor:
    """Weighted gather from a shared latent bank and per-head projection (docs/design.md §1.2).

    u[t, h] = sum_j weights[t, h, j] * bank[indices[t, h, j]] (EmbeddingBag "sum" with per-sample
    weights) and out[t, h] = u[t, h] @ proj[h]: Head-wise Implicit Value Expansion (HIVE, MIDUS
    sec. 3), where head h's value of slot i is bank[i] @ proj[h] and is never materialised.

    Args:
        weights: [N, H, k] per-sample weights, same dtype as ``bank``.
        indices: [N, H, k] int32 or int64, each in [0, R).
        bank: [R, d_z] shared latent bank; float32, float64, bfloat16 or float16.
        proj: [H, d_z, d_v] per-head projections (linear, no bias), or None (d_v = d_z).
        deterministic: bitwise-identical gradients run to run; also implied by
            ``torch.use_deterministic_algorithms(True)``. (The CPU kernels always are.)
        check_indices: True (default) checks every index before reading; on CUDA that is a
            host-side check, i.e. a stream synchronisation (skipped while a CUDA graph is being
            captured). False means the caller guarantees 0 <= indices < R, as for indices from
            :func:`pk_topk` with R = n * n (the layers pass False): no synchronisation then, with
            the CUDA kernels or the reference, and a bad index fails as an asynchronous
            device-side assert instead of an IndexError. The CPU kernels check either way (the
            CPU reference leaves it to ``F.embedding``: an IndexError).

    Returns:
        out: [N, H, d_v], dtype of ``bank``; sums are accumulated in fp32 (fp64 for fp64).

    Gradients for ``weights``, ``bank`` and ``proj`` are computed only where needed; the bank
    gradient is a scatter-add over ``indices``.

    Raises:
        TypeError: non-float weights/bank/proj, dtypes that differ, non-integer indices.
        ValueError: shape mismatches, mixed devices.
        IndexError / RuntimeError: an index < 0 or >= R (message names ``indices``).
    """
    _check_float("weights", weights)
    _check_float("bank", bank)
    _check(isinstance(indices, torch.Tensor), "indices must be a torch.Tensor", TypeError)
    _check(indices.dtype in _INDEX_DTYPES, f"indices must be int32 or int64, got {indices.dtype}", TypeError)
    _check(weights.dim() == 3, f"weights must have shape [N, H, k], got {tuple(weights.shape)}")
    _check(indices.shape == weights.shape,
           f"indices has shape {tuple(indices.shape)} but weights has {tuple(weights.shape)}: they must match")
    _check(bank.dim() == 2, f"bank must have shape [R, d_z], got {tuple(bank.shape)}")
    _check(weights.dtype == bank.dtype, f"weights is {weights.dtype} but bank is {bank.dtype}: use one dtype",
           TypeError)
    devices = dict(weights=weights, indices=indices, bank=bank)
    if proj is not None:
        _check_float("proj", proj)
        _check(proj.dim() == 3, f"proj must have shape [H, d_z, d_v], got {tuple(proj.shape)}")
        _check(proj.shape[0] == weights.shape[1],
               f"proj has {proj.shape[0]} heads but weights has H = {weights.shape[1]}")
        _check(proj.shape[1] == bank.shape[1],
               f"proj has d_z = {proj.shape[1]} but bank has d_z = {bank.shape[1]}")
        _check(proj.dtype == bank.dtype, f"proj is {proj.dtype} but bank is {bank.dtype}: use one dtype", TypeError)
        devices["proj"] = proj
    _check_same_device(**devices)
    _check(bank.shape[0] > 0 or indices.numel() == 0, "bank has no rows (R = 0) but indices is not empty")
    deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    if has_kernel("hive_gather", bank.device):
        return torch.ops.midus_ops.hive_gather(weights, indices, bank, proj, deterministic, bool(check_indices))
    return hive_gather_ref(weights, indices, bank, proj, check_indices=bool(check_indices))


# --------------------------------------------------------------------------------------------
# Fake kernels and autograd for the compiled ops
# --------------------------------------------------------------------------------------------
if EXTENSION_AVAILABLE:

    @torch.library.register_fake("midus_ops::pk_topk")
    def _pk_topk_fake(q, subkeys, k):
        N, H, _ = q.shape
        return q.new_empty((N, H, k)), q.new_empty((N, H, k), dtype=torch.int64)

    @torch.library.register_fake("midus_ops::pk_topk_backward")
    def _pk_topk_backward_fake(grad_scores, q, subkeys, indices, need_q, need_subkeys, check_indices=True):
        return (q.new_empty(q.shape) if need_q else q.new_empty((0,)),
                subkeys.new_empty(subkeys.shape) if need_subkeys else subkeys.new_empty((0,)))

    @torch.library.register_fake("midus_ops::hive_gather")
    def _hive_gather_fake(weights, indices, bank, proj, deterministic, check_indices=True):
        N, H, _ = weights.shape
        d_v = bank.shape[1] if proj is None else proj.shape[2]
        return bank.new_empty((N, H, d_v))

    @torch.library.register_fake("midus_ops::hive_gather_backward")
    def _hive_gather_backward_fake(grad_out, weights, indices, bank, proj, deterministic,
                                   need_weights, need_bank, need_proj, check_indices=True):
        empty = bank.new_empty((0,))
        return (weights.new_empty(weights.shape) if need_weights else empty,
                bank.new_empty(bank.shape) if need_bank else empty,
                proj.new_empty(proj.shape) if (need_proj and proj is not None) else empty)

    def _pk_topk_setup(ctx, inputs, output):
        q, subkeys, _ = inputs
        ctx.save_for_backward(q, subkeys, output[1])

    def _pk_topk_backward(ctx, grad_scores, grad_indices):
        q, subkeys, indices = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_q or need_k):
            return None, None, None
        # check_indices=False: the indices are the forward's own output (saved, so an in-place
        # change would fail autograd's version check), in range by construction: no synchronisation.
        gq, gk = torch.ops.midus_ops.pk_topk_backward(grad_scores, q, subkeys, indices, need_q, need_k, False)
        return (gq if need_q else None), (gk if need_k else None), None

    torch.library.register_autograd("midus_ops::pk_topk", _pk_topk_backward, setup_context=_pk_topk_setup)

    def _hive_gather_setup(ctx, inputs, output):
        weights, indices, bank, proj, deterministic = inputs[:5]  # (and check_indices)
        ctx.has_proj = proj is not None
        ctx.deterministic = deterministic
        ctx.save_for_backward(weights, indices, bank, proj)

    def _hive_gather_backward(ctx, grad_out):
        weights, indices, bank, proj = ctx.saved_tensors
        need_w, _, need_bank, need_proj = ctx.needs_input_grad[:4]
        need_proj = bool(need_proj) and ctx.has_proj
        if not (need_w or need_bank or need_proj):
            return None, None, None, None, None, None
        # check_indices=False: the forward already checked these indices (or its caller vouched
        # for them), and autograd's version check rules out a change since.
        gw, gb, gp = torch.ops.midus_ops.hive_gather_backward(
            grad_out, weights, indices, bank, proj, ctx.deterministic, need_w, need_bank, need_proj, False)
        return (gw if need_w else None), None, (gb if need_bank else None), (gp if need_proj else None), None, None

    torch.library.register_autograd("midus_ops::hive_gather", _hive_gather_backward,
                                    setup_context=_hive_gather_setup)

    # No second-order gradients: differentiating a backward op raises instead of returning
    # silently wrong zeros (what an op without autograd would give under create_graph=True).
    def _no_double_backward(op):
        def setup(ctx, inputs, output):
            pass

        def backward(ctx, *grads):
            raise RuntimeError(f"midus_ops: double backward through {op} is not supported "
                               f"(the first-order gradients are; use the reference ops for higher orders)")
        return backward, setup

    for _op in ("pk_topk_backward", "hive_gather_backward"):
        _bw, _setup = _no_double_backward(_op)
        torch.library.register_autograd(f"midus_ops::{_op}", _bw, setup_context=_setup)
