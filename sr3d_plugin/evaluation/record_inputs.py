"""Model inputs from a prepared evaluation record: frames, 3D positions and region prompts.

Used by the lmms-eval model (:mod:`sr3d_plugin.evaluation.lmms_model`); it needs no lmms-eval.
The visual fields of a record (written by ``sr3d prepare``, documented in ``docs/evaluation.md``):

``scene`` (str)
    ScanNet-style posed RGB-D folder (CONTRIBUTING.md, "Data layouts"), relative to the data
    folder or absolute. ScanQA, SQA3D and Scan2Cap records carry one.
``video`` (str)
    Video file (VSI-Bench), relative to the data folder or absolute.
``points`` (str, optional)
    Reconstruction point maps for the video or scene (``.npz`` / ``.npy``, CONTRIBUTING.md).
``frame_ids`` (list[str], optional)
    Informative: the frames that ``sr3d prepare`` sampled (with its ``--num-frames``).
``regions`` (list, optional)
    Region prompts, in the order of the ``<mask>`` tokens of the prompt. Each is an object with
    ``masks`` (a list of ``{"frame": "@<frame id>", "rle": COCO RLE}`` drawn on original frames),
    ``box3d`` (``[cx, cy, cz, dx, dy, dz(, yaw)]`` in the scene's axis-aligned frame, metres) and
    ``label``; or a region spec string (:mod:`sr3d_plugin.regions`). Masks on frames that are not
    among the sampled frames are dropped; when none is left the 3D box is projected onto the sampled
    frames with the depth test (:func:`sr3d_plugin.regions.box3d_masks`).

Frames are sampled with :func:`sr3d_plugin.visual_inputs.read_frames` (uniform, SR3D-FACTS §3) and 3D
positions come from :func:`sr3d_plugin.visual_inputs.positions` — the functions the pipeline and the
training records use — so a record means what the same inputs mean to ``sr3d ask``.
Frames and point maps of the most recent scenes are kept in a small LRU cache (questions of one
scene are usually asked together).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sr3d_plugin.errors import SR3DConfigError, SR3DInputError
from sr3d_plugin.evaluation.schema import record_label
from sr3d_plugin.modeling.inputs import Region, VisualInput
from sr3d_plugin.visual_inputs import DEPTH_SOURCES as _VOCABULARY
from sr3d_plugin.visual_inputs import default_depth_model, depth_source_name, positions, read_frames

__all__ = ["DATA_DIR_FIELD", "DEPTH_SOURCES", "RecordInputBuilder", "SceneGeometry", "resolve_record_path"]

#: how 3D positions are obtained (model argument ``depth_source``; ``gt`` is still read as ``gt_depth``)
DEPTH_SOURCES = _VOCABULARY
#: field added by the sr3d lmms-eval tasks to every document: the absolute data folder
DATA_DIR_FIELD = "sr3d_data_dir"
_POINT_SUFFIXES = (".npz", ".npy")


def resolve_record_path(value: Any, data_dir: str | os.PathLike | None, what: str, label: str) -> Path:
    """A record's path field as an absolute path (relative paths are relative to ``data_dir``)."""
    if not isinstance(value, str) or not value.strip():
        raise SR3DInputError(f"{label}: field {what!r} must be a non-empty path string, got {value!r}")
    p = Path(value).expanduser()
    if not p.is_absolute():
        if data_dir is None:
            raise SR3DInputError(f"{label}: {what} {value!r} is relative but the record has no data folder")
        p = Path(data_dir) / p
    return p


@dataclass
class SceneGeometry:
    """Frames of one visual input with their canonical 3D positions (shared by the questions of a scene)."""

    frames: Any
    points: torch.Tensor | None
    valid: torch.Tensor | None
    info: dict[str, Any]


