"""The one validation layer of the public surface: arrays, numbers, camera matrices.

Every public function of :mod:`sr3d_plugin.geometry`, :mod:`~sr3d_plugin.tiling`,
:mod:`~sr3d_plugin.regions`, :mod:`~sr3d_plugin.pointmap`, :mod:`~sr3d_plugin.sources`,
:mod:`~sr3d_plugin.visual_inputs` and :mod:`~sr3d_plugin.records` checks what it is given with these
helpers, where the value comes in, and the layers below trust it. Each check either returns the value
in a known form or raises :class:`~sr3d_plugin.errors.SR3DInputError` naming the parameter, the bad
value (shape, dtype or a short summary) and what was expected — never another exception type, never a
silent reinterpretation (complex numbers are refused, not truncated; a scaled intrinsics matrix is
refused, not misread).

Conventions checked here (SR3D-FACTS §3):

* intrinsics are pinhole matrices ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`` in pixels: finite,
  ``fx, fy > 0``, **no skew** (the back-projection ``x = (u − cx)·z/fx`` has none, so a skewed
  matrix is refused rather than misread) and a last row of exactly ``[0, 0, 1]`` (a matrix scaled by
  ``s`` — last row ``[0, 0, s]`` — would put points off by ``s``);
* poses are rigid camera-to-world ``4×4`` transforms (orthonormal rotation, det +1, last row
  ``[0, 0, 0, 1]``);
* coordinates are bounded by :data:`MAX_COORDINATE` metres, so that spans and products stay finite.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from sr3d_plugin.errors import SR3DInputError

__all__ = [
    "MAX_COORDINATE",
    "as_array",
    "as_mask",
    "as_tensor",
    "check_depth",
    "check_intrinsics",
    "check_rigid",
    "describe",
    "finite_number",
    "integer",
    "shape_text",
]

#: largest coordinate magnitude (metres, or any point unit) a 3D box or point may have; float32
#: spans of such values (and their products in the slab test) stay far from overflow
MAX_COORDINATE = 1.0e9

#: relative tolerance for the zero entries of an intrinsics matrix (skew, lower triangle) and for
#: its last row ``[0, 0, 1]``
INTRINSICS_TOL = 1e-6


def shape_text(shape: Sequence[int | None]) -> str:
    """``(3, None)`` → ``"[3, *]"`` for messages."""
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def describe(x: Any) -> str:
    """A short summary of a value for error messages: type, shape and dtype of arrays, ``repr`` of the rest."""
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {str(x.dtype).removeprefix('torch.')}"
    if isinstance(x, np.ndarray):
        return f"an array of shape {x.shape} and dtype {x.dtype}"
    text = repr(x)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(x).__name__} {text}"


def _dtype_kind(x: np.ndarray | torch.Tensor) -> str:
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bool:
            return "b"
        if x.is_complex():
            return "c"
        if torch.is_floating_point(x):
            return "f"
        return "u" if x.dtype == torch.uint8 else "i"
    return x.dtype.kind


def _as_raw(x: Any, name: str) -> np.ndarray | torch.Tensor:
    """``x`` as a tensor or ndarray, without changing its dtype (lists go through NumPy)."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return x
    if isinstance(x, (str, bytes)) or x is None or isinstance(x, dict):
        raise SR3DInputError(f"{name} must be an array of numbers, got {describe(x)}")
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SR3DInputError(f"{name} must be an array of numbers, got {describe(x)} ({exc})") from exc
    return arr


