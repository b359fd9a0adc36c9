"""Drop-in memory layers built on the two operators (docs/design.md §2)."""
from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import ops as _ops
from .options import MemoryOptions, check_bool, check_k, check_positive_int, check_tau
from .reference import accumulation_dtype

__all__ = ["HeadwiseMemoryLayer", "ProductKeyMemory", "MemoryOps", "MEMORY_OPS", "register_memory_ops",
           "set_memory_ops", "use_memory_ops", "RetrievalHook"]


class MemoryOps(NamedTuple):
    """The two operators a memory layer calls, with :func:`midus_ops.pk_topk`'s and
    :func:`midus_ops.hive_gather`'s signatures (``hive_gather`` takes ``deterministic`` and
    ``check_indices`` keywords)."""
    pk_topk: Callable
    hive_gather: Callable


# Implementations of the layers' operators by name, chosen per layer instance (``ops_implementation``),
# the way transformers picks an attention function per model: baselines (e.g. the benchmarks'
# eager PyTorch ops) register here instead of overwriting this module's names.
MEMORY_OPS: Dict[str, MemoryOps] = {"midus_ops": MemoryOps(_ops.pk_topk, _ops.hive_gather)}


def register_memory_ops(name: str, pk_topk: Callable, hive_gather: Callable) -> None:
    """Make ``name`` selectable as a layer's ``ops_implementation`` (replaces an earlier registration
    of the same name; "midus_ops" is the package's own and cannot be replaced). Raises ValueError."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if name == "midus_ops":
        raise ValueError("name 'midus_ops' is the package's own implementation and cannot be replaced")
    MEMORY_OPS[name] = MemoryOps(pk_topk, hive_gather)


def _check_ops_implementation(name: str) -> str:
    if name not in MEMORY_OPS:
        raise ValueError(f"ops_implementation must be one of {sorted(MEMORY_OPS)} (register_memory_ops adds more), "
                         f"got {name!r}")
    return name


def set_memory_ops(module: nn.Module, name: str) -> Dict[nn.Module, str]:
    """Set ``ops_implementation = name`` on every memory layer in ``module`` (itself included);
    returns each layer's previous value. Raises ValueError for an unregistered name."""
    _check_ops_implementation(name)
    previous = {}
    for m in module.modules():
        if isinstance(m, (HeadwiseMemoryLayer, ProductKeyMemory)):
            previous[m] = m.ops_implementation
            m.ops_implementation = name
    return previous


@contextmanager
def use_memory_ops(module: nn.Module, name: str) -> Iterator[nn.Module]:
    """Within the block the memory layers of ``module`` run the operators registered as ``name``;
    restored on exit (also on error)."""
    previous = set_memory_ops(module, name)
    try:
        yield module
    finally:
        for m, old in previous.items():
            m.ops_implementation = old


# hook(layer, q [N, H, d_k], scores [N, H, k], indices [N, H, k], weights [N, H, k]) -> None (look
# only) or (indices, weights): the retrieval the read-out uses instead.
RetrievalHook = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                         Optional[Tuple[torch.Tensor, torch.Tensor]]]


def _check_positive_ints(**values) -> tuple:
    """The values as Python ints, in order (:func:`midus_ops.options.check_positive_int`)."""
    return tuple(check_positive_int(name, v) for name, v in values.items())


def _check_token_mask(token_mask: Optional[torch.Tensor], lead: torch.Size, x: torch.Tensor) -> None:
    if token_mask is None:
        return
    if not isinstance(token_mask, torch.Tensor):
        raise TypeError(f"token_mask must be a torch.Tensor or None, got {type(token_mask).__name__}")
    if token_mask.shape != lead:
        raise ValueError(f"token_mask must have the input's leading shape {tuple(lead)}, got {tuple(token_mask.shape)}")
    if token_mask.device != x.device:
        raise ValueError(f"token_mask is on {token_mask.device} but the input is on {x.device}")


