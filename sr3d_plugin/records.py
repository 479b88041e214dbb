"""LLaVA-style data records → frames, regions, 3D positions and chat messages.

The record format is documented in ``docs/data-format.md``. One record is a JSON object with an
``id``, exactly one visual key (``image``, ``frames``, ``scene`` or ``video``), optional geometry
(``depth`` + ``depth_scale``, ``relative_depth``, ``intrinsics``, ``poses``, ``axis_align``,
``points``, ``depth_source``), ``num_frames``, ``regions`` and ``conversations``. Relative paths are
relative to the folder of the JSON/JSONL file.

Frame reading and 3D positions go through :mod:`sr3d_plugin.visual_inputs` (``read_frames`` /
``positions``, as the pipeline and the lmms-eval model do) and regions through
:mod:`sr3d_plugin.regions`, so a record means exactly what the same arguments mean to ``sr3d ask``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sr3d_plugin import _checks
from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.modeling.inputs import Region, VisualInput
from sr3d_plugin.regions import region_from_record as region_from_record
from sr3d_plugin.visual_inputs import DEPTH_SOURCES as DEPTH_SOURCES
from sr3d_plugin.visual_inputs import depth_source_name, positions, read_frames

__all__ = [
    "VISUAL_KEYS",
    "RecordReader",
    "load_records",
    "record_messages",
    "region_from_record",
    "validate_record",
]

#: the keys naming a record's visual input (exactly one per record)
VISUAL_KEYS = ("image", "frames", "scene", "video")
#: every key a record may carry
RECORD_KEYS = {
    "id",
    *VISUAL_KEYS,
    "depth",
    "depth_scale",
    "relative_depth",
    "intrinsics",
    "poses",
    "axis_align",
    "points",
    "depth_source",
    "num_frames",
    "regions",
    "conversations",
    "meta",
}
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_MARKERS = re.compile(r"(?:<image>|<video>)\n?")


# ----------------------------------------------------------------------------------------------
# files and validation
# ----------------------------------------------------------------------------------------------


#: evaluation tasks whose prepared records (``sr3d prepare``) can be trained on directly
TRAINABLE_EVAL_TASKS = ("scanqa", "sqa3d", "scan2cap")


_PATH_KEYS = ("image", "frames", "scene", "video", "depth", "intrinsics", "poses", "axis_align", "points")


def eval_record_to_training(rec: dict[str, Any], task: str, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """A training record from a prepared evaluation record (``<data>/<task>/<split>.jsonl``).

    The user turn is the task's own evaluation prompt (the bundled lmms-eval task YAML, so training
    and evaluation ask the same way); the answer is the first reference answer (ScanQA / SQA3D) or
    caption (Scan2Cap). Visual keys and regions are kept; relative file paths, which prepared data
    gives relative to the data folder ``root``, are made absolute.
    """
    from sr3d_plugin.evaluation.prompts import doc_to_text, task_prompt_kwargs

    if task not in TRAINABLE_EVAL_TASKS:
        raise SR3DInputError(f"records of task {task!r} cannot be trained on; expected one of {TRAINABLE_EVAL_TASKS}")
    where = f"{task} record {rec.get('question_id', '?')!r}"
    targets = rec.get("references") if task == "scan2cap" else rec.get("answers")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t.strip() for t in targets):
        field = "references" if task == "scan2cap" else "answers"
        raise SR3DInputError(f"{where}: {field} must be a non-empty list of strings to train on")
    prompt = doc_to_text(task, rec, task_prompt_kwargs(task))
    out = {k: rec[k] for k in RECORD_KEYS - {"id", "conversations", "meta"} if rec.get(k) is not None}
    out["id"] = str(rec.get("question_id", rec.get("id", "")))
    out["conversations"] = [{"from": "human", "value": prompt}, {"from": "gpt", "value": targets[0].strip()}]
    if root is not None:
        base = Path(root)

        def absolute(value: Any) -> Any:
            if isinstance(value, str) and not Path(value).is_absolute():
                return str(base / value)
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return [absolute(v) for v in value]
            return value

        for key in _PATH_KEYS:
            if key in out:
                out[key] = absolute(out[key])
    return out


def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSON list or a JSONL file of records (each checked with :func:`validate_record`).

    Prepared evaluation files (``<data>/scanqa|sqa3d|scan2cap/<split>.jsonl`` from ``sr3d prepare``,
    records without ``conversations``) are converted with :func:`eval_record_to_training`.
    """
    p = Path(path)
    if not p.is_file():
        raise SR3DInputError(f"data file {str(p)!r} does not exist; expected a JSON or JSONL file of records")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SR3DInputError(f"data file {str(p)!r} is not readable UTF-8 text: {exc}") from exc
    records: list[Any]
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SR3DInputError(f"{p} is not valid JSON: {exc}") from exc
    else:
        records = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SR3DInputError(f"{p}, line {n}: not valid JSON ({exc})") from exc
    if not records:
        raise SR3DInputError(f"{p} holds no records")
    task = p.resolve().parent.name
    if task in TRAINABLE_EVAL_TASKS:
        records = [
            eval_record_to_training(rec, task, p.resolve().parent.parent)
            if isinstance(rec, dict) and "conversations" not in rec
            else rec
            for rec in records
        ]
    for i, rec in enumerate(records):
        validate_record(rec, f"{p.name} record {i}")
    return records


