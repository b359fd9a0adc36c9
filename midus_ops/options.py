"""The memory options, owned in one place: :class:`MemoryOptions` (defaults and validation).

The layers (:class:`~midus_ops.HeadwiseMemoryLayer`, :class:`~midus_ops.ProductKeyMemory`) take
their defaults from it and validate through it; ``midus.MidusConfig`` stores its fields;
``midus.upscale(..., memory=MemoryOptions(...))`` and the ``midus`` command build one. This module
imports no torch.

Sources of the defaults: docs/design.md §2.1 (marked [project] there: the paper leaves them open)
and §3.1 (the memory block).
"""
from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

__all__ = ["MemoryOptions", "OptionsMixin", "check_positive_int", "check_tau", "check_bool"]

MEMORY_KINDS = ("hml", "pkm")
OUT_PROJ = ("none", "copy")
QUERY_NORMS = ("none", "rms")


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as a Python int; integer types such as numpy's are accepted (and converted, so
    configs stay JSON), bools and floats are not. Raises ValueError naming ``name``."""
    try:
        i = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        i = None
    if i is None or i < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(i)


def check_tau(tau: Any, name: str = "tau") -> float:
    """A positive finite float. Raises ValueError naming ``name``."""
    try:
        t = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {tau!r}") from None
    if not t > 0 or math.isinf(t):
        raise ValueError(f"{name} must be a positive finite number, got {tau!r}")
    return t


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_k(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= n = {n}, got k = {k}")


class OptionsMixin:
    """Shared by the frozen options dataclasses (:class:`MemoryOptions`, ``midus.lesa.LesaOptions``):
    building from a mapping, back to a dict, a changed copy. ``_kind`` names them in errors."""

    _kind = "options"

    @classmethod
    def fields(cls) -> tuple:
        """The field names, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, options: Optional[Mapping[str, Any]] = None, **more: Any):
        """From a mapping of fields (e.g. a saved config's record), missing ones at their defaults.
        Raises TypeError naming unknown fields, ValueError naming a bad value."""
        opts = {**(options or {}), **more}
        unknown = set(opts) - set(cls.fields())
        if unknown:
            raise TypeError(f"unknown {cls._kind} option(s) {sorted(unknown)}; known options: {sorted(cls.fields())}")
        return cls(**opts)

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any):
        """A copy with ``changes`` applied (validated). Raises TypeError naming unknown fields."""
        return type(self).from_dict(self.to_dict(), **changes)


@dataclass(frozen=True)
class MemoryOptions(OptionsMixin):
    """The options of a memory layer and of a MIDUS memory block (immutable; validated on creation).

    Fields:
        memory: "hml" (:class:`~midus_ops.HeadwiseMemoryLayer` over the heads' outputs) or "pkm"
            (:class:`~midus_ops.ProductKeyMemory` over the hidden state).
        out_proj: HML in a MIDUS block: "none" (the paper: read-outs added as they are) or "copy"
            (a clone of the source layer's o_proj after the memory). "pkm" takes "none" only.
        n: sub-keys per half; each head addresses n * n slots. [project] 32.
        k: slots read per (token, head), 1 <= k <= n. [project] 16.
        d_z: HML latent bank width. [project] 256.
        tau: softmax temperature of the top-k weights (> 0, finite). 1.
        query_norm: HML query normalisation, "none" (the paper) or "rms" (per-head RMSNorm).
        learn_tau: a learned temperature per head (``log_tau``, initialised at log(tau)). False.
        pkm_heads: PKM memory heads. [project] 4.
        pkm_d_k: PKM query width per head. [project] 128.
        deterministic: ``hive_gather``'s deterministic mode (the backward's bank gradient summed in
            a fixed order: bitwise reproducible, slower on CUDA; docs/design.md §1.2). False.

    Raises ValueError naming the field for a bad value and TypeError for an unknown field
    (:meth:`from_dict`, the constructor). ``dataclasses.replace(opts, k=8)`` makes a changed copy.
    """

    _kind = "memory"

    memory: str = "hml"
    out_proj: str = "none"
    n: int = 32
    k: int = 16
    d_z: int = 256
    tau: float = 1.0
    query_norm: str = "none"
    learn_tau: bool = False
    pkm_heads: int = 4
    pkm_d_k: int = 128
    deterministic: bool = False

    def __post_init__(self):
        def put(name, value):  # frozen: normalised values (numpy ints -> int, tau -> float) go in this way
            object.__setattr__(self, name, value)

        if self.memory not in MEMORY_KINDS:
            raise ValueError(f"memory must be 'hml' or 'pkm', got {self.memory!r}")
        if self.out_proj not in OUT_PROJ:
            raise ValueError(f"out_proj must be 'none' or 'copy', got {self.out_proj!r}")
        if self.memory == "pkm" and self.out_proj != "none":
            raise ValueError("out_proj='copy' applies to memory='hml' only (the pkm block keeps the cloned o_proj "
                             "inside its attention)")
        if self.query_norm not in QUERY_NORMS:
            raise ValueError(f"query_norm must be 'none' or 'rms', got {self.query_norm!r}")
        for name in ("n", "k", "d_z", "pkm_heads", "pkm_d_k"):
            put(name, check_positive_int(name, getattr(self, name)))
        check_k(self.k, self.n)
        put("tau", check_tau(self.tau))
        check_bool("learn_tau", self.learn_tau)
        check_bool("deterministic", self.deterministic)

