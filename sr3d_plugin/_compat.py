"""What of sr3d-plugin works with the installed transformers, and how ``sr3d`` reaches transformers' Auto classes.

The package has two layers (docs/vila.md, README "Layers"):

* **core** — :mod:`~sr3d_plugin.geometry`, :mod:`~sr3d_plugin.tiling`, :mod:`~sr3d_plugin.sources`,
  :mod:`~sr3d_plugin.regions`, :mod:`~sr3d_plugin.plugins`, ``PositionEncoder3D``, the projectors,
  ``RegionExtractor`` and :mod:`sr3d_plugin.integrations.vila`: torch + numpy, and transformers ≥ 4.46
  only where a tokenizer or vision tower is involved. This is what runs inside a VILA environment
  (transformers 4.46 pinned).
* **model classes** — ``SR3DConfig``, ``SR3DForConditionalGeneration``, ``SR3DProcessor``, the builders
  and the Auto registration: transformers ≥ 5 (:data:`MODEL_CLASSES_MIN_TRANSFORMERS`). They are loaded
  lazily (PEP 562 ``__getattr__`` in ``sr3d_plugin`` and ``sr3d_plugin.modeling``); on an older
  transformers they raise :class:`~sr3d_plugin.errors.SR3DDependencyError` naming the installed version.

Auto registration (decided here, tested in ``tests/test_auto_registration.py``):

1. ``import sr3d_plugin`` imports neither torch nor transformers. It installs a small import hook
   (:func:`install_auto_hook`) that lets transformers' Auto modules load as usual and right after each one
   calls the matching function of :mod:`sr3d_plugin.modeling.registration`: ``configuration_auto`` →
   ``sr3d`` → ``SR3DConfig`` with ``AutoConfig``; ``processing_auto`` → ``SR3DProcessor`` with
   ``AutoProcessor`` (which may pick the class by name before any config exists); ``modeling_auto`` →
   ``SR3DForConditionalGeneration`` with ``AutoModel``, ``AutoModelForImageTextToText`` and
   ``AutoModelForCausalLM``. A module that is already loaded is served at once.
2. So ``AutoModelForImageTextToText.from_pretrained(folder)`` works in a process that only did
   ``import sr3d_plugin``, whichever of the two was imported first.
3. :func:`sr3d_plugin.register_auto_classes` does all of it explicitly (idempotent).

This module never imports the model layer (the callbacks are handed in by the package root), so the
import graph stays acyclic: model layer → ``_compat``, never back.
On transformers < 5 none of this happens (the hook does nothing).
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

from sr3d_plugin.errors import SR3DDependencyError

__all__ = [
    "AUTO_MODULES",
    "MODEL_CLASSES_MIN_TRANSFORMERS",
    "install_auto_hook",
    "model_classes_available",
    "require_model_classes",
    "transformers_version",
]

#: lowest transformers release the model classes (SR3DConfig, SR3DForConditionalGeneration, …) support
MODEL_CLASSES_MIN_TRANSFORMERS = "5.0"
#: lowest transformers release the core (and the VILA integration) supports
CORE_MIN_TRANSFORMERS = "4.46"

#: transformers' Auto modules we register with, right after each loads
AUTO_MODULES = {
    "config": "transformers.models.auto.configuration_auto",
    "processor": "transformers.models.auto.processing_auto",
    "model": "transformers.models.auto.modeling_auto",
}

#: what works on an older transformers (said in every SR3DDependencyError)
_CORE_NOTE = (
    "With transformers {version} the core works: sr3d_plugin.geometry, tiling, sources, regions, plugins, "
    "sr3d_plugin.modeling.PositionEncoder3D / projectors / RegionExtractor / Region / VisualInput, and "
    "sr3d_plugin.integrations.vila (SR-3D inside VILA, see docs/vila.md). Load the folders VILA saves with "
    "the `vila` builder in an environment with transformers>=5 (pip install 'transformers>=5,<6')."
)


def transformers_version() -> str | None:
    """The transformers version in use (the imported module's, else the installed distribution's), or None."""
    module = sys.modules.get("transformers")
    version = getattr(module, "__version__", None) if module is not None else None
    if isinstance(version, str):
        return version
    import importlib.metadata  # here, not at module level: ``import sr3d_plugin`` stays cheap

    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in version.split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def model_classes_available() -> bool:
    """True when the installed transformers supports the model classes (≥ 5.0)."""
    version = transformers_version()
    return version is not None and _release(version) >= _release(MODEL_CLASSES_MIN_TRANSFORMERS)


def require_model_classes(what: str) -> None:
    """Raise :class:`SR3DDependencyError` unless transformers ≥ 5 is installed.

    Args:
        what: the name that was asked for (e.g. ``"sr3d_plugin.SR3DForConditionalGeneration"``).
    """
    version = transformers_version()
    if version is None:
        raise SR3DDependencyError(
            f"{what} needs transformers>={MODEL_CLASSES_MIN_TRANSFORMERS}, which is not installed. "
            + _CORE_NOTE.format(version="absent")
        )
    if _release(version) < _release(MODEL_CLASSES_MIN_TRANSFORMERS):
        raise SR3DDependencyError(
            f"{what} needs transformers>={MODEL_CLASSES_MIN_TRANSFORMERS}, but transformers {version} is installed. "
            + _CORE_NOTE.format(version=version)
        )


# ----------------------------------------------------------------------------------------------
# Auto registration
# ----------------------------------------------------------------------------------------------

_lock = threading.RLock()


class _AutoHook(importlib.abc.MetaPathFinder):
    """Lets transformers' Auto modules load as usual, then registers our classes with them (one shot each)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _HOOKED:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            if find is not None:
                spec = find(fullname, path, target)
                if spec is not None:
                    break
        loader = getattr(spec, "loader", None)
        original = getattr(loader, "exec_module", None)
        if original is None:
            return spec

        def exec_module(module: Any) -> None:
            original(module)
            _registered_after_import(fullname)

        loader.exec_module = exec_module  # this loader instance serves this one module only
        return spec


#: transformers module → what to call right after it loaded (filled by :func:`install_auto_hook`)
_HOOKED: dict[str, Callable[[], None]] = {}


def _registered_after_import(module: str) -> None:
    if not model_classes_available():
        return
    try:
        _HOOKED[module]()
    except Exception as exc:  # never break transformers' own import
        warnings.warn(f"sr3d-plugin could not register with {module}: {exc}", RuntimeWarning, stacklevel=2)


_hook: _AutoHook | None = None


def install_auto_hook(callbacks: dict[str, Callable[[], None]]) -> None:
    """Call each callback right after its transformers module has loaded (at once if it already has).

    ``import sr3d_plugin`` passes the registration functions of the model layer
    (:mod:`sr3d_plugin.modeling.registration`); this module itself never imports the model layer, so
    the layers stay acyclic. Cheap: nothing is imported here. Nothing happens on transformers < 5.
    """
    global _hook
    with _lock:
        _HOOKED.update(callbacks)
        pending = False
        for module in callbacks:
            if module in sys.modules:
                _registered_after_import(module)
            else:
                pending = True
        if pending and _hook is None:
            _hook = _AutoHook()
            sys.meta_path.insert(0, _hook)