def validate_record(rec: Any, where: str = "record") -> None:
    """Check a record's structure (not its files). Raises :class:`SR3DInputError` naming the problem."""
    if not isinstance(rec, dict):
        raise SR3DInputError(f"{where} is a {type(rec).__name__}; expected a JSON object")
    where = f"{where} (id {rec['id']!r})" if "id" in rec else where
    unknown = sorted(set(rec) - RECORD_KEYS)
    if unknown:
        raise SR3DInputError(f"{where} has unknown keys {unknown}; expected keys among {sorted(RECORD_KEYS)}")
    visual = [k for k in VISUAL_KEYS if rec.get(k) is not None]
    if len(visual) > 1:
        raise SR3DInputError(f"{where} names {visual}; expected exactly one of {', '.join(VISUAL_KEYS)}")
    if "frames" in rec and not (isinstance(rec["frames"], list) and rec["frames"]):
        raise SR3DInputError(f"{where}: frames must be a non-empty list of image paths")
    depth_source_name(rec.get("depth_source", "auto"), f"{where}: depth_source")
    if "num_frames" in rec and (
        not isinstance(rec["num_frames"], int) or isinstance(rec["num_frames"], bool) or rec["num_frames"] <= 0
    ):
        raise SR3DInputError(f"{where}: num_frames={rec['num_frames']!r}; expected a positive integer")
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise SR3DInputError(f"{where}: conversations must be a non-empty list of {{'from', 'value'}} turns")
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise SR3DInputError(f"{where}: turn {t} must be an object with 'from' and 'value'")
        if turn["from"] not in _ROLES:
            raise SR3DInputError(
                f"{where}: turn {t} is from {turn['from']!r}; expected human, gpt (or user, assistant, system)"
            )
        if not isinstance(turn["value"], str):
            raise SR3DInputError(f"{where}: turn {t} value must be a string")
    if not any(_ROLES[t["from"]] == "assistant" for t in conv):
        raise SR3DInputError(f"{where}: no gpt turn; nothing to learn from")
    if not visual and any(_MARKERS.search(t["value"]) for t in conv):
        raise SR3DInputError(f"{where} has <image> markers but no image, frames, scene or video")
    regions = rec.get("regions", [])
    if not isinstance(regions, list):
        raise SR3DInputError(f"{where}: regions must be a list")
    if regions and not visual:
        raise SR3DInputError(f"{where} has regions but no visual input")


# ----------------------------------------------------------------------------------------------
# conversations
# ----------------------------------------------------------------------------------------------


