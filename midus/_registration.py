"""Registration of ``MidusConfig`` / ``MidusForCausalLM`` with transformers' auto classes, done
when transformers is imported rather than when midus is.

The promise of ``import midus`` is that ``AutoModelForCausalLM.from_pretrained(saved_midus_folder)``
(and ``AutoConfig.for_model("midus")``) then work. Registering needs transformers and the MIDUS
classes (torch, transformers' modelling code, ``midus_ops``: seconds), which ``midus --help`` or
``import midus`` for ``midus.constants`` must not pay. So :func:`install` registers at once if
transformers is already imported, and otherwise puts a finder on ``sys.meta_path`` that wraps the
loader of ``transformers`` (the pattern of wrapt's ``register_post_import_hook``) and registers
right after that module has run, before the ``import transformers`` statement returns: by the time
any code can reach ``transformers.AutoModelForCausalLM``, "midus" is in its mapping.

Why a post-import hook rather than something simpler: registering lazily inside transformers
(its ``CONFIG_MAPPING`` takes only transformers' own module names) would rely on private
structures; registering at the first ``midus.<attribute>`` access misses the documented use
(``import midus`` then only transformers calls). ``midus.modeling_midus`` is watched too: when it
is the module that first imports transformers (``from midus.modeling_midus import ...``), its
classes do not exist yet when transformers finishes, so registration waits for the end of that
module instead.

The finder removes itself once registration succeeded. If the ``transformers`` import fails, the
finder stays (a later import that succeeds registers). If registering fails (e.g. ``midus_ops``
cannot be imported), ``import transformers`` still succeeds, with a warning naming the error, and
the finder stays, so that a later import of ``midus.modeling_midus`` retries (and raises the error
itself).
"""
from __future__ import annotations

import importlib.abc
import sys
import threading
import warnings

__all__ = ["install", "register", "registered"]

_WATCHED = ("transformers", "midus.modeling_midus")
_lock = threading.RLock()
_done = False
_busy = False


def registered() -> bool:
    """True once ``model_type="midus"`` is registered with the auto classes by this package."""
    return _done


def register() -> None:
    """Register ``MidusConfig`` with ``AutoConfig`` and ``MidusForCausalLM`` with
    ``AutoModelForCausalLM`` (idempotent; imports transformers and :mod:`midus.modeling_midus`).
    Raises what importing them raises (e.g. ImportError when ``midus_ops`` is missing)."""
    global _done, _busy
    with _lock:
        if _done or _busy:  # _busy: the imports below re-enter through the hook
            return
        _busy = True
        try:
            from transformers import AutoConfig, AutoModelForCausalLM

            from .modeling_midus import MidusConfig, MidusForCausalLM

            AutoConfig.register(MidusConfig.model_type, MidusConfig, exist_ok=True)
            AutoModelForCausalLM.register(MidusConfig, MidusForCausalLM, exist_ok=True)
            _done = True
        finally:
            _busy = False
    _uninstall()


def _initializing(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _on_loaded(name: str) -> None:
    if _done:
        return
    if name == "transformers" and _initializing("midus.modeling_midus"):
        return  # modeling_midus is the importer: its own hook registers once its classes exist
    try:
        register()
    except Exception as err:  # noqa: BLE001  (the user's import of transformers must not fail because of midus)
        warnings.warn(f"midus: could not register model_type 'midus' with transformers' auto classes "
                      f"({type(err).__name__}: {err}); AutoModelForCausalLM cannot load MIDUS folders until "
                      f"`import midus.modeling_midus` succeeds", RuntimeWarning, stacklevel=2)


class _NotifyingLoader(importlib.abc.Loader):
    """Runs the wrapped loader, then :func:`_on_loaded`. Every other attribute (get_source,
    get_resource_reader, ...) is the wrapped loader's; after running, the module's ``__loader__``
    and ``__spec__.loader`` are the wrapped loader again, so nothing of this stays behind."""

    def __init__(self, loader, spec):
        self._loader, self._spec = loader, spec

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        try:
            self._loader.exec_module(module)
        finally:
            self._spec.loader = self._loader
            for mod in (module, sys.modules.get(self._spec.name)):
                if mod is not None and getattr(mod, "__loader__", None) is self:
                    try:
                        mod.__loader__ = self._loader
                    except AttributeError:
                        pass
        _on_loaded(self._spec.name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds the watched modules with the finders after it and wraps their loader."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _WATCHED or _done:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _NotifyingLoader(spec.loader, spec)
        return spec


_finder = _PostImportFinder()


def _uninstall() -> None:
    try:
        sys.meta_path.remove(_finder)
    except ValueError:
        pass


def install() -> None:
    """Register now if transformers is already imported, else when it is (see the module docstring)."""
    if "transformers" in sys.modules:
        register()
    elif _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
