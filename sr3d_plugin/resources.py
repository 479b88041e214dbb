"""Locate the data folders shipped with the package (``recipes/``, ``eval_tasks/``).

In a built wheel they live inside the package (``sr3d_plugin/recipes``); in an editable install
or a source checkout they sit beside it at the repository root.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["eval_tasks_dir", "package_dir", "recipes_dir"]


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
