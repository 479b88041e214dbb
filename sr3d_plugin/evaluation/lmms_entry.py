"""Entry point of the ``sr3d`` model for lmms-eval's ``lmms_eval.models`` group.

lmms-eval builds its model registry while ``lmms_eval.models`` is being imported and loads every
entry point then. Our model module itself imports ``lmms_eval.models`` (for ``ModelManifest`` and
the ``lmms`` base class), so pointing the entry point at a constant defined there is circular:
when a program imports :mod:`sr3d_plugin.evaluation.lmms_model` first, the registry is built
while that module is half-initialised and ``sr3d`` silently goes missing. This module imports
nothing from lmms-eval at import time; the registry calls :func:`manifests` once it is ready.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MODEL_CLASS_PATH", "MODEL_ID", "manifests"]

MODEL_ID = "sr3d"
MODEL_CLASS_PATH = "sr3d_plugin.evaluation.lmms_model.SR3DLmms"


def manifests() -> list[Any]:
    """The ``sr3d`` manifest (a one-element list of ``lmms_eval.models.registry_v2.ModelManifest``).

    Called by lmms-eval's registry; ``registry_v2`` is importable by then (it is a leaf module).
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS_PATH)]
