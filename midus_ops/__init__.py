"""midus_ops: fast product-key memory operators and the memory layers of MIDUS.

MIDUS: Memory-Infused Depth Up-Scaling (arXiv 2512.13751). The design is docs/design.md:

- :func:`pk_topk`: per-head product-key scoring and top-k (docs/design.md §1.1).
- :func:`hive_gather`: weighted gather from a shared bank + per-head projection (docs/design.md §1.2).
- :class:`HeadwiseMemoryLayer` and :class:`ProductKeyMemory`: drop-in nn.Modules (docs/design.md §2).
- ``midus_ops.reference``: the pure-PyTorch reference of each operator.

If the compiled extension cannot load, importing warns once (``MidusExtensionWarning``) and
every op runs the reference; ``EXTENSION_AVAILABLE`` and ``EXTENSION_ERROR`` say why.
``BUILD_INFO`` says what the loaded extension was built with (CUDA or CPU, why, the arch list).
"""
from .ops import (BUILD_INFO, EXTENSION_AVAILABLE, EXTENSION_ERROR, MidusExtensionWarning, has_kernel,
                  hive_gather, pk_topk)
from .reference import hive_gather_ref, pk_topk_ref
from .layers import HeadwiseMemoryLayer, ProductKeyMemory

__version__ = "0.1.0"

__all__ = ["pk_topk", "hive_gather", "pk_topk_ref", "hive_gather_ref", "HeadwiseMemoryLayer",
           "ProductKeyMemory", "EXTENSION_AVAILABLE", "EXTENSION_ERROR", "MidusExtensionWarning",
           "has_kernel", "BUILD_INFO", "__version__"]