def _check_layout(
    x: np.ndarray | torch.Tensor,
    name: str,
    ndim: int | tuple[int, ...] | None,
    shape: Sequence[int | None] | None,
    nonempty: bool,
) -> None:
    got = tuple(x.shape)
    if shape is not None:
        ok = len(got) == len(shape) and all(s is None or s == g for s, g in zip(shape, got))
        if not ok:
            raise SR3DInputError(f"{name} must have shape {shape_text(shape)}, got shape {got}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if len(got) not in allowed:
            want = " or ".join(f"{n}-D" for n in allowed)
            raise SR3DInputError(f"{name} must be {want}, got shape {got}")
    if nonempty and any(int(s) == 0 for s in got):
        raise SR3DInputError(f"{name} is empty (shape {got}); expected at least one value on every axis")


def _check_kind(x: np.ndarray | torch.Tensor, name: str, allow_bool: bool) -> None:
    kind = _dtype_kind(x)
    if kind == "c":
        raise SR3DInputError(
            f"{name} must be real numbers, got complex dtype {x.dtype} (the imaginary part would be dropped)"
        )
    if kind == "b" and not allow_bool:
        raise SR3DInputError(f"{name} must be numeric, got a boolean array")
    if kind not in "biuf":
        raise SR3DInputError(f"{name} must hold numbers, got dtype {x.dtype}")


def _at(x: np.ndarray | torch.Tensor) -> str:
    return "pixel" if x.ndim == 2 else "index"


def _check_finite(x: np.ndarray | torch.Tensor, name: str, expectation: str) -> None:
    if isinstance(x, torch.Tensor):
        if not torch.is_floating_point(x):
            return
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            idx = tuple(int(i) for i in torch.nonzero(bad)[0])
            raise SR3DInputError(
                f"{name} contains {int(bad.sum())} non-finite value(s) (first {x[idx].item()} at {_at(x)} {idx}); "
                f"expected {expectation}"
            )
        return
    if x.dtype.kind != "f":
        return
    bad = ~np.isfinite(x)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise SR3DInputError(
            f"{name} contains {int(bad.sum())} non-finite value(s) (first {x[idx]} at {_at(x)} {idx}); "
            f"expected {expectation}"
        )


def as_array(
    x: Any,
    name: str,
    *,
    ndim: int | tuple[int, ...] | None = None,
    shape: Sequence[int | None] | None = None,
    finite: bool = True,
    nonempty: bool = True,
    dtype: Any = np.float64,
) -> np.ndarray:
    """``x`` (array, tensor, nested list, number) as a real NumPy array of ``dtype``.

    Args:
        x: the value.
        name: the parameter, as written in messages.
        ndim: allowed number(s) of dimensions.
        shape: required shape, ``None`` entries free (e.g. ``(None, 3, 3)``).
        finite: refuse NaN and ±inf.
        nonempty: refuse a zero-length axis.
        dtype: result dtype (None keeps the input's).

    Raises:
        SR3DInputError: not numbers (strings, objects, ragged lists), complex or boolean dtype, wrong
            shape, empty, non-finite, or values that overflow ``dtype``.
    """
    raw = _as_raw(x, name)
    if isinstance(raw, torch.Tensor):
        _check_kind(raw, name, allow_bool=False)
        raw = raw.detach().cpu()
        raw = (raw.to(torch.float64) if raw.dtype in (torch.bfloat16, torch.float16) else raw).numpy()
    _check_kind(raw, name, allow_bool=False)
    _check_layout(raw, name, ndim, shape, nonempty)
    if finite:
        _check_finite(raw, name, "finite numbers")
    if dtype is None or raw.dtype == dtype:
        return raw
    with np.errstate(over="ignore", invalid="ignore"):
        out = raw.astype(dtype)
    if finite and np.dtype(dtype).kind == "f" and not np.isfinite(out).all():
        raise SR3DInputError(f"{name} has values too large for {np.dtype(dtype)}: {describe(raw)}")
    return out


def as_tensor(
    x: Any,
    name: str,
    *,
    ndim: int | tuple[int, ...] | None = None,
    shape: Sequence[int | None] | None = None,
    finite: bool = True,
    nonempty: bool = True,
) -> torch.Tensor:
    """``x`` as a floating torch tensor: float64 / float32 kept, half precision and integers become float32.

    Same checks as :func:`as_array` (real, numeric, shape, non-empty, finite).
    """
    raw = _as_raw(x, name)
    _check_kind(raw, name, allow_bool=False)
    if isinstance(raw, np.ndarray):
        if raw.dtype not in (np.float32, np.float64):
            # integers and half precision become float32 (as before); longdouble float64
            wide = raw.dtype.kind == "f" and raw.dtype.itemsize > 8
            with np.errstate(over="ignore", invalid="ignore"):
                raw = raw.astype(np.float64 if wide else np.float32)
        t = torch.from_numpy(np.ascontiguousarray(raw))
    else:
        t = raw
    _check_layout(t, name, ndim, shape, nonempty)
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float32)
    if finite:
        _check_finite(t, name, "finite numbers")
    return t


