"""Procedural posed RGB-D scenes: a furnished room, a camera loop and exact ground truth.

World frames (SR3D-FACTS §3):

* The *aligned* frame: z up, floor at ``z = 0``, room walls parallel to x and y, room centred on
  the origin in x/y. Objects, the room and :attr:`SyntheticScene.cam_to_world` live here.
* The *raw* frame: what a scanner would record — the aligned frame moved by a random rotation
  about z and a translation. ``axis_align`` maps raw → aligned (``p_aligned = A @ p_raw``), like
  ScanNet's ``axisAlignment``, and ``raw_cam_to_world = inv(A) @ cam_to_world`` is what
  ``pose/<i>.txt`` stores.

Cameras use the OpenCV/ScanNet convention (x right, y down, z forward) and a pinhole model with the
pixel-index convention ``x = (u − cx)·z/fx``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.geometry import Box3D
from sr3d_plugin.synthetic.objects import RGB, Room, SceneObject
from sr3d_plugin.synthetic.render import render

if TYPE_CHECKING:
    from sr3d_plugin.sources.base import FrameSet

__all__ = [
    "LABEL_CATALOG",
    "Room",
    "SceneObject",
    "SyntheticScene",
    "default_scene",
    "generate_scene",
    "look_at",
    "pinhole_intrinsics",
]

#: label → (width range, depth range, height range in metres, base colours). Width is along the
#: box's local x axis, depth along local y, height along z.
LABEL_CATALOG: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float], tuple[RGB, ...]]] = {
    "chair": ((0.42, 0.55), (0.45, 0.58), (0.80, 1.00), ((150, 90, 50), (60, 60, 70), (180, 40, 40))),
    "table": ((0.90, 1.60), (0.60, 1.00), (0.70, 0.78), ((170, 120, 70), (120, 80, 45), (200, 200, 195))),
    "sofa": ((1.60, 2.20), (0.80, 1.00), (0.75, 0.90), ((70, 90, 140), (120, 60, 60), (90, 110, 80))),
    "bed": ((1.40, 1.80), (1.90, 2.10), (0.45, 0.60), ((210, 205, 190), (100, 130, 170))),
    "cabinet": ((0.60, 1.20), (0.40, 0.60), (0.80, 1.90), ((230, 225, 210), (140, 95, 55), (90, 90, 95))),
    "desk": ((1.00, 1.60), (0.55, 0.80), (0.72, 0.78), ((190, 150, 100), (240, 240, 235), (70, 70, 75))),
    "shelf": ((0.60, 1.20), (0.28, 0.40), (1.20, 2.00), ((160, 110, 60), (245, 245, 240), (40, 40, 45))),
    "lamp": ((0.28, 0.45), (0.28, 0.45), (1.20, 1.70), ((240, 220, 150), (200, 200, 210))),
    "box": ((0.30, 0.60), (0.30, 0.60), (0.25, 0.60), ((190, 150, 95), (170, 130, 80))),
    "plant": ((0.30, 0.50), (0.30, 0.50), (0.50, 1.20), ((60, 140, 60), (40, 110, 50))),
    "refrigerator": ((0.65, 0.80), (0.65, 0.75), (1.65, 1.90), ((235, 235, 235), (180, 185, 190))),
    "trash can": ((0.25, 0.40), (0.25, 0.40), (0.35, 0.65), ((80, 80, 80), (60, 110, 170))),
    "ottoman": ((0.45, 0.80), (0.45, 0.80), (0.35, 0.45), ((150, 60, 90), (200, 170, 120))),
}

#: Categories that usually stand against a wall, and those that stand in the open.
_WALL_LABELS = frozenset({"shelf", "cabinet", "refrigerator", "lamp", "plant", "trash can", "desk", "box"})
_INTERIOR_LABELS = frozenset({"table", "sofa", "chair", "ottoman", "box", "bed", "plant", "trash can", "desk"})

_WALL_PALETTE: tuple[RGB, ...] = ((226, 218, 200), (205, 215, 222), (222, 205, 196), (210, 222, 205), (235, 232, 225))
_FLOOR_PALETTE: tuple[tuple[RGB, RGB], ...] = (
    ((165, 120, 75), (140, 98, 58)),  # wood
    ((195, 195, 190), (150, 150, 150)),  # grey tiles
    ((120, 85, 60), (95, 65, 45)),  # dark wood
    ((205, 190, 160), (175, 160, 130)),  # sand tiles
)


@dataclass
class SyntheticScene:
    """A rendered synthetic scan with exact geometry.

    Attributes:
        scene_id: folder-style name, e.g. ``"synth0000_00"``.
        seed: the seed it was generated from.
        rgb: ``[V, H, W, 3]`` uint8.
        depth: ``[V, H, W]`` float32 z-depth in metres (0 = nothing hit).
        instance: ``[V, H, W]`` int32 object ids (0 = room).
        intrinsics: ``[3, 3]`` float64 pinhole matrix (colour and depth share it).
        cam_to_world: ``[V, 4, 4]`` float64 camera-to-world poses in the aligned frame.
        axis_align: ``[4, 4]`` float64 rigid map raw frame → aligned frame.
        raw_cam_to_world: ``[V, 4, 4]`` float64 ``inv(axis_align) @ cam_to_world`` (raw-frame poses).
        objects: objects in the aligned frame.
        room: the room in the aligned frame.
        width, height: image size in pixels.
    """

    scene_id: str
    seed: int
    rgb: np.ndarray
    depth: np.ndarray
    instance: np.ndarray
    intrinsics: np.ndarray
    cam_to_world: np.ndarray
    axis_align: np.ndarray
    raw_cam_to_world: np.ndarray
    objects: list[SceneObject]
    room: Room
    width: int
    height: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.rgb.shape[0])

    def object_by_id(self, object_id: int) -> SceneObject:
        for obj in self.objects:
            if obj.id == object_id:
                return obj
        raise SR3DInputError(f"scene {self.scene_id} has no object {object_id}; ids are {[o.id for o in self.objects]}")

    def to_frame_set(self) -> FrameSet:
        """The scene as a :class:`sr3d_plugin.sources.base.FrameSet` (aligned poses, metric depth)."""
        from sr3d_plugin.sources.base import FrameSet

        v = self.num_frames
        return FrameSet(
            images=[Image.fromarray(self.rgb[i]) for i in range(v)],
            depth=self.depth.copy(),
            intrinsics=np.repeat(self.intrinsics[None], v, axis=0),
            cam_to_world=self.cam_to_world.copy(),
            axis_align=self.axis_align.copy(),
            frame_ids=[str(i) for i in range(v)],
            source=f"synthetic:{self.scene_id}",
            meta={"scene_id": self.scene_id, "seed": self.seed},
        )


# ----------------------------------------------------------------------------------------------
# cameras
# ----------------------------------------------------------------------------------------------


def pinhole_intrinsics(
    width: int, height: int, hfov_deg: float = 60.0, cx: float | None = None, cy: float | None = None
) -> np.ndarray:
    """``[3, 3]`` float64 pinhole matrix with square pixels and horizontal field of view ``hfov_deg``.

    The principal point defaults to the image centre in pixel-index convention, ``((W−1)/2, (H−1)/2)``.
    """
    if not 1.0 < hfov_deg < 179.0:
        raise SR3DInputError(f"horizontal field of view must be in (1, 179) degrees, got {hfov_deg}")
    f = (width / 2.0) / math.tan(math.radians(hfov_deg) / 2.0)
    k = np.eye(3)
    k[0, 0] = k[1, 1] = f
    k[0, 2] = (width - 1) / 2.0 if cx is None else cx
    k[1, 2] = (height - 1) / 2.0 if cy is None else cy
    return k


def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray | None = None) -> np.ndarray:
    """``[4, 4]`` camera-to-world pose of an OpenCV camera at ``eye`` looking at ``target`` (world z up).

    Camera axes in world coordinates: z = forward, x = forward × up (right), y = forward × x (down).
    """
    eye = np.asarray(eye, dtype=np.float64)
    fwd = np.asarray(target, dtype=np.float64) - eye
    n = np.linalg.norm(fwd)
    if n < 1e-9:
        raise SR3DInputError(f"camera target {target} coincides with the eye {eye}")
    fwd = fwd / n
    up_v = np.array([0.0, 0.0, 1.0]) if up is None else np.asarray(up, dtype=np.float64)
    right = np.cross(fwd, up_v)
    if np.linalg.norm(right) < 1e-9:
        raise SR3DInputError(f"view direction {fwd} is parallel to the up vector {up_v}")
    right = right / np.linalg.norm(right)
    down = np.cross(fwd, right)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, down, fwd, eye
    return pose


def _yaw_matrix(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@dataclass
class _Trajectory:
    """Camera loop: an ellipse around the room centre with smooth radius, height and gaze wobble."""

    semi_x: float
    semi_y: float
    start: float
    direction: float
    height: float
    target_height: float
    target_push: float
    phases: np.ndarray  # [3]

    def eye(self, s: np.ndarray) -> np.ndarray:
        """``[N, 3]`` camera centres at loop parameters ``s ∈ [0, 1)``."""
        th = self.start + self.direction * 2 * math.pi * s
        scale = 1.0 + 0.08 * np.sin(2 * th + self.phases[0])
        return np.stack(
            [
                self.semi_x * scale * np.cos(th),
                self.semi_y * scale * np.sin(th),
                self.height + 0.08 * np.sin(3 * th + self.phases[1]),
            ],
            axis=-1,
        )

    def poses(self, n: int) -> np.ndarray:
        s = np.arange(n) / n
        eyes = self.eye(s)
        th = self.start + self.direction * 2 * math.pi * s
        out = []
        for e, t in zip(eyes, th):
            # look past the room centre, with a slow side-to-side gaze wobble
            gaze = -self.target_push * e[:2]
            wobble = math.radians(9.0) * math.sin(2 * t + self.phases[2])
            rel = _yaw_matrix(wobble)[:2, :2] @ (gaze - e[:2])
            target = np.array([e[0] + rel[0], e[1] + rel[1], self.target_height])
            out.append(look_at(e, target))
        return np.stack(out)


# ----------------------------------------------------------------------------------------------
# layout sampling
# ----------------------------------------------------------------------------------------------


def _footprint_overlap(
    c1: np.ndarray, h1: np.ndarray, yaw1: float, c2: np.ndarray, h2: np.ndarray, yaw2: float
) -> bool:
    """Separating-axis test of two oriented rectangles (centres [2], half sizes [2], yaw)."""
    a1, a2 = _yaw_matrix(yaw1)[:2, :2], _yaw_matrix(yaw2)[:2, :2]
    d = c2 - c1
    for axes in (a1, a2):
        for k in range(2):
            n = axes[:, k]
            r1 = h1[0] * abs(a1[:, 0] @ n) + h1[1] * abs(a1[:, 1] @ n)
            r2 = h2[0] * abs(a2[:, 0] @ n) + h2[1] * abs(a2[:, 1] @ n)
            if abs(d @ n) > r1 + r2:
                return False
    return True


def _point_rect_distance(points: np.ndarray, c: np.ndarray, h: np.ndarray, yaw: float) -> np.ndarray:
    """Distances ``[N]`` from 2-D points ``[N, 2]`` to an oriented rectangle (0 inside)."""
    local = (points - c) @ _yaw_matrix(yaw)[:2, :2]
    return np.linalg.norm(np.clip(np.abs(local) - h, 0.0, None), axis=-1)


def _sample_layout(
    rng: np.random.Generator,
    count: int,
    room: Room,
    path: np.ndarray,
    traj: _Trajectory,
    labels: list[str],
    gap: float,
    clearance: float,
) -> list[SceneObject] | None:
    """Rejection-sample ``count`` objects standing on the floor; None if the room is too crowded.

    Each object goes either against a wall (back to the wall, facing the room, slight yaw jitter)
    or inside the camera loop (any yaw, at most 1.25 m tall so it does not hide the room). Every
    footprint keeps ``clearance`` metres from the camera path and ``gap`` metres from the others.
    """
    placed: list[tuple[np.ndarray, np.ndarray, float]] = []
    objects: list[SceneObject] = []
    lo, hi = room.lower[:2], room.upper[:2]
    wall_labels = [lab for lab in labels if lab in _WALL_LABELS] or labels
    inner_labels = [lab for lab in labels if lab in _INTERIOR_LABELS] or labels
    p_inner = 0.6 if min(traj.semi_x, traj.semi_y) >= 0.8 else 0.25
    unit = np.array([[sx, sy] for sx in (-1, 1) for sy in (-1, 1)], dtype=np.float64)
    for idx in range(count):
        for _attempt in range(300):
            inner = bool(rng.random() < p_inner)
            pool = inner_labels if inner else wall_labels
            label = pool[int(rng.integers(len(pool)))]
            (w0, w1), (d0, d1), (z0, z1), palette = LABEL_CATALOG[label]
            size = np.array([rng.uniform(w0, w1), rng.uniform(d0, d1), rng.uniform(z0, z1)])
            half = size[:2] / 2
            if inner:
                if rng.random() < 0.5:
                    yaw = float(rng.integers(4)) * math.pi / 2 + rng.normal(0.0, math.radians(8.0))
                else:
                    yaw = float(rng.uniform(-math.pi, math.pi))
                r, phi = math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
                reach = np.maximum([traj.semi_x - clearance, traj.semi_y - clearance], 0.05)
                center = reach * r * np.array([math.cos(phi), math.sin(phi)])
            else:
                wall = int(rng.integers(4))  # −x, +x, −y, +y
                yaw = (-math.pi / 2, math.pi / 2, 0.0, math.pi)[wall] + rng.normal(0.0, math.radians(3.0))
                axis = wall // 2  # the wall is normal to this axis
                along = 1 - axis
                span = (lo[along] + half[0], hi[along] - half[0])
                if span[0] >= span[1]:
                    continue
                center = np.zeros(2)
                center[along] = rng.uniform(*span)
                offset = half[1] + rng.uniform(0.02, 0.12)
                center[axis] = lo[axis] + offset if wall % 2 == 0 else hi[axis] - offset
            yaw = math.remainder(yaw, 2 * math.pi)
            corners = center + (unit * half) @ _yaw_matrix(yaw)[:2, :2].T
            if (corners < lo + 0.01).any() or (corners > hi - 0.01).any():
                continue
            if size[2] > room.size[2] - 0.2:
                continue
            if _point_rect_distance(path, center, half, yaw).min() < clearance:
                continue
            inside_loop = (center[0] / traj.semi_x) ** 2 + (center[1] / traj.semi_y) ** 2 < 1.0
            if inside_loop and size[2] > 1.25:
                continue
            if any(_footprint_overlap(center, half + gap / 2, yaw, c, h + gap / 2, y) for c, h, y in placed):
                continue
            placed.append((center, half, yaw))
            color = np.asarray(palette[int(rng.integers(len(palette)))], dtype=np.float64)
            color = np.clip(color * rng.uniform(0.88, 1.12) + rng.integers(-12, 13, size=3), 0, 255)
            box = Box3D.from_center_size_yaw([center[0], center[1], size[2] / 2], size, yaw)
            objects.append(SceneObject(idx + 1, label, box, tuple(int(c) for c in color)))
            break
        else:
            return None
    return objects


def _all_visible(
    objects: list[SceneObject],
    room: Room,
    k: np.ndarray,
    instance: np.ndarray,
    traj: _Trajectory,
    min_fraction: float,
) -> bool:
    """Every object covers ``min_fraction`` of some frame's pixels.

    Short sequences (< 12 frames) cannot show every object; they are checked on a 24-frame loop
    along the same trajectory instead (rendered at half resolution).
    """
    n, height, width = instance.shape
    if n < 12:
        w2, h2 = max(width // 2, 8), max(height // 2, 8)
        k2 = k.copy()
        sx, sy = w2 / width, h2 / height
        k2[0, 0], k2[0, 2] = k[0, 0] * sx, (k[0, 2] + 0.5) * sx - 0.5
        k2[1, 1], k2[1, 2] = k[1, 1] * sy, (k[1, 2] + 0.5) * sy - 0.5
        instance = render(objects, room, k2, traj.poses(24), w2, h2, edge_lines=False).instance
        n, height, width = instance.shape
    ids = np.array([o.id for o in objects])
    counts = np.stack([np.bincount(frame.ravel(), minlength=int(ids.max()) + 1)[ids] for frame in instance])
    return bool((counts.max(0) >= min_fraction * width * height).all())


def generate_scene(
    seed: int,
    num_frames: int = 24,
    width: int = 320,
    height: int = 240,
    num_objects: int | tuple[int, int] = (4, 8),
    *,
    labels: list[str] | None = None,
    room_size: tuple[tuple[float, float], tuple[float, float], tuple[float, float]] = (
        (3.0, 7.0),
        (3.0, 7.0),
        (2.5, 3.0),
    ),
    hfov_deg: tuple[float, float] = (55.0, 65.0),
    min_visible_fraction: float = 0.002,
    scene_id: str | None = None,
) -> SyntheticScene:
    """Generate a furnished room, a camera loop through it and the rendered RGB-D frames.

    Deterministic in ``seed`` (one ``numpy.random.Generator``; no global random state).

    Args:
        seed: integer seed.
        num_frames: number of views ``V`` along one closed loop around the room centre.
        width, height: image size in pixels (e.g. 640×480 for ScanNet depth size).
        num_objects: exact count or an inclusive ``(min, max)`` range.
        labels: restrict object categories (keys of :data:`LABEL_CATALOG`); default all.
        room_size: ``(min, max)`` metres for the room's x, y and z extent.
        hfov_deg: ``(min, max)`` horizontal field of view in degrees.
        min_visible_fraction: every object must cover at least this fraction of one frame's pixels;
            layouts that fail are re-sampled (sequences shorter than 12 frames are checked on a
            24-frame loop along the same path).
        scene_id: name of the scene; default ``f"synth{seed:04d}_00"``.

    Returns:
        :class:`SyntheticScene` with ``rgb [V, H, W, 3]`` uint8, ``depth [V, H, W]`` float32 metres,
        ``instance [V, H, W]`` int32, ``intrinsics [3, 3]``, aligned ``cam_to_world [V, 4, 4]``,
        ``axis_align [4, 4]`` and raw ``raw_cam_to_world [V, 4, 4]`` (all float64).
    """
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise SR3DInputError(f"seed must be a non-negative integer, got {seed!r}")
    if num_frames < 1:
        raise SR3DInputError(f"num_frames must be >= 1, got {num_frames}")
    if width < 8 or height < 8:
        raise SR3DInputError(f"image size must be at least 8×8 pixels, got {width}×{height}")
    if isinstance(num_objects, int):
        n_lo = n_hi = num_objects
    else:
        n_lo, n_hi = (int(x) for x in num_objects)
    if not 0 <= n_lo <= n_hi or n_hi > 40:
        raise SR3DInputError(
            f"num_objects must be an int or an inclusive (min, max) range in 0..40, got {num_objects!r}"
        )
    label_list = sorted(LABEL_CATALOG) if labels is None else list(labels)
    unknown = [lab for lab in label_list if lab not in LABEL_CATALOG]
    if unknown or not label_list:
        raise SR3DInputError(f"unknown object labels {unknown or label_list}; expected some of {sorted(LABEL_CATALOG)}")

    rng = np.random.default_rng(int(seed))
    count = int(rng.integers(n_lo, n_hi + 1))
    for _attempt in range(40):
        # floor area grows with the object count (about 3–4.5 m² per object), within room_size
        (x0, x1), (y0, y1), (z0, z1) = room_size
        area = max(count, 2) * rng.uniform(3.0, 4.5)
        aspect = rng.uniform(1.0, 1.7)
        lx, ly = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if rng.random() < 0.5:
            lx, ly = ly, lx
        dims = np.array([np.clip(lx, x0, x1), np.clip(ly, y0, y1), rng.uniform(z0, z1)])
        walls = _WALL_PALETTE[int(rng.integers(len(_WALL_PALETTE)))]
        wall_colors = tuple(tuple(int(np.clip(c * f, 0, 255)) for c in walls) for f in (1.0, 0.95, 0.97, 1.03))
        floor_a, floor_b = _FLOOR_PALETTE[int(rng.integers(len(_FLOOR_PALETTE)))]
        room = Room(
            lower=np.array([-dims[0] / 2, -dims[1] / 2, 0.0]),
            upper=np.array([dims[0] / 2, dims[1] / 2, dims[2]]),
            wall_colors=wall_colors,  # type: ignore[arg-type]
            floor_color_a=floor_a,
            floor_color_b=floor_b,
        )
        # the camera walks a loop about 1 m from the walls, looking across the room
        semi = np.maximum(dims[:2] / 2 - rng.uniform(0.75, 1.0, size=2), 0.3)
        traj = _Trajectory(
            semi_x=float(semi[0]),
            semi_y=float(semi[1]),
            start=float(rng.uniform(0, 2 * math.pi)),
            direction=float(rng.choice([-1.0, 1.0])),
            height=float(rng.uniform(1.3, 1.6)),
            target_height=float(rng.uniform(0.7, 1.0)),
            target_push=float(rng.uniform(0.5, 1.0)),
            phases=rng.uniform(0, 2 * math.pi, size=3),
        )
        path = traj.eye(np.arange(720) / 720)[:, :2]
        objects = _sample_layout(rng, count, room, path, traj, label_list, gap=0.08, clearance=0.3)
        if objects is None:
            continue
        hfov = float(rng.uniform(*hfov_deg))
        cx = (width - 1) / 2 + float(rng.uniform(-0.01, 0.01)) * width
        cy = (height - 1) / 2 + float(rng.uniform(-0.01, 0.01)) * height
        k = pinhole_intrinsics(width, height, hfov, cx, cy)
        poses = traj.poses(num_frames)
        result = render(objects, room, k, poses, width, height)
        if objects and not _all_visible(objects, room, k, result.instance, traj, min_visible_fraction):
            continue
        break
    else:
        raise SR3DInputError(
            f"could not lay out {count} objects with every object visible after 40 attempts (seed {seed}); "
            "ask for fewer objects or a larger room_size"
        )

    # random raw scanner frame: rotation about z plus translation; axis_align maps raw → aligned
    raw_yaw = float(rng.uniform(-math.pi, math.pi))
    align = np.eye(4)
    align[:3, :3] = _yaw_matrix(raw_yaw)
    align[:3, 3] = [rng.uniform(-3.0, 3.0), rng.uniform(-3.0, 3.0), rng.uniform(-0.1, 0.1)]
    raw_poses = np.linalg.inv(align) @ poses

    return SyntheticScene(
        scene_id=scene_id or f"synth{int(seed):04d}_00",
        seed=int(seed),
        rgb=result.rgb,
        depth=result.depth,
        instance=result.instance,
        intrinsics=k,
        cam_to_world=poses,
        axis_align=align,
        raw_cam_to_world=raw_poses,
        objects=objects,
        room=room,
        width=int(width),
        height=int(height),
        meta={"hfov_deg": hfov, "layout_attempts": _attempt + 1},
    )


def default_scene() -> SyntheticScene:
    """The bundled demo scene: ``generate_scene(seed=0)`` (generated on the fly, nothing stored)."""
    return generate_scene(seed=0)
