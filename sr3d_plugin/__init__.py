"""sr3d-plugin: SR-3D (3D-aware, region-prompted VLM) as a plugin for the VLM frameworks people use.

Importing the package registers the ``sr3d`` model type with transformers' Auto classes.

Submodules: :mod:`~sr3d_plugin.geometry`, :mod:`~sr3d_plugin.tiling`, :mod:`~sr3d_plugin.modeling`,
:mod:`~sr3d_plugin.sources`, :mod:`~sr3d_plugin.synthetic`, :mod:`~sr3d_plugin.plugins`.
"""

from __future__ import annotations

from sr3d_plugin.hookspecs import hookimpl

__version__ = "0.1.0"

from sr3d_plugin.modeling import (
    Region,
    SR3DConfig,
    SR3DForConditionalGeneration,
    SR3DProcessor,
    VisualInput,
)

__all__ = [
    "Region",
    "SR3DConfig",
    "SR3DForConditionalGeneration",
    "SR3DProcessor",
    "VisualInput",
    "__version__",
    "hookimpl",
]