def as_mask(x: Any, name: str, shape: Sequence[int] | None = None) -> torch.Tensor:
    """A boolean mask: bool arrays as they are, numbers only when every value is 0 or 1."""
    raw = _as_raw(x, name)
    if isinstance(raw, np.ndarray):
        _check_kind(raw, name, allow_bool=True)
        t = torch.from_numpy(np.ascontiguousarray(raw.astype(bool if raw.dtype.kind == "b" else np.float64)))
    else:
        _check_kind(raw, name, allow_bool=True)
        t = raw
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise SR3DInputError(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)} to match the points")
    if t.dtype == torch.bool:
        return t
    if not bool(((t == 0) | (t == 1)).all()):
        raise SR3DInputError(f"{name} must be a boolean mask (or 0/1 values), got {describe(x)} with other values")
    return t != 0


def integer(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int`` (Python or NumPy integers; not bools, not floats) within the bounds."""
    kind = {1: "a positive integer", 0: "a non-negative integer"}.get(
        minimum if minimum is not None else -1, "an integer"
    )
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise SR3DInputError(f"{name} must be {kind}, got {describe(value)}")
    v = int(value)
    if minimum is not None and v < minimum:
        want = kind if minimum in (0, 1) else f"an integer >= {minimum}"
        raise SR3DInputError(f"{name}={v} is out of range; expected {want}")
    if maximum is not None and v > maximum:
        raise SR3DInputError(f"{name}={v} is out of range; expected an integer <= {maximum}")
    return v


def finite_number(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
) -> float:
    """``value`` as a finite ``float`` (``positive``: > 0) within the inclusive bounds."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.integer, np.floating)):
        raise SR3DInputError(f"{name} must be a number, got {describe(value)}")
    v = float(value)
    if not np.isfinite(v):
        raise SR3DInputError(f"{name}={v} is not finite; expected a finite number")
    if positive and v <= 0:
        raise SR3DInputError(f"{name}={v:g} must be positive")
    if minimum is not None and v < minimum:
        raise SR3DInputError(f"{name}={v:g} is out of range; expected >= {minimum:g}")
    if maximum is not None and v > maximum:
        raise SR3DInputError(f"{name}={v:g} is out of range; expected <= {maximum:g}")
    return v


# ----------------------------------------------------------------------------------------------
# camera matrices and depth
# ----------------------------------------------------------------------------------------------


def _matrices(m: Any, name: str, size: int, what: str) -> np.ndarray:
    arr = as_array(m, name, finite=False)
    if arr.ndim < 2 or arr.shape[-2:] != (size, size):
        raise SR3DInputError(f"{name} must be [{size}, {size}] or [V, {size}, {size}] {what}, got shape {arr.shape}")
    if arr.size == 0:
        raise SR3DInputError(f"{name} is empty (shape {arr.shape}); expected at least one {size}×{size} matrix")
    return arr


def check_intrinsics(intrinsics: Any, name: str = "intrinsics") -> None:
    """Raise unless ``intrinsics`` is ``[..., 3, 3]`` pinhole matrices ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]``.

    Refused: non-finite entries, ``fx ≤ 0`` or ``fy ≤ 0``, skew (``K[0, 1] ≠ 0``, not modelled by the
    back-projection), nonzero lower-triangle entries, and a last row other than ``[0, 0, 1]`` (a matrix
    scaled by ``s`` has ``[0, 0, s]``: divide it by ``K[2, 2]``).
    """
    k = _matrices(intrinsics, name, 3, "pinhole matrices")
    flat = k.reshape(-1, 3, 3)
    bad = [i for i, m in enumerate(flat) if not np.isfinite(m).all()]
    if bad:
        raise SR3DInputError(f"{name} has non-finite entries in matrix {bad[0]}: {flat[bad[0]].tolist()}")
    fx, fy = flat[:, 0, 0], flat[:, 1, 1]
    if (fx <= 0).any() or (fy <= 0).any():
        i = int(np.flatnonzero((fx <= 0) | (fy <= 0))[0])
        raise SR3DInputError(
            f"{name} is singular: matrix {i} has focal lengths fx={fx[i]:g} fy={fy[i]:g}; expected fx > 0 and fy > 0"
        )
    last = flat[:, 2, :]
    off_last = np.abs(last - np.array([0.0, 0.0, 1.0])).max(axis=-1) > INTRINSICS_TOL
    if off_last.any():
        i = int(np.flatnonzero(off_last)[0])
        hint = (
            f"; it looks scaled by {last[i, 2]:g}: divide it by K[2, 2]"
            if abs(last[i, 0]) <= INTRINSICS_TOL and abs(last[i, 1]) <= INTRINSICS_TOL and last[i, 2] > 0
            else ""
        )
        raise SR3DInputError(
            f"{name} matrix {i} has last row {last[i].tolist()}; expected [0, 0, 1] (a pinhole matrix in pixels){hint}"
        )
    scale = np.maximum(fx, fy)
    skew = np.abs(flat[:, 0, 1]) > INTRINSICS_TOL * scale
    lower = np.abs(flat[:, 1, 0]) > INTRINSICS_TOL * scale
    if skew.any() or lower.any():
        i = int(np.flatnonzero(skew | lower)[0])
        raise SR3DInputError(
            f"{name} matrix {i} has skew K[0, 1]={flat[i, 0, 1]:g} / K[1, 0]={flat[i, 1, 0]:g}; expected 0 "
            "(skewed cameras are not supported: x = (u − cx)·z/fx assumes square-grid pixels)"
        )


def check_rigid(pose: Any, name: str = "cam_to_world", tol: float = 1e-3) -> None:
    """Raise unless ``pose`` is ``[..., 4, 4]`` rigid transforms (orthonormal rotation, det +1, last row 0 0 0 1)."""
    p = _matrices(pose, name, 4, "camera-to-world poses")
    flat = p.reshape(-1, 4, 4)
    bad = [i for i, m in enumerate(flat) if not np.isfinite(m).all()]
    if bad:
        raise SR3DInputError(f"{name} has non-finite entries in pose(s) {bad} (ScanNet marks invalid poses with -inf)")
    last = flat[:, 3, :]
    if np.abs(last - np.array([0.0, 0.0, 0.0, 1.0])).max() > tol:
        raise SR3DInputError(f"{name} last row must be [0, 0, 0, 1], got {last.tolist()[:4]}")
    if np.abs(flat[:, :3, 3]).max() > MAX_COORDINATE:
        raise SR3DInputError(
            f"{name} has a translation of {np.abs(flat[:, :3, 3]).max():.3g}; expected |t| <= {MAX_COORDINATE:g}"
        )
    rot = flat[:, :3, :3]
    err = np.abs(np.swapaxes(rot, -1, -2) @ rot - np.eye(3)).max(axis=(-1, -2))
    det = np.linalg.det(rot)
    wrong = (err > tol) | (np.abs(det - 1) > tol)
    if wrong.any():
        worst = int(np.flatnonzero(wrong)[0])
        raise SR3DInputError(
            f"{name} is not rigid: rotation part of pose {worst} has |RᵀR − I| = {err[worst]:.3g} and "
            f"det = {det[worst]:.6g}; expected an orthonormal rotation with det +1 (no scale, shear or reflection)"
        )


def check_depth(depth: np.ndarray | torch.Tensor, name: str = "depth") -> None:
    """Raise if a depth map holds NaN, ±inf or negative values (0 is allowed: it marks invalid pixels)."""
    _check_kind(depth, name, allow_bool=False)
    _check_finite(depth, name, "finite metric depth in metres with 0 for invalid pixels")
    if isinstance(depth, torch.Tensor):
        neg = depth < 0
        if bool(neg.any()):
            idx = tuple(int(i) for i in torch.nonzero(neg)[0])
            value = float(depth[idx])
            count = int(neg.sum())
        else:
            return
    else:
        neg = depth < 0
        if not neg.any():
            return
        idx = tuple(int(i) for i in np.argwhere(neg)[0])
        value = float(depth[idx])
        count = int(neg.sum())
    raise SR3DInputError(
        f"{name} contains {count} negative value(s) (first {value:.6g} at {_at(depth)} {idx}); "
        "expected depth >= 0 in metres (0 = invalid)"
    )