def _topk_weights(scores: torch.Tensor, tau, allow_16bit: bool = True) -> torch.Tensor:
    """softmax(scores / tau) over the last dim, computed in fp32 (fp64 for fp64). ``tau``: a float,
    or a tensor [H] of per-head temperatures for scores [N, H, k] (a learned temperature).

    Returned in fp32 (fp64), except in one case: bf16/fp16 CUDA scores that need no gradient
    with tau = 1 (inference, decode) give the weights in the scores' dtype straight from torch's
    CUDA softmax, which computes in fp32 and rounds once at the end: the same values as the fp32
    softmax rounded by the caller's ``.to``, in one kernel launch instead of three (cast, softmax,
    cast). Decode (docs/design.md §4) is launch-bound. With gradients (or ``allow_16bit=False``, while
    usage statistics record the weights) the fp32 path runs, so that the softmax backward and the
    statistics use the fp32 weights. Elsewhere softmax's ``dtype`` argument converts the
    input (as an explicit ``.to`` would) and tau = 1 skips the division.
    """
    sd = accumulation_dtype(scores.dtype)  # top-k weights in fp32 at least
    if isinstance(tau, torch.Tensor):
        return torch.softmax(scores.to(sd) / tau.to(sd).view(-1, 1), dim=-1)
    if (allow_16bit and tau == 1.0 and scores.is_cuda and not scores.requires_grad
            and scores.dtype in (torch.bfloat16, torch.float16)):
        return torch.softmax(scores, dim=-1)
    if tau != 1.0:
        scores = scores.to(sd) / tau
    return torch.softmax(scores, dim=-1, dtype=sd)


