"""Registration of the ``sr3d`` model type with transformers' Auto classes (model layer, transformers ≥ 5).

Each class module registers itself when it is imported (``configuration_sr3d`` with ``AutoConfig``,
``processing_sr3d`` with ``AutoProcessor``, ``modeling_sr3d`` with ``AutoModel``,
``AutoModelForImageTextToText`` and ``AutoModelForCausalLM``), so registering means importing it. That
also makes re-entry harmless: when loading a class module itself makes transformers load an Auto module,
the hook's import finds the module half-initialised, does nothing, and the module registers as it
finishes. The ``AutoModelForImageTextToText`` entry is also what lets transformers'
``pipeline("image-text-to-text", model=..., processor=...)`` accept our model; the processor side of
that pipeline (``images=`` / chat messages) is :meth:`SR3DProcessor.__call__` and
:meth:`SR3DProcessor.apply_chat_template`. The functions are called by the import hook that ``import sr3d_plugin`` installs
(:mod:`sr3d_plugin._compat` explains when), or all at once by :func:`register_auto_classes`.
"""

from __future__ import annotations

import importlib

from sr3d_plugin._compat import require_model_classes

__all__ = ["register_auto_classes", "register_config_class", "register_model_classes", "register_processor_class"]


def register_config_class() -> None:
    """``sr3d`` → ``SR3DConfig`` with ``AutoConfig``."""
    importlib.import_module("sr3d_plugin.modeling.configuration_sr3d")


def register_processor_class() -> None:
    """``SR3DConfig`` → ``SR3DProcessor`` with ``AutoProcessor``."""
    importlib.import_module("sr3d_plugin.modeling.processing_sr3d")


def register_model_classes() -> None:
    """``SR3DConfig`` → ``SR3DForConditionalGeneration`` with the Auto model classes."""
    importlib.import_module("sr3d_plugin.modeling.modeling_sr3d")


def register_auto_classes() -> None:
    """Register the ``sr3d`` model type with transformers' Auto classes (idempotent; transformers ≥ 5).

    ``AutoConfig``, ``AutoModel``, ``AutoModelForImageTextToText``, ``AutoModelForCausalLM`` and
    ``AutoProcessor`` then load our folders without ``trust_remote_code``. Usually not needed: importing
    ``sr3d_plugin`` arranges it (see :mod:`sr3d_plugin._compat`).
    """
    require_model_classes("sr3d_plugin.register_auto_classes")
    register_config_class()
    register_processor_class()
    register_model_classes()
