"""Multi-view scenes for cross-frame region questions, built so that image position and size do not give 3D away.

A fixed room (9 m × 9 m × 3.8 m, four identical walls) is seen by ``F`` cameras standing within
0.5 m of its centre, each looking horizontally: four of them roughly towards the four walls (yaw
``k·90° ± 30°``), the others in random directions; the frame order is shuffled. Every camera gets one
or two floating boxes placed in its own view: image position and angular size first, then a depth
drawn from one fixed range (:data:`CROSS_FRAME_DEPTH`) whatever the image position. The room is sized
so that every such draw fits; no wall, floor or ceiling ever caps the depth along a ray. (An earlier
8 m × 2.4 m room capped it: objects near the top or bottom of the image had to be near the camera,
hence near the room's centre, hence closer to everything, and a 2D classifier answered 60 % of the
"closer to a third region" questions from pixel rows alone.) An object placed for one camera may also
be seen by another; the question samplers in :mod:`sr3d_plugin.synthetic.qa` only relate objects that
are **never seen together** in any frame and draw each region on its object's home frame.

Why the fixed room: the canonical space (:func:`sr3d_plugin.geometry.canonicalize`) takes the
per-axis min/max over all points. The four walls are always seen (each of the four wall-facing
cameras sees its wall, and the 60° view from 1.75–2.05 m reaches above 3.8 m and below the floor at
any wall 3.5 m or more away), so the bounds are the room's and the canonical space of every scene is
one fixed affine map of room coordinates: distances in metres are learnable from it, as in the
single-view scenes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.geometry import Box3D, backproject, canonical_transform
from sr3d_plugin.synthetic.render import render
from sr3d_plugin.synthetic.scene import Room, SceneObject, look_at, pinhole_intrinsics

__all__ = ["COLORS", "CROSS_FRAME_DEPTH", "CROSS_FRAME_ROOM", "CrossFrameScene", "cross_frame_scene"]

#: the room of every cross-frame scene (interior bounds in metres; four walls of one colour)
_WALL = (222, 214, 196)
CROSS_FRAME_ROOM = Room(lower=[-4.5, -4.5, 0.0], upper=[4.5, 4.5, 3.8], wall_colors=(_WALL,) * 4)
#: object depth along the optical axis of the camera it is placed for (metres): one range for every
#: image position, so that no pixel position or box size narrows an object's depth
CROSS_FRAME_DEPTH = (1.0, 2.8)
#: image half-extents an object's centre may take (normalised image coordinates x/z, y/z)
_XN, _YN = 0.52, 0.35
#: camera centres: within this of the room's centre horizontally, at this height range (metres)
_EYE_XY, _EYE_Z = 0.5, (1.75, 2.05)

#: the object colours of every synthetic QA scene (single-view and cross-frame)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (205, 45, 45),
    "green": (50, 165, 70),
    "blue": (55, 85, 210),
    "yellow": (225, 205, 50),
    "purple": (140, 60, 175),
    "orange": (235, 130, 35),
}


@dataclass
class CrossFrameScene:
    """A rendered cross-frame scene.

    Attributes:
        frames: ``F`` RGB images (``image_size`` square).
        instance: ``[F, H, W]`` int32 object id per pixel (0 = room).
        objects: the boxes (ids 1..N).
        canonical: ``[F, H, W, 3]`` float32 canonical point maps.
        cam_to_world: ``[F, 4, 4]`` float64 camera poses (room frame).
        home_frame: ``[N]`` the frame each object was placed for (it is visible there unless occluded).
    """

    frames: list[Image.Image]
    instance: np.ndarray
    objects: list[SceneObject]
    canonical: torch.Tensor
    cam_to_world: np.ndarray
    home_frame: list[int]

    def pixel_counts(self) -> np.ndarray:
        """``[N, F]`` pixels of each object in each frame."""
        ids = np.array([o.id for o in self.objects])
        return (self.instance[None] == ids[:, None, None, None]).sum(axis=(2, 3))

    def centers(self) -> np.ndarray:
        """``[N, 3]`` box centres in metres (room frame)."""
        return np.stack([o.box.center.numpy() for o in self.objects])


def _cameras(rng: np.random.Generator, num_frames: int) -> np.ndarray:
    yaws = [k * math.pi / 2 + rng.uniform(-math.pi / 6, math.pi / 6) for k in range(min(4, num_frames))]
    yaws += [rng.uniform(-math.pi, math.pi) for _ in range(num_frames - len(yaws))]
    poses = []
    for yaw in yaws:
        eye = np.array([*rng.uniform(-_EYE_XY, _EYE_XY, size=2), rng.uniform(*_EYE_Z)])
        poses.append(look_at(eye, eye + np.array([math.cos(yaw), math.sin(yaw), 0.0])))
    order = rng.permutation(num_frames)
    return np.stack([poses[i] for i in order])


def _place(
    rng: np.random.Generator,
    pose: np.ndarray,
    placed: list[Box3D],
    eyes: np.ndarray,
    room: Room,
) -> Box3D | None:
    """One box in the view of ``pose``: image box and depth drawn independently; None if no fit.

    The room, the camera range and :data:`CROSS_FRAME_DEPTH` are sized so that every (image box,
    depth) pair fits inside the room: depth is never capped by a wall, the floor or the ceiling along
    the ray (a cap would tie depth to image position, and near objects sit near the room's centre,
    which answers "closer to" questions from 2D alone). Only clearance from other boxes and cameras
    rejects a draw.
    """
    rot, eye = pose[:3, :3], pose[:3, 3]
    for _try in range(60):
        ax, az = rng.uniform(0.06, 0.12, size=2)  # angular half-width / half-height (normalised)
        ay = rng.uniform(0.05, 0.12)  # relative half-depth
        xn = rng.uniform(-_XN + ax, _XN - ax)
        yn = rng.uniform(-_YN + az, _YN - az)
        ray_cam = np.array([xn, yn, 1.0])
        depth = float(rng.uniform(*CROSS_FRAME_DEPTH))
        center = rot @ (ray_cam * depth) + eye
        half = np.array([ax * depth, ay * depth, az * depth])
        # box axes: x across the view, y along it (as the single-view boxes), then a small random turn
        yaw = math.atan2(rot[1, 2], rot[0, 2]) - math.pi / 2 + float(rng.uniform(-0.45, 0.45))
        # the box (its bounding sphere) stays inside the room, off the floor, clear of cameras and boxes
        radius = float(np.linalg.norm(half))
        inner_lo = room.lower + np.array([0.1, 0.1, 0.15])
        inner_hi = room.upper - np.array([0.1, 0.1, 0.1])
        if np.any(center - radius < inner_lo) or np.any(center + radius > inner_hi):
            raise RuntimeError("cross-frame room too small for its depth range")  # sized so this never happens
        if np.min(np.linalg.norm(eyes - center, axis=1)) < radius + 0.6:
            continue
        if any(
            float(np.linalg.norm(b.center.numpy() - center)) < radius + float(b.size.norm()) / 2 + 0.15 for b in placed
        ):
            continue
        return Box3D.from_center_size_yaw(center, 2 * half, yaw, validate=False)  # valid by construction
    return None


@functools.lru_cache(maxsize=8192)
def cross_frame_scene(seed: int, num_frames: int = 6, image_size: int = 64, min_pixels: int = 10) -> CrossFrameScene:
    """The cross-frame scene of ``seed`` (deterministic; cached: a training set of thousands of questions
    shares its scenes, about 0.3 MB each).

    Args:
        seed: scene seed (the splits draw disjoint ranges, see :data:`sr3d_plugin.synthetic.qa.SPLIT_SEED_BASE`).
        num_frames: frames ``F`` (≥ 4: four wall-facing cameras fix the canonical bounds).
        image_size: square render size in pixels.
        min_pixels: an object must cover this many pixels of the frame it was placed for.
    """
    if num_frames < 4:
        raise SR3DInputError(f"cross-frame scenes need num_frames >= 4 (four wall-facing cameras), got {num_frames}")
    room = CROSS_FRAME_ROOM
    k = pinhole_intrinsics(image_size, image_size, 60.0)
    rng = np.random.default_rng([int(seed), 77])
    bounds = canonical_transform(torch.tensor(np.stack([room.lower, room.upper])))  # the room's own map
    for _attempt in range(20):
        poses = _cameras(rng, num_frames)
        eyes = poses[:, :3, 3]
        boxes: list[Box3D] = []
        home: list[int] = []
        for f in range(num_frames):
            for _ in range(int(rng.integers(1, 3))):
                box = _place(rng, poses[f], boxes, eyes, room)
                if box is not None:
                    boxes.append(box)
                    home.append(f)
        names = [str(rng.choice(sorted(COLORS))) for _ in boxes]
        objects = [SceneObject(i + 1, f"{n} object", b, COLORS[n]) for i, (n, b) in enumerate(zip(names, boxes))]
        out = render(objects, room, k, poses, image_size, image_size, edge_lines=False)
        counts = np.stack([(out.instance == o.id).sum(axis=(1, 2)) for o in objects]) if objects else None
        if counts is None or len(objects) < 4 or any(counts[i, home[i]] < min_pixels for i in range(len(objects))):
            continue
        pts = backproject(
            torch.from_numpy(out.depth.astype(np.float64)),
            torch.from_numpy(k),
            torch.from_numpy(poses),
        )
        tf = canonical_transform(pts)
        if not (
            torch.allclose(tf.lower, bounds.lower, atol=0.02) and torch.allclose(tf.upper, bounds.upper, atol=0.02)
        ):
            continue  # some wall, the floor or the ceiling unseen: the canonical map would differ
        canonical = tf.apply(pts).to(torch.float32)
        frames = [Image.fromarray(out.rgb[i]) for i in range(num_frames)]
        return CrossFrameScene(frames, out.instance, objects, canonical, poses, home)
    raise SR3DInputError(f"could not lay out a cross-frame scene for seed {seed}")
