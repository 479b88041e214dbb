"""Merge a trained adapter into its base model (``sr3d merge``)."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sr3d_plugin.errors import SR3DInputError

__all__ = ["find_adapter", "merge_adapter"]


def find_adapter(path: str | Path) -> Path:
    """The adapter folder inside a run / checkpoint folder, or ``path`` itself."""
    p = Path(path)
    for cand in (p, p / "adapter"):
        if (cand / "adapter_config.json").is_file():
            return cand
    raise SR3DInputError(
        f"{p} holds no adapter (adapter_config.json); expected an adapter folder, a checkpoint-N folder or a run folder"
    )


def merge_adapter(
    adapter: str | Path, out: str | Path, base: str | Path | None = None, dtype: Any = None
) -> dict[str, Any]:
    """Load the base model unquantised, apply the adapter, merge it and save a standard sr3d folder.

    The LoRA deltas are added into the LLM weights; the trained perception encoder, projector and
    region extractor (peft ``modules_to_save``) replace the base ones. The processor saved with the
    adapter (same tokenizer and tiling) is written beside the weights.

    Returns:
        ``{"adapter", "base", "output", "parameters", "trained_modules", "notes"}``: ``trained_modules``
        are the SR-3D modules the adapter brings (their base "created fresh" notes are dropped), ``notes``
        the remaining load notes of the base model.
    """
    from peft import PeftModel

    from sr3d_plugin.builders import load_model
    from sr3d_plugin.io_utils import atomic_dir
    from sr3d_plugin.modeling import SR3DProcessor

    folder = find_adapter(adapter)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    base_path = Path(base) if base is not None else Path(str(cfg.get("base_model_name_or_path") or ""))
    if not str(base_path) or not base_path.is_dir():
        raise SR3DInputError(
            f"base model {str(base_path)!r} of adapter {folder} is not a folder on this machine; pass base= (the base model folder)"
        )
    trained = [str(m) for m in (cfg.get("modules_to_save") or [])]
    with _quiet_about(trained):  # the base lacks them, the adapter brings them: not "created fresh"
        model, processor = load_model(base_path, dtype=dtype)
    notes = [n for n in getattr(model, "load_notes", []) if not _about(n, trained)]
    for note in notes:
        logging.getLogger("sr3d_plugin.builders").warning(note)
    merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    if (folder / "processor_config.json").is_file() or (folder / "tokenizer_config.json").is_file():
        processor = SR3DProcessor.from_pretrained(str(folder))
    with atomic_dir(out) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        processor.save_pretrained(str(tmp))
    return {
        "adapter": str(folder),
        "base": str(base_path),
        "output": str(Path(out)),
        "parameters": sum(p.numel() for p in merged.parameters()),
        "trained_modules": trained,
        "notes": notes,
    }


def _about(message: str, parts: list[str]) -> bool:
    """Whether a load note is the "created fresh" note of one of ``parts``."""
    return any(message.startswith(f"{part} has no weights") for part in parts)


@contextlib.contextmanager
def _quiet_about(parts: list[str]) -> Iterator[None]:
    """Drop the builders' "created fresh" warnings for ``parts`` while the base model loads."""

    def keep(record: logging.LogRecord) -> bool:
        return not _about(record.getMessage(), parts)

    log = logging.getLogger("sr3d_plugin.builders")
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)
