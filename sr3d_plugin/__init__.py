"""sr3d-plugin: SR-3D (3D-aware, region-prompted VLM) as a plugin for the VLM frameworks people use.

``import sr3d_plugin`` is cheap: it imports neither torch nor transformers. Public names load on first
access (PEP 562): ``Region`` / ``VisualInput`` need torch; ``SR3DConfig``,
``SR3DForConditionalGeneration`` and ``SR3DProcessor`` need transformers ≥ 5 and raise
:class:`~sr3d_plugin.errors.SR3DDependencyError` on an older one (the core and
:mod:`sr3d_plugin.integrations.vila` work there, e.g. inside a VILA environment). Transformers' Auto
classes learn the ``sr3d`` model type on their own once this package is imported
(:mod:`sr3d_plugin._compat` says when); :func:`register_auto_classes` does it explicitly.

Submodules: :mod:`~sr3d_plugin.geometry`, :mod:`~sr3d_plugin.tiling`, :mod:`~sr3d_plugin.modeling`,
:mod:`~sr3d_plugin.sources`, :mod:`~sr3d_plugin.synthetic`, :mod:`~sr3d_plugin.plugins`,
:mod:`~sr3d_plugin.integrations.vila`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sr3d_plugin._compat import AUTO_MODULES, install_auto_hook
from sr3d_plugin.hookspecs import hookimpl

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from sr3d_plugin.modeling import (
        Region,
        SR3DConfig,
        SR3DForConditionalGeneration,
        SR3DProcessor,
        VisualInput,
        register_auto_classes,
    )

#: names served lazily from sr3d_plugin.modeling
_LAZY = (
    "Region",
    "SR3DConfig",
    "SR3DForConditionalGeneration",
    "SR3DProcessor",
    "VisualInput",
    "register_auto_classes",
)

__all__ = [
    "Region",
    "SR3DConfig",
    "SR3DForConditionalGeneration",
    "SR3DProcessor",
    "VisualInput",
    "__version__",
    "hookimpl",
    "register_auto_classes",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module("sr3d_plugin.modeling"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def _registration(name: str) -> Any:
    """A callback that runs ``sr3d_plugin.modeling.registration.<name>`` (imported only when it fires)."""

    def call() -> None:
        getattr(importlib.import_module("sr3d_plugin.modeling.registration"), name)()

    return call


# transformers' Auto modules learn ``sr3d`` right after they load (sr3d_plugin._compat explains)
install_auto_hook(
    {
        AUTO_MODULES["config"]: _registration("register_config_class"),
        AUTO_MODULES["processor"]: _registration("register_processor_class"),
        AUTO_MODULES["model"]: _registration("register_model_classes"),
    }
)


def _wire_foreign_loading() -> None:
    """Let ``SR3DForConditionalGeneration.from_pretrained`` load foreign folders through the builders
    (the model layer does not import the builders, which sit above it; both imports are torch-free)."""
    from sr3d_plugin.builders import load_foreign_model
    from sr3d_plugin.modeling._foreign import register_foreign_loader

    register_foreign_loader(load_foreign_model)


_wire_foreign_loading()
