"""midus: Memory-Infused Depth Up-Scaling of Hugging Face causal LMs (arXiv 2512.13751).

    import midus
    big = midus.upscale(model, "midus", num_blocks=8)          # docs/design.md §3.1-3.3
    big.save_pretrained(path)                                   # config.json + safetensors + modeling file
    AutoModelForCausalLM.from_pretrained(path)                  # after `import midus`, or with trust_remote_code

After ``import midus``, ``MidusConfig`` / ``MidusForCausalLM`` (``model_type="midus"``) are
registered with ``AutoConfig`` / ``AutoModelForCausalLM`` by the time transformers can be used:
at once if transformers is already imported, else as soon as it is (:mod:`midus._registration`).
``import midus`` itself is cheap (no torch, transformers or midus_ops): the names below are
loaded on first use (``midus.upscale`` imports torch, transformers and midus_ops), and so are the
data, training and CLI modules (``midus.train``, ``midus.cli``, ...).
"""
import importlib
import sys
import types

from . import _registration
from .constants import DEFAULT_PLACEMENT, KEY_VALUE_PARAMETER_NAMES, METHODS, PLACEMENTS

__version__ = "0.1.0"

__all__ = ["upscale", "placement_indices", "solar_layer_order", "new_parameter_names", "memory_parameter_names",
           "MidusConfig", "MidusForCausalLM", "MidusMemoryBlock", "METHODS", "PLACEMENTS", "DEFAULT_PLACEMENT",
           "SUPPORTED_FAMILIES",
           "MEMORY_DEFAULTS", "KEY_VALUE_PARAMETER_NAMES", "__version__"]

# Attribute -> the submodule defining it, imported on first access (PEP 562).
_LAZY = {**dict.fromkeys(("upscale", "placement_indices", "solar_layer_order", "new_parameter_names",
                          "memory_parameter_names"), ".upscale"),
         **dict.fromkeys(("MidusConfig", "MidusForCausalLM", "MidusMemoryBlock", "MEMORY_DEFAULTS",
                          "SUPPORTED_FAMILIES"), ".modeling_midus")}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    # Once a submodule has run, the import system binds it on its package: the first
    # `import midus.upscale` (midus.cli, midus.pipeline, ... do it) would replace the function
    # `midus.upscale` by the module of that name. The function is the public name (the module
    # stays reachable as sys.modules["midus.upscale"]), as it was when this file imported it eagerly.
    def __setattr__(self, name, value):
        if name == "upscale" and isinstance(value, types.ModuleType) and value.__name__ == f"{self.__name__}.upscale":
            value = value.upscale
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

_registration.install()
