"""Hook specifications of the ``sr3d`` plugin system.

A plugin is any module or object with functions decorated by :data:`hookimpl`. Each hook receives
a ``register(name, factory)`` callback and calls it once per component it provides. ``factory``
is a callable returning the component (usually its class). Plugins are found through the
``sr3d`` entry-point group; the package's own components are registered through the same hooks
(see :mod:`sr3d_plugin.builtin_plugins`).

Example third-party plugin::

    from sr3d_plugin import hookimpl

    @hookimpl
    def register_depth_estimators(register):
        register("my_depth", MyDepthEstimator)

and in its ``pyproject.toml``::

    [project.entry-points.sr3d]
    my_plugin = "my_package.sr3d_plugin"
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

__all__ = ["hookimpl", "hookspec"]

hookspec = pluggy.HookspecMarker("sr3d")
hookimpl = pluggy.HookimplMarker("sr3d")

Register = Callable[[str, Callable[..., Any]], None]


@hookspec
def register_depth_estimators(register: Register) -> None:
    """Register monocular depth estimators: ``factory(**options)`` → object with ``estimate(images)``."""


@hookspec
def register_pointmap_sources(register: Register) -> None:
    """Register point-map sources: ``factory(**options)`` → object with ``pointmaps(frames)``."""


@hookspec
def register_frame_readers(register: Register) -> None:
    """Register frame readers (scene folders, videos, images): ``factory(**options)`` → ``read(path)``."""


@hookspec
def register_position_encoders(register: Register) -> None:
    """Register 3D position encoders: ``factory(hidden_size, **options)`` → ``nn.Module`` on xyz."""


@hookspec
def register_region_extractors(register: Register) -> None:
    """Register region extractors: ``factory(vision_hidden_size, llm_hidden_size, **options)``."""


@hookspec
def register_projectors(register: Register) -> None:
    """Register vision→LLM projectors: ``factory(vision_hidden_size, llm_hidden_size, **options)``."""


@hookspec
def register_model_builders(register: Register) -> None:
    """Register model builders that turn a checkpoint folder or config into an SR-3D model."""


@hookspec
def register_dataset_converters(register: Register) -> None:
    """Register converters from official raw dataset releases to the plugin's local layout."""
