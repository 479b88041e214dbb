"""Shared pieces of the dataset converters (``sr3d prepare``): the converter protocol, file lookup,
JSON reading with clear errors, atomic JSONL output, progress bars and file linking.

A converter is any object with

* ``name`` (str), ``description`` (str), ``default_split`` (str or None),
* ``options`` (dict: option name → help text; the keyword options ``convert`` accepts),
* ``convert(raw, out, split=None, *, overwrite=False, progress=True, **options) -> dict`` — reads the
  official raw release at ``raw`` and writes the prepared layout under ``out``; returns a JSON-ready
  summary (counts, written files, skipped items).

Converters are registered with the ``register_dataset_converters`` plugin hook (kind
``dataset_converters``). Every output file is written atomically, and work already written completely
is skipped unless ``overwrite`` is set, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sr3d_plugin.errors import SR3DConfigError, SR3DInputError
from sr3d_plugin.io_utils import atomic_write_text

__all__ = [
    "SCENES_DIR",
    "Converter",
    "as_bool",
    "as_int",
    "check_options",
    "find_file",
    "link_or_copy",
    "load_json",
    "missing_scene_error",
    "progress_bar",
    "require_fields",
    "scene_ref",
    "symlink",
    "write_jsonl",
]

#: sub-folder of the prepared data folder that holds the ScanNet-style scene folders
SCENES_DIR = "scenes"

T = TypeVar("T")


class Converter:
    """Base class with the shared option check; subclasses set the attributes and ``convert``."""

    name = ""
    description = ""
    default_split: str | None = None
    options: dict[str, str] = {}

    def convert(
        self,
        raw: str | os.PathLike,
        out: str | os.PathLike,
        split: str | None = None,
        *,
        overwrite: bool = False,
        progress: bool = True,
        **options: Any,
    ) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def start(
        self, out: str | os.PathLike, split: str | None, overwrite: bool, options: Mapping[str, Any]
    ) -> tuple[str, Path, Path, dict[str, Any] | None]:
        """The prologue every split converter shares.

        Checks the options and resolves ``(split, out folder, destination .jsonl, done)``; ``done`` is
        the result to return at once when the split is already prepared (and ``overwrite`` is off).
        """
        check_options(self, options)
        resolved = split or self.default_split
        if resolved is None:
            raise SR3DConfigError(f"{self.name}: give split= (this dataset has no default split)")
        folder = Path(out).expanduser()
        dest = folder / self.name / f"{resolved}.jsonl"
        done = None
        if dest.is_file() and not overwrite:
            done = {"dataset": self.name, "split": resolved, "written": str(dest), "already_prepared": True}
        return resolved, folder, dest, done


def check_options(converter: Any, given: Mapping[str, Any]) -> None:
    """Raise :class:`SR3DConfigError` for options the converter does not take (naming the ones it does)."""
    accepted = getattr(converter, "options", {}) or {}
    unknown = sorted(k for k in given if k not in accepted)
    if unknown:
        known = ", ".join(f"{k}=" for k in sorted(accepted)) or "none"
        raise SR3DConfigError(
            f"{converter.name}: option(s) {unknown} do not apply; options of {converter.name}: {known}"
        )


def progress_bar(items: Iterable[T], desc: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """``tqdm`` on stderr (a plain iterator when disabled)."""
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=desc, total=total, file=sys.stderr, dynamic_ncols=True)


def find_file(raw: str | os.PathLike, names: Sequence[str], what: str, max_depth: int = 4) -> Path:
    """``raw`` itself when it is one of ``names``, else the only file named so below the folder ``raw``."""
    root = Path(raw).expanduser()
    if not root.exists():
        raise SR3DInputError(f"{what}: {str(root)!r} does not exist")
    if root.is_file():
        if root.name in names:
            return root
        raise SR3DInputError(f"{what}: expected a file named {' or '.join(names)}, got {str(root)!r}")
    found: list[Path] = []
    base_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        if len(Path(dirpath).parts) - base_depth >= max_depth:
            dirnames[:] = []
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames if f in names)
    if not found:
        raise SR3DInputError(f"{what}: no file named {' or '.join(names)} in {str(root)!r}")
    if len(found) > 1:
        raise SR3DInputError(
            f"{what}: {len(found)} files named {' or '.join(names)} in {str(root)!r} ({', '.join(map(str, found[:3]))}); "
            "pass the file itself"
        )
    return found[0]


def load_json(path: Path, what: str) -> Any:
    """A JSON file, or an error naming the file and what it should have been."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise SR3DInputError(f"{what} {str(path)!r} is not valid JSON: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SR3DInputError(f"cannot read {what} {str(path)!r}: {exc}") from None


def require_fields(entry: Any, fields: Sequence[str], where: str) -> None:
    """``entry`` is an object holding every field in ``fields`` (error names the entry and the fields)."""
    if not isinstance(entry, Mapping):
        raise SR3DInputError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    missing = [f for f in fields if f not in entry or entry[f] is None]
    if missing:
        raise SR3DInputError(f"{where}: missing field(s) {missing}; expected {', '.join(fields)}")


def write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> int:
    """Write records as JSON Lines atomically; returns the number written."""
    lines = [json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def scene_ref(out: Path, scene_id: str) -> tuple[str, bool]:
    """``("scenes/<scene_id>", exists)`` — the path a record stores (relative to ``out``)."""
    rel = f"{SCENES_DIR}/{scene_id}"
    return rel, (out / rel).is_dir()


def link_or_copy(src: Path, dst: Path, copy: bool = False) -> None:
    """Hard-link ``src`` to ``dst`` (same file system), else copy it; ``copy=True`` always copies."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not copy:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def symlink(src: Path, dst: Path) -> None:
    """A symbolic link ``dst`` → absolute ``src`` (falls back to a copy where links are not allowed)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(src.resolve(), dst, target_is_directory=src.is_dir())
    except OSError:
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)


def missing_scene_error(dataset: str, missing: Mapping[str, int], out: Path) -> SR3DInputError:
    """The error for questions whose scene folder has not been prepared."""
    ids = sorted(missing)
    shown = ", ".join(f"{s} ({missing[s]} item(s))" for s in ids[:5]) + (" …" if len(ids) > 5 else "")
    return SR3DInputError(
        f"{dataset}: {sum(missing.values())} item(s) refer to {len(ids)} scene(s) missing from "
        f"{str(out / SCENES_DIR)!r}: {shown}; prepare the scannet data set first (raw= the scans, out={str(out)!r}), "
        "or pass skip_missing=True to leave those items out"
    )


def as_bool(value: Any, name: str) -> bool:
    """Option value as bool (accepts true/false strings)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "0", "false", "no"):
        return value.strip().lower() in ("1", "true", "yes")
    raise SR3DConfigError(f"option {name}={value!r} must be true or false")


def as_int(value: Any, name: str, minimum: int = 1) -> int:
    """Option value as an int >= ``minimum``."""
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise SR3DConfigError(f"option {name}={value!r} must be an integer") from None
    if isinstance(value, bool) or out < minimum:
        raise SR3DConfigError(f"option {name}={value!r} must be an integer >= {minimum}")
    return out
