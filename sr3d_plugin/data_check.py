"""Check training records before any work starts: every bad record, with file, line and id, in one report.

:func:`check_records` reads JSON / JSONL record files (docs/data-format.md) and checks each record
the way training will use it, but at header level where that is cheap:

* the record's structure (:func:`sr3d_plugin.records.validate_record`) and its size
  (``max_record_bytes``, one JSONL line or one element of a JSON list);
* its files exist and decode: images (header: format and size), depth ``.npy`` (header: shape),
  16-bit depth PNGs and relative depth images (header), point-map ``.npz`` (archive index) / ``.npy``
  (header), intrinsics / pose / axis-alignment files (present), scene folders (numbered colour,
  depth and pose files, one each; poses read to find the valid frames, as the scene reader does);
  videos are only checked to exist;
* frame references: a region's ``frame`` index lies among the frames left after sampling
  (``num_frames``, uniform ``floor(linspace)``), an ``"@ID"`` names a sampled frame, and per-frame
  lists (``depth``, ``poses``, ``relative_depth``) have one entry per frame;
* regions lie in their images (the region reader of training itself,
  :func:`sr3d_plugin.regions.region_from_record`, run on the frame sizes read from the headers:
  boxes inside the image, mask / RLE / polygon masks non-empty); ``box3d`` values are checked for
  shape and sign only (projecting them needs the depth maps);
* the ``<mask>`` count of the conversation matches the regions (or ``<regionK>`` aliases stay
  below it), the rule of the processor.

A record that passes is read by :class:`~sr3d_plugin.training.data.SR3DTrainDataset` without a
data error; a record that fails would fail there, after the model loaded. ``sr3d validate-data``
prints the report; training runs the check before the model loads (``data.skip_invalid`` drops
the bad records instead of stopping) and ``sr3d eval`` checks the evaluation inputs
(:mod:`sr3d_plugin.evaluation.preflight`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sr3d_plugin.errors import SR3DDataError, SR3DInputError
from sr3d_plugin.limits import MAX_RECORD_BYTES, iter_json_records

__all__ = [
    "MAX_RECORD_BYTES",
    "DataReport",
    "RecordProblem",
    "check_records",
    "iter_json_records",
]

#: problems listed in full in one error message (the report keeps them all)
SHOWN_PROBLEMS = 50


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


@dataclass
class RecordProblem:
    """One bad record: ``file:line`` (1-based), its ``id`` (None when it has none) and what is wrong."""

    file: str
    line: int
    id: str | None
    message: str

    def __str__(self) -> str:
        rid = f" (id {self.id!r})" if self.id is not None else ""
        return f"{self.file}:{self.line}{rid}: {self.message}"


@dataclass
class DataReport:
    """The outcome of :func:`check_records`.

    Attributes:
        files: the checked files, as given.
        total: records read (bad ones included).
        records: ``{file: [(line, record), ...]}`` of the records that passed, in file order.
        problems: every bad record (:class:`RecordProblem`), in file and line order.
    """

    files: list[str]
    total: int = 0
    records: dict[str, list[tuple[int, dict[str, Any]]]] = field(default_factory=dict)
    problems: list[RecordProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def num_valid(self) -> int:
        return sum(len(v) for v in self.records.values())

    @property
    def num_invalid(self) -> int:
        return len({(p.file, p.line) for p in self.problems})

    def valid_records(self, file: str | None = None) -> list[dict[str, Any]]:
        """The records that passed (of one file, or of all)."""
        files = [file] if file is not None else list(self.records)
        return [rec for f in files for _, rec in self.records.get(f, [])]

    def summary(self) -> str:
        return (
            f"{self.total} record(s) in {len(self.files)} file(s): {self.num_valid} valid, {self.num_invalid} invalid"
        )

    def message(self, shown: int = SHOWN_PROBLEMS) -> str:
        """The summary and every problem (the first ``shown`` when there are more), one per line."""
        lines = [self.summary()]
        lines += [f"  {p}" for p in self.problems[:shown]]
        if len(self.problems) > shown:
            lines.append(
                f"  … and {len(self.problems) - shown} more problem(s) (all of them: `sr3d validate-data "
                f"{' '.join(self.files)}`, or DataReport.problems)"
            )
        return "\n".join(lines)

    def raise_if_invalid(self, hint: str = "") -> None:
        """Raise :class:`SR3DDataError` listing every bad record (with ``hint`` appended) unless all passed."""
        if self.problems:
            raise SR3DDataError(self.message() + (f"\n{hint}" if hint else ""), report=self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "total": self.total,
            "valid": self.num_valid,
            "invalid": self.num_invalid,
            "problems": [{"file": p.file, "line": p.line, "id": p.id, "message": p.message} for p in self.problems],
        }


# ----------------------------------------------------------------------------------------------
# header-level frames
# ----------------------------------------------------------------------------------------------


class _Sized:
    """Stands in for a PIL image where only ``.size`` is read."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size


