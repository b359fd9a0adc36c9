"""midus: Memory-Infused Depth Up-Scaling of Hugging Face causal LMs (arXiv 2512.13751).

    import midus
    big = midus.upscale(model, "midus", num_blocks=8)          # docs/design.md §3.1-3.3
    big.save_pretrained(path)                                   # config.json + safetensors + modeling file
    AutoModelForCausalLM.from_pretrained(path)                  # after `import midus`, or with trust_remote_code

Importing midus registers ``MidusConfig`` / ``MidusForCausalLM`` (``model_type="midus"``) with
``AutoConfig`` / ``AutoModelForCausalLM``. It imports torch, transformers and midus_ops only; the
data, training and CLI modules are imported when used (``midus.train``, ``midus.cli``, ...).
"""
from transformers import AutoConfig, AutoModelForCausalLM

from .modeling_midus import MEMORY_DEFAULTS, SUPPORTED_FAMILIES, MidusConfig, MidusForCausalLM, MidusMemoryBlock
from .upscale import (DEFAULT_PLACEMENT, KEY_VALUE_PARAMETER_NAMES, METHODS, PLACEMENTS, memory_parameter_names,
                      new_parameter_names, placement_indices, solar_layer_order, upscale)

AutoConfig.register(MidusConfig.model_type, MidusConfig, exist_ok=True)
AutoModelForCausalLM.register(MidusConfig, MidusForCausalLM, exist_ok=True)

__version__ = "0.1.0"

__all__ = ["upscale", "placement_indices", "solar_layer_order", "new_parameter_names", "memory_parameter_names",
           "MidusConfig", "MidusForCausalLM", "MidusMemoryBlock", "METHODS", "PLACEMENTS", "DEFAULT_PLACEMENT",
           "SUPPORTED_FAMILIES",
           "MEMORY_DEFAULTS", "KEY_VALUE_PARAMETER_NAMES", "__version__"]