def record_messages(rec: dict[str, Any], num_images: int, system_prompt: str | None = None) -> list[dict[str, str]]:
    """Chat messages of a record with exactly ``num_images`` ``<image>`` markers.

    Markers (``<image>``/``<video>``, each with one following newline) are removed wherever they
    were and ``num_images`` ``<image>`` markers are put at the start of the first user turn (where
    VILA puts them), so records may carry none, one per frame, or a single ``<video>``.
    """
    messages: list[dict[str, str]] = []
    if system_prompt is not None and not any(_ROLES[t["from"]] == "system" for t in rec["conversations"]):
        messages.append({"role": "system", "content": system_prompt})
    placed = num_images == 0
    for turn in rec["conversations"]:
        role = _ROLES[turn["from"]]
        text = _MARKERS.sub("", turn["value"]) if role == "user" else turn["value"]
        if role == "user" and not placed:
            text = "<image>" * num_images + text.lstrip("\n")
            placed = True
        messages.append({"role": role, "content": text})
    if not placed:
        raise SR3DInputError(f"record {rec.get('id', '?')!r} has images but no human turn to attach them to")
    return messages


# ----------------------------------------------------------------------------------------------
# regions
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# frames and positions
# ----------------------------------------------------------------------------------------------


def _path(value: Any, base: Path) -> Any:
    if isinstance(value, str):
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p
    return value


def _paths(value: Any, base: Path) -> Any:
    if isinstance(value, list):
        return [_path(v, base) for v in value]
    return _path(value, base)


def _matrix(value: Any, base: Path, shape: tuple[int, ...], what: str) -> np.ndarray:
    from sr3d_plugin.sources.files import read_matrix

    if isinstance(value, str):
        m = read_matrix(_path(value, base), what)
    else:
        m = _checks.as_array(value, what, finite=False, nonempty=False)
    if m.shape != shape:
        raise SR3DInputError(f"{what} must be {'×'.join(map(str, shape))}, got shape {m.shape}")
    return m