class _PerHeadRMSNorm(nn.Module):
    """RMSNorm over the last dim with a learnable scale per head: x [..., H, d] -> [..., H, d]."""

    def __init__(self, num_heads: int, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_heads, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class _InputDtypeLinear(nn.Linear):
    """nn.Linear computing in the input's dtype (the weight cast to it, as autocast would).

    The layers call it as a module rather than reading ``.weight`` in their own forward: hooks
    that materialise a module's weights for its forward (accelerate's offloading to CPU or disk)
    then see it; reading the weight of a submodule not called leaves it on the meta device."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class _UsageStats(nn.Module):
    """Slot-read counts and top-k weight entropy per head (Lample et al. 2019, sec. 4.3).

    Buffers are non-persistent: statistics are never written into a checkpoint.
    """

    def __init__(self, num_heads: int, num_slots: int):
        super().__init__()
        self.num_slots = num_slots
        self.register_buffer("slot_counts", torch.zeros(num_heads, num_slots, dtype=torch.float64), persistent=False)
        self.register_buffer("entropy_sum", torch.zeros(num_heads, dtype=torch.float64), persistent=False)
        self.register_buffer("tokens", torch.zeros((), dtype=torch.float64), persistent=False)

    @torch.no_grad()
    def update(self, indices: torch.Tensor, weights: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> None:
        """Record the reads of N tokens: ``indices``, ``weights`` [N, H, k]; ``token_mask`` [N]
        (bool, or 0/1 numbers) leaves out the tokens where it is False / 0 (padding), or None.

        The mask weighs the records instead of selecting rows: boolean indexing would read the
        number of rows on the host (a synchronisation on CUDA, and no CUDA-graph capture)."""
        self._writable()
        N, H, k = indices.shape
        offset = torch.arange(H, device=indices.device).view(1, H, 1) * self.num_slots
        flat = (indices.long() + offset).reshape(-1)
        w = weights.double()
        ent = -(w * torch.log(w.clamp_min(1e-30))).sum(-1)  # [N, H]
        if token_mask is None:
            self.slot_counts.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
            self.entropy_sum += ent.sum(0)
            self.tokens += N
            return
        keep = token_mask.reshape(N, 1) != 0
        self.slot_counts.view(-1).index_add_(0, flat, keep.expand(N, H * k).reshape(-1).double())
        # where, not a product: a padded row's weights may be NaN (a fully masked attention row)
        self.entropy_sum += torch.where(keep, ent, torch.zeros_like(ent)).sum(0)
        self.tokens += keep.sum()

    def _apply(self, fn, *args, **kwargs):
        # Model-wide casts (.half(), .to(torch.bfloat16)) move the statistics but keep their
        # dtypes: counts in bf16 would stop at 256.
        dtypes = {name: buf.dtype for name, buf in self._buffers.items()}
        super()._apply(fn, *args, **kwargs)
        for name, dtype in dtypes.items():
            if self._buffers[name] is not None and self._buffers[name].dtype != dtype:
                self._buffers[name] = self._buffers[name].to(dtype)
        return self

    def _writable(self) -> None:
        """Buffers allocated under ``torch.inference_mode()`` (a model loaded or built inside it)
        are inference tensors, which may not be updated in place outside that mode: replace them
        with normal copies first (host-side flags only, no synchronisation)."""
        if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
            return
        for name, buf in self._buffers.items():
            if buf is not None and buf.is_inference():
                self._buffers[name] = buf.clone()

    def reset(self) -> None:
        self._writable()
        self.slot_counts.zero_()
        self.entropy_sum.zero_()
        self.tokens.zero_()

    def summary(self) -> Dict[str, torch.Tensor]:
        counts = self.slot_counts
        total = counts.sum(-1, keepdim=True)
        p = counts / total.clamp_min(1)
        plogp = torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p)).sum(-1)
        empty = total.squeeze(-1) == 0
        nan = torch.full_like(plogp, float("nan"))
        return {
            "slot_usage": (counts > 0).double().mean(-1),
            # KL(p || uniform) = log R + sum_i p_i log p_i
            "kl_from_uniform": torch.where(empty, nan, math.log(self.num_slots) + plogp),
            "weight_entropy": torch.where(empty, nan, self.entropy_sum / self.tokens.clamp_min(1)),
            "tokens": self.tokens.clone(),
        }


def _check_options_kind(options, kind: str) -> None:
    if not isinstance(options, MemoryOptions):
        raise TypeError(f"options must be a midus_ops.MemoryOptions, got {type(options).__name__}")
    if options.memory != kind:
        raise ValueError(f"options.memory is {options.memory!r}, which is not this layer: pass "
                         f"MemoryOptions(memory={kind!r}, ...)")


def _check_hook_retrieval(idx: torch.Tensor, w: torch.Tensor, shape: torch.Size, slots: int) -> None:
    if not isinstance(idx, torch.Tensor) or not isinstance(w, torch.Tensor):
        raise TypeError("a retrieval hook must return None or (indices, weights) tensors")
    if idx.shape != shape or w.shape != shape:
        raise ValueError(f"a retrieval hook returned indices {tuple(idx.shape)} and weights {tuple(w.shape)}; "
                         f"both must be {tuple(shape)}")
    # The range check reads the values on the host (a synchronisation, a graph break under
    # torch.compile): skipped while compiling, where hive_gather's own index check still runs.
    if not torch.compiler.is_compiling() and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= slots):
        raise IndexError(f"a retrieval hook returned indices outside [0, {slots}) (n * n slots): "
                         f"min {int(idx.min())}, max {int(idx.max())}")


class _MemoryLayer(nn.Module):
    """What both memory layers share: the operator implementation, retrieval hooks, usage statistics."""

    def _init_common(self, num_heads: int, num_slots: int, deterministic: bool, ops_implementation: str) -> None:
        self.stats = _UsageStats(num_heads, num_slots)
        self.track_stats = True
        self.deterministic = check_bool("deterministic", deterministic)
        self.ops_implementation = _check_ops_implementation(ops_implementation)
        self._retrieval_hooks: Dict[int, RetrievalHook] = OrderedDict()

    def register_retrieval_hook(self, hook: RetrievalHook) -> RemovableHandle:
        """Call ``hook(layer, q, scores, indices, weights)`` in every forward, after the top-k and
        its softmax and before the read-out: q [N, H, d_k] (the queries, after ``query_norm``),
        scores / indices / weights [N, H, k] (weights fp32, or fp64 for fp64 input). Returning None
        leaves the retrieval as it is; returning ``(indices, weights)`` (same shapes; indices int64 in
        [0, n*n), checked) makes the read-out use them instead. Hooks run in registration order,
        each seeing the previous one's result. The usage statistics record the retrieval after the
        hooks. Returns a handle whose ``remove()`` unregisters the hook. Used by ``midus.analyze``."""
        if not callable(hook):
            raise TypeError(f"hook must be callable, got {type(hook).__name__}")
        handle = RemovableHandle(self._retrieval_hooks)
        self._retrieval_hooks[handle.id] = hook
        return handle

    def _retrieve(self, q: torch.Tensor, subkeys: torch.Tensor, token_mask: Optional[torch.Tensor]):
        """Top-k, weights, hooks, statistics: (ops, indices, weights, whether a hook replaced them)."""
        ops = MEMORY_OPS.get(self.ops_implementation)
        if ops is None:  # set by hand, or unpickled in a process that has not registered it
            _check_ops_implementation(self.ops_implementation)
        scores, idx = ops.pk_topk(q, subkeys, self.k)
        recording = self.track_stats and not self.training
        w = self.topk_weights(scores, allow_16bit=not recording and not self._retrieval_hooks)
        replaced = False
        for hook in tuple(self._retrieval_hooks.values()):  # a hook may remove or add hooks
            out = hook(self, q, scores, idx, w)
            if out is not None:
                idx, w = out
                replaced = True
        if replaced:  # before the statistics count them
            _check_hook_retrieval(idx, w, scores.shape, self.n * self.n)
        if recording:
            self.stats.update(idx, w, token_mask)
        return ops, idx, w, replaced

    def __setstate__(self, state):
        # Layers pickled by versions without these attributes (torch.save of a whole module).
        state.setdefault("_retrieval_hooks", OrderedDict())
        state.setdefault("ops_implementation", "midus_ops")
        super().__setstate__(state)

    def topk_weights(self, scores: torch.Tensor, allow_16bit: bool = False) -> torch.Tensor:
        """softmax(scores / tau) over the last dim of ``scores`` [N, H, k], in fp32 (fp64 for fp64);
        tau per head (``exp(log_tau)``) with ``learn_tau``. See :func:`_topk_weights` for the
        16-bit inference path that ``allow_16bit`` permits."""
        return _topk_weights(scores, self.tau if self.log_tau is None else self.log_tau.exp(), allow_16bit)

    def memory_stats(self) -> Dict[str, torch.Tensor]:
        """Usage since the last reset, per head (Lample et al. 2019, sec. 4.3).

        Returns a dict of float64 tensors: ``slot_usage`` [H] fraction of the n*n slots read at
        least once; ``kl_from_uniform`` [H] KL divergence (nats) of the slot-read distribution from
        uniform; ``weight_entropy`` [H] mean entropy (nats) of the top-k softmax weights;
        ``tokens`` [] tokens recorded. NaN where nothing has been recorded.
        """
        return self.stats.summary()

    def reset_memory_stats(self) -> None:
        self.stats.reset()

    def _extra(self) -> str:
        return ((", learn_tau=True" if self.log_tau is not None else "")
                + (", deterministic=True" if self.deterministic else "")
                + (f", ops_implementation={self.ops_implementation!r}" if self.ops_implementation != "midus_ops" else ""))


class HeadwiseMemoryLayer(_MemoryLayer):
    """Head-wise Memory Layer (HML) with Head-wise Implicit Value Expansion (HIVE).

    MIDUS (arXiv 2512.13751) sec. 3; docs/design.md §2.1. Every attention head queries its own
    product-key space with its own output, reads k slots of one shared latent bank, and projects
    the weighted read through its own matrix::

        q = norm(o)                               [..., H, d_h]
        scores, idx = pk_topk(q, subkeys, k)      [..., H, k]
        w = softmax(scores / tau)                 (fp32)
        r = hive_gather(w, idx, bank, proj)       [..., H, d_h]

    Args:
        num_heads: H.
        head_dim: d_h (even): the query width and the output width.
        n: sub-keys per half; each head addresses n * n slots. [project] default 32.
        k: slots read per (token, head), 1 <= k <= n. [project] default 16.
        d_z: width of the shared latent bank. [project] default 256.
        tau: softmax temperature (> 0). Default 1.
        query_norm: "none" (default, as in the paper) or "rms" (per-head learnable RMSNorm).
        learn_tau: if True, each head learns its own temperature: a parameter ``log_tau`` [H]
            initialised at log(tau) (as CLIP learns its logit scale), so a head can sharpen or
            flatten its top-k weights. Default False (the fixed ``tau``).
        deterministic: ``hive_gather``'s deterministic mode (bitwise reproducible backward). False.
        ops_implementation: which registered operators run (:data:`MEMORY_OPS`; "midus_ops").

    The defaults are :class:`~midus_ops.MemoryOptions`'s; :meth:`from_options` builds the layer
    from one. :meth:`register_retrieval_hook` lets analyses look at or replace the retrieval.

    Parameters: ``subkeys`` [H, 2, n, d_h/2] ~ N(0, 1/d_h); ``bank`` [n*n, d_z] = 0;
    ``proj`` [H, d_z, d_h] ~ N(0, 1/d_z) (and ``log_tau`` [H] with ``learn_tau``). With the zero bank the layer outputs zeros, so a block
    ``x + HML(...)`` starts as the identity while the bank still gets gradients.

    Raises ValueError (naming the argument) for non-positive sizes, odd head_dim, k outside
    [1, n], tau not a positive finite number, an unknown query_norm, or an input not [..., H, d_h].

    The computation runs in the dtype of the input (parameters are cast to it, like autocast
    would for a Linear). Usage statistics are recorded in eval mode while ``track_stats`` is
    True, for the tokens of ``token_mask`` when given (:meth:`forward`); see :meth:`memory_stats`.
    """

    def __init__(self, num_heads: int, head_dim: int, n: int = MemoryOptions.n, k: int = MemoryOptions.k,
                 d_z: int = MemoryOptions.d_z, tau: float = MemoryOptions.tau,
                 query_norm: str = MemoryOptions.query_norm, learn_tau: bool = MemoryOptions.learn_tau,
                 deterministic: bool = MemoryOptions.deterministic, ops_implementation: str = "midus_ops"):
        super().__init__()
        num_heads, head_dim = _check_positive_ints(num_heads=num_heads, head_dim=head_dim)
        # the retrieval options are validated where they are owned
        opts = MemoryOptions(n=n, k=k, d_z=d_z, tau=tau, query_norm=query_norm, learn_tau=learn_tau,
                             deterministic=deterministic)
        if head_dim % 2:
            raise ValueError(f"head_dim must be even (the query is split in two halves), got {head_dim}")
        n, k, d_z = opts.n, opts.k, opts.d_z
        self.num_heads, self.head_dim, self.n, self.k, self.d_z = num_heads, head_dim, n, k, d_z
        self.tau, self.query_norm_kind = opts.tau, opts.query_norm
        self.subkeys = nn.Parameter(torch.empty(num_heads, 2, n, head_dim // 2))
        self.bank = nn.Parameter(torch.empty(n * n, d_z))
        self.proj = nn.Parameter(torch.empty(num_heads, d_z, head_dim))
        self.query_norm = _PerHeadRMSNorm(num_heads, head_dim) if opts.query_norm == "rms" else None
        self.log_tau = nn.Parameter(torch.empty(num_heads)) if opts.learn_tau else None
        self._init_common(num_heads, n * n, opts.deterministic, ops_implementation)
        self.reset_parameters()

    @classmethod
    def from_options(cls, num_heads: int, head_dim: int, options: MemoryOptions, **kwargs) -> "HeadwiseMemoryLayer":
        """The layer of ``options`` (its n, k, d_z, tau, query_norm, learn_tau, deterministic)."""
        _check_options_kind(options, "hml")
        return cls(num_heads, head_dim, n=options.n, k=options.k, d_z=options.d_z, tau=options.tau,
                   query_norm=options.query_norm, learn_tau=options.learn_tau,
                   deterministic=options.deterministic, **kwargs)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.subkeys, std=1.0 / math.sqrt(self.head_dim))
        nn.init.zeros_(self.bank)
        nn.init.normal_(self.proj, std=1.0 / math.sqrt(self.d_z))
        if self.query_norm is not None:
            nn.init.ones_(self.query_norm.weight)
        if self.log_tau is not None:
            nn.init.constant_(self.log_tau, math.log(self.tau))

    def forward(self, o: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """o: [..., H, d_h] per-head attention outputs (before any output projection).
        token_mask: optional [...] (bool, or 0/1 numbers): the tokens the usage statistics count,
        e.g. the attention mask, so that padding is not counted; the output is the same either way.
        Returns r: [..., H, d_h], dtype of ``o``. Raises ValueError for a wrong input or mask shape."""
        if o.dim() < 2 or o.shape[-2:] != (self.num_heads, self.head_dim):
            raise ValueError(f"HeadwiseMemoryLayer expects input [..., {self.num_heads}, {self.head_dim}] "
                             f"(heads, head_dim), got {tuple(o.shape)}")
        lead = o.shape[:-2]
        _check_token_mask(token_mask, lead, o)
        q = o.reshape(-1, self.num_heads, self.head_dim)
        if self.query_norm is not None:
            q = self.query_norm(q)
        dt = q.dtype
        ops, idx, w, replaced = self._retrieve(q, self.subkeys.to(dt), token_mask)
        # Indices from pk_topk are in [0, n*n) by construction: no host-side range check (on CUDA
        # a synchronisation, which would also break CUDA graph capture). A hook's are checked.
        r = ops.hive_gather(w.to(dt), idx, self.bank.to(dt), self.proj.to(dt), deterministic=self.deterministic,
                            check_indices=replaced)
        return r.reshape(*lead, self.num_heads, self.head_dim)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, n={self.n}, k={self.k}, "
                f"d_z={self.d_z}, tau={self.tau}, query_norm={self.query_norm_kind!r}" + self._extra())


class ProductKeyMemory(_MemoryLayer):
    """Multi-head product-key memory over the full hidden state (Lample et al. 2019).

    docs/design.md §2.2, the "MIDUS-PKM" ablation and a drop-in FFN replacement::

        q = Linear(d -> H_m * d_k)(x)             [N, H_m, d_k]
        scores, idx = pk_topk(q, subkeys, k)      per memory head
        w = softmax(scores / tau)
        out = sum_h hive_gather(w, idx, values)   one shared value table [n*n, d_out]

    Args:
        d_model: input width d.
        num_heads: memory heads H_m. [project] default 4.
        n: sub-keys per half (n * n slots). [project] default 32.
        k: slots read per head. [project] default 16.
        d_k: query width per head (even). [project] default 128.
        d_out: value width, default ``d_model``.
        tau: softmax temperature.
        learn_tau: a learned temperature per memory head (``log_tau`` [H_m], initialised at
            log(tau)), as for :class:`HeadwiseMemoryLayer`. Default False.
        value_init: "normal" (N(0, 1/d_out), Lample et al.) or "zeros" (identity at insertion,
            as MIDUS's up-scaling uses).

    Input x [..., d] -> output [..., d_out], dtype of x. No query BatchNorm is offered.
    Raises ValueError (naming the argument) for non-positive sizes, odd d_k, k outside [1, n],
    tau not a positive finite number, an unknown value_init, or an input whose last dim is not d.
    """

    def __init__(self, d_model: int, num_heads: int = MemoryOptions.pkm_heads, n: int = MemoryOptions.n,
                 k: int = MemoryOptions.k, d_k: int = MemoryOptions.pkm_d_k, d_out: Optional[int] = None,
                 tau: float = MemoryOptions.tau, value_init: str = "normal", learn_tau: bool = MemoryOptions.learn_tau,
                 deterministic: bool = MemoryOptions.deterministic, ops_implementation: str = "midus_ops"):
        super().__init__()
        d_out = d_model if d_out is None else d_out
        d_model, num_heads, n, k, d_k, d_out = _check_positive_ints(d_model=d_model, num_heads=num_heads, n=n, k=k,
                                                                    d_k=d_k, d_out=d_out)
        tau = check_tau(tau)
        learn_tau = check_bool("learn_tau", learn_tau)
        if d_k % 2:
            raise ValueError(f"d_k must be even, got {d_k}")
        check_k(k, n)
        if value_init not in ("normal", "zeros"):
            raise ValueError(f"value_init must be 'normal' or 'zeros', got {value_init!r}")
        self.d_model, self.num_heads, self.n, self.k, self.d_k, self.d_out = d_model, num_heads, n, k, d_k, d_out
        self.tau, self.value_init = float(tau), value_init
        self.query = _InputDtypeLinear(d_model, num_heads * d_k, bias=False)
        self.subkeys = nn.Parameter(torch.empty(num_heads, 2, n, d_k // 2))
        self.values = nn.Parameter(torch.empty(n * n, d_out))
        self.log_tau = nn.Parameter(torch.empty(num_heads)) if learn_tau else None
        self._init_common(num_heads, n * n, deterministic, ops_implementation)
        self.reset_parameters()

    @classmethod
    def from_options(cls, d_model: int, options: MemoryOptions, **kwargs) -> "ProductKeyMemory":
        """The layer of ``options`` (its pkm_heads, n, k, pkm_d_k, tau, learn_tau, deterministic);
        ``kwargs``: d_out, value_init, ops_implementation."""
        _check_options_kind(options, "pkm")
        return cls(d_model, num_heads=options.pkm_heads, n=options.n, k=options.k, d_k=options.pkm_d_k,
                   tau=options.tau, learn_tau=options.learn_tau, deterministic=options.deterministic, **kwargs)

    def reset_parameters(self) -> None:
        self.query.reset_parameters()
        nn.init.normal_(self.subkeys, std=1.0 / math.sqrt(self.d_k))
        if self.value_init == "zeros":
            nn.init.zeros_(self.values)
        else:
            nn.init.normal_(self.values, std=1.0 / math.sqrt(self.d_out))
        if self.log_tau is not None:
            nn.init.constant_(self.log_tau, math.log(self.tau))

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [..., d]; token_mask: optional [...], the tokens the usage statistics count (see
        :meth:`HeadwiseMemoryLayer.forward`). Returns [..., d_out], dtype of ``x``."""
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"ProductKeyMemory expects input [..., {self.d_model}], got {tuple(x.shape)}")
        lead = x.shape[:-1]
        _check_token_mask(token_mask, lead, x)
        dt = x.dtype
        q = self.query(x.reshape(-1, self.d_model)).view(-1, self.num_heads, self.d_k)
        ops, idx, w, replaced = self._retrieve(q, self.subkeys.to(dt), token_mask)
        # Summing heads equals one bag of H_m * k rows per token: no [N, H_m, d_out] intermediate.
        N = q.shape[0]
        bag = self.num_heads * self.k
        out = ops.hive_gather(w.to(dt).reshape(N, 1, bag), idx.reshape(N, 1, bag), self.values.to(dt), None,
                              deterministic=self.deterministic, check_indices=replaced)  # pk_topk's: in range
        return out.reshape(*lead, self.d_out)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_heads={self.num_heads}, n={self.n}, k={self.k}, d_k={self.d_k}, "
                f"d_out={self.d_out}, tau={self.tau}" + self._extra())
