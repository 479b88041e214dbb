"""The ``reconstruction`` point-map source: point maps exported from CUT3R / MASt3R / VGGT.

File layout (CONTRIBUTING.md, "Reconstruction point maps"): an ``.npz`` with ``xyz`` ``[V, H, W, 3]``
(one world frame shared by all frames, any metric or up-to-scale units), optional ``valid``
``[V, H, W]`` bool, ``confidence`` ``[V, H, W]`` float and ``frame_ids`` ``[V]`` str; or an ``.npy``
holding ``xyz`` alone (non-finite = invalid). Files are loaded with ``allow_pickle=False``.

SR3D-FACTS §3: the same canonicalisation as ground-truth depth applies; the default canonical mode
is ``"robust"`` (min/max over valid points), since estimated geometry has outliers and holes.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from sr3d_plugin import _checks
from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.limits import check_npy_file, check_npz_file
from sr3d_plugin.sources.base import FrameSet, PointMaps, normalise_frame_id
from sr3d_plugin.sources.files import file_identity, require_file
from sr3d_plugin.sources.pointmap_sources import check_aspect

__all__ = ["Reconstruction", "ReconstructionSource", "load_reconstruction", "reconstruction_from_array"]


class Reconstruction:
    """Arrays of one reconstruction file: ``xyz [V, H, W, 3]`` float32 (invalid points zeroed),
    ``valid [V, H, W]`` bool, ``confidence [V, H, W]`` float32 or None, ``frame_ids`` list or None."""

    def __init__(
        self,
        xyz: np.ndarray,
        valid: np.ndarray,
        confidence: np.ndarray | None,
        frame_ids: list[str] | None,
        path: str,
    ) -> None:
        self.xyz = xyz
        self.valid = valid
        self.confidence = confidence
        self.frame_ids = frame_ids
        self.path = path

    def __len__(self) -> int:
        return self.xyz.shape[0]


def load_reconstruction(path: str | os.PathLike) -> Reconstruction:
    """Load and validate a reconstruction file (see the module docstring for the layout)."""
    p = require_file(path, "reconstruction point-map file")
    suffix = p.suffix.lower()
    if suffix not in (".npz", ".npy"):
        raise SR3DInputError(f"reconstruction file {str(p)!r} must be .npz or .npy, got {suffix or 'no suffix'!r}")
    confidence = None
    frame_ids = None
    valid = None
    if suffix == ".npy":
        check_npy_file(p, "reconstruction file")
    else:
        check_npz_file(p, "reconstruction file")
    try:
        if suffix == ".npy":
            xyz = np.load(p, allow_pickle=False)
        else:
            with np.load(p, allow_pickle=False) as data:
                keys = set(data.files)
                if "xyz" not in keys:
                    raise SR3DInputError(
                        f"reconstruction file {str(p)!r} has keys {sorted(keys)}; expected 'xyz' [V, H, W, 3] "
                        "(and optionally 'valid', 'confidence', 'frame_ids')"
                    )
                xyz = data["xyz"]
                valid = data["valid"] if "valid" in keys else None
                confidence = data["confidence"] if "confidence" in keys else None
                frame_ids = data["frame_ids"] if "frame_ids" in keys else None
    except SR3DInputError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise SR3DInputError(
            f"reconstruction file {str(p)!r} cannot be read as numeric arrays without pickle: {exc}"
        ) from exc
    if xyz.dtype.kind not in "iuf":
        raise SR3DInputError(f"'xyz' in {str(p)!r} has dtype {xyz.dtype}; expected real floats")
    if xyz.ndim == 3 and xyz.shape[-1] == 3:
        xyz = xyz[None]
    if xyz.ndim != 4 or xyz.shape[-1] != 3:
        raise SR3DInputError(f"'xyz' in {str(p)!r} has shape {xyz.shape}; expected [V, H, W, 3]")
    shape = xyz.shape[:3]
    finite = np.isfinite(xyz).all(axis=-1)
    if valid is not None:
        if valid.shape != shape:
            raise SR3DInputError(f"'valid' in {str(p)!r} has shape {valid.shape}; expected {shape} to match 'xyz'")
        if valid.dtype != np.bool_ and not np.issubdtype(valid.dtype, np.integer):
            raise SR3DInputError(f"'valid' in {str(p)!r} has dtype {valid.dtype}; expected bool")
        valid = valid.astype(bool) & finite
    else:
        valid = finite
    if confidence is not None:
        if confidence.shape != shape:
            raise SR3DInputError(
                f"'confidence' in {str(p)!r} has shape {confidence.shape}; expected {shape} to match 'xyz'"
            )
        if confidence.dtype.kind not in "iuf":
            raise SR3DInputError(f"'confidence' in {str(p)!r} has dtype {confidence.dtype}; expected real floats")
        confidence = np.nan_to_num(confidence.astype(np.float32), nan=-np.inf)
    ids = None
    if frame_ids is not None:
        flat = np.asarray(frame_ids).reshape(-1)
        if flat.shape[0] != shape[0]:
            raise SR3DInputError(
                f"'frame_ids' in {str(p)!r} has {flat.shape[0]} entries for {shape[0]} point maps; expected one per frame"
            )
        ids = [str(x) for x in flat.tolist()]
    if 0 in shape:
        raise SR3DInputError(f"'xyz' in {str(p)!r} has shape {xyz.shape}; expected non-empty [V, H, W, 3] maps")
    xyz = _float32_points(np.where(valid[..., None], np.nan_to_num(xyz, nan=0.0, posinf=0.0, neginf=0.0), 0.0), p)
    return Reconstruction(xyz, valid, confidence, ids, str(p))


def _float32_points(xyz: np.ndarray, where: object) -> np.ndarray:
    """float32 points, refusing values that float32 cannot hold (they would silently become inf)."""
    big = float(np.abs(xyz).max(initial=0.0))
    if big > _checks.MAX_COORDINATE:
        raise SR3DInputError(
            f"points of {str(where)!r} reach {big:.3g}; expected coordinates within ±{_checks.MAX_COORDINATE:g}"
        )
    return xyz.astype(np.float32)


def reconstruction_from_array(points: object, where: str = "the points array") -> Reconstruction:
    """A :class:`Reconstruction` from an in-memory ``[V, H, W, 3]`` (or ``[H, W, 3]``) array or tensor;
    non-finite points are invalid (and zeroed)."""
    xyz = _checks.as_array(points, "points", ndim=(3, 4), finite=False, nonempty=False, dtype=None)
    if xyz.ndim == 3:
        xyz = xyz[None]
    if xyz.shape[-1] != 3 or 0 in xyz.shape:
        raise SR3DInputError(f"points must be [V, H, W, 3] (non-empty), got shape {xyz.shape}")
    valid = np.isfinite(xyz).all(axis=-1)
    xyz = _float32_points(np.where(valid[..., None], xyz, 0.0), where)
    return Reconstruction(xyz, valid, None, None, where)


class ReconstructionSource:
    """Point maps from a reconstruction file, matched to the frames of a :class:`FrameSet`.

    Args:
        path: the ``.npz`` / ``.npy`` file, or the point maps themselves (``[V, H, W, 3]`` array or
            tensor, non-finite = invalid).
        min_confidence: points with a lower confidence are invalid (needs ``confidence`` in the file).
        canonical_mode: mode suggested to the canonicalisation (default ``"robust"``).
        aspect_tolerance: allowed relative aspect-ratio difference between point maps and images.

    Frames are matched by ``frame_ids`` when the file has them and every frame of the set is found
    there (:meth:`FrameSet.index_of` rule, so a reconstruction of the whole video serves any sampling
    of it); otherwise by order, which needs one point map per frame of the set, or one per original
    frame (``frames.meta["total_frames"]``, picked by ``meta["sampled_indices"]``).
    """

    name = "reconstruction"

    def __init__(
        self,
        path: str | os.PathLike | np.ndarray | torch.Tensor | None = None,
        min_confidence: float | None = None,
        canonical_mode: str = "robust",
        aspect_tolerance: float = 0.02,
    ) -> None:
        if path is None:
            raise SR3DInputError(
                "the reconstruction source needs a point-map file: pass path=<.npz/.npy file or [V, H, W, 3] array>"
            )
        if canonical_mode not in ("sr3d", "robust"):
            raise SR3DInputError(f"unknown canonical mode {canonical_mode!r}; expected 'sr3d' or 'robust'")
        if min_confidence is not None:
            min_confidence = _checks.finite_number(min_confidence, "min_confidence")
        self.array = None if isinstance(path, (str, os.PathLike)) else reconstruction_from_array(path)
        self.path = Path(path).expanduser() if self.array is None else None
        self.min_confidence = min_confidence
        self.canonical_mode = canonical_mode
        self.aspect_tolerance = _checks.finite_number(aspect_tolerance, "aspect_tolerance", minimum=0.0)

    @property
    def where(self) -> str:
        """The input as named in messages."""
        return "the points array" if self.path is None else repr(str(self.path))

    def options(self) -> dict:
        if self.array is not None:
            digest = hashlib.sha1(np.ascontiguousarray(self.array.xyz).tobytes()).hexdigest()
            ident = ["array", list(self.array.xyz.shape), digest]
        else:
            ident = file_identity(self.path) if self.path.exists() else [str(self.path)]
        return {"path": ident, "min_confidence": self.min_confidence, "canonical_mode": self.canonical_mode}

    def _match(self, rec: Reconstruction, frames: FrameSet) -> list[int]:
        if rec.frame_ids is not None:
            lookup: dict[str, int] = {}
            for i, fid in enumerate(rec.frame_ids):
                lookup.setdefault(normalise_frame_id(fid), i)
            wanted = [normalise_frame_id(f) for f in frames.frame_ids]
            if all(w in lookup for w in wanted):
                return [lookup[w] for w in wanted]
        if len(rec) == len(frames):
            return list(range(len(frames)))
        sampled, total = frames.meta.get("sampled_indices"), frames.meta.get("total_frames")
        if sampled is not None and total is not None and len(rec) == int(total) and len(sampled) == len(frames):
            return [int(i) for i in sampled]
        raise SR3DInputError(
            f"reconstruction {self.where} has {len(rec)} point maps but there are {len(frames)} frames "
            + (f"sampled from {total} " if total is not None else "")
            + f"({frames.frame_ids[:5]}{' …' if len(frames) > 5 else ''}); expected one point map per frame, "
            "one per original frame, or 'frame_ids' in the file that name every frame"
        )

    def pointmaps(self, frames: FrameSet) -> PointMaps:
        """Returns ``xyz [V, H, W, 3]`` float32 (file units, one world frame), ``valid``, ``confidence``."""
        rec = self.array if self.array is not None else load_reconstruction(self.path)
        idx = self._match(rec, frames)
        xyz, valid = rec.xyz[idx], rec.valid[idx]
        conf = None if rec.confidence is None else rec.confidence[idx]
        height, width = xyz.shape[1:3]
        check_aspect(frames, height, width, self.aspect_tolerance, f"reconstruction point map of {self.where}")
        if self.min_confidence is not None:
            if conf is None:
                raise SR3DInputError(
                    f"min_confidence={self.min_confidence} was given but {self.where} has no 'confidence' array"
                )
            valid = valid & (conf >= self.min_confidence)
        if not valid.any():
            raise SR3DInputError(
                f"no valid point in {self.where} for frames {frames.frame_ids[:5]}"
                + (f" at min_confidence={self.min_confidence}" if self.min_confidence is not None else "")
            )
        xyz = np.where(valid[..., None], xyz, 0.0).astype(np.float32)
        return PointMaps(
            xyz=torch.from_numpy(np.ascontiguousarray(xyz)),
            valid=torch.from_numpy(np.ascontiguousarray(valid)),
            confidence=None if conf is None else torch.from_numpy(np.ascontiguousarray(conf)),
            space="world",
            canonical_mode=self.canonical_mode,
        )