class RecordReader:
    """Turns records into :class:`~sr3d_plugin.sources.base.FrameSet`, regions and canonical point maps.

    Args:
        config: the model's :class:`~sr3d_plugin.modeling.SR3DConfig` (frame count, canonical mode,
            depth model, whether positions are needed).
        num_frames: default frames sampled from frame lists, videos and scenes (a record's
            ``num_frames`` wins).
        depth_source: default point-map source for records that do not name one
            (:data:`sr3d_plugin.visual_inputs.DEPTH_SOURCES`; ``"points"`` is read as ``"reconstruction"``).
        depth_model: Depth Anything V2 id or folder for ``depth_source: depth_anything``.
        cache: point-map cache (False, True, a folder) — see :func:`sr3d_plugin.pointmap.pointmaps_with_cache`.
        device: device of the depth estimator.
    """

    def __init__(
        self,
        config: Any,
        num_frames: int | None = None,
        depth_source: str = "auto",
        depth_model: str | None = None,
        cache: Any = False,
        device: str = "cpu",
    ) -> None:
        self.config = config
        self.num_frames = num_frames
        self.depth_source = depth_source_name(depth_source)
        self.depth_model = depth_model or getattr(config, "depth_model", None)
        self.cache = cache
        self.device = device

    @property
    def needs_positions(self) -> bool:
        return bool(getattr(self.config, "use_position_encoding", True))

    def frames(self, rec: dict[str, Any], base: Path) -> Any:
        """The record's frames after uniform sampling (``meta["sampled_indices"]`` / ``["total_frames"]``)."""
        if not isinstance(rec, dict):
            raise SR3DInputError(f"rec must be a record (a JSON object), got {_checks.describe(rec)}")
        where = f"record {rec.get('id', '?')!r}"
        raw_scale = rec.get("depth_scale", 1000.0)
        depth_scale = _checks.finite_number(raw_scale, f"{where}: depth_scale", positive=True)
        n = _checks.integer(
            rec.get("num_frames", self.num_frames or self.config.num_video_frames), f"{where}: num_frames", minimum=1
        )
        kwargs: dict[str, Any] = {"num_frames": n, "depth_scale": depth_scale}
        if rec.get("image") is not None:
            kwargs["image"] = _path(rec["image"], base)
        elif rec.get("frames") is not None:
            kwargs["frames"] = [_path(f, base) for f in rec["frames"]]
        elif rec.get("scene") is not None:
            kwargs["scene"] = _path(rec["scene"], base)
        elif rec.get("video") is not None:
            kwargs["video"] = _path(rec["video"], base)
        else:
            raise SR3DInputError(f"record {rec.get('id', '?')!r} has no visual input")
        if rec.get("depth") is not None:
            kwargs["depth"] = _paths(rec["depth"], base)
        if rec.get("intrinsics") is not None:
            k = rec["intrinsics"]
            if isinstance(k, str):
                kwargs["intrinsics"] = _path(k, base)
            else:
                k = _checks.as_array(k, f"{where}: intrinsics", finite=False, nonempty=False)
                if k.shape != (3, 3) and not (k.ndim == 3 and k.shape[1:] == (3, 3)):
                    raise SR3DInputError(
                        f"{where}: intrinsics must be a file, a 3×3 matrix or one 3×3 per frame, got shape {k.shape}"
                    )
                kwargs["intrinsics"] = k
        if rec.get("poses") is not None:
            poses = rec["poses"]
            if isinstance(poses, str) or (isinstance(poses, list) and poses and all(isinstance(p, str) for p in poses)):
                kwargs["poses"] = _paths(poses, base)  # pose files
            else:
                poses = _checks.as_array(poses, f"{where}: poses", finite=False, nonempty=False)
                if poses.ndim != 3 or poses.shape[1:] != (4, 4):
                    raise SR3DInputError(
                        f"{where}: poses must be pose files or one 4×4 camera-to-world per frame, got shape "
                        f"{poses.shape}"
                    )
                kwargs["poses"] = poses
        fs = read_frames(**kwargs)
        if rec.get("axis_align") is not None:
            a = _axis_align(rec["axis_align"], base)
            if fs.cam_to_world is None:
                raise SR3DInputError(f"record {rec.get('id', '?')!r} has axis_align but no poses")
            fs.cam_to_world = a[None] @ fs.cam_to_world
            fs.axis_align = a
        return fs

    def regions(self, rec: dict[str, Any], frames: Any, base: Path) -> list[Region]:
        """The record's regions on ``frames``, in ``<mask>`` / ``<regionK>`` order."""
        rid = rec.get("id", "?")
        return [
            region_from_record(item, frames, base, where=f"record {rid!r} region {i}")
            for i, item in enumerate(rec.get("regions", []) or [])
        ]

    def positions(
        self, rec: dict[str, Any], frames: Any, base: Path, cache: Any = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(canonical [V, H, W, 3], valid [V, H, W] or None)`` of ``frames``, or ``(None, None)`` when the
        model needs no positions.

        Sources, by ``depth_source`` (record, else the reader default; ``auto`` picks the first that
        applies): ``reconstruction`` (the ``points`` file) → ``relative_depth`` (a released single-view
        depth image: value/255, 0 = nearest) → ``gt_depth`` (``depth`` + ``intrinsics`` / ``poses``;
        metric back-projection) → ``depth_anything``. An explicit ``relative_depth`` without a
        ``relative_depth`` file reads the record's ``depth`` under the single-view convention.
        """
        if not self.needs_positions:
            return None, None
        cache = self.cache if cache is None else cache
        src = depth_source_name(rec.get("depth_source", self.depth_source))
        rid = rec.get("id", "?")
        if src == "auto":
            if rec.get("points") is not None:
                src = "reconstruction"
            elif rec.get("relative_depth") is not None:
                src = "relative_depth"
            elif frames.depth is not None:
                src = "gt_depth"
            else:
                src = "depth_anything"
        mode = getattr(self.config, "canonical_mode", "sr3d")
        if src == "reconstruction":
            if rec.get("points") is None:
                raise SR3DInputError(f"record {rid!r}: depth_source 'reconstruction' needs a 'points' file")
            canonical, valid, _ = positions(frames, src, points=_path(rec["points"], base), canonical_mode=mode)
            return canonical, valid
        if src == "relative_depth" and rec.get("relative_depth") is not None:
            return self._relative(rec, frames, base, cache)
        if src == "depth_anything":
            if not self.depth_model:
                raise SR3DInputError(f"record {rid!r} needs a depth model (no depth, points or relative_depth)")
            canonical, valid, _ = positions(
                frames, src, depth_model=self.depth_model, device=self.device, canonical_mode=mode, cache=cache
            )
            return canonical, valid
        if frames.depth is None:
            raise SR3DInputError(f"record {rid!r}: depth_source {src!r} needs depth maps")
        canonical, valid, _ = positions(frames, src, canonical_mode=mode, cache=cache)
        return canonical, valid

    def _relative(self, rec: dict[str, Any], frames: Any, base: Path, cache: Any) -> tuple[torch.Tensor, None]:
        """Released single-view relative depth images → points: ``d = value / 255`` (``/ max`` above 255),
        0 = nearest and valid, as SR-REAL's ``mm_utils.process_depth`` (SR3D-FACTS §3)."""
        from PIL import Image

        from sr3d_plugin.sources.base import FrameSet

        files = rec["relative_depth"]
        files = [files] if isinstance(files, str) else list(files)
        if len(files) != len(frames) and len(files) == int(frames.meta.get("total_frames", -1)):
            files = [files[i] for i in frames.meta["sampled_indices"]]
        if len(files) != len(frames):
            raise SR3DInputError(
                f"record {rec.get('id', '?')!r}: {len(files)} relative_depth file(s) for {len(frames)} frame(s)"
            )
        maps = []
        for f in files:
            with Image.open(_path(f, base)) as im:
                arr = np.asarray(im)
            if arr.ndim == 3:
                arr = arr[..., 0]
            maps.append(arr.astype(np.float64))  # file units; value/255 (or /max) as SR-REAL's process_depth
        fs = FrameSet(
            images=frames.images,
            depth=np.stack(maps),
            frame_ids=list(frames.frame_ids),
            source=frames.source,
            meta={"input_files": [str(_path(f, base)) for f in files], "reader": "relative_depth"},
        )
        canonical, _, _ = positions(fs, "relative_depth", cache=cache, scaling="sr3d", depth_scale=1.0)
        return canonical, None

    def visual(self, rec: dict[str, Any], base: Path) -> VisualInput | None:
        """The complete visual input of a record (None for text-only records)."""
        if not any(rec.get(k) is not None for k in VISUAL_KEYS):
            return None
        fs = self.frames(rec, base)
        regions = self.regions(rec, fs, base)
        canonical, valid = self.positions(rec, fs, base)
        return VisualInput(
            list(fs.images), points=canonical, valid=valid, regions=regions, multi_view=rec.get("image") is None
        )


def _axis_align(value: Any, base: Path) -> np.ndarray:
    if isinstance(value, str) and not value.strip().startswith("["):
        from sr3d_plugin.sources.scannet import read_axis_alignment

        p = _path(value, base)
        if Path(p).suffix == ".txt":
            try:
                m = read_axis_alignment(p)
            except SR3DInputError:
                m = None
            if m is not None:
                return m
    return _matrix(value, base, (4, 4), "axis_align")


def subset_frames(frames: Any, keep: Sequence[int]) -> Any:
    """``frames.select(keep)`` with ``meta["sampled_indices"]`` narrowed accordingly."""
    sub = frames.select(list(keep))
    sampled = frames.meta.get("sampled_indices")
    if sampled is not None and len(sampled) == len(frames):
        sub.meta["sampled_indices"] = [sampled[i] for i in keep]
    sub.meta.pop("input_files", None)
    return sub
