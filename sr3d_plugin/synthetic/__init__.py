"""Procedural posed RGB-D scenes with exact geometry (ground truth for tests, the demo and QA data).

* :func:`generate_scene` / :func:`default_scene` — a furnished room, a camera loop and rendered
  RGB, z-depth and instance maps (deterministic from the seed).
* :func:`render` — vectorised ray casting of arbitrary oriented boxes inside a room.
* :func:`write_scannet_layout` / :func:`read_objects` — the ScanNet-style scene folder of
  CONTRIBUTING.md ("Data layouts").
"""

from __future__ import annotations

from sr3d_plugin.synthetic.layout import depth_to_millimetres, read_objects, write_scannet_layout
from sr3d_plugin.synthetic.render import RenderResult, render
from sr3d_plugin.synthetic.scene import (
    LABEL_CATALOG,
    Room,
    SceneObject,
    SyntheticScene,
    default_scene,
    generate_scene,
    look_at,
    pinhole_intrinsics,
)

__all__ = [
    "LABEL_CATALOG",
    "RenderResult",
    "Room",
    "SceneObject",
    "SyntheticScene",
    "default_scene",
    "depth_to_millimetres",
    "generate_scene",
    "look_at",
    "pinhole_intrinsics",
    "read_objects",
    "render",
    "write_scannet_layout",
]
