"""Locate the data folders shipped with the package (``recipes/``, ``eval_tasks/``).

In a built wheel they live inside the package (``sr3d_plugin/recipes``); in an editable install
or a source checkout they sit beside it at the repository root.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["BUNDLED_MODELS", "eval_tasks_dir", "package_dir", "recipes_dir", "resolve_model_name"]


def package_dir() -> Path:
    return Path(__file__).resolve().parent


def _shipped(name: str) -> Path:
    inside = package_dir() / name
    if inside.is_dir():
        return inside
    beside = package_dir().parent / name
    if beside.is_dir():
        return beside
    raise FileNotFoundError(f"the {name}/ folder is missing: looked in {inside} and {beside}; reinstall sr3d-plugin")


def recipes_dir() -> Path:
    """Folder of the bundled training recipes (YAML)."""
    return _shipped("recipes")


def eval_tasks_dir() -> Path:
    """Folder to pass to ``lmms-eval --include_path``."""
    return _shipped("eval_tasks")


#: short model names resolved to folders shipped inside the package
BUNDLED_MODELS: dict[str, str] = {"tiny": "assets/tiny-sr3d"}


def resolve_model_name(path: str | Path) -> str | Path:
    """A bundled model's short name (``"tiny"``) -> its folder; anything else is returned unchanged.

    An existing folder of that name in the working directory wins over the bundled model.
    """
    name = str(path)
    if name in BUNDLED_MODELS and not Path(name).exists():
        return package_dir() / BUNDLED_MODELS[name]
    return path
