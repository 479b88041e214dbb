"""Model builders: turn a checkpoint folder (ours, VILA/NVILA/SR-3D, LLaVA) or a config into an SR-3D model.

``load_model(path)`` picks the builder automatically (:func:`detect_builder`) or by name; builders are
registered through the ``register_model_builders`` plugin hook.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sr3d_plugin.errors import SR3DInputError

__all__ = ["detect_builder", "load_model"]


def _read_config(path: Path) -> dict[str, Any]:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise SR3DInputError(f"{path} has no config.json; expected a model folder")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as exc:
        raise SR3DInputError(f"{cfg} is not valid JSON: {exc}") from exc


def detect_builder(path: str | Path) -> str:
    """Name of the builder that understands the folder at ``path``."""
    from sr3d_plugin import plugins

    p = Path(path)
    if not p.is_dir():
        raise SR3DInputError(f"model folder {p} does not exist (hub ids must be downloaded first, e.g. with `hf download`)")
    config = _read_config(p)
    for name, reg in sorted(plugins.registry("model_builders").items()):
        builder = reg.factory()
        if builder.can_load(p, config):
            return name
    raise SR3DInputError(
        f"no model builder recognises {p} (model_type={config.get('model_type')!r}, "
        f"architectures={config.get('architectures')}); registered builders: "
        f"{', '.join(sorted(plugins.registry('model_builders')))}"
    )


def load_model(path: str | Path, builder: str | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """Load ``(model, processor)`` from a folder with the named (or detected) builder.

    Keyword arguments (builder-dependent): ``dtype`` (``"bfloat16"``, …), ``device_map``,
    ``load_in_4bit``, ``load_in_8bit``, ``attn_implementation``.
    """
    from sr3d_plugin import plugins

    name = builder or detect_builder(path)
    return plugins.create("model_builders", name).load(Path(path), **kwargs)
