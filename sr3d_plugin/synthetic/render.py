"""Vectorised ray casting of oriented boxes inside an axis-aligned room.

Exact geometry for tests, demos and synthetic data: every pixel's ray (pixel-index convention of
SR3D-FACTS §3, ``x = (u − cx)·z/fx``) is intersected analytically with the object boxes (slab test
in each box's frame) and with the inner faces of the room. Depth is the camera-space ``z`` of the
first hit (not the ray length), so :func:`sr3d_plugin.geometry.backproject` of the rendered depth
lands exactly on the surfaces.

Shading is deterministic: per-object base colour with Lambert shading of each face from two fixed
lights (plus ambient) and darkened box edges; room walls carry stripes and a baseboard, the floor a
checkerboard with grout lines, the ceiling a panel grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.geometry import check_intrinsics, check_rigid
from sr3d_plugin.synthetic.objects import Room, SceneObject

__all__ = ["LIGHTS", "RenderResult", "render"]

#: Fixed lights: (unit direction towards the light, intensity). Ambient is :data:`AMBIENT`.
LIGHTS: tuple[tuple[tuple[float, float, float], float], ...] = (
    ((0.55, 0.33, 0.77), 0.55),  # key light, high and to one side
    ((-0.62, -0.74, 0.26), 0.25),  # weak fill from the opposite side
)
AMBIENT = 0.45
#: Camera-space rays closer than this (metres) are ignored.
_NEAR = 1e-6
#: Width (metres) of the darkened band along box edges.
_EDGE = 0.012


@dataclass
class RenderResult:
    """Rendered frames.

    Attributes:
        rgb: ``[V, H, W, 3]`` uint8 colour images.
        depth: ``[V, H, W]`` float32 camera-space z-depth of the first hit, in metres (0 = no hit).
        instance: ``[V, H, W]`` int32 object id of the first hit (0 = room or background).
    """

    rgb: np.ndarray
    depth: np.ndarray
    instance: np.ndarray


def _shade_normals(normals: np.ndarray) -> np.ndarray:
    """Lambert factor ``[...]`` for unit world normals ``[..., 3]`` (ambient included)."""
    out = np.full(normals.shape[:-1], AMBIENT, dtype=np.float64)
    for direction, intensity in LIGHTS:
        d = np.asarray(direction, dtype=np.float64)
        d = d / np.linalg.norm(d)
        out = out + intensity * np.clip(normals @ d, 0.0, None)
    return out


def _as_batch(a: np.ndarray | torch.Tensor, shape: tuple[int, int], name: str) -> np.ndarray:
    arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    arr = arr.astype(np.float64)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != shape:
        raise SR3DInputError(f"{name} must be {list(shape)} or [V, {shape[0]}, {shape[1]}], got shape {arr.shape}")
    return arr


def _slab(
    origin: np.ndarray, dirs: Sequence[np.ndarray], lower: np.ndarray, upper: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Ray/box slab test for rays ``origin + t·dir`` against the box ``[lower, upper]`` (its own frame).

    Returns ``(t_near, t_far, t_lo, t_hi)``: entry and exit parameters per ray (the ray meets the
    box iff ``t_near <= t_far``) and the per-axis slab entry/exit parameters they were taken from.
    Rays parallel to a slab give ±inf there (NaN from 0/0 is ignored by ``fmin``/``fmax``).
    """
    t_lo, t_hi = [], []
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(3):
            inv = 1.0 / dirs[i]
            a = (lower[i] - origin[i]) * inv
            b = (upper[i] - origin[i]) * inv
            t_lo.append(np.fmin(a, b))
            t_hi.append(np.fmax(a, b))
    t_near = np.fmax(np.fmax(t_lo[0], t_lo[1]), t_lo[2])
    t_far = np.fmin(np.fmin(t_hi[0], t_hi[1]), t_hi[2])
    return t_near, t_far, t_lo, t_hi


def _face_code(per_axis: list[np.ndarray], t: np.ndarray, dirs: list[np.ndarray], exit_side: bool) -> np.ndarray:
    """Face code ``axis·2 + (1 if the upper side)`` of the slab bound that produced ``t``.

    Entering a slab while moving up an axis happens on its lower side (``exit_side=False``);
    leaving it, on its upper side.
    """
    is0 = per_axis[0] == t
    is1 = ~is0 & (per_axis[1] == t)
    is2 = ~is0 & ~is1
    d = np.where(is0, dirs[0], np.where(is1, dirs[1], dirs[2]))
    upper = (d > 0) if exit_side else (d < 0)
    return (2 * (is1 + 2 * is2) + upper).astype(np.int32)


