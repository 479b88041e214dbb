"""Point-map sources built from depth: ``gt_depth``, ``relative_depth`` and ``depth_anything``.

Every source has ``pointmaps(frames: FrameSet) -> PointMaps`` and ``options() -> dict`` (what the
point-map cache keys on). Conventions are those of SR3D-FACTS §3:

* ``gt_depth`` back-projects metric depth with the depth intrinsics and camera-to-world poses into
  one world frame (``space="world"``, canonical mode ``"sr3d"``, the released convention).
* ``relative_depth`` turns a given depth image without intrinsics into the single-view convention
  of SR-REAL's ``mm_utils.process_depth``: ``d = value / 255`` (``value / max`` when the maximum
  exceeds 255), value 0 is the nearest point and valid, then ``(u·z, v·z, z)``;
  ``space="single_view"``. ``scaling="minmax"`` (an option, off by default) re-normalises each map
  over its non-zero pixels instead and treats 0 as invalid.
* ``depth_anything`` runs a registered depth estimator (Depth Anything V2 by default) and applies
  the same single-view convention.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sr3d_plugin import _checks
from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.geometry import (
    backproject,
    depth_image_to_relative,
    disparity_to_relative_depth,
    relative_depth_to_points,
)
from sr3d_plugin.sources.base import FrameSet, PointMaps

__all__ = [
    "DepthAnythingSource",
    "GTDepthSource",
    "RelativeDepthSource",
    "check_aspect",
]


def check_aspect(frames: FrameSet, height: int, width: int, tolerance: float, what: str) -> None:
    """Raise if a ``height × width`` map's aspect ratio differs from the frames' images by more than ``tolerance``.

    Point maps at another resolution than the images are fine (they are area-resized onto the
    tiles), but a different aspect ratio means the map does not cover the same pixels.
    """
    target = width / height
    for fid, im in zip(frames.frame_ids, frames.images):
        aspect = im.size[0] / im.size[1]
        if abs(aspect - target) / aspect > tolerance:
            raise SR3DInputError(
                f"{what} is {width}×{height} (aspect {target:.4f}) but frame {fid} is {im.size[0]}×{im.size[1]} "
                f"(aspect {aspect:.4f}); expected the same aspect ratio within {tolerance:.0%} "
                "(a cropped or transposed map would put 3D positions on the wrong pixels)"
            )


def _frame_depth(frames: FrameSet, source: str) -> np.ndarray:
    if frames.depth is None:
        raise SR3DInputError(
            f"the {source} source needs depth maps, but the frames from {frames.source or 'the input'} have none; "
            "pass depth files, or use the depth_anything source (monocular estimate) instead"
        )
    return np.asarray(frames.depth)  # shape, dtype and values checked when the FrameSet was built


class GTDepthSource:
    """Metric depth + intrinsics (+ poses) → world point maps (SR3D-FACTS §3, multi-view).

    Args:
        canonical_mode: mode suggested to the canonicalisation (``"sr3d"`` = released convention).
        max_depth: pixels farther than this (metres) are marked invalid; None keeps all.
        aspect_tolerance: allowed relative aspect-ratio difference between depth and colour images.
    """

    name = "gt_depth"

    def __init__(self, canonical_mode: str = "sr3d", max_depth: float | None = None, aspect_tolerance: float = 0.02):
        if canonical_mode not in ("sr3d", "robust"):
            raise SR3DInputError(f"unknown canonical mode {canonical_mode!r}; expected 'sr3d' or 'robust'")
        if max_depth is not None:
            max_depth = _checks.finite_number(max_depth, "max_depth", positive=True)
        self.canonical_mode = canonical_mode
        self.max_depth = max_depth
        self.aspect_tolerance = _checks.finite_number(aspect_tolerance, "aspect_tolerance", minimum=0.0)

    def options(self) -> dict:
        return {"canonical_mode": self.canonical_mode, "max_depth": self.max_depth}

    def pointmaps(self, frames: FrameSet) -> PointMaps:
        """Returns ``xyz [V, Hd, Wd, 3]`` float32 metres in the (axis-aligned) world frame — the camera
        frame for a single frame without pose — and ``valid = depth > 0``."""
        depth = _frame_depth(frames, self.name)
        v, height, width = depth.shape
        if frames.intrinsics is None:
            raise SR3DInputError(
                f"the gt_depth source needs depth intrinsics, but the frames from {frames.source or 'the input'} "
                "have none; pass an intrinsics file, or use the relative_depth source (no camera model)"
            )
        k = np.asarray(frames.intrinsics, dtype=np.float64)
        cx, cy = k[:, 0, 2], k[:, 1, 2]
        if (cx < 0).any() or (cx > width).any() or (cy < 0).any() or (cy > height).any():
            raise SR3DInputError(
                f"depth intrinsics put the principal point at (cx, cy) = ({cx.max():.1f}, {cy.max():.1f}) outside "
                f"the {width}×{height} depth map; expected the intrinsics of the depth images "
                "(colour intrinsics of a larger colour image?)"
            )
        check_aspect(frames, height, width, self.aspect_tolerance, "depth map")
        poses = frames.cam_to_world
        if poses is None and v > 1:
            raise SR3DInputError(
                f"{v} frames have depth but no camera poses; back-projecting them into one world frame needs a "
                "camera-to-world pose per frame (or use one frame, or the relative_depth source)"
            )
        if poses is not None:
            poses = np.asarray(poses, dtype=np.float64)
        valid = depth > 0
        if self.max_depth is not None:
            valid &= depth <= self.max_depth
        if not valid.any():
            raise SR3DInputError(
                f"all depth values of the {v} frame(s) are invalid (0 or beyond max_depth={self.max_depth}); "
                "expected some pixels with depth > 0 in metres (check depth_scale)"
            )
        pts = backproject(
            torch.from_numpy(depth.astype(np.float64)),
            torch.from_numpy(k),
            None if poses is None else torch.from_numpy(poses),
        )
        return PointMaps(
            xyz=pts.to(torch.float32),
            valid=torch.from_numpy(valid),
            space="world",
            canonical_mode=self.canonical_mode,
        )


class RelativeDepthSource:
    """A given depth image without a camera model → single-view point maps (SR3D-FACTS §3).

    ``scaling="sr3d"`` (default, SR-REAL's ``mm_utils.process_depth``): the image values ``x``
    (the depth in file units: metres × ``depth_scale``) become ``d = x / 255`` when ``max(x) ≤ 255``,
    else ``d = x / max(x)``; every pixel is valid (0 is the nearest point). ``scaling="minmax"``
    (an improvement for arbitrary depth maps, off by default): ``d = minmax(depth)`` over the pixels
    with depth > 0 (far = 1; zero pixels get ``d = 1`` and ``valid = False``), optionally 8-bit
    quantised. Then :func:`~sr3d_plugin.geometry.relative_depth_to_points`.

    Args:
        disparity: (``minmax`` only) the maps hold inverse depth (larger = closer).
        quantize: (``minmax`` only) truncate ``d`` to 8 bits as in the released single-view data.
        scaling: ``"sr3d"`` or ``"minmax"``.
        depth_scale: file units per metre the frames' depth was divided by when it was read
            (default: ``frames.meta["depth_scale"]``, else 1000).
    """

    name = "relative_depth"
    SCALINGS = ("sr3d", "minmax")

    def __init__(
        self, disparity: bool = False, quantize: bool = True, scaling: str = "sr3d", depth_scale: float | None = None
    ) -> None:
        if scaling not in self.SCALINGS:
            raise SR3DInputError(f"relative depth scaling={scaling!r}; expected one of {self.SCALINGS}")
        if scaling == "sr3d" and disparity:
            raise SR3DInputError(
                "disparity=True needs scaling='minmax'; the released convention (scaling='sr3d') reads depth images "
                "(0 = nearest)"
            )
        if depth_scale is not None:
            depth_scale = _checks.finite_number(depth_scale, "depth_scale", positive=True)
        self.disparity = bool(disparity)
        self.quantize = bool(quantize)
        self.scaling = scaling
        self.depth_scale = None if depth_scale is None else float(depth_scale)

    def options(self) -> dict:
        opts: dict[str, Any] = {"disparity": self.disparity, "quantize": self.quantize, "scaling": self.scaling}
        if self.depth_scale is not None:
            opts["depth_scale"] = self.depth_scale
        return opts

    def pointmaps(self, frames: FrameSet) -> PointMaps:
        """Returns ``xyz [V, Hd, Wd, 3]`` in ``[−1, 1]³`` (``space="single_view"``) and ``valid [V, Hd, Wd]``."""
        depth = _frame_depth(frames, self.name).astype(np.float64)
        height, width = depth.shape[1:]
        rel = np.empty_like(depth)
        valid = np.ones(depth.shape, dtype=bool)
        scale = self.depth_scale if self.depth_scale is not None else float(frames.meta.get("depth_scale", 1000.0))
        for i, fid in enumerate(frames.frame_ids):
            d = depth[i]
            what = f"{'disparity' if self.disparity else 'depth'} of frame {fid}"
            if self.scaling == "sr3d":
                rel[i] = depth_image_to_relative(d * scale)
                continue
            ok = d >= 0 if self.disparity else d > 0
            if not ok.any():
                raise SR3DInputError(f"{what} has no valid pixel (all zero); expected some depth > 0")
            if self.disparity:
                filled = d
            else:
                # larger depth = farther; negate so that it reads as disparity, invalid pixels set to the far end
                filled = -np.where(ok, d, d[ok].max())
            rel[i] = disparity_to_relative_depth(torch.from_numpy(filled), quantize=self.quantize).numpy()
            valid[i] = ok
        check_aspect(frames, height, width, 0.02, "depth map")
        pts = relative_depth_to_points(torch.from_numpy(rel))
        return PointMaps(
            xyz=pts.to(torch.float32), valid=torch.from_numpy(valid), space="single_view", canonical_mode="sr3d"
        )


class DepthAnythingSource:
    """Monocular depth estimate → single-view point maps, for images without any geometry.

    Args:
        estimator: a registered depth-estimator name (default ``"depth_anything_v2"``) or an object
            with ``estimate(images) -> [V, H, W]`` relative depth in ``[0, 1]``, far = 1.
        **estimator_options: passed to the estimator factory (``model``, ``device``, ``dtype``,
            ``quantize``, ``batch_size``, …).
    """

    name = "depth_anything"

    def __init__(self, estimator: str | Any = "depth_anything_v2", **estimator_options: Any) -> None:
        if isinstance(estimator, str):
            from sr3d_plugin import plugins

            self.estimator_name = estimator
            self.estimator = plugins.create("depth_estimators", estimator, **estimator_options)
        else:
            if not hasattr(estimator, "estimate"):
                raise SR3DInputError(
                    f"estimator {estimator!r} has no estimate(images) method; expected a depth estimator"
                )
            self.estimator_name = type(estimator).__name__
            self.estimator = estimator
        self.estimator_options = dict(estimator_options)

    def options(self) -> dict:
        opts = self.estimator.options() if hasattr(self.estimator, "options") else dict(self.estimator_options)
        return {"estimator": self.estimator_name, **opts}

    def pointmaps(self, frames: FrameSet) -> PointMaps:
        """Returns ``xyz [V, H, W, 3]`` at the image size in ``[−1, 1]³`` (``space="single_view"``), all valid."""
        sizes = {im.size for im in frames.images}
        if len(sizes) != 1:
            raise SR3DInputError(
                f"frames have different sizes {sorted(sizes)}; single-view point maps of one frame set need one size"
            )
        width, height = next(iter(sizes))
        rel = _checks.as_array(
            self.estimator.estimate(frames.images), f"output of depth estimator {self.estimator_name!r}", nonempty=False
        )
        if rel.shape != (len(frames), height, width):
            raise SR3DInputError(
                f"depth estimator {self.estimator_name!r} returned shape {rel.shape}; "
                f"expected [{len(frames)}, {height}, {width}] (one map per image, at the image size)"
            )
        pts = relative_depth_to_points(torch.from_numpy(rel))
        valid = torch.ones(pts.shape[:3], dtype=torch.bool)
        return PointMaps(xyz=pts.to(torch.float32), valid=valid, space="single_view", canonical_mode="sr3d")
