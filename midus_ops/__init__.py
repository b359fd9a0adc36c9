"""midus_ops: fast product-key memory operators and the memory layers of MIDUS.

MIDUS: Memory-Infused Depth Up-Scaling (arXiv 2512.13751). The design is docs/design.md:

- :func:`pk_topk`: per-head product-key scoring and top-k (docs/design.md §1.1).
- :func:`hive_gather`: weighted gather from a shared bank + per-head projection (docs/design.md §1.2).
- :class:`HeadwiseMemoryLayer` and :class:`ProductKeyMemory`: drop-in nn.Modules (docs/design.md §2).
- :class:`MemoryOptions`: the memory options, their defaults and validation, in one place.
- ``midus_ops.reference``: the pure-PyTorch reference of each operator.
- :func:`register_memory_ops` / :func:`use_memory_ops`: other implementations of the two operators
  for the layers (baselines), chosen per layer by name; ``register_retrieval_hook`` on a layer
  lets an analysis look at or replace its retrieval.

If the compiled extension cannot load, importing warns once (``MidusExtensionWarning``) and
every op runs the reference; ``EXTENSION_AVAILABLE`` and ``EXTENSION_ERROR`` say why.
``BUILD_INFO`` says what the loaded extension was built with (CUDA or CPU, why, the arch list).
"""
from .ops import (BUILD_INFO, EXTENSION_AVAILABLE, EXTENSION_ERROR, MidusExtensionWarning, has_kernel,
                  hive_gather, pk_topk)
from .reference import hive_gather_ref, pk_topk_ref
from .options import MemoryOptions
from .layers import (MEMORY_OPS, HeadwiseMemoryLayer, ProductKeyMemory, register_memory_ops, set_memory_ops,
                     use_memory_ops)

__version__ = "0.1.0"

__all__ = ["pk_topk", "hive_gather", "pk_topk_ref", "hive_gather_ref", "HeadwiseMemoryLayer",
           "ProductKeyMemory", "MemoryOptions", "MEMORY_OPS", "register_memory_ops", "set_memory_ops",
           "use_memory_ops", "EXTENSION_AVAILABLE", "EXTENSION_ERROR", "MidusExtensionWarning",
           "has_kernel", "BUILD_INFO", "__version__"]
