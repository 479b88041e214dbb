"""Pure, batched geometry: back-projection, the shared canonical 3D space, grid pooling, 3D boxes.

Conventions (SR3D-FACTS §3):

* Depth is metric, in metres, ``0`` marks an invalid pixel. Pixel ``(u, v)`` uses integer indices
  (``u`` = column, ``v`` = row) and ``x = (u − cx)·z/fx``, ``y = (v − cy)·z/fy``.
* Poses are camera-to-world 4×4 matrices (ScanNet convention; optionally left-multiplied by the
  scene's ``axis_align_matrix`` before use).
* The canonical space multiplies *row vectors* by ``R = [[0,0,−1],[1,0,0],[0,−1,0]]`` and maps each
  axis to ``[−1, 1]`` with the minimum and maximum over **all points of all frames** together.

Every function accepts torch tensors or NumPy arrays, works in float32 or float64 (the dtype of the
input is kept), and raises :class:`~sr3d_plugin.errors.SR3DInputError` on bad input: inputs go
through the shared checks of :mod:`sr3d_plugin._checks` (real dtype, shape, non-empty, finite,
pinhole intrinsics without skew and with last row ``[0, 0, 1]``, rigid poses), and a result that
would overflow the input's dtype is computed in float64 or refused — finite input never gives NaN
or inf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from sr3d_plugin import _checks
from sr3d_plugin._checks import MAX_COORDINATE
from sr3d_plugin.errors import SR3DInputError

__all__ = [
    "SR3D_AXIS_ROTATION",
    "Box3D",
    "CanonicalTransform",
    "as_float_tensor",
    "backproject",
    "box_iou_3d_axis_aligned",
    "canonical_transform",
    "canonicalize",
    "check_depth",
    "check_intrinsics",
    "check_rigid",
    "depth_image_to_relative",
    "disparity_to_relative_depth",
    "pool_to_grid",
    "project_box_to_masks",
    "project_points",
    "relative_depth_to_points",
    "valid_depth_mask",
]

#: Row-vector rotation of the released SR-3D canonical space (points @ R).
SR3D_AXIS_ROTATION = torch.tensor([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]], dtype=torch.float64)

CanonicalMode = Literal["sr3d", "robust"]


# ----------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------


def as_float_tensor(x: torch.Tensor | np.ndarray | list, name: str = "input") -> torch.Tensor:
    """Convert ``x`` to a floating torch tensor, keeping float64 / float32 (integers and halves become float32).

    Complex, boolean and non-numeric input is refused (:func:`sr3d_plugin._checks.as_tensor`).
    """
    return _checks.as_tensor(x, name, finite=False, nonempty=False)


def check_depth(depth: torch.Tensor, name: str = "depth") -> None:
    """Raise if ``depth`` is not ``[H, W]`` / ``[V, H, W]`` or holds NaN, ±inf or negative values (0 = invalid)."""
    if depth.dim() not in (2, 3):
        raise SR3DInputError(f"{name} must be [H, W] or [V, H, W], got shape {tuple(depth.shape)}")
    _checks.check_depth(depth, name)


def check_intrinsics(intrinsics: torch.Tensor | np.ndarray, name: str = "intrinsics") -> None:
    """Raise unless ``intrinsics`` is ``[..., 3, 3]`` pinhole matrices ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]``
    (finite, ``fx, fy > 0``, no skew, last row ``[0, 0, 1]``; :func:`sr3d_plugin._checks.check_intrinsics`)."""
    _checks.check_intrinsics(intrinsics, name)


def check_rigid(pose: torch.Tensor | np.ndarray, name: str = "cam_to_world", tol: float = 1e-3) -> None:
    """Raise unless ``pose`` is ``[..., 4, 4]`` rigid transforms (orthonormal rotation, det +1, last row 0 0 0 1)."""
    _checks.check_rigid(pose, name, tol)


def _finite_result(out: torch.Tensor, what: str, hint: str) -> torch.Tensor:
    """``out`` when every value is finite; an error otherwise (finite input overflowed the dtype)."""
    if not bool(torch.isfinite(out).all()):
        raise SR3DInputError(f"{what} overflows {str(out.dtype).removeprefix('torch.')}; expected {hint}")
    return out


def valid_depth_mask(depth: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``depth > 0`` and finite, as a bool tensor of the same shape."""
    d = as_float_tensor(depth, "depth")
    return torch.isfinite(d) & (d > 0)