# Colour-table codes: 0 background, then room faces, the second floor colour, the baseboard of each
# wall, then six faces per object (face code = axis·2 + upper side).
_ROOM = 1
_FLOOR_B = 7
_BASEBOARD = 8
_OBJECTS = 12


def _palette(room: Room | None, colors: np.ndarray, obj_shade: np.ndarray, room_shade: np.ndarray, bg) -> np.ndarray:
    """``[12 + 6N, 3]`` float32 shaded colour of every code."""
    table = np.zeros((_OBJECTS + 6 * len(colors), 3), dtype=np.float64)
    table[0] = bg
    if room is not None:
        walls = np.asarray(room.wall_colors, dtype=np.float64)
        table[_ROOM : _ROOM + 4] = walls * room_shade[:4, None]
        table[_ROOM + 4] = np.asarray(room.floor_color_a) * room_shade[4]
        table[_ROOM + 5] = np.asarray(room.ceiling_color) * room_shade[5]
        table[_FLOOR_B] = np.asarray(room.floor_color_b) * room_shade[4]
        table[_BASEBOARD : _BASEBOARD + 4] = np.asarray(room.baseboard_color, dtype=np.float64) * room_shade[:4, None]
    table[_OBJECTS:] = (colors[:, None, :] * obj_shade[:, :, None]).reshape(-1, 3)
    return table.astype(np.float32)


