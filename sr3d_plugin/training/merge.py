"""Adapters as models: load a trained adapter on its base without merging, or merge it (``sr3d merge``)."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sr3d_plugin.errors import SR3DInputError

__all__ = ["adapter_base", "find_adapter", "is_adapter", "load_adapter", "merge_adapter"]


def is_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a peft adapter folder, or a run / checkpoint folder holding one in ``adapter/``."""
    p = Path(path)
    return any((cand / "adapter_config.json").is_file() for cand in (p, p / "adapter"))


def find_adapter(path: str | Path) -> Path:
    """The adapter folder inside a run / checkpoint folder, or ``path`` itself."""
    p = Path(path)
    for cand in (p, p / "adapter"):
        if (cand / "adapter_config.json").is_file():
            return cand
    raise SR3DInputError(
        f"{p} holds no adapter (adapter_config.json); expected an adapter folder, a checkpoint-N folder or a run folder"
    )


def adapter_base(adapter: str | Path, base: str | Path | None = None) -> Path:
    """The base model folder of ``adapter``: ``base`` when given, else the adapter's ``base_model_name_or_path``.

    Raises:
        SR3DInputError: no adapter there, an unreadable adapter_config.json, or a base that is not a
            folder on this machine.
    """
    folder = find_adapter(adapter)
    if base is None:
        try:
            cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SR3DInputError(f"cannot read {folder / 'adapter_config.json'}: {exc}") from None
        recorded = str((cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None) or "")
        if not recorded:
            raise SR3DInputError(
                f"adapter {folder} records no base_model_name_or_path; pass base= (the base model folder)"
            )
        base_path = Path(recorded).expanduser()
        if not base_path.is_dir():
            raise SR3DInputError(
                f"base model {recorded!r} of adapter {folder} is not a folder on this machine; "
                "pass base= (the base model folder)"
            )
        return base_path
    base_path = Path(base).expanduser()
    if not base_path.is_dir():
        raise SR3DInputError(f"base={str(base)!r} is not a folder; expected the base model folder of adapter {folder}")
    return base_path


def load_adapter(
    adapter: str | Path, base: str | Path | None = None, builder: str | None = None, **load_kwargs: Any
) -> tuple[Any, Any, Path, Path]:
    """Load an adapter like peft's ``AutoPeftModel``, without merging.

    The base loads through :func:`sr3d_plugin.builders.load_model` (any builder; ``load_kwargs`` such as
    ``dtype`` or ``load_in_4bit`` go to it), the LoRA is applied with peft's ``PeftModel`` and the
    trained SR-3D modules saved beside it (perception encoder, projector, region extractor: peft
    ``modules_to_save``) replace the base ones; the processor saved with the adapter (tokenizer with
    ``<mask>``, tiling) is used.

    Args:
        adapter: adapter folder, checkpoint folder or run folder (its ``adapter/``).
        base: base model folder (default: the adapter's ``base_model_name_or_path``).
        builder: builder of the base folder (default: detected).

    Returns:
        ``(peft model in eval mode, processor, adapter folder, base folder)``.
    """
    from peft import PeftModel

    from sr3d_plugin.builders import load_model
    from sr3d_plugin.modeling import SR3DProcessor

    folder = find_adapter(adapter)
    base_path = adapter_base(folder, base)
    # the base lacks the SR-3D modules the adapter brings: no "created fresh" warnings for those
    with _quiet_about(_trained_modules(folder)):
        model, processor = load_model(base_path, builder=builder, **load_kwargs)
    model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    if (folder / "processor_config.json").is_file() or (folder / "tokenizer_config.json").is_file():
        processor = SR3DProcessor.from_pretrained(str(folder))
    model.eval()
    return model, processor, folder, base_path


def merge_adapter(
    adapter: str | Path, out: str | Path, base: str | Path | None = None, dtype: Any = None
) -> dict[str, Any]:
    """Load the base model unquantised, apply the adapter, merge it and save a standard sr3d folder.

    The LoRA deltas are added into the LLM weights; the trained perception encoder, projector and
    region extractor (peft ``modules_to_save``) replace the base ones. The processor saved with the
    adapter (same tokenizer and tiling) is written beside the weights, and a model card (README.md:
    the training facts of the adapter's card, the base and the adapter it came from).

    Returns:
        ``{"adapter", "base", "output", "parameters", "trained_modules", "notes"}``: ``trained_modules``
        are the SR-3D modules the adapter brings (their base "created fresh" notes are dropped), ``notes``
        the remaining load notes of the base model.
    """
    from sr3d_plugin.io_utils import atomic_dir
    from sr3d_plugin.training.model_card import read_card_facts, write_card

    model, processor, folder, base_path = load_adapter(adapter, base, dtype=dtype)
    trained = _trained_modules(folder)
    notes = [n for n in getattr(model, "load_notes", []) if not _about(n, trained)]
    merged = model.merge_and_unload()
    facts = read_card_facts(folder) or {}
    facts = {**facts, "base_model": str(base_path.resolve()), "adapter": str(folder.resolve())}
    facts.pop("kind", None)
    with atomic_dir(out) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        processor.save_pretrained(str(tmp))
        write_card(tmp, facts, "merged", folder_name=str(out))
    return {
        "adapter": str(folder),
        "base": str(base_path),
        "output": str(Path(out)),
        "parameters": sum(p.numel() for p in merged.parameters()),
        "trained_modules": trained,
        "notes": notes,
    }


def _trained_modules(folder: Path) -> list[str]:
    """The modules an adapter folder saves in full (peft ``modules_to_save``: the trained SR-3D modules)."""
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [str(m) for m in ((cfg.get("modules_to_save") if isinstance(cfg, dict) else None) or [])]


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