class HeaderFrames:
    """The sampled frames of a record as far as regions need them: ``len``, ``frame_ids``, ``find``
    and ``images[k].size`` (read from the image headers; None for videos, whose size is not read)."""

    def __init__(self, sizes: Sequence[tuple[int, int] | None], frame_ids: Sequence[str]) -> None:
        from sr3d_plugin.sources.base import normalise_frame_id

        self.images = [_Sized(s) if s is not None else None for s in sizes]
        self.frame_ids = [str(f) for f in frame_ids]
        self._ids = {normalise_frame_id(f): i for i, f in enumerate(self.frame_ids)}
        self.sized = all(s is not None for s in sizes)

    def __len__(self) -> int:
        return len(self.frame_ids)

    def find(self, frame_id: object) -> int | None:
        from sr3d_plugin.sources.base import normalise_frame_id

        return self._ids.get(normalise_frame_id(frame_id))


def _image_size(path: Path, what: str) -> tuple[int, int]:
    """Width and height from an image header (the pixels are not decoded)."""
    from PIL import Image

    if not path.is_file():
        raise SR3DInputError(f"{what} {str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            return (int(im.size[0]), int(im.size[1]))
    except Exception as exc:  # PIL raises many types for undecodable files
        raise SR3DInputError(f"{what} {str(path)!r} cannot be decoded ({type(exc).__name__}: {exc})") from None


def _check_array_file(path: Path, what: str, ndim: tuple[int, ...] | None = None) -> None:
    """A ``.npy`` (header), ``.npz`` (archive index) or image file (header) that exists and opens."""
    if not path.is_file():
        raise SR3DInputError(f"{what} {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise SR3DInputError(f"{what} {str(path)!r} is not a readable .npy array ({exc})") from None
        if ndim is not None and arr.ndim not in ndim:
            raise SR3DInputError(
                f"{what} {str(path)!r} has shape {arr.shape}; expected {' or '.join(f'{d}-D' for d in ndim)}"
            )
        return
    if suffix == ".npz":
        import zipfile

        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise SR3DInputError(f"{what} {str(path)!r} is not a readable .npz archive ({exc})") from None
        if not names:
            raise SR3DInputError(f"{what} {str(path)!r} is an empty .npz archive")
        return
    _image_size(path, what)


def _resolve(value: Any, base: Path) -> Path:
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else base / p


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


class _SceneCache:
    """Per scene folder: the frame numbers with a valid pose and their colour files (read once)."""

    def __init__(self) -> None:
        self._scenes: dict[Path, tuple[list[int], dict[int, Path]] | SR3DInputError] = {}
        self._sizes: dict[Path, tuple[int, int]] = {}

    def frames(self, scene: Path) -> tuple[list[int], dict[int, Path]]:
        key = scene.resolve()
        if key not in self._scenes:
            try:
                self._scenes[key] = _read_scene(scene)
            except SR3DInputError as exc:
                self._scenes[key] = exc
        found = self._scenes[key]
        if isinstance(found, SR3DInputError):
            raise found
        return found

    def size(self, path: Path, what: str) -> tuple[int, int]:
        if path not in self._sizes:
            self._sizes[path] = _image_size(path, what)
        return self._sizes[path]


def _read_scene(scene: Path) -> tuple[list[int], dict[int, Path]]:
    from sr3d_plugin.sources.files import IMAGE_SUFFIXES, load_pose_file
    from sr3d_plugin.sources.scannet import numbered_files

    if not scene.is_dir():
        raise SR3DInputError(f"scene folder {str(scene)!r} does not exist (ScanNet layout: color/, depth/, pose/)")
    colors = numbered_files(scene / "color", IMAGE_SUFFIXES, "colour")
    if not colors:
        raise SR3DInputError(f"no numbered colour frames (<i>.jpg / <i>.png) in {str(scene / 'color')!r}")
    depths = numbered_files(scene / "depth", (".png", ".npy"), "depth")
    poses = numbered_files(scene / "pose", (".txt",), "pose")
    for what, files in (("depth", depths), ("pose", poses)):
        missing = sorted(set(colors) - set(files))
        if missing:
            raise SR3DInputError(
                f"scene {str(scene)!r}: no {what} file for colour frame(s) {missing[:5]}{' …' if len(missing) > 5 else ''}"
            )
    if not (scene / "intrinsic" / "intrinsic_depth.txt").is_file():
        raise SR3DInputError(f"scene {str(scene)!r}: intrinsic/intrinsic_depth.txt not found")
    valid = []
    for i in sorted(colors):
        pose = load_pose_file(poses[i])
        if np.isfinite(pose).all():
            valid.append(i)
    if not valid:
        raise SR3DInputError(f"scene {str(scene)!r}: every pose is invalid (-inf / NaN)")
    return valid, colors


# ----------------------------------------------------------------------------------------------
# one record
# ----------------------------------------------------------------------------------------------


class _Checker:
    def __init__(self, num_frames: int, check_files: bool) -> None:
        self.num_frames = num_frames
        self.check_files = check_files
        self.scenes = _SceneCache()

    def frames(self, rec: dict[str, Any], base: Path) -> HeaderFrames | None:
        """The record's sampled frames (sizes from headers), checking the visual and geometry files."""
        from sr3d_plugin.sources.base import normalise_frame_id, uniform_frame_indices

        n = int(rec.get("num_frames", self.num_frames))
        if rec.get("image") is not None:
            path = _resolve(rec["image"], base)
            size = self.scenes.size(path, "image") if self.check_files else None
            count, picked, ids, sizes = 1, [0], [path.stem], [size]
        elif rec.get("frames") is not None:
            paths = [_resolve(f, base) for f in rec["frames"]]
            count = len(paths)
            picked = uniform_frame_indices(count, n)
            stems = [paths[i].stem for i in picked]
            ids = stems if len({normalise_frame_id(s) for s in stems}) == len(stems) else [str(i) for i in picked]
            if self.check_files:
                for i, p in enumerate(paths):
                    if not p.is_file():
                        raise SR3DInputError(f"frame {i} {str(p)!r} does not exist")
                sizes = [self.scenes.size(paths[i], f"frame {i}") for i in picked]
            else:
                sizes = [None] * len(picked)
        elif rec.get("scene") is not None:
            scene = _resolve(rec["scene"], base)
            if not self.check_files:
                return None
            valid, colors = self.scenes.frames(scene)
            chosen = [valid[j] for j in uniform_frame_indices(len(valid), n)]
            ids = [str(i) for i in chosen]
            sizes = [self.scenes.size(colors[i], f"colour frame {i} of scene {str(scene)!r}") for i in chosen]
            if len(set(sizes)) > 1:
                raise SR3DInputError(f"scene {str(scene)!r}: colour frames have different sizes {sorted(set(sizes))}")
            count, picked = len(valid), list(range(len(chosen)))
        elif rec.get("video") is not None:
            path = _resolve(rec["video"], base)
            if self.check_files and not path.is_file():
                raise SR3DInputError(f"video {str(path)!r} does not exist")
            return HeaderFrames([None] * n, [str(i) for i in range(n)])
        else:
            return None
        self._geometry(rec, base, count, picked)
        return HeaderFrames(sizes, ids)

    def _geometry(self, rec: dict[str, Any], base: Path, count: int, picked: list[int]) -> None:
        """Per-frame lists have one entry per frame; geometry files exist and open (headers)."""
        unit = "image" if rec.get("image") is not None else "frame"
        for key in ("depth", "relative_depth", "poses"):
            value = rec.get(key)
            if value is None:
                continue
            if key == "poses" and not (
                isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], str))
            ):
                arr = np.asarray(value, dtype=np.float64) if _numeric(value) else None
                if arr is None or arr.ndim != 3 or arr.shape[1:] != (4, 4) or not np.isfinite(arr).all():
                    raise SR3DInputError(f"poses must be finite 4×4 camera-to-world matrices, one per {unit}")
                if arr.shape[0] != count:
                    raise SR3DInputError(f"{arr.shape[0]} pose(s) for {count} {unit}(s); expected one per {unit}")
                continue
            items = _as_list(value)
            if key == "relative_depth" and len(items) == len(picked) and len(items) != count:
                pass  # relative depth may be given for the sampled frames only
            elif len(items) != count:
                raise SR3DInputError(f"{len(items)} {key} entr(ies) for {count} {unit}(s); expected one per {unit}")
            if self.check_files:
                chosen = picked if len(items) == count else list(range(len(items)))
                for i in chosen:
                    if key == "poses":
                        p = _resolve(items[i], base)
                        if not p.is_file():
                            raise SR3DInputError(f"pose file {str(p)!r} does not exist")
                    else:
                        _check_array_file(_resolve(items[i], base), f"{key} of {unit} {i}", ndim=(2,))
        for key, what in (("intrinsics", "intrinsics"), ("axis_align", "axis_align")):
            value = rec.get(key)
            if isinstance(value, str) and self.check_files:
                p = _resolve(value, base)
                if not p.is_file():
                    raise SR3DInputError(f"{what} file {str(p)!r} does not exist")
            elif value is not None and not isinstance(value, str):
                arr = np.asarray(value, dtype=np.float64) if _numeric(value) else None
                shape = (3, 3) if key == "intrinsics" else (4, 4)
                ok = arr is not None and (arr.shape == shape or (key == "intrinsics" and arr.shape == (count, 3, 3)))
                if not ok or not np.isfinite(arr).all():
                    raise SR3DInputError(f"{what} must be a finite {'×'.join(map(str, shape))} matrix")
        if rec.get("points") is not None and self.check_files:
            _check_array_file(_resolve(rec["points"], base), "points file")

    def regions(self, rec: dict[str, Any], frames: HeaderFrames | None, base: Path) -> int:
        """Checks every region on ``frames``; returns the region count."""
        regions = rec.get("regions") or []
        if frames is None:
            return len(regions)
        for i, item in enumerate(regions):
            self._region(item, frames, base, f"region {i}")
        return len(regions)

    def _region(self, item: Any, frames: HeaderFrames, base: Path, where: str) -> None:
        from sr3d_plugin.regions import region_from_record

        if isinstance(item, dict) and "box3d" in item and "masks" not in item:
            _box3d(item["box3d"], where)
            extra = sorted(set(item) - {"box3d", "label"})
            if extra:
                raise SR3DInputError(f"{where}: box3d regions take only box3d and label, got also {extra}")
            return
        if not frames.sized:
            if isinstance(item, dict) and "frame" in item:
                from sr3d_plugin.regions import _frame_of

                _frame_of(item["frame"], frames, where)
            return
        if isinstance(item, dict) and "masks" in item:
            rest = {k: v for k, v in item.items() if k != "box3d"}
            if item.get("box3d") is not None:
                _box3d(item["box3d"], f"{where} box3d")
            try:
                region_from_record(rest, frames, base, where)
            except SR3DInputError as exc:
                if item.get("box3d") is None or "none of its masks lies" not in str(exc):
                    raise
            return
        if isinstance(item, str) and "box3d=" in item:
            from sr3d_plugin.regions import parse_region_spec

            parse_region_spec(item)
            return
        region_from_record(item, frames, base, where)