# ----------------------------------------------------------------------------------------------
# back-projection and the canonical space
# ----------------------------------------------------------------------------------------------


def _pixel_grid(height: int, width: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    v, u = torch.meshgrid(
        torch.arange(height, dtype=dtype, device=device),
        torch.arange(width, dtype=dtype, device=device),
        indexing="ij",
    )
    return u, v


def backproject(
    depth: torch.Tensor | np.ndarray,
    intrinsics: torch.Tensor | np.ndarray,
    cam_to_world: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """Back-project metric depth to 3D points.

    Args:
        depth: ``[H, W]`` or ``[V, H, W]`` depth in metres (0 = invalid; such pixels land on the
            camera centre, exactly as in the released SR-3D pipeline).
        intrinsics: ``[3, 3]`` or ``[V, 3, 3]`` pinhole matrix of the depth image, in pixels.
        cam_to_world: optional ``[4, 4]`` or ``[V, 4, 4]`` camera-to-world rigid transform; without
            it the points stay in camera coordinates (x right, y down, z forward).

    Returns:
        ``[..., H, W, 3]`` points in metres, same leading shape and dtype as ``depth``.
    """
    d = _checks.as_tensor(depth, "depth", ndim=(2, 3), finite=False)
    check_depth(d)
    k = _checks.as_tensor(intrinsics, "intrinsics", ndim=(2, 3)).to(device=d.device, dtype=d.dtype)
    check_intrinsics(k)
    single = d.dim() == 2
    if single:
        d = d.unsqueeze(0)
    v_count, height, width = d.shape
    if k.dim() == 2:
        k = k.expand(v_count, 3, 3)
    if k.shape[0] != v_count:
        raise SR3DInputError(
            f"intrinsics has {k.shape[0]} matrices but depth has {v_count} frames; expected one per frame"
        )
    # ray of pixel (u, v) with unit z: ((u − cx)/fx, (v − cy)/fy, 1); the point is z · ray
    ray_x = (torch.arange(width, dtype=d.dtype, device=d.device).view(1, 1, -1) - k[:, 0, 2].view(-1, 1, 1)) / k[
        :, 0, 0
    ].view(-1, 1, 1)
    ray_y = (torch.arange(height, dtype=d.dtype, device=d.device).view(1, -1, 1) - k[:, 1, 2].view(-1, 1, 1)) / k[
        :, 1, 1
    ].view(-1, 1, 1)
    if cam_to_world is None:
        pts = torch.stack([d * ray_x, d * ray_y, d], dim=-1)
    else:
        t = _checks.as_tensor(cam_to_world, "cam_to_world", ndim=(2, 3), finite=False)
        check_rigid(t)
        t = t.to(device=d.device, dtype=d.dtype)
        if t.dim() == 2:
            t = t.expand(v_count, 4, 4)
        if t.shape[0] != v_count:
            raise SR3DInputError(
                f"cam_to_world has {t.shape[0]} poses but depth has {v_count} frames; expected one per frame"
            )
        # world_i = z · (R_i0·ray_x + R_i1·ray_y + R_i2) + t_i, one broadcast per axis (no per-pixel matmul)
        pts = torch.empty((v_count, height, width, 3), dtype=d.dtype, device=d.device)
        for i in range(3):
            r = t[:, i, :3]
            direction = r[:, 0].view(-1, 1, 1) * ray_x + r[:, 1].view(-1, 1, 1) * ray_y + r[:, 2].view(-1, 1, 1)
            torch.addcmul(t[:, i, 3].view(-1, 1, 1).expand_as(d), d, direction, out=pts[..., i])
    _finite_result(pts, "back-projection", "depth in metres and pixel intrinsics of a real camera")
    return pts[0] if single else pts


def _is_signed_permutation(rotation: torch.Tensor) -> bool:
    nz = rotation != 0
    return bool((nz.sum(0) == 1).all() and (nz.sum(1) == 1).all() and (rotation.abs()[nz] == 1).all())


def _rotate_rows(points: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """``points @ rotation`` for ``[..., 3]`` points; a signed permutation (the SR-3D rotation) is
    applied by indexing, which is exact and much faster than a K=3 matmul on millions of points."""
    r = rotation.to(points.dtype)
    if _is_signed_permutation(r):
        nz = r != 0
        src = nz.to(torch.int64).argmax(dim=0)  # output column j takes input column src[j]
        sign = r[src, torch.arange(3)]
        return points[..., src.tolist()] * sign.to(points.device)
    return points @ r.to(points.device)


@dataclass
class CanonicalTransform:
    """Affine map from world points to the canonical ``[−1, 1]³`` space: ``2·(p·R − lo)/(hi − lo) − 1``.

    Attributes:
        rotation: ``[3, 3]`` row-vector rotation (``points @ rotation``).
        lower, upper: ``[3]`` per-axis minimum and maximum of the rotated points.
    """

    rotation: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    mode: str = "sr3d"
    eps: float = field(default=1e-8)

    @property
    def scale(self) -> torch.Tensor:
        """Per-axis length (metres) that maps to the canonical width 2."""
        return self.upper - self.lower

    def apply(self, points: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Map ``[..., 3]`` world points to canonical coordinates (degenerate axes map to 0)."""
        p = _checks.as_tensor(points, "points", nonempty=False)
        if p.dim() < 1 or p.shape[-1] != 3:
            raise SR3DInputError(f"points must be [..., 3], got shape {tuple(p.shape)}")
        wide = self.lower.to(torch.float64), self.upper.to(torch.float64)
        if not bool(torch.isfinite(wide[1] - wide[0]).all()):
            raise SR3DInputError(
                f"canonical transform has non-finite bounds {self.lower.tolist()}, {self.upper.tolist()}"
            )
        span64 = wide[1] - wide[0]
        finfo = torch.finfo(p.dtype)
        # the reference formula in the points' dtype, or in float64 when that dtype cannot hold the span
        # (float32 points near ±3e38) or its differences
        work = p.dtype if bool((span64.abs() < finfo.max / 4).all()) else torch.float64
        q = p.to(work)
        lo = wide[0].to(device=p.device, dtype=work)
        span = span64.to(device=p.device, dtype=work)
        degenerate = span.abs() <= self.eps
        safe = torch.where(degenerate, torch.ones_like(span), span)
        out = 2.0 * (_rotate_rows(q, self.rotation) - lo) / safe - 1.0
        if bool(degenerate.any()):
            out[..., degenerate] = 0.0
        out = out.to(p.dtype)
        return _finite_result(out, "canonical coordinates", "points within the transform's bounds")

    def invert(self, canonical: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Map canonical ``[..., 3]`` coordinates back to world points."""
        c = _checks.as_tensor(canonical, "canonical", nonempty=False)
        if c.dim() < 1 or c.shape[-1] != 3:
            raise SR3DInputError(f"canonical must be [..., 3], got shape {tuple(c.shape)}")
        rot = self.rotation.to(device=c.device, dtype=torch.float64)
        lo = self.lower.to(device=c.device, dtype=torch.float64)
        span = (self.upper.to(torch.float64) - self.lower.to(torch.float64)).to(c.device)
        q = (c.to(torch.float64) + 1.0) / 2.0 * span + lo
        out = (q @ rot.transpose(0, 1)).to(c.dtype)
        return _finite_result(out, "world points", "canonical coordinates near [-1, 1]")

    def to_dict(self) -> dict:
        return {
            "rotation": self.rotation.tolist(),
            "lower": self.lower.tolist(),
            "upper": self.upper.tolist(),
            "mode": self.mode,
        }


def canonical_transform(
    points: torch.Tensor | np.ndarray,
    valid: torch.Tensor | np.ndarray | None = None,
    mode: CanonicalMode = "sr3d",
) -> CanonicalTransform:
    """The canonical-space transform of a set of points (all frames of one scene together).

    Args:
        points: ``[..., 3]`` world points, e.g. ``[V, H, W, 3]``.
        valid: optional ``[...]`` bool mask of valid points (same leading shape).
        mode: ``"sr3d"`` takes the min/max over **all** points, invalid ones included — exactly
            the released convention; ``"robust"`` takes them over valid points only.
    """
    p = _checks.as_tensor(points, "points", finite=False, nonempty=False)
    if p.dim() < 1 or p.shape[-1] != 3:
        raise SR3DInputError(f"points must have a last dimension of 3, got shape {tuple(p.shape)}")
    if not bool(torch.isfinite(p).all()):
        raise SR3DInputError(
            "points contain NaN or inf; expected finite coordinates (mark invalid points with `valid`)"
        )
    if mode not in ("sr3d", "robust"):
        raise SR3DInputError(f"unknown canonical mode {mode!r}; expected 'sr3d' or 'robust'")
    rot = SR3D_AXIS_ROTATION.to(device=p.device, dtype=p.dtype)
    flat = p.reshape(-1, 3)
    if mode == "sr3d":
        sel = flat
    elif mode == "robust":
        if valid is None:
            sel = flat
        else:
            m = _checks.as_mask(valid, "valid", tuple(p.shape[:-1]))
            sel = flat[m.reshape(-1).to(flat.device)]
            if sel.shape[0] == 0:
                raise SR3DInputError("all points are invalid (no pixel with depth > 0); cannot build a canonical space")
    else:
        raise SR3DInputError(f"unknown canonical mode {mode!r}; expected 'sr3d' or 'robust'")
    if sel.shape[0] == 0:
        raise SR3DInputError("points is empty; cannot build a canonical space")
    if _is_signed_permutation(rot):
        # a signed permutation maps per-axis bounds to per-axis bounds: rotate 2 points, not millions
        lo, hi = sel.aminmax(dim=0)
        a, b = _rotate_rows(lo, rot), _rotate_rows(hi, rot)
        return CanonicalTransform(rot, torch.minimum(a, b), torch.maximum(a, b), mode=mode)
    lo, hi = _rotate_rows(sel, rot).aminmax(dim=0)
    return CanonicalTransform(rot, lo, hi, mode=mode)


def canonicalize(
    points: torch.Tensor | np.ndarray,
    valid: torch.Tensor | np.ndarray | None = None,
    mode: CanonicalMode = "sr3d",
) -> torch.Tensor:
    """Map world points of all frames into one canonical ``[−1, 1]³`` space.

    Args:
        points: ``[..., 3]`` points in metres (e.g. ``[V, H, W, 3]`` from :func:`backproject`).
        valid: optional ``[...]`` bool mask; used by ``mode="robust"`` (min/max over valid points
            only, invalid points set to 0). ``mode="sr3d"`` ignores it, as the reference does.
        mode: ``"sr3d"`` (released convention, exact) or ``"robust"``.

    Returns:
        ``[..., 3]`` canonical coordinates, same shape and dtype as ``points``.
    """
    tf = canonical_transform(points, valid, mode)
    out = tf.apply(points)
    if mode == "robust" and valid is not None:
        m = _checks.as_mask(valid, "valid", tuple(out.shape[:-1])).to(out.device)
        out = torch.where(m.unsqueeze(-1), out, torch.zeros_like(out))
    return out


# ----------------------------------------------------------------------------------------------
# single-view (no camera) convention
# ----------------------------------------------------------------------------------------------


def depth_image_to_relative(values: np.ndarray | torch.Tensor) -> np.ndarray:
    """Relative depth ``d ∈ [0, 1]`` of a single-view depth image, as SR-REAL's ``mm_utils.process_depth``.

    ``d = values / 255`` when the maximum is at most 255 (8-bit images), else ``values / max``. Zero
    is the nearest point and valid; nothing is re-normalised.

    Args:
        values: ``[H, W]`` non-negative image values (file units), float64 recommended.

    Returns:
        ``[H, W]`` float64.
    """
    x = _checks.as_array(values, "values", ndim=2, finite=False)
    near = np.rint(x)
    x = np.where(np.abs(x - near) < 1e-3, near, x)  # values read back from integer images
    if not np.isfinite(x).all() or (x < 0).any():
        raise SR3DInputError("a relative depth image must hold finite, non-negative values")
    top = float(x.max())
    return x / 255.0 if top <= 255 else x / top


def disparity_to_relative_depth(prediction: torch.Tensor | np.ndarray, quantize: bool = True) -> torch.Tensor:
    """Turn a relative (inverse-depth) prediction, e.g. Depth Anything V2, into ``d ∈ [0, 1]``, far = 1.

    ``d = 1 − minmax(prediction)``. With ``quantize`` the result is truncated to 8 bits exactly as
    SR-REAL's ``generate_content`` does before making points: ``(1 − minmax(p)) · 255`` in the
    prediction's dtype, cast to uint8 (truncation), read back as ``/ 255``.

    Args:
        prediction: ``[H, W]`` or ``[V, H, W]``; larger = closer. Min/max are per image.
    """
    p = _checks.as_tensor(prediction, "prediction", ndim=(2, 3))
    out_dtype = p.dtype
    if not bool((p.abs() < torch.finfo(p.dtype).max / 4).all()):
        # the reference computes in the prediction's dtype; only a span that would overflow it moves to float64
        p = p.to(torch.float64)
    flat = p.reshape(*p.shape[:-2], -1)
    lo = flat.amin(dim=-1, keepdim=True).unsqueeze(-1)
    hi = flat.amax(dim=-1, keepdim=True).unsqueeze(-1)
    span = hi - lo
    norm = torch.where(span > 0, (p - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(p))
    d = 1.0 - norm
    if quantize:
        return torch.floor((d * 255.0).clamp(0.0, 255.0)).to(torch.float64) / 255.0
    return d.to(out_dtype)


def relative_depth_to_points(depth01: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Single-view point map (no intrinsics) from relative depth ``d ∈ [0, 1]`` (far = 1).

    ``u = 2x/(W−1) − 1``, ``v = 2y/(H−1) − 1``, ``z = 2d − 1``, and the point is ``(u·z, v·z, z)``.

    Args:
        depth01: ``[H, W]`` or ``[V, H, W]`` relative depth; values outside ``[0, 1]`` are rejected.

    Returns:
        ``[..., H, W, 3]`` points in ``[−1, 1]³``.
    """
    d = _checks.as_tensor(depth01, "depth01", ndim=(2, 3), nonempty=False, finite=False)
    if d.shape[-2] < 2 or d.shape[-1] < 2 or d.numel() == 0:
        raise SR3DInputError(f"depth01 must be at least 2×2 pixels per map, got shape {tuple(d.shape)}")
    if not bool(torch.isfinite(d).all()):
        raise SR3DInputError("depth01 contains NaN or inf; expected relative depth in [0, 1]")
    lo, hi = float(d.min()), float(d.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise SR3DInputError(f"depth01 values span [{lo:.4g}, {hi:.4g}]; expected relative depth in [0, 1] (far = 1)")
    height, width = d.shape[-2:]
    u, v = _pixel_grid(height, width, d.dtype, d.device)
    u = 2.0 * u / (width - 1) - 1.0
    v = 2.0 * v / (height - 1) - 1.0
    z = 2.0 * d - 1.0
    return torch.stack([u * z, v * z, z], dim=-1)


# ----------------------------------------------------------------------------------------------
# pooling onto the token grid
# ----------------------------------------------------------------------------------------------


#: largest token grid side :func:`pool_to_grid` builds (SigLIP-448 uses 32)
MAX_GRID_SIZE = 4096


def _grid_size(grid_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(grid_size, (tuple, list)):
        if len(grid_size) != 2:
            raise SR3DInputError(f"grid_size must be g or (gh, gw), got {grid_size!r}")
        gh, gw = grid_size
    else:
        gh = gw = grid_size
    return (
        _checks.integer(gh, "grid_size", minimum=1, maximum=MAX_GRID_SIZE),
        _checks.integer(gw, "grid_size", minimum=1, maximum=MAX_GRID_SIZE),
    )


def pool_to_grid(
    points: torch.Tensor | np.ndarray,
    grid_size: int | tuple[int, int],
    valid: torch.Tensor | np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Area-average a point map onto a token grid.

    Without ``valid`` this is ``F.interpolate(mode="area")`` (the reference); with ``valid`` each
    cell averages only its valid pixels.

    Args:
        points: ``[..., H, W, 3]`` point map (any units).
        grid_size: ``g`` or ``(gh, gw)`` output grid, e.g. 32 for SigLIP at 448 px.
        valid: optional ``[..., H, W]`` bool mask.

    Returns:
        ``(grid [..., gh, gw, 3], coverage [..., gh, gw])`` — coverage is the fraction of valid
        pixels in each cell (all ones without ``valid``); cells with no valid pixel are 0.
    """
    p = _checks.as_tensor(points, "points", nonempty=False)
    if p.dim() < 3 or p.shape[-1] != 3:
        raise SR3DInputError(f"points must be [..., H, W, 3], got shape {tuple(p.shape)}")
    if p.shape[-3] == 0 or p.shape[-2] == 0:
        raise SR3DInputError(f"points has an empty image (shape {tuple(p.shape)}); expected H, W >= 1")
    gh, gw = _grid_size(grid_size)
    lead = p.shape[:-3]
    height, width = p.shape[-3:-1]
    out_dtype = p.dtype
    if p.numel() and not bool((p.abs() < torch.finfo(p.dtype).max / 4).all()):
        p = p.to(torch.float64)  # cell sums of values near the dtype's maximum would overflow
    x = p.reshape(-1, height, width, 3).permute(0, 3, 1, 2)
    if valid is None:
        pooled = F.adaptive_avg_pool2d(x, (gh, gw))
        cover = torch.ones((x.shape[0], gh, gw), dtype=p.dtype, device=p.device)
    else:
        m = _checks.as_mask(valid, "valid", tuple(p.shape[:-1]))
        w = m.to(device=p.device, dtype=p.dtype).reshape(-1, 1, height, width)
        num = F.adaptive_avg_pool2d(x * w, (gh, gw))
        den = F.adaptive_avg_pool2d(w, (gh, gw))
        pooled = torch.where(den > 0, num / den.clamp_min(torch.finfo(p.dtype).tiny), torch.zeros_like(num))
        cover = den[:, 0]
    grid = pooled.permute(0, 2, 3, 1).reshape(*lead, gh, gw, 3).to(out_dtype)
    return grid, cover.reshape(*lead, gh, gw).to(out_dtype)


# ----------------------------------------------------------------------------------------------
# 3D boxes
# ----------------------------------------------------------------------------------------------


@dataclass
class Box3D:
    """An oriented 3D box: ``center`` ``[3]`` and full ``size`` ``[3]`` in metres, ``rotation`` ``[3, 3]``
    mapping box axes to world axes (columns are the box axes in world coordinates)."""

    center: torch.Tensor
    size: torch.Tensor
    rotation: torch.Tensor

    def __post_init__(self) -> None:
        self.center = _box_vector(self.center, "box center")
        self.size = _box_vector(self.size, "box size")
        r = _checks.as_tensor(self.rotation, "box rotation", finite=False).to(torch.float64)
        if r.numel() != 9:
            raise SR3DInputError(f"box rotation must be a [3, 3] matrix, got shape {tuple(r.shape)}")
        self.rotation = r.reshape(3, 3)
        if bool((self.size <= 0).any()):
            raise SR3DInputError(f"box size must be positive on every axis, got {self.size.tolist()}")
        if not bool(torch.isfinite(self.rotation).all()):
            raise SR3DInputError(f"box rotation has non-finite entries: {self.rotation.tolist()}")
        r = self.rotation
        err = float((r.T @ r - torch.eye(3, dtype=torch.float64)).abs().max())
        det = float(torch.linalg.det(r))
        if err > 1e-4 or abs(det - 1.0) > 1e-4:
            raise SR3DInputError(
                f"box rotation {r.tolist()} is not a rotation (|RᵀR − I| = {err:.3g}, det = {det:.6g}); "
                "expected an orthonormal matrix with det +1 (no scale or reflection)"
            )

    @classmethod
    def from_aabb(cls, lower: torch.Tensor | np.ndarray | list, upper: torch.Tensor | np.ndarray | list) -> Box3D:
        """Axis-aligned box from its min and max corners."""
        lo = as_float_tensor(lower, "box lower").to(torch.float64).reshape(3)
        hi = as_float_tensor(upper, "box upper").to(torch.float64).reshape(3)
        return cls((lo + hi) / 2, hi - lo, torch.eye(3, dtype=torch.float64))

    @classmethod
    def from_center_size_yaw(
        cls,
        center: torch.Tensor | np.ndarray | list,
        size: torch.Tensor | np.ndarray | list,
        yaw: float = 0.0,
        validate: bool = True,
    ) -> Box3D:
        """Box rotated by ``yaw`` radians about the world z (up) axis.

        ``validate=False`` skips the range, sign and rotation checks (the tensors are the same): for
        generators whose boxes are valid by construction and that make thousands of them.
        """
        yaw = _checks.finite_number(yaw, "yaw")
        c, s = float(np.cos(yaw)), float(np.sin(yaw))
        rot = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
        center_t, size_t = as_float_tensor(center, "box center"), as_float_tensor(size, "box size")
        if validate:
            return cls(center_t, size_t, rot)
        box = object.__new__(cls)
        box.center = center_t.to(torch.float64).reshape(3)
        box.size = size_t.to(torch.float64).reshape(3)
        box.rotation = rot
        return box

    def corners(self) -> torch.Tensor:
        """``[8, 3]`` world corners."""
        signs = torch.tensor([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=torch.float64)
        return self.center + (signs * self.size / 2) @ self.rotation.T

    def contains(self, points: torch.Tensor | np.ndarray, margin: float = 0.0) -> torch.Tensor:
        """``[...]`` bool: which of ``[..., 3]`` points lie inside the box grown by ``margin`` metres."""
        p = _checks.as_tensor(points, "points", nonempty=False).to(torch.float64)
        if p.dim() < 1 or p.shape[-1] != 3:
            raise SR3DInputError(f"points must be [..., 3], got shape {tuple(p.shape)}")
        margin = _checks.finite_number(margin, "margin")
        local = (p - self.center) @ self.rotation
        return (local.abs() <= self.size / 2 + margin).all(dim=-1)

    def transformed(self, matrix: torch.Tensor | np.ndarray) -> Box3D:
        """The box under a rigid 4×4 transform (e.g. an axis-alignment matrix)."""
        m = _checks.as_tensor(matrix, "matrix", shape=(4, 4), finite=False).to(torch.float64)
        check_rigid(m, "matrix")
        return Box3D(m[:3, :3] @ self.center + m[:3, 3], self.size, m[:3, :3] @ self.rotation)

    def to_dict(self) -> dict:
        return {"center": self.center.tolist(), "size": self.size.tolist(), "rotation": self.rotation.tolist()}


def _box_vector(value: object, name: str) -> torch.Tensor:
    """A finite ``[3]`` float64 vector with ``|v| <= MAX_COORDINATE`` metres."""
    v = _checks.as_tensor(value, name).to(torch.float64)
    if v.numel() != 3:
        raise SR3DInputError(f"{name} must have 3 values (x, y, z), got shape {tuple(v.shape)}")
    v = v.reshape(3)
    if bool((v.abs() > MAX_COORDINATE).any()):
        raise SR3DInputError(f"{name} {v.tolist()} is out of range; expected |values| <= {MAX_COORDINATE:g} metres")
    return v


def box_iou_3d_axis_aligned(a: Box3D, b: Box3D) -> float:
    """IoU of the axis-aligned hulls of two boxes (the ScanRefer / Scan2Cap convention)."""
    for name, box in (("a", a), ("b", b)):
        if not isinstance(box, Box3D):
            raise SR3DInputError(f"{name} must be a Box3D, got {_checks.describe(box)}")

    def bounds(box: Box3D) -> tuple[torch.Tensor, torch.Tensor]:
        c = box.corners()
        return c.amin(0), c.amax(0)

    alo, ahi = bounds(a)
    blo, bhi = bounds(b)
    inter = (torch.minimum(ahi, bhi) - torch.maximum(alo, blo)).clamp_min(0).prod()
    union = (ahi - alo).prod() + (bhi - blo).prod() - inter
    return float(inter / union) if union > 0 else 0.0


def project_points(
    points: torch.Tensor | np.ndarray,
    intrinsics: torch.Tensor | np.ndarray,
    cam_to_world: torch.Tensor | np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Project world points ``[N, 3]`` into one camera.

    Returns:
        ``(uv [N, 2] pixel coordinates, z [N] depth in metres)`` with the pixel-index convention of
        :func:`backproject` (``u = fx·x/z + cx``).
    """
    p = _checks.as_tensor(points, "points", nonempty=False).to(torch.float64)
    if p.dim() < 1 or p.shape[-1] != 3:
        raise SR3DInputError(f"points must be [N, 3] (or [..., 3]), got shape {tuple(p.shape)}")
    if bool((p.abs() > MAX_COORDINATE).any()):
        raise SR3DInputError(f"points has coordinates beyond {MAX_COORDINATE:g}; expected world points in metres")
    k = _checks.as_tensor(intrinsics, "intrinsics", shape=(3, 3), finite=False).to(torch.float64)
    check_intrinsics(k)
    if cam_to_world is not None:
        t = _checks.as_tensor(cam_to_world, "cam_to_world", shape=(4, 4), finite=False).to(torch.float64)
        check_rigid(t)
        rot, trans = t[:3, :3], t[:3, 3]
        p = (p - trans) @ rot
    z = p[..., 2]
    safe = torch.where(z.abs() > 1e-12, z, torch.full_like(z, 1e-12))
    u = k[0, 0] * p[..., 0] / safe + k[0, 2]
    v = k[1, 1] * p[..., 1] / safe + k[1, 2]
    uv = _finite_result(torch.stack([u, v], dim=-1), "projected pixel coordinates", "intrinsics of a real camera")
    return uv, z


def project_box_to_masks(
    box: Box3D,
    intrinsics: torch.Tensor | np.ndarray,
    cam_to_world: torch.Tensor | np.ndarray,
    image_size: tuple[int, int],
    depth: torch.Tensor | np.ndarray | None = None,
    depth_tolerance: float = 0.05,
) -> torch.Tensor:
    """Per-frame masks of the pixels where a 3D box is seen.

    Each pixel's ray is intersected with the box (slab test, exact for oriented boxes). Without
    ``depth`` the mask is the box silhouette. With ``depth`` a pixel is kept only if its observed
    surface point lies inside the box along that ray (within ``depth_tolerance`` metres), which
    removes the parts hidden behind other surfaces and the background seen through the box's
    empty space.

    Args:
        box: the 3D box in world coordinates.
        intrinsics: ``[3, 3]`` or ``[V, 3, 3]``.
        cam_to_world: ``[4, 4]`` or ``[V, 4, 4]``.
        image_size: ``(H, W)`` of the masks.
        depth: optional ``[V, H, W]`` (or ``[H, W]``) metric depth at that size, 0 = invalid.

    Returns:
        ``[V, H, W]`` bool masks (``[H, W]`` when a single pose is given).
    """
    if not isinstance(box, Box3D):
        raise SR3DInputError(f"box must be a Box3D, got {_checks.describe(box)}")
    if not isinstance(image_size, (tuple, list)) or len(image_size) != 2:
        raise SR3DInputError(f"image_size must be (H, W), got {_checks.describe(image_size)}")
    height = _checks.integer(image_size[0], "image_size", minimum=1)
    width = _checks.integer(image_size[1], "image_size", minimum=1)
    depth_tolerance = _checks.finite_number(depth_tolerance, "depth_tolerance", minimum=0.0)
    t = _checks.as_tensor(cam_to_world, "cam_to_world", ndim=(2, 3), finite=False).to(torch.float64)
    check_rigid(t)
    single = t.dim() == 2
    if single:
        t = t.unsqueeze(0)
    v_count = t.shape[0]
    k = _checks.as_tensor(intrinsics, "intrinsics", ndim=(2, 3), finite=False).to(torch.float64)
    check_intrinsics(k)
    if k.dim() == 2:
        k = k.expand(v_count, 3, 3)
    if k.shape[0] != v_count:
        raise SR3DInputError(f"intrinsics has {k.shape[0]} matrices for {v_count} poses; expected one per pose")
    d = None
    if depth is not None:
        d = _checks.as_tensor(depth, "depth", ndim=(2, 3), finite=False).to(torch.float64)
        check_depth(d)
        if d.dim() == 2:
            d = d.unsqueeze(0)
        if tuple(d.shape) != (v_count, height, width):
            raise SR3DInputError(
                f"depth shape {tuple(d.shape)} does not match {v_count} poses at image size {height}×{width}"
            )
    u, v = _pixel_grid(height, width, torch.float64, torch.device("cpu"))
    # Ray directions in camera coordinates with unit z, so that the ray parameter equals z-depth.
    dirs_c = torch.stack(
        [
            (u.unsqueeze(0) - k[:, 0, 2].view(-1, 1, 1)) / k[:, 0, 0].view(-1, 1, 1),
            (v.unsqueeze(0) - k[:, 1, 2].view(-1, 1, 1)) / k[:, 1, 1].view(-1, 1, 1),
            torch.ones((v_count, height, width), dtype=torch.float64),
        ],
        dim=-1,
    )
    rot_world = t[:, :3, :3]
    origin = t[:, :3, 3]
    to_box = box.rotation.T
    dirs_b = torch.einsum("ij,vjk,vhwk->vhwi", to_box, rot_world, dirs_c)
    origin_b = (origin - box.center) @ to_box.T  # [V, 3]
    half = box.size / 2
    tiny = 1e-12
    safe = torch.where(dirs_b.abs() < tiny, torch.full_like(dirs_b, tiny), dirs_b)
    o = origin_b.view(-1, 1, 1, 3)
    t1 = (-half - o) / safe
    t2 = (half - o) / safe
    t_near = torch.minimum(t1, t2).amax(dim=-1)
    t_far = torch.maximum(t1, t2).amin(dim=-1)
    hit = (t_near <= t_far) & (t_far > 0)
    if d is not None:
        t_near = t_near.clamp_min(0)
        hit = hit & (d > 0) & (d >= t_near - depth_tolerance) & (d <= t_far + depth_tolerance)
    return hit[0] if single else hit