class RecordInputBuilder:
    """Turn records into :class:`VisualInput` objects with a pipeline's frame reader and point-map code.

    Args:
        pipeline: an :class:`~sr3d_plugin.inference.SR3DPipeline`.
        num_frames: frames sampled per scene / video (SR-3D uses 32).
        depth_source: one of :data:`sr3d_plugin.visual_inputs.DEPTH_SOURCES`: ``"auto"`` (point maps
            when found, else the scene's depth, else the depth model), ``"gt_depth"`` (the scene's depth
            only; ``"gt"`` is accepted), ``"relative_depth"`` (the scene's depth, single-view convention),
            ``"depth_anything"`` (monocular estimate for every input) or ``"reconstruction"``
            (point-map files only).
        depth_model: Depth Anything V2 id or folder (default: the model config's ``depth_model``).
        pointmap_dir: folder of reconstruction point maps ``<scene_id>.npz`` / ``.npy`` (optionally in a
            ``<dataset>/`` sub-folder), used when a record has no ``points`` field.
        cache_size: scenes whose frames and point maps are kept in memory.
    """

    def __init__(
        self,
        pipeline: Any,
        num_frames: int = 32,
        depth_source: str = "auto",
        depth_model: str | None = None,
        pointmap_dir: str | os.PathLike | None = None,
        cache_size: int = 2,
    ) -> None:
        try:
            depth_source = depth_source_name(depth_source)
        except SR3DInputError as exc:
            raise SR3DConfigError(str(exc)) from None
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames <= 0:
            raise SR3DConfigError(f"num_frames must be a positive integer, got {num_frames!r}")
        if pointmap_dir is not None and not Path(pointmap_dir).expanduser().is_dir():
            raise SR3DConfigError(f"pointmap_dir {str(pointmap_dir)!r} is not a folder")
        self.pipeline = pipeline
        self.num_frames = num_frames
        self.depth_source = depth_source
        self.depth_model = depth_model
        self.pointmap_dir = None if pointmap_dir is None else Path(pointmap_dir).expanduser()
        self.cache_size = max(0, int(cache_size))
        self._cache: OrderedDict[tuple, SceneGeometry] = OrderedDict()

    # ------------------------------------------------------------------------------------------
    # visual input
    # ------------------------------------------------------------------------------------------

    def source_key(self, record: Mapping[str, Any]) -> str:
        """A sort key that groups records of the same scene or video (for cache-friendly batching)."""
        for name in ("scene", "video"):
            if isinstance(record.get(name), str):
                return f"{name}:{record[name]}"
        return ""

    def geometry(self, record: Mapping[str, Any]) -> SceneGeometry:
        """Frames and canonical point maps of the record's scene or video (cached)."""
        label = record_label(record)
        data_dir = record.get(DATA_DIR_FIELD)
        kind = next((k for k in ("scene", "video") if record.get(k) is not None), None)
        if kind is None:
            raise SR3DInputError(f"{label}: no visual input; expected a 'scene' folder or a 'video' file")
        path = resolve_record_path(record[kind], data_dir, kind, label)
        if kind == "scene" and not path.is_dir():
            raise SR3DInputError(f"{label}: scene folder {str(path)!r} not found")
        if kind == "video" and not path.is_file():
            raise SR3DInputError(f"{label}: video file {str(path)!r} not found")
        points = self._points_file(record, data_dir, label)
        key = (
            kind,
            str(path),
            self.num_frames,
            self.depth_source,
            self.depth_model,
            None if points is None else str(points),
        )
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        frames = read_frames(**{kind: path}, num_frames=self.num_frames)
        pts = valid = None
        info: dict[str, Any] = {"source": None}
        if self.pipeline.needs_positions:
            pts, valid, info = self._positions(frames, kind, points, label)
        geo = SceneGeometry(frames, pts, valid, info)
        if self.cache_size:
            self._cache[key] = geo
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return geo

    def _points_file(self, record: Mapping[str, Any], data_dir: Any, label: str) -> Path | None:
        if record.get("points") is not None:
            p = resolve_record_path(record["points"], data_dir, "points", label)
            if not p.is_file():
                raise SR3DInputError(f"{label}: point-map file {str(p)!r} not found")
            return p
        if self.pointmap_dir is None:
            return None
        scene_id = str(record.get("scene_id", ""))
        subdirs = [record["dataset"]] if isinstance(record.get("dataset"), str) else []
        for sub in [*subdirs, ""]:
            for suffix in _POINT_SUFFIXES:
                cand = self.pointmap_dir / sub / f"{scene_id}{suffix}"
                if cand.is_file():
                    return cand
        return None

    def _positions(
        self, frames: Any, kind: str, points: Path | None, label: str
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        pipe = self.pipeline
        mode = self.depth_source
        options = {"canonical_mode": getattr(pipe.config, "canonical_mode", "sr3d"), "device": pipe.device}
        if mode == "reconstruction" or (mode == "auto" and points is not None):
            if points is None:
                where = f" in {str(self.pointmap_dir)!r}" if self.pointmap_dir is not None else ""
                raise SR3DInputError(
                    f"{label}: depth_source=reconstruction but no point-map file was found{where} "
                    "(expected <pointmap_dir>/[<dataset>/]<scene_id>.npz or a 'points' field)"
                )
            return positions(frames, "reconstruction", points=points, **options)
        if mode in ("gt_depth", "relative_depth") or (mode == "auto" and frames.depth is not None):
            if frames.depth is None:
                raise SR3DInputError(
                    f"{label}: depth_source={mode} but the {kind} has no depth maps; use depth_source=depth_anything "
                    "or reconstruction"
                )
            return positions(frames, "gt_depth" if mode == "auto" else mode, **options)
        dm = self.depth_model or default_depth_model(pipe.config)
        return positions(frames, "depth_anything", depth_model=dm, **options)

    # ------------------------------------------------------------------------------------------
    # regions
    # ------------------------------------------------------------------------------------------

    def regions(self, record: Mapping[str, Any], frames: Any) -> list[Region]:
        """The record's region prompts on the sampled ``frames`` (:func:`sr3d_plugin.regions.region_from_record`,
        the reader training records use; see the module docstring)."""
        from sr3d_plugin.regions import region_from_record

        items = record.get("regions") or []
        label = record_label(record)
        if not isinstance(items, (list, tuple)):
            raise SR3DInputError(f"{label}: 'regions' must be a list, got {type(items).__name__}")
        base = record.get(DATA_DIR_FIELD)
        return [region_from_record(item, frames, base, f"{label}: region {i}") for i, item in enumerate(items)]

    def visual(self, record: Mapping[str, Any]) -> VisualInput:
        """The full :class:`VisualInput` of a record (frames, positions, regions)."""
        geo = self.geometry(record)
        regions = self.regions(record, geo.frames)
        return VisualInput(
            list(geo.frames.images), points=geo.points, valid=geo.valid, regions=regions, multi_view=True
        )
