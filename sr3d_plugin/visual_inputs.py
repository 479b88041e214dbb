"""One path from raw inputs to a model's :class:`~sr3d_plugin.modeling.inputs.VisualInput`.

Used by the pipeline (:mod:`sr3d_plugin.inference`), training records (:mod:`sr3d_plugin.records`)
and the lmms-eval model (:mod:`sr3d_plugin.evaluation.record_inputs`), so that the same arguments
mean the same thing everywhere:

1. :func:`read_frames` — exactly one of ``image`` / ``frames`` / ``video`` / ``scene`` through the
   registered frame readers (``image`` and ``frames`` through
   :class:`~sr3d_plugin.sources.images.FramesReader`, which takes files, PIL images or arrays),
   sampled uniformly to ``num_frames`` (``floor(linspace(0, N−1, n))``, SR3D-FACTS §3).
2. :func:`positions` — canonical 3D positions from ONE depth-source vocabulary,
   :data:`DEPTH_SOURCES`: the registered point-map sources (``gt_depth``, ``relative_depth``,
   ``depth_anything``, ``reconstruction``) plus ``"auto"``.
3. :func:`visual_input` — both, plus region specs (:mod:`sr3d_plugin.regions`), as one
   :class:`VisualBundle`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sr3d_plugin import _checks
from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.modeling.inputs import Region, VisualInput

__all__ = [
    "DEPTH_SOURCES",
    "VisualBundle",
    "check_input_paths",
    "default_depth_model",
    "depth_source_name",
    "positions",
    "read_frames",
    "visual_input",
]

PathLike = str | os.PathLike

#: how 3D positions are obtained: the registered point-map sources plus ``"auto"``
DEPTH_SOURCES = ("auto", "gt_depth", "relative_depth", "depth_anything", "reconstruction")
#: spellings older public surfaces accepted: lmms-eval ``depth_source=gt``, training records ``"points"``
_OLD_SPELLINGS = {"gt": "gt_depth", "points": "reconstruction"}


def depth_source_name(name: Any, parameter: str = "depth_source") -> str:
    """``name`` in the :data:`DEPTH_SOURCES` vocabulary (old spellings ``gt`` / ``points`` mapped here, once).

    Raises :class:`SR3DInputError` naming ``parameter`` and the valid names for anything else.
    """
    key = _OLD_SPELLINGS.get(name, name) if isinstance(name, str) else name
    if key not in DEPTH_SOURCES:
        raise SR3DInputError(f"{parameter}={name!r}; expected one of {', '.join(DEPTH_SOURCES)}")
    return key


def default_depth_model(config: Any) -> str:
    """The model config's ``depth_model`` (Depth Anything V2 id or folder), else the package default."""
    from sr3d_plugin.sources.depth_anything import DEFAULT_DEPTH_MODEL

    return str(getattr(config, "depth_model", None) or DEFAULT_DEPTH_MODEL)


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


# ----------------------------------------------------------------------------------------------
# frames
# ----------------------------------------------------------------------------------------------


def check_input_paths(**inputs: Any) -> None:
    """Fail early (before any decoding or model work) when a named input file or folder is missing."""
    from sr3d_plugin.sources.files import require_file

    kinds = {"image": "image", "frames": "frame image", "video": "video file"}
    for name, value in inputs.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(item, (str, os.PathLike)):
                continue
            if name == "scene":
                if not Path(item).expanduser().is_dir():
                    raise SR3DInputError(f"scene folder not found: {str(item)!r}")
            else:
                require_file(item, kinds.get(name, "point-map file"))


