"""Plain values of the up-scaling API that the command line needs before any model code runs.

Importing this module imports neither torch nor transformers: ``midus --help`` builds its
parser from it in well under a second, while :mod:`midus.upscale` (which imports both) takes
the same values from here, so they are written once. (``MEMORY_DEFAULTS`` stays in
:mod:`midus.modeling_midus`: that file is copied beside saved models and must stand alone.)
"""
from __future__ import annotations

__all__ = ["METHODS", "PLACEMENTS", "DEFAULT_PLACEMENT", "KEY_VALUE_PARAMETER_NAMES"]

METHODS = ("midus", "dus", "llama_pro", "solar", "lesa", "avg_deus", "opt_deus")
PLACEMENTS = ("distributed", "top-heavy", "bottom-heavy", "top-gaps", "importance")
# A method's placement when none is given: OpT-DeUS's paper puts its new layers in the top gaps.
DEFAULT_PLACEMENT = {"opt_deus": "top-gaps"}
# Leaf names of the key/value parameters of the memory layers (docs/design.md §3.4: no weight decay, own LR).
KEY_VALUE_PARAMETER_NAMES = {"hml": ("subkeys", "bank", "proj", "log_tau"), "pkm": ("subkeys", "values", "log_tau")}
