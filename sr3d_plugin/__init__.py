"""sr3d-plugin: SR-3D (3D-aware, region-prompted VLM) as a plugin for the VLM frameworks people use.

Submodules: :mod:`~sr3d_plugin.geometry`, :mod:`~sr3d_plugin.tiling`, :mod:`~sr3d_plugin.modeling`,
:mod:`~sr3d_plugin.sources`, :mod:`~sr3d_plugin.synthetic`, :mod:`~sr3d_plugin.plugins`.
"""

from __future__ import annotations

from sr3d_plugin.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl"]