def _numeric(value: Any) -> bool:
    try:
        np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return True


def _box3d(value: Any, where: str) -> None:
    if not isinstance(value, (list, tuple)) or len(value) not in (6, 7) or not _numeric(value):
        raise SR3DInputError(
            f"{where}: box3d={value!r}; expected [cx, cy, cz, sx, sy, sz] or with a yaw (metres, radians)"
        )
    arr = np.asarray(value, dtype=np.float64)
    if not np.isfinite(arr).all() or (arr[3:6] <= 0).any():
        raise SR3DInputError(f"{where}: box3d={value!r}; expected finite numbers with positive sizes sx, sy, sz")


def check_mask_count(rec: dict[str, Any], n_regions: int, mask_token: str = "<mask>") -> None:
    """The conversation refers to the regions as the processor will: one ``<mask>`` per region in
    order, or ``<regionK>`` aliases with ``K < n_regions`` (not both)."""
    from sr3d_plugin.regions import count_region_references

    text = "".join(str(t.get("value", "")) for t in rec.get("conversations") or [] if isinstance(t, dict))
    bare, aliases = count_region_references(text, mask_token)
    if bare and aliases:
        raise SR3DInputError(f"the conversation mixes {mask_token} and <regionK> references; use one style")
    if aliases:
        bad = sorted({k for k in aliases if k >= n_regions})
        if bad:
            raise SR3DInputError(
                f"the conversation refers to <region{bad[0]}> but the record has {n_regions} region(s)"
            )
    elif bare != n_regions:
        raise SR3DInputError(
            f"the conversation has {bare} {mask_token} token(s) but the record has {n_regions} region(s); "
            f"expected one {mask_token} per region, in order"
        )


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------