def read_frames(
    *,
    image: Any = None,
    frames: Sequence[Any] | None = None,
    video: PathLike | None = None,
    scene: PathLike | None = None,
    depth: Any = None,
    intrinsics: Any = None,
    poses: Any = None,
    num_frames: int = 32,
    depth_scale: float = 1000.0,
) -> Any:
    """Read exactly one visual input into a :class:`~sr3d_plugin.sources.base.FrameSet` (frames after sampling).

    Args:
        image: one image (path, PIL image or ``[H, W, 3]`` uint8 array); not sampled.
        frames: several images of one scene (paths / PIL / arrays), sampled to ``num_frames``.
        video: a video file; scene: a ScanNet-style posed RGB-D folder (both carry their own geometry).
        depth: for ``image`` / ``frames``: one depth file or ``[H, W]`` array (metres) per image, or ``[N, H, W]``.
        intrinsics: ``[3, 3]`` pinhole matrix of the depth maps (file or array) or ``[N, 3, 3]``.
        poses: 4×4 camera-to-world per image (files or ``[N, 4, 4]``).
        num_frames: frames kept from frame lists, videos and scenes.
        depth_scale: raw depth units per metre for integer depth images.

    ``meta["sampled_indices"]`` holds the positions of the sampled frames in the original sequence
    (when known) and ``meta["total_frames"]`` its length.
    """
    from sr3d_plugin import plugins

    given = [n for n, v in (("image", image), ("frames", frames), ("video", video), ("scene", scene)) if v is not None]
    if len(given) != 1:
        raise SR3DInputError(
            f"give exactly one visual input (image, frames, video or scene); got {len(given)}"
            + (f" ({', '.join(given)})" if given else "")
        )
    n = _checks.integer(num_frames, "num_frames", minimum=1)
    depth_scale = _checks.finite_number(depth_scale, "depth_scale", positive=True)
    if (scene is not None or video is not None) and any(x is not None for x in (depth, intrinsics, poses)):
        raise SR3DInputError(
            "depth / intrinsics / poses go with an image or frames; a scene folder carries its own and a video "
            "takes point maps (points) or a depth model"
        )
    if scene is not None:
        return plugins.create("frame_readers", "scannet", num_frames=n, depth_scale=depth_scale).read(scene)
    if video is not None:
        fs = plugins.create("frame_readers", "video", num_frames=n).read(video)
        fs.meta["sampled_indices"] = list(fs.meta.get("frame_indices", []))
        return fs
    reader = plugins.create(
        "frame_readers", "frames", num_frames=None if image is not None else n, depth_scale=depth_scale
    )
    if image is not None:
        if isinstance(image, (list, tuple)):
            raise SR3DInputError(f"image takes one image, got a list of {len(image)}; use frames for several")
        if isinstance(image, np.ndarray) and image.ndim not in (2, 3):
            raise SR3DInputError(f"image array must be [H, W, 3] uint8, got shape {image.shape}")
        return reader.read([image], depth=depth, intrinsics=intrinsics, poses=poses)
    assert frames is not None
    if _is_path(frames) or isinstance(frames, Image.Image):
        frames = [frames]
    return reader.read(list(frames), depth=depth, intrinsics=intrinsics, poses=poses)


# ----------------------------------------------------------------------------------------------
# 3D positions
# ----------------------------------------------------------------------------------------------