def _room_hits(
    org: np.ndarray, dirs: list[np.ndarray], lower: np.ndarray, upper: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(t, code)`` of every pixel against the room's inner faces (``t = inf``, code 0 where missed)."""
    if bool(np.all(org > lower) and np.all(org < upper)):
        # camera inside the room (usual case): every ray leaves through exactly one face
        t_axis = []
        with np.errstate(divide="ignore"):
            for i in range(3):
                inv = 1.0 / dirs[i]
                t_axis.append(np.maximum((upper[i] - org[i]) * inv, (lower[i] - org[i]) * inv))
        t = np.minimum(np.minimum(t_axis[0], t_axis[1]), t_axis[2])
        return t, _ROOM + _face_code(t_axis, t, dirs, exit_side=True)
    t_near, t_far, _, t_hi = _slab(org, dirs, lower, upper)
    hit = (t_near <= t_far) & (t_far > _NEAR)
    code = np.where(hit, _ROOM + _face_code(t_hi, t_far, dirs, exit_side=True), 0)
    return np.where(hit, t_far, np.inf), code


def _room_texture(
    room: Room, code: np.ndarray, t: np.ndarray, org: np.ndarray, dirs: list[np.ndarray], factor: np.ndarray
) -> np.ndarray:
    """Apply the room's patterns: returns the new code map and scales ``factor`` in place.

    Floor: checkerboard (second colour code) with dark grout lines; ceiling: panel grid; walls:
    vertical stripes, a rail at 0.9 m and a baseboard below 0.1 m.
    """
    with np.errstate(invalid="ignore"):  # pixels that miss the room have t = inf
        return _room_pattern(room, code, t, org, dirs, factor)


def _room_pattern(
    room: Room, code: np.ndarray, t: np.ndarray, org: np.ndarray, dirs: list[np.ndarray], factor: np.ndarray
) -> np.ndarray:
    lower = room.lower
    px = org[0] + t * dirs[0] - lower[0]
    py = org[1] + t * dirs[1] - lower[1]
    pz = org[2] + t * dirs[2] - lower[2]
    code = code.copy()
    floor = code == _ROOM + 4
    if floor.any():
        fx, fy = px / room.tile_size, py / room.tile_size
        parity = (np.floor(fx) + np.floor(fy)) % 2 > 0
        code[floor & parity] = _FLOOR_B
        grout = np.minimum(np.abs(fx - np.round(fx)), np.abs(fy - np.round(fy))) * room.tile_size < 0.008
        factor[floor & grout] *= 0.55
    ceiling = code == _ROOM + 5
    if ceiling.any():
        gx, gy = px / 0.6, py / 0.6
        line = np.minimum(np.abs(gx - np.round(gx)), np.abs(gy - np.round(gy))) * 0.6 < 0.01
        factor[ceiling & line] *= 0.8
    wall = (code >= _ROOM) & (code < _ROOM + 4)
    if wall.any():
        along = np.where(code < _ROOM + 2, py, px)  # x-walls run along y, y-walls along x
        stripe = np.floor(along / room.stripe_period) % 2 > 0
        factor[wall & stripe] *= 0.91
        factor[wall & (np.abs(pz - 0.9) < 0.015)] *= 0.8
        board = wall & (pz < 0.1)
        code[board] = _BASEBOARD + (code[board] - _ROOM)
        factor[board] = 1.0
    return code


def render(
    objects: Sequence[SceneObject],
    room: Room | None,
    intrinsics: np.ndarray | torch.Tensor,
    cam_to_world: np.ndarray | torch.Tensor,
    width: int,
    height: int,
    *,
    background: tuple[int, int, int] = (0, 0, 0),
    edge_lines: bool = True,
) -> RenderResult:
    """Ray-cast oriented boxes inside a room from posed pinhole cameras.

    Args:
        objects: boxes to draw (``id`` ≥ 1, ``box`` a :class:`~sr3d_plugin.geometry.Box3D` in the
            world frame of ``cam_to_world``, ``color`` RGB 0–255). Ids need not be unique or sorted.
        room: the room (inner faces of an axis-aligned box are drawn), or None for an empty
            background (depth 0, ``background`` colour).
        intrinsics: ``[3, 3]`` or ``[V, 3, 3]`` pinhole matrix in pixels (pixel-index convention,
            SR3D-FACTS §3).
        cam_to_world: ``[4, 4]`` or ``[V, 4, 4]`` camera-to-world rigid transforms, OpenCV camera
            axes (x right, y down, z forward).
        width, height: image size in pixels.
        background: colour of pixels that hit nothing.
        edge_lines: darken a thin band along the box edges (helps to see each box's shape).

    Returns:
        :class:`RenderResult` with ``rgb [V, H, W, 3]`` uint8, ``depth [V, H, W]`` float32 z-depth in
        metres (0 where nothing is hit) and ``instance [V, H, W]`` int32 object ids (0 = none).
        Where two surfaces are hit at exactly the same depth, objects win over the room and later
        objects over earlier ones.
    """
    if int(width) != width or int(height) != height or width < 1 or height < 1:
        raise SR3DInputError(f"image size must be positive integers, got width={width} height={height}")
    width, height = int(width), int(height)
    poses = _as_batch(cam_to_world, (4, 4), "cam_to_world")
    check_rigid(torch.from_numpy(poses))
    n_views = poses.shape[0]
    ks = _as_batch(intrinsics, (3, 3), "intrinsics")
    check_intrinsics(torch.from_numpy(ks))
    if ks.shape[0] == 1 and n_views > 1:
        ks = np.repeat(ks, n_views, axis=0)
    if ks.shape[0] != n_views:
        raise SR3DInputError(f"intrinsics has {ks.shape[0]} matrices for {n_views} poses; expected 1 or one per pose")

    objs = list(objects)
    n_obj = len(objs)
    centers = np.array([o.box.center.numpy() for o in objs], dtype=np.float64).reshape(n_obj, 3)
    halves = np.array([o.box.size.numpy() / 2 for o in objs], dtype=np.float64).reshape(n_obj, 3)
    rots = np.array([o.box.rotation.numpy() for o in objs], dtype=np.float64).reshape(n_obj, 3, 3)
    ids = np.array([int(o.id) for o in objs], dtype=np.int32)
    colors = np.array([o.color for o in objs], dtype=np.float64).reshape(n_obj, 3)
    # Outward face normals [N, 6, 3] (face = axis·2 + (1 if the upper side)) and their shading.
    signs = np.array([-1.0, 1.0])
    obj_normals = np.einsum("nij,s->njsi", rots, signs).reshape(n_obj, 6, 3)
    # Room faces seen from inside: the inward normal of the lower face of axis i is +e_i.
    room_normals = np.zeros((6, 3))
    for i in range(3):
        room_normals[2 * i, i] = 1.0
        room_normals[2 * i + 1, i] = -1.0
    palette = _palette(room, colors, _shade_normals(obj_normals), _shade_normals(room_normals), background)
    code_to_id = np.zeros(len(palette), dtype=np.int32)
    code_to_id[_OBJECTS:] = np.repeat(ids, 6)
    corner_signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)

    rgb = np.empty((n_views, height, width, 3), dtype=np.uint8)
    depth = np.zeros((n_views, height, width), dtype=np.float32)
    instance = np.zeros((n_views, height, width), dtype=np.int32)
    u = np.arange(width, dtype=np.float64)
    v = np.arange(height, dtype=np.float64)

    for view in range(n_views):
        k = ks[view]
        rot_c, org = poses[view, :3, :3], poses[view, :3, 3]
        xn = (u - k[0, 2]) / k[0, 0]  # [W] camera x of the unit-z ray (so t = z-depth)
        yn = (v - k[1, 2]) / k[1, 1]  # [H]
        edge = np.zeros((height, width), dtype=bool)
        if room is not None:
            dirs_w = [rot_c[i, 0] * xn[None, :] + rot_c[i, 1] * yn[:, None] + rot_c[i, 2] for i in range(3)]
            zbuf, code = _room_hits(org, dirs_w, room.lower, room.upper)
        else:
            zbuf = np.full((height, width), np.inf)
            code = np.zeros((height, width), dtype=np.int32)

        for j in range(n_obj):
            to_box = rots[j].T
            m = to_box @ rot_c  # camera axes in box coordinates
            o_b = to_box @ (org - centers[j])
            # Pixel window that can see the box: projected corners (all in front of the camera).
            cam_pts = (corner_signs * halves[j] - o_b) @ m  # box coordinates → camera coordinates
            if bool((cam_pts[:, 2] > 1e-3).all()):
                pu = k[0, 0] * cam_pts[:, 0] / cam_pts[:, 2] + k[0, 2]
                pv = k[1, 1] * cam_pts[:, 1] / cam_pts[:, 2] + k[1, 2]
                u0, u1 = max(int(np.floor(pu.min())) - 1, 0), min(int(np.ceil(pu.max())) + 2, width)
                v0, v1 = max(int(np.floor(pv.min())) - 1, 0), min(int(np.ceil(pv.max())) + 2, height)
                if u0 >= u1 or v0 >= v1:
                    continue
            else:
                u0, u1, v0, v1 = 0, width, 0, height
            xs, ys = xn[u0:u1][None, :], yn[v0:v1][:, None]
            dirs = [m[i, 0] * xs + m[i, 1] * ys + m[i, 2] for i in range(3)]
            t_near, t_far, t_lo, t_hi = _slab(o_b, dirs, -halves[j], halves[j])
            win_z = zbuf[v0:v1, u0:u1]
            if bool(np.all(np.abs(o_b) < halves[j])):  # camera inside the box: its inner faces
                t_hit, hit = t_far, (t_far > _NEAR) & (t_far <= win_z)
                face = _face_code(t_hi, t_far, dirs, exit_side=True)
            else:  # a ray that meets the box enters it in front of the camera
                t_hit, hit = t_near, (t_near <= t_far) & (t_near > _NEAR) & (t_near <= win_z)
                face = _face_code(t_lo, t_near, dirs, exit_side=False)
            if not hit.any():
                continue
            np.copyto(win_z, t_hit, where=hit)
            np.copyto(code[v0:v1, u0:u1], _OBJECTS + 6 * j + face, where=hit)
            if edge_lines:
                with np.errstate(invalid="ignore"):
                    near = [np.abs(o_b[i] + t_hit * dirs[i]) > halves[j, i] - _EDGE for i in range(3)]
                # on a face one coordinate is at its bound; a second one near its bound = an edge
                np.copyto(edge[v0:v1, u0:u1], (near[0].view(np.int8) + near[1] + near[2]) >= 2, where=hit)

        hit_any = code > 0
        depth[view] = np.where(hit_any, zbuf, 0.0)
        instance[view] = code_to_id[code]
        factor = np.ones((height, width), dtype=np.float32)
        if room is not None:
            code = _room_texture(room, code, zbuf, org, dirs_w, factor)
        if edge_lines:
            factor[edge] *= 0.6
        img = palette[code] * factor[..., None]
        rgb[view] = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    return RenderResult(rgb=rgb, depth=depth, instance=instance)