def check_records(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    num_frames: int = 32,
    max_record_bytes: int = MAX_RECORD_BYTES,
    check_files: bool = True,
    mask_token: str = "<mask>",
) -> DataReport:
    """Check every record of one or more JSON / JSONL files (module docstring); never stops at the first.

    Args:
        paths: record files; paths inside a record are relative to its file's folder.
        num_frames: frames sampled from frame lists and scenes when a record gives no ``num_frames``
            (the recipe's ``data.num_frames``).
        max_record_bytes: largest record (bytes of one JSONL line / JSON-list element).
        check_files: open the files (False: structure, region and ``<mask>`` checks only).
        mask_token: the region placeholder of the conversation.

    Returns:
        A :class:`DataReport` (``report.ok``; ``report.raise_if_invalid()`` raises
        :class:`~sr3d_plugin.errors.SR3DDataError` listing every bad record). A missing or
        unreadable file, or a malformed JSON list, is one problem of that file (line 0).
    """
    from sr3d_plugin.records import TRAINABLE_EVAL_TASKS, eval_record_to_training
    from sr3d_plugin.training.recipe import MAX_NUM_FRAMES

    files = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not files:
        raise SR3DInputError("paths=[]; expected at least one JSON or JSONL file of records")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or not 1 <= num_frames <= MAX_NUM_FRAMES:
        raise SR3DInputError(f"num_frames={num_frames!r}; expected an integer in [1, {MAX_NUM_FRAMES}]")
    report = DataReport(files=[str(f) for f in files])
    checker = _Checker(num_frames, check_files)
    for f in files:
        name = str(f)
        p = Path(f)
        base = p.resolve().parent
        task = base.name
        kept: list[tuple[int, dict[str, Any]]] = []
        report.records[name] = kept
        try:
            for line, rec, problem in iter_json_records(p, max_record_bytes):
                report.total += 1
                rid = str(rec["id"]) if isinstance(rec, dict) and rec.get("id") is not None else None
                if problem is not None:
                    report.problems.append(RecordProblem(name, line, rid, problem))
                    continue
                try:
                    if task in TRAINABLE_EVAL_TASKS and isinstance(rec, dict) and "conversations" not in rec:
                        rec = eval_record_to_training(rec, task, base.parent)
                        rid = rec.get("id") or rid
                    _check_one(rec, base, checker, mask_token)
                except SR3DInputError as exc:
                    report.problems.append(RecordProblem(name, line, rid, _strip_where(str(exc))))
                    continue
                except (TypeError, ValueError, KeyError, IndexError, OverflowError) as exc:
                    report.problems.append(
                        RecordProblem(name, line, rid, f"malformed record ({type(exc).__name__}: {exc})")
                    )
                    continue
                kept.append((line, rec))
        except SR3DInputError as exc:
            report.problems.append(RecordProblem(name, 0, None, str(exc)))
    if report.total == 0 and not report.problems:
        report.problems.append(RecordProblem(str(files[0]), 0, None, "no records in the given file(s)"))
    return report


