"""Where ``SR3DForConditionalGeneration.from_pretrained`` sends local folders in foreign layouts.

The model layer does not know the model builders (they sit above it and build on it). The package
root registers :func:`sr3d_plugin.builders.load_foreign_model` here when ``sr3d_plugin`` is imported
(always before any module of this package); ``from_pretrained`` asks :func:`load_foreign` and falls
back to transformers' own loading when it returns None. No torch, no transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["load_foreign", "register_foreign_loader"]

#: ``(path, model_args, kwargs) -> model | (model, info) | None``
ForeignLoader = Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]

_loader: ForeignLoader | None = None


def register_foreign_loader(loader: ForeignLoader | None) -> None:
    """Set the function that loads foreign folders (None: transformers' loading only)."""
    global _loader
    _loader = loader


def load_foreign(path: Any, model_args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The registered loader's answer for ``path``, or None (not a foreign folder / no loader)."""
    if _loader is None:
        return None
    return _loader(path, model_args, kwargs)
