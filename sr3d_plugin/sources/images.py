"""The ``image`` and ``frames`` frame readers: loose image files with optional depth, intrinsics, poses.

Depth files: 16-bit PNG in millimetres (divided by ``depth_scale``) or ``.npy`` in metres.
Intrinsics: a 3×3 or 4×4 matrix in a ``.txt`` or ``.npy`` file, describing the *depth* map (the
image when there is no depth). Poses: 4×4 camera-to-world matrices, one file per frame.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.sources.base import FrameSet, uniform_frame_indices
from sr3d_plugin.sources.files import (
    load_depth_file,
    load_intrinsics_file,
    load_pose_file,
    load_rgb,
    require_file,
)

__all__ = ["FramesReader", "ImageReader"]

PathLike = str | os.PathLike


def _as_path_list(value: PathLike | Sequence[PathLike] | None, what: str) -> list[Path] | None:
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    items = [Path(v) for v in value]
    if not items:
        raise SR3DInputError(f"{what} list is empty; expected one file per frame")
    return items


def _check_pose(pose: np.ndarray, path: Path) -> np.ndarray:
    if not np.isfinite(pose).all():
        raise SR3DInputError(f"pose file {str(path)!r} holds non-finite values; expected a valid 4×4 camera-to-world")
    return pose


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
        self.depth_scale = float(depth_scale)

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


class FramesReader:
    """Read a list of image files as the frames of one scene.

    Args:
        num_frames: sample this many frames uniformly (``floor(linspace)``); None keeps all.
        depth_scale: raw units per metre for integer depth images.

    ``read(paths, depth=None, intrinsics=None, poses=None)``: ``depth`` / ``poses`` are lists with
    one file per image (or None); ``intrinsics`` is one file shared by all frames.
    """

    name = "frames"

    def __init__(self, num_frames: int | None = None, depth_scale: float = 1000.0) -> None:
        if num_frames is not None and num_frames <= 0:
            raise SR3DInputError(f"num_frames must be positive or None, got {num_frames!r}")
        if not np.isfinite(depth_scale) or depth_scale <= 0:
            raise SR3DInputError(f"depth_scale must be a positive number, got {depth_scale!r}")
        self.num_frames = num_frames
        self.depth_scale = float(depth_scale)

    def read(
        self,
        paths: PathLike | Sequence[PathLike],
        depth: PathLike | Sequence[PathLike] | None = None,
        intrinsics: PathLike | None = None,
        poses: PathLike | Sequence[PathLike] | None = None,
    ) -> FrameSet:
        """Returns a :class:`FrameSet`: depth ``[V, Hd, Wd]`` float32 metres, intrinsics ``[V, 3, 3]``,
        poses ``[V, 4, 4]`` — each None when not given."""
        images_p = _as_path_list(paths, "image")
        assert images_p is not None
        depth_p = _as_path_list(depth, "depth")
        poses_p = _as_path_list(poses, "pose")
        n = len(images_p)
        for what, lst in (("depth", depth_p), ("pose", poses_p)):
            if lst is not None and len(lst) != n:
                raise SR3DInputError(f"{len(lst)} {what} file(s) for {n} image(s); expected one {what} file per image")
        for p in images_p:
            require_file(p, "image")
        picked = uniform_frame_indices(n, self.num_frames or n)
        images = [load_rgb(images_p[i]) for i in picked]
        files: list[Path] = [images_p[i] for i in picked]

        depth_arr = None
        if depth_p is not None:
            maps = [load_depth_file(depth_p[i], self.depth_scale) for i in picked]
            shapes = {m.shape for m in maps}
            if len(shapes) != 1:
                raise SR3DInputError(f"depth maps have different shapes {sorted(shapes)}; expected one size")
            depth_arr = np.stack(maps).astype(np.float32)
            files += [depth_p[i] for i in picked]

        k_arr = None
        if intrinsics is not None:
            k = load_intrinsics_file(intrinsics)
            k_arr = np.repeat(k[None], len(picked), axis=0)
            files.append(Path(intrinsics))

        pose_arr = None
        if poses_p is not None:
            pose_arr = np.stack([_check_pose(load_pose_file(poses_p[i]), poses_p[i]) for i in picked])
            files += [poses_p[i] for i in picked]

        # the intrinsics also describe the colour images when there is no depth or it has their size
        same_size = depth_arr is None or all(im.size == (depth_arr.shape[2], depth_arr.shape[1]) for im in images)
        color_k = k_arr if same_size else None
        stems = [images_p[i].stem for i in picked]
        ids = stems if len(set(stems)) == len(stems) else [str(i) for i in picked]
        return FrameSet(
            images=images,
            depth=depth_arr,
            intrinsics=k_arr,
            cam_to_world=pose_arr,
            color_intrinsics=color_k,
            frame_ids=ids,
            source=str(images_p[0]) if n == 1 else f"{images_p[0]} (+{n - 1} more)",
            meta={
                "reader": {
                    "name": self.name,
                    "options": {"num_frames": self.num_frames, "depth_scale": self.depth_scale},
                },
                "total_frames": n,
                "input_files": [str(f) for f in files],
            },
        )
