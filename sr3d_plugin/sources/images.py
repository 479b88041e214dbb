"""The ``image`` and ``frames`` frame readers: loose image files with optional depth, intrinsics, poses.

Depth files: 16-bit PNG in millimetres (divided by ``depth_scale``) or ``.npy`` in metres.
Intrinsics: a 3×3 or 4×4 matrix in a ``.txt`` or ``.npy`` file, describing the *depth* map (the
image when there is no depth). Poses: 4×4 camera-to-world matrices, one file per frame.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sr3d_plugin import _checks
from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.sources.base import FrameSet, normalise_frame_id, uniform_frame_indices
from sr3d_plugin.sources.files import (
    check_depth_array,
    load_depth_file,
    load_intrinsics_file,
    load_pose_file,
    load_rgb,
    require_file,
)

__all__ = ["FramesReader", "ImageReader"]

PathLike = str | os.PathLike


class ImageReader:
    """Read one image, optionally with a depth map, intrinsics and a pose.

    Args:
        depth: optional depth file (16-bit PNG in mm or ``.npy`` in metres).
        intrinsics: optional 3×3 / 4×4 intrinsics file of the depth map (of the image without depth).
        pose: optional 4×4 camera-to-world file.
        depth_scale: raw units per metre for integer depth images (1000 = millimetres).

    ``read(path, depth=..., intrinsics=..., pose=...)`` overrides the constructor's files.
    """

    name = "image"

    def __init__(
        self,
        depth: PathLike | None = None,
        intrinsics: PathLike | None = None,
        pose: PathLike | None = None,
        depth_scale: float = 1000.0,
    ) -> None:
        self.depth = depth
        self.intrinsics = intrinsics
        self.pose = pose
        self.depth_scale = _checks.finite_number(depth_scale, "depth_scale", positive=True)

    def read(
        self,
        path: PathLike,
        depth: PathLike | None = None,
        intrinsics: PathLike | None = None,
        pose: PathLike | None = None,
    ) -> FrameSet:
        """Returns a one-frame :class:`FrameSet` (depth ``[1, Hd, Wd]`` metres, intrinsics ``[1, 3, 3]``)."""
        reader = FramesReader(depth_scale=self.depth_scale)
        fs = reader.read(
            [path],
            depth=None if (depth or self.depth) is None else [depth or self.depth],
            intrinsics=intrinsics or self.intrinsics,
            poses=None if (pose or self.pose) is None else [pose or self.pose],
        )
        fs.meta["reader"] = {"name": self.name, "options": {"depth_scale": self.depth_scale}}
        return fs


def _is_path(value: object) -> bool:
    return isinstance(value, (str, os.PathLike))


def _to_image(value: object, what: str) -> Image.Image:
    """An RGB PIL image from a file path, a PIL image or an ``[H, W, 3]`` / ``[H, W]`` uint8 array."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if _is_path(value):
        return load_rgb(value, what)  # type: ignore[arg-type]
    if isinstance(value, np.ndarray):
        arr = value
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise SR3DInputError(f"{what} array must be [H, W, 3] uint8, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            raise SR3DInputError(f"{what} array must be uint8 (0..255), got {arr.dtype}")
        return Image.fromarray(np.ascontiguousarray(arr[..., :3]))
    raise SR3DInputError(f"{what} is a {type(value).__name__}; expected a file path, PIL image or uint8 array")


def _per_frame(value: object, item_ndim: int, what: str = "value") -> list | None:
    """A per-frame list from a path, a list/tuple, one ``item_ndim``-d array or a stacked array."""
    if value is None:
        return None
    if _is_path(value) or isinstance(value, Image.Image):
        return [value]
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.ndim < item_ndim:
            raise SR3DInputError(
                f"{what} must be one entry per frame ({item_ndim}-D each, or stacked), got shape {value.shape}"
            )
        return [value] if value.ndim == item_ndim else list(value)
    if not isinstance(value, (list, tuple)):
        raise SR3DInputError(f"{what} must be a list with one entry per frame, got {_checks.describe(value)}")
    return list(value)


class FramesReader:
    """Read a list of images (files, PIL images or uint8 arrays) as the frames of one scene.

    Args:
        num_frames: sample this many frames uniformly (``floor(linspace)``); None keeps all.
        depth_scale: raw units per metre for integer depth images.

    ``read(images, depth=None, intrinsics=None, poses=None)``: ``depth`` / ``poses`` hold one entry
    per image, in the same order (files, or ``[H, W]`` metres / ``[4, 4]`` camera-to-world arrays,
    or one stacked ``[N, H, W]`` / ``[N, 4, 4]`` array); ``intrinsics`` is one file or ``[3, 3]``
    matrix shared by all frames, or ``[N, 3, 3]`` (one per image). Only the sampled entries are read.
    """

    name = "frames"

    def __init__(self, num_frames: int | None = None, depth_scale: float = 1000.0) -> None:
        if num_frames is not None:
            num_frames = _checks.integer(num_frames, "num_frames", minimum=1)
        self.num_frames = num_frames
        self.depth_scale = _checks.finite_number(depth_scale, "depth_scale", positive=True)

    def read(
        self,
        paths: object,
        depth: object = None,
        intrinsics: object = None,
        poses: object = None,
    ) -> FrameSet:
        """Returns a :class:`FrameSet`: depth ``[V, Hd, Wd]`` float32 metres, intrinsics ``[V, 3, 3]``,
        poses ``[V, 4, 4]`` — each None when not given; ``meta["sampled_indices"]`` / ``["total_frames"]``."""
        images = _per_frame(paths, 3, "paths")
        assert images is not None
        if not images:
            raise SR3DInputError("the image list is empty; expected at least one image")
        unit = "image" if len(images) == 1 else "frame"
        depth_l = _per_frame(depth, 2, "depth")
        poses_l = _per_frame(poses, 2, "poses")
        n = len(images)
        for what, lst in (("depth map", depth_l), ("pose", poses_l)):
            if lst is not None and len(lst) != n:
                raise SR3DInputError(
                    f"{len(lst)} {what}(s) for {n} {unit}(s); expected one {what} per {unit}, in the same order"
                )
        for v in images:
            if _is_path(v):
                require_file(v, "image")  # type: ignore[arg-type]
        picked = uniform_frame_indices(n, self.num_frames or n)
        imgs = [_to_image(images[i], f"{unit} {i}") for i in picked]
        files: list = [images[i] for i in picked]

        depth_arr = None
        if depth_l is not None:
            maps = []
            for i in picked:
                d = depth_l[i]
                files.append(d)
                if _is_path(d):
                    maps.append(load_depth_file(d, self.depth_scale))
                    continue
                arr = _checks.as_array(d, f"depth of {unit} {i}", finite=False, dtype=np.float32)
                if arr.ndim != 2 or arr.size == 0:
                    raise SR3DInputError(f"depth of {unit} {i} must be [H, W] metres, got shape {arr.shape}")
                check_depth_array(arr, f"depth of {unit} {i}")
                maps.append(arr)
            shapes = {m.shape for m in maps}
            if len(shapes) != 1:
                raise SR3DInputError(f"depth maps have different shapes {sorted(shapes)}; expected one size")
            depth_arr = np.stack(maps).astype(np.float32)

        k_arr = None
        if intrinsics is not None:
            files.append(intrinsics)
            if _is_path(intrinsics):
                k = np.repeat(load_intrinsics_file(intrinsics)[None], len(picked), axis=0)  # type: ignore[arg-type]
            else:
                k = _checks.as_array(intrinsics, "intrinsics", finite=False, nonempty=False)
                if k.shape == (3, 3):
                    k = np.repeat(k[None], len(picked), axis=0)
                elif k.ndim == 3 and k.shape[1:] == (3, 3) and k.shape[0] == n:
                    k = k[picked]
                else:
                    raise SR3DInputError(
                        f"intrinsics must be [3, 3] or [{n}, 3, 3] (one per {unit}), got shape {k.shape}"
                    )
                _checks.check_intrinsics(k, "intrinsics")
            k_arr = k

        pose_arr = None
        if poses_l is not None:
            mats = []
            for i in picked:
                p = poses_l[i]
                files.append(p)
                m = load_pose_file(p) if _is_path(p) else _checks.as_array(p, f"pose of {unit} {i}", finite=False)
                if m.shape != (4, 4):
                    raise SR3DInputError(
                        f"pose of {unit} {i} must be a 4×4 camera-to-world matrix, got shape {m.shape}"
                    )
                if not np.isfinite(m).all():
                    where = f"pose file {str(p)!r}" if _is_path(p) else f"pose of {unit} {i}"
                    raise SR3DInputError(f"{where} holds non-finite values; expected a valid 4×4 camera-to-world")
                mats.append(m)
            pose_arr = np.stack(mats)

        # the intrinsics also describe the colour images when there is no depth or it has their size
        same_size = depth_arr is None or all(im.size == (depth_arr.shape[2], depth_arr.shape[1]) for im in imgs)
        stems = [Path(images[i]).stem if _is_path(images[i]) else str(i) for i in picked]
        ids = stems if len({normalise_frame_id(s) for s in stems}) == len(stems) else [str(i) for i in picked]
        first = images[0]
        if _is_path(first):
            source = str(first) if n == 1 else f"{first} (+{n - 1} more)"
        else:
            source = "in-memory images"
        meta: dict = {
            "reader": {"name": self.name, "options": {"num_frames": self.num_frames, "depth_scale": self.depth_scale}},
            "total_frames": n,
            "sampled_indices": picked,
            "depth_scale": self.depth_scale,
        }
        if all(_is_path(f) for f in files):  # otherwise the cache identifies the frames by their content
            meta["input_files"] = [str(f) for f in files]
        return FrameSet(
            images=imgs,
            depth=depth_arr,
            intrinsics=k_arr,
            cam_to_world=pose_arr,
            color_intrinsics=k_arr if same_size else None,
            frame_ids=ids,
            source=source,
            meta=meta,
        )
