"""Data types shared by frame readers, depth estimators and point-map sources.

:class:`FrameSet` is what readers produce (images, optionally metric depth, intrinsics and poses);
:class:`PointMaps` is what point-map sources produce (per-pixel 3D points + validity), before the
canonical transform.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from sr3d_plugin import _checks
from sr3d_plugin.errors import SR3DInputError

__all__ = ["FrameSet", "PointMaps", "normalise_frame_id", "uniform_frame_indices"]

#: suffixes dropped from a frame id (``"frames/000010.jpg"`` names frame ``"10"``)
_ID_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".npy", ".npz", ".txt")


def normalise_frame_id(value: object) -> str:
    """The one frame-id rule: ``"@frames/000010.jpg"``, ``"000010.png"``, ``"000010"``, ``10`` all name ``"10"``.

    Surrounding blanks and one leading ``@`` (the region-spec marker for original ids) are dropped,
    then any folder part; a known file suffix (images, ``.npy``/``.npz``/``.txt``) is dropped; an id
    made only of digits loses its leading zeros. Everything else is compared as written.
    """
    s = str(value).strip().removeprefix("@").replace("\\", "/")
    name = s.rsplit("/", 1)[-1] if "/" in s.rstrip("/") else s
    for suffix in _ID_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return str(int(name)) if name.isdecimal() else name  # isdigit() also admits "²", which int() refuses


def uniform_frame_indices(total: int, count: int = 32) -> list[int]:
    """``floor(linspace(0, total − 1, count))`` — the SR-3D frame sampling (all frames if fewer)."""
    total = _checks.integer(total, "total")
    count = _checks.integer(count, "count")
    if total <= 0:
        raise SR3DInputError(f"cannot sample frames from an empty sequence (total={total})")
    if count <= 0:
        raise SR3DInputError(f"number of frames must be positive, got {count}")
    if total <= count:
        return list(range(total))
    return [int(i) for i in np.floor(np.linspace(0, total - 1, count)).astype(np.int64)]


@dataclass
class FrameSet:
    """Frames of one image, video or scan, with whatever geometry is known.

    Attributes:
        images: ``V`` RGB PIL images.
        depth: ``[V, Hd, Wd]`` float32 metric depth in metres (0 = invalid), or None.
        intrinsics: ``[V, 3, 3]`` pinhole matrices of the *depth* maps (pixels), or None.
        cam_to_world: ``[V, 4, 4]`` camera-to-world poses, axis alignment already applied, or None.
        color_intrinsics: ``[V, 3, 3]`` of the colour images, if different from ``intrinsics``.
        axis_align: ``[4, 4]`` scene axis-alignment matrix that was applied (for reference), or None.
        frame_ids: one identifier per frame (file stem or frame index); unique under
            :func:`normalise_frame_id`, looked up with :meth:`index_of`.
        source: where the frames came from (path), for messages and cache keys.
        meta: free-form extras (scene id, fps, original frame count, …).
    """

    images: list[Image.Image]
    depth: np.ndarray | None = None
    intrinsics: np.ndarray | None = None
    cam_to_world: np.ndarray | None = None
    color_intrinsics: np.ndarray | None = None
    axis_align: np.ndarray | None = None
    frame_ids: list[str] = field(default_factory=list)
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.images, (list, tuple)) or not self.images:
            raise SR3DInputError(f"frame set from {self.source or 'input'} has no images (a list of PIL images)")
        self.images = list(self.images)
        for i, im in enumerate(self.images):
            if not isinstance(im, Image.Image):
                raise SR3DInputError(f"images[{i}] is {_checks.describe(im)}; expected a PIL image")
            if im.size[0] <= 0 or im.size[1] <= 0:
                raise SR3DInputError(f"images[{i}] is empty ({im.size[0]}×{im.size[1]} pixels)")
        if not isinstance(self.frame_ids, (list, tuple)):
            raise SR3DInputError(f"frame_ids must be a list, got {_checks.describe(self.frame_ids)}")
        if not self.frame_ids:
            self.frame_ids = [str(i) for i in range(len(self.images))]
        v = len(self.images)
        if len(self.frame_ids) != v:
            raise SR3DInputError(f"{len(self.frame_ids)} frame ids for {v} images")
        self.frame_ids = [str(f) for f in self.frame_ids]
        self._ids: dict[str, int] = {}
        for i, fid in enumerate(self.frame_ids):
            key = normalise_frame_id(fid)
            if key in self._ids:
                raise SR3DInputError(
                    f"frame ids {self.frame_ids[self._ids[key]]!r} and {fid!r} of {self.source or 'the input'} name "
                    "the same frame; expected one id per frame"
                )
            self._ids[key] = i
        for name in ("depth", "intrinsics", "cam_to_world", "color_intrinsics"):
            arr = getattr(self, name)
            sized = isinstance(arr, (list, tuple)) or (isinstance(arr, (np.ndarray, torch.Tensor)) and arr.ndim > 0)
            if arr is not None and not sized:
                raise SR3DInputError(f"{name} must be an array with one entry per frame, got {_checks.describe(arr)}")
            if arr is not None and len(arr) != v:
                raise SR3DInputError(f"{name} has {len(arr)} entries but there are {v} images; expected one per frame")
        self._check_geometry(v)

    def _check_geometry(self, v: int) -> None:
        """Depth, intrinsics and poses are checked here, once (:mod:`sr3d_plugin._checks`: real numbers,
        shapes, finite, depth >= 0, pinhole intrinsics without skew, rigid poses), naming the frame; the
        point-map sources trust them."""
        if self.depth is not None:
            if isinstance(self.depth, (list, tuple)) and len({np.shape(d) for d in self.depth}) > 1:
                raise SR3DInputError(
                    f"depth maps of {self.source or 'the input'} differ in size "
                    f"{sorted({np.shape(d) for d in self.depth})}; expected one [H, W] size"
                )
            depth = _checks.as_array(self.depth, "depth", finite=False, dtype=None)
            if depth.ndim != 3 or depth.shape[0] != v:
                raise SR3DInputError(f"depth must be [V, H, W] with V = {v} frames, got shape {depth.shape}")
            if depth.dtype.kind != "f":
                depth = depth.astype(np.float32)
            for fid, d in zip(self.frame_ids, depth):
                _checks.check_depth(d, f"depth of frame {fid}")
            self.depth = depth
        labels = {
            "intrinsics": "intrinsics",
            "color_intrinsics": "color_intrinsics",
            "cam_to_world": "poses (camera-to-world)",
        }
        for name, shape in (("intrinsics", (3, 3)), ("color_intrinsics", (3, 3)), ("cam_to_world", (4, 4))):
            arr = getattr(self, name)
            if arr is None:
                continue
            arr = _checks.as_array(arr, name, finite=False)
            if arr.shape != (v, *shape):
                raise SR3DInputError(
                    f"{labels[name]} must be [{v}, {shape[0]}, {shape[1]}] (one per frame), got shape {arr.shape}"
                )
            bad = [fid for fid, m in zip(self.frame_ids, arr) if not np.isfinite(m).all()]
            if bad:
                raise SR3DInputError(f"frames {bad} have non-finite {labels[name]}; drop them or fix their files")
            for fid, m in zip(self.frame_ids, arr):
                if name == "cam_to_world":
                    _checks.check_rigid(m, f"pose (camera-to-world) of frame {fid}")
                else:
                    _checks.check_intrinsics(m, f"{name} of frame {fid}")
            setattr(self, name, arr)

    def __len__(self) -> int:
        return len(self.images)

    def find(self, frame_id: object) -> int | None:
        """Position of the frame named ``frame_id`` (:func:`normalise_frame_id` rule), or None."""
        return self._ids.get(normalise_frame_id(frame_id))

    def index_of(self, frame_id: object) -> int:
        """Position (0..V−1) of the frame named ``frame_id`` (:func:`normalise_frame_id` rule).

        Raises :class:`SR3DInputError` naming the known ids when no frame has that id.
        """
        k = self.find(frame_id)
        if k is None:
            shown = ", ".join(self.frame_ids[:8]) + (" …" if len(self) > 8 else "")
            raise SR3DInputError(f"frame id {str(frame_id)!r} is not among the {len(self)} frame(s) ({shown})")
        return k

    @property
    def has_metric_geometry(self) -> bool:
        """Depth, intrinsics and poses are all present (multi-view back-projection possible)."""
        return self.depth is not None and self.intrinsics is not None and self.cam_to_world is not None

    def select(self, indices: list[int]) -> FrameSet:
        """A new frame set with only ``indices`` (in that order)."""
        n = len(self)
        for i in indices:
            if not 0 <= i < n:
                raise SR3DInputError(f"frame index {i} is out of range for {n} frames")

        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[indices]

        return FrameSet(
            images=[self.images[i] for i in indices],
            depth=pick(self.depth),
            intrinsics=pick(self.intrinsics),
            cam_to_world=pick(self.cam_to_world),
            color_intrinsics=pick(self.color_intrinsics),
            axis_align=self.axis_align,
            frame_ids=[self.frame_ids[i] for i in indices],
            source=self.source,
            meta=dict(self.meta),
        )


PointSpace = Literal["world", "single_view"]


@dataclass
class PointMaps:
    """Per-pixel 3D points of a frame set, before the canonical transform.

    Attributes:
        xyz: ``[V, H, W, 3]`` float32. ``space="world"``: metres in one world frame shared by all
            frames (camera frame for a single posed image). ``space="single_view"``: the SR-3D
            single-image convention (already in ``[−1, 1]³``, no canonical transform applied).
        valid: ``[V, H, W]`` bool.
        confidence: optional ``[V, H, W]`` float (reconstruction models), higher = more reliable.
        space: see ``xyz``.
        canonical_mode: the canonical mode that suits this source: ``"sr3d"`` for ground-truth
            depth (released convention), ``"robust"`` for estimated geometry.
    """

    xyz: torch.Tensor
    valid: torch.Tensor
    confidence: torch.Tensor | None = None
    space: PointSpace = "world"
    canonical_mode: str = "sr3d"

    def __post_init__(self) -> None:
        self.xyz = _checks.as_tensor(self.xyz, "xyz", finite=False, nonempty=False)
        if self.xyz.dim() != 4 or self.xyz.shape[-1] != 3 or 0 in tuple(self.xyz.shape):
            raise SR3DInputError(f"point maps must be [V, H, W, 3] (non-empty), got shape {tuple(self.xyz.shape)}")
        if not bool(torch.isfinite(self.xyz).all()):
            raise SR3DInputError(
                "point maps xyz contain NaN or inf; expected finite points (invalid ones marked in valid)"
            )
        if tuple(np.shape(self.valid)) != tuple(self.xyz.shape[:3]):
            raise SR3DInputError(
                f"validity mask shape {tuple(np.shape(self.valid))} does not match point maps {tuple(self.xyz.shape[:3])}"
            )
        self.valid = _checks.as_mask(self.valid, "valid")
        if self.confidence is not None:
            if tuple(np.shape(self.confidence)) != tuple(self.xyz.shape[:3]):
                raise SR3DInputError(
                    f"confidence shape {tuple(np.shape(self.confidence))} does not match point maps "
                    f"{tuple(self.xyz.shape[:3])}"
                )
            self.confidence = _checks.as_tensor(self.confidence, "confidence", finite=False)
        if self.space not in ("world", "single_view"):
            raise SR3DInputError(f"unknown point space {self.space!r}; expected 'world' or 'single_view'")

    def __len__(self) -> int:
        return self.xyz.shape[0]

    def canonical(self, mode: str | None = None) -> torch.Tensor:
        """``[V, H, W, 3]`` canonical coordinates shared by all frames (single-view maps are returned as is)."""
        from sr3d_plugin.geometry import canonicalize

        if self.space == "single_view":
            return self.xyz
        return canonicalize(self.xyz, self.valid, mode or self.canonical_mode)