def _strip_where(message: str) -> str:
    """Drop the ``record (id …)`` prefix of :func:`validate_record` messages (the report names the record)."""
    return re.sub(r"^record(?: \(id [^)]*\))?:? ?", "", message)


def _check_one(rec: Any, base: Path, checker: _Checker, mask_token: str) -> None:
    from sr3d_plugin.records import validate_record
    from sr3d_plugin.training.recipe import MAX_NUM_FRAMES

    validate_record(rec, "record")
    _check_types(rec)
    n = rec.get("num_frames")
    if n is not None and n > MAX_NUM_FRAMES:
        raise SR3DInputError(f"num_frames={n}; expected at most {MAX_NUM_FRAMES}")
    frames = checker.frames(rec, base)
    n_regions = checker.regions(rec, frames, base)
    check_mask_count(rec, n_regions, mask_token)


def _is_path_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _check_types(rec: dict[str, Any]) -> None:
    """Field types the readers assume (a wrong one would end in a raw exception inside training)."""
    for key in ("image", "scene", "video", "points"):
        if rec.get(key) is not None and not _is_path_text(rec[key]):
            raise SR3DInputError(f"{key}={rec[key]!r}; expected a file path (a string)")
    if rec.get("frames") is not None and not all(_is_path_text(f) for f in rec["frames"]):
        raise SR3DInputError("frames must be a list of image paths (strings)")
    for key in ("depth", "relative_depth"):
        value = rec.get(key)
        if value is not None and not (
            _is_path_text(value) or (isinstance(value, list) and value and all(_is_path_text(v) for v in value))
        ):
            raise SR3DInputError(f"{key}={value!r}; expected a file path or a list of file paths (one per frame)")
    if "depth_scale" in rec:
        value = rec["depth_scale"]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value) and value > 0
        if not ok:
            raise SR3DInputError(f"depth_scale={value!r}; expected a positive number (raw depth units per metre)")