def positions(
    frames: Any,
    source: str = "auto",
    *,
    points: Any = None,
    depth_model: str | PathLike | None = None,
    fallback_depth_model: str | PathLike | None = None,
    canonical_mode: str = "sr3d",
    device: str | torch.device | None = None,
    cache: Any = False,
    **source_options: Any,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """Canonical point maps of ``frames`` (a :class:`~sr3d_plugin.sources.base.FrameSet`).

    Args:
        source: one of :data:`DEPTH_SOURCES` (old spellings accepted, :func:`depth_source_name`).
            ``"auto"``: ``points`` when given → ``depth_model`` when given → the frames' own depth
            (``gt_depth`` with intrinsics, and poses for several frames; ``relative_depth`` otherwise,
            :func:`sr3d_plugin.pointmap.choose_source`) → ``fallback_depth_model`` when given.
            ``"gt_depth"``: the frames' own depth by that
            same rule. ``"relative_depth"``: the frames' depth under the single-view convention.
            ``"depth_anything"``: a monocular estimate with ``depth_model``. ``"reconstruction"``: ``points``.
        points: reconstruction point maps (``.npz`` / ``.npy`` file or ``[V|N, H, W, 3]`` array).
        depth_model: Depth Anything V2 id or folder.
        fallback_depth_model: the depth model ``"auto"`` uses for frames without depth or points
            (a default that, unlike ``depth_model``, does not override the frames' own depth).
        canonical_mode: canonical mode of metric ground-truth depth (the model config's); other sources
            use their own (``"robust"`` for estimated geometry).
        device: device of the depth estimator.
        cache: point-map cache (False, True, a folder or a :class:`~sr3d_plugin.pointmap.PointMapCache`).
        **source_options: passed to the point-map source (override the defaults chosen here).

    Returns:
        ``(canonical [V, H, W, 3] float32, valid [V, H, W] bool or None, info)`` where ``valid`` is given
        only in robust mode (the released ``"sr3d"`` convention averages every pixel) and ``info`` =
        ``{"source", "space", "canonical_mode", "points"?, "depth_model"?}``.
    """
    from sr3d_plugin.pointmap import choose_source, pointmaps_with_cache
    from sr3d_plugin.sources.base import FrameSet

    if not isinstance(frames, FrameSet):
        raise SR3DInputError(f"frames must be a FrameSet (see read_frames), got {_checks.describe(frames)}")
    if canonical_mode not in ("sr3d", "robust"):
        raise SR3DInputError(f"canonical_mode={canonical_mode!r}; expected 'sr3d' or 'robust'")
    name = depth_source_name(source, "source")
    if name == "auto":
        if points is not None:
            name = "reconstruction"
        elif depth_model is not None:
            name = "depth_anything"
        elif frames.depth is not None:
            name = "gt_depth"
        elif fallback_depth_model is not None:
            name, depth_model = "depth_anything", fallback_depth_model
        else:
            raise SR3DInputError(
                "3D positions need a depth source but the input has no depth, point maps or depth model; "
                "give depth (with intrinsics, and poses for several frames), points (.npz/.npy reconstruction "
                "or an array) or depth_model"
            )
    options: dict[str, Any] = {}
    if name == "reconstruction":
        if points is None:
            raise SR3DInputError("source='reconstruction' needs points (a .npz/.npy file or a [V, H, W, 3] array)")
        options["path"] = points
    elif name == "depth_anything":
        if depth_model is None:
            raise SR3DInputError("source='depth_anything' needs depth_model (a Depth Anything V2 id or folder)")
        options = {"model": str(depth_model), "device": str(device or "cpu")}
    else:
        if frames.depth is None:
            raise SR3DInputError(f"source={name!r} needs depth maps but the input has none")
        if name == "gt_depth":
            name = choose_source(frames)
        if name == "relative_depth":  # depth images are read in file units (SR-REAL's process_depth)
            options["depth_scale"] = float(frames.meta.get("depth_scale", 1000.0))
    options.update(source_options)
    # metric ground-truth depth follows the model's convention; other sources pick their own mode
    mode_arg = canonical_mode if name == "gt_depth" else None
    result = pointmaps_with_cache(frames, name, canonical_mode=mode_arg, cache=cache, **options)
    pm, canonical, mode = result.pointmaps, result.canonical, result.canonical_mode
    info: dict[str, Any] = {"source": name, "space": pm.space, "canonical_mode": mode}
    if name == "reconstruction" and _is_path(points):
        info["points"] = str(points)
    if name == "depth_anything":
        info["depth_model"] = str(depth_model)
    valid = pm.valid if mode == "robust" else None
    return canonical.to(torch.float32), valid, info


# ----------------------------------------------------------------------------------------------
# all together
# ----------------------------------------------------------------------------------------------


@dataclass
class VisualBundle:
    """A model's visual input with what it was made of.

    Attributes:
        visual: the :class:`VisualInput` (images, canonical points ``[V, H, W, 3]``, valid, regions).
        frames: the :class:`~sr3d_plugin.sources.base.FrameSet` after sampling.
        geometry: :func:`positions`' ``info`` (``{"source": None}`` without positions).
        specs: the region specs as given (for reports).
        timings: seconds spent in ``read``, ``geometry`` and ``regions``.
    """

    visual: VisualInput
    frames: Any
    geometry: dict[str, Any]
    specs: list[Any] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    kind: str = ""

    def summary(self) -> dict[str, Any]:
        """JSON-ready report: ``{"regions", "num_frames", "frame_ids", "geometry", "input"}``
        (regions as :func:`sr3d_plugin.regions.region_summary`)."""
        from sr3d_plugin.regions import RegionSpec, region_summary

        fs = self.frames
        return {
            "regions": [
                region_summary(r, i, fs, s if isinstance(s, (str, RegionSpec)) else None)
                for i, (r, s) in enumerate(zip(self.visual.regions, self.specs))
            ],
            "num_frames": len(fs),
            "frame_ids": [str(f) for f in fs.frame_ids],
            "geometry": self.geometry,
            "input": {
                "kind": self.kind,
                "source": fs.source,
                "total_frames": int(fs.meta.get("total_frames", len(fs))),
                "image_size": list(fs.images[0].size),
            },
        }


def visual_input(
    *,
    image: Any = None,
    frames: Sequence[Any] | None = None,
    video: PathLike | None = None,
    scene: PathLike | None = None,
    depth: Any = None,
    intrinsics: Any = None,
    poses: Any = None,
    points: Any = None,
    source: str = "auto",
    depth_model: str | PathLike | None = None,
    fallback_depth_model: str | PathLike | None = None,
    regions: Sequence[Any] = (),
    num_frames: int = 32,
    depth_scale: float = 1000.0,
    needs_positions: bool = True,
    canonical_mode: str = "sr3d",
    device: str | torch.device | None = None,
    cache: Any = False,
) -> VisualBundle:
    """:func:`read_frames` + :func:`positions` (when ``needs_positions``) + regions, as one :class:`VisualBundle`.

    Args:
        image, frames, video, scene, depth, intrinsics, poses, num_frames, depth_scale: as :func:`read_frames`.
        points, source, depth_model, fallback_depth_model, canonical_mode, device, cache: as :func:`positions`.
        regions: specs (:func:`sr3d_plugin.regions.parse_region_spec` strings, :class:`RegionSpec`) or
            :class:`Region` objects on the sampled frames, in ``<mask>`` order.
        needs_positions: whether the model adds 3D positions (without them no depth source is needed).

    The inputs are checked before anything is read: files exist, ``depth`` and ``points`` are not
    both given, a ``depth_model`` comes without ``depth`` / ``points``, and a model that needs
    positions has some depth source (a scene's depth, ``depth``, ``points`` or a depth model).
    """
    from sr3d_plugin.regions import RegionSpec, parse_region_spec, resolve_regions

    if points is not None and depth is not None:
        raise SR3DInputError("give either depth or points (reconstruction point maps), not both")
    if depth_model is not None and (depth is not None or points is not None):
        raise SR3DInputError("a depth model estimates depth; do not also give depth or points")
    check_input_paths(image=image, frames=frames, video=video, scene=scene, points=points)
    has_source = scene is not None or any(x is not None for x in (depth, points, depth_model, fallback_depth_model))
    if needs_positions and not has_source:
        raise SR3DInputError(
            "this model adds 3D positional encodings (use_position_encoding=True) but no depth source was given; "
            "pass depth (with intrinsics, and poses for several frames), points (a .npz/.npy reconstruction or "
            f"an array) or depth_model (e.g. {default_depth_model(None)!r})"
        )

    timings: dict[str, float] = {}
    t = time.perf_counter()
    fs = read_frames(
        image=image,
        frames=frames,
        video=video,
        scene=scene,
        depth=depth,
        intrinsics=intrinsics,
        poses=poses,
        num_frames=num_frames,
        depth_scale=depth_scale,
    )
    timings["read"] = time.perf_counter() - t
    t = time.perf_counter()
    canonical = valid = None
    geometry: dict[str, Any] = {"source": None}
    if needs_positions:
        canonical, valid, geometry = positions(
            fs,
            source,
            points=points,
            depth_model=depth_model,
            fallback_depth_model=fallback_depth_model,
            canonical_mode=canonical_mode,
            device=device,
            cache=cache,
        )
    timings["geometry"] = time.perf_counter() - t
    t = time.perf_counter()
    if isinstance(regions, (str, Region, RegionSpec)):
        regions = [regions]
    specs = [parse_region_spec(r) if isinstance(r, str) else r for r in regions]
    region_objs = resolve_regions(specs, fs)
    timings["regions"] = time.perf_counter() - t
    visual = VisualInput(list(fs.images), points=canonical, valid=valid, regions=region_objs)
    kind = next(
        k for k, v in (("image", image), ("frames", frames), ("video", video), ("scene", scene)) if v is not None
    )
    return VisualBundle(visual, fs, geometry, specs, timings, kind)
