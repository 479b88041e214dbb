"""``sr3d app``: a browser page (Gradio, extra ``app``) to draw boxes on frames and ask SR-3D about them.

* :mod:`sr3d_plugin.app.views` — pure functions (boxes from clicks, region reach, overlays).
* :mod:`sr3d_plugin.app.backend` — :class:`AppBackend`: the model, the loaded inputs, answers.
* :mod:`sr3d_plugin.app.ui` — :func:`build_app` / :func:`launch_app`: the Gradio page.

Names load on first use, so importing this package imports neither gradio nor torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sr3d_plugin.app.backend import AppBackend
    from sr3d_plugin.app.ui import build_app, launch_app

__all__ = ["AppBackend", "build_app", "launch_app"]

_WHERE = {"AppBackend": "backend", "build_app": "ui", "launch_app": "ui"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"sr3d_plugin.app.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'sr3d_plugin.app' has no attribute {name!r}")
