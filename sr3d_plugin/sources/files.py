"""Small, strict readers for the files that frame readers consume.

Matrices (poses, intrinsics) come as whitespace-separated text or ``.npy``; depth comes as 16-bit
PNG in millimetres (ScanNet convention) or ``.npy`` in metres. Every reader raises
:class:`~sr3d_plugin.errors.SR3DInputError` naming the file and what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from sr3d_plugin import _checks
from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.limits import check_npy_file, open_image

__all__ = [
    "IMAGE_SUFFIXES",
    "check_depth_array",
    "file_identity",
    "load_depth_file",
    "load_intrinsics_file",
    "load_pose_file",
    "load_rgb",
    "read_matrix",
    "require_file",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

PathLike = str | os.PathLike


def require_file(path: PathLike, what: str) -> Path:
    """``path`` as a :class:`Path`, or an error naming ``what`` was expected there."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SR3DInputError(f"{what} not found: {str(p)!r}")
    if not p.is_file():
        raise SR3DInputError(f"{what} must be a file, got a folder: {str(p)!r}")
    return p


def file_identity(path: PathLike) -> list:
    """``[resolved path, size in bytes, mtime in ns]`` — what cache keys use to notice a changed file."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    return [str(p), int(st.st_size), int(st.st_mtime_ns)]


def read_matrix(path: PathLike, what: str = "matrix") -> np.ndarray:
    """Read a matrix of numbers from a ``.txt`` (whitespace separated, one row per line) or ``.npy`` file.

    Returns:
        float64 array of the file's shape (``.npy``) or ``[rows, cols]`` (text; a single line of
        ``n·n`` numbers is reshaped to ``[n, n]`` for n = 3 or 4).
    """
    p = require_file(path, what)
    if p.suffix.lower() == ".npy":
        check_npy_file(p, f"{what} file")
        try:
            arr = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise SR3DInputError(f"{what} file {str(p)!r} is not a readable numeric .npy array: {exc}") from exc
        if arr.dtype.kind not in "iuf":
            raise SR3DInputError(f"{what} file {str(p)!r} holds {arr.dtype} values; expected real numbers")
        return _checks.as_array(arr, f"{what} file {str(p)!r}", finite=False, nonempty=False)
    try:
        text = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as exc:
        raise SR3DInputError(f"{what} file {str(p)!r} is not a readable text file: {exc}") from exc
    rows: list[list[float]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        parts = line.replace(",", " ").split()
        if not parts:
            continue
        try:
            rows.append([float(x) for x in parts])
        except ValueError as exc:
            raise SR3DInputError(
                f"{what} file {str(p)!r} line {lineno} has a value that is not a number: {line.strip()!r}"
            ) from exc
    if not rows:
        raise SR3DInputError(f"{what} file {str(p)!r} is empty; expected a matrix of numbers")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise SR3DInputError(f"{what} file {str(p)!r} has rows of different lengths {sorted(widths)}")
    arr = np.asarray(rows, dtype=np.float64)
    if arr.shape[0] == 1 and arr.shape[1] in (9, 16):
        n = 3 if arr.shape[1] == 9 else 4
        arr = arr.reshape(n, n)
    return arr


def load_pose_file(path: PathLike) -> np.ndarray:
    """A ``[4, 4]`` camera-to-world pose (may contain -inf/NaN: ScanNet's mark of an invalid frame)."""
    m = read_matrix(path, "pose")
    if m.shape != (4, 4):
        raise SR3DInputError(f"pose file {str(path)!r} holds a {m.shape} matrix; expected 4×4 camera-to-world")
    return m


def load_intrinsics_file(path: PathLike) -> np.ndarray:
    """A ``[3, 3]`` pinhole matrix from a 3×3 or 4×4 (top-left block) text / ``.npy`` file, in pixels."""
    m = read_matrix(path, "intrinsics")
    if m.shape not in ((3, 3), (4, 4)):
        raise SR3DInputError(f"intrinsics file {str(path)!r} holds a {m.shape} matrix; expected 3×3 or 4×4")
    k = m[:3, :3].copy()
    _checks.check_intrinsics(k, f"intrinsics file {str(path)!r}")
    return k


def load_rgb(path: PathLike, what: str = "image") -> Image.Image:
    """Open an image file as a fully loaded RGB PIL image (the file is closed on return).

    The size is checked against :mod:`sr3d_plugin.limits` from the header, before decoding.
    """
    p = require_file(path, what)
    try:
        with open_image(p, what) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise SR3DInputError(f"{what} {str(p)!r} is not a readable image: {exc}") from exc


def load_depth_file(path: PathLike, depth_scale: float = 1000.0) -> np.ndarray:
    """Read one depth map as float32 metres (0 = invalid).

    * integer images (16-bit PNG as in ScanNet, 8-bit, 32-bit int): ``value / depth_scale``
      (``depth_scale`` 1000 for millimetres, 4000 for Matterport);
    * float images (mode ``F``, e.g. 32-bit TIFF) and ``.npy`` arrays: already metres.

    Non-finite and negative values are rejected (they mean a broken export, not "invalid").

    Returns:
        ``[H, W]`` float32.
    """
    depth_scale = _checks.finite_number(depth_scale, "depth_scale", positive=True)
    p = require_file(path, "depth file")
    if p.suffix.lower() == ".npy":
        check_npy_file(p, "depth file")
        try:
            arr = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise SR3DInputError(f"depth file {str(p)!r} is not a readable numeric .npy array: {exc}") from exc
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 2 or arr.dtype.kind not in "iuf" or arr.size == 0:
            raise SR3DInputError(
                f"depth file {str(p)!r} holds a {arr.dtype} array of shape {arr.shape}; expected [H, W] real metres"
            )
        depth = _checks.as_array(arr, f"depth file {str(p)!r}", finite=False, dtype=np.float32)
    else:
        try:
            with open_image(p, "depth file") as im:
                mode = im.mode
                arr = np.array(im)
        except (UnidentifiedImageError, OSError) as exc:
            raise SR3DInputError(f"depth file {str(p)!r} is not a readable image: {exc}") from exc
        if arr.ndim != 2:
            raise SR3DInputError(
                f"depth image {str(p)!r} has mode {mode} with shape {arr.shape}; "
                "expected a single-channel 16-bit PNG in millimetres"
            )
        if np.issubdtype(arr.dtype, np.floating):
            depth = arr.astype(np.float32)
        elif np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
            depth = (arr.astype(np.float64) / float(depth_scale)).astype(np.float32)
        else:  # pragma: no cover - PIL returns numeric arrays only
            raise SR3DInputError(f"depth image {str(p)!r} has unsupported pixel type {arr.dtype}")
    check_depth_array(depth, f"depth file {str(p)!r}")
    return depth


def check_depth_array(depth: np.ndarray, what: str) -> None:
    """Raise if a depth array is not real numbers or holds NaN, ±inf or negative values (0 = invalid is fine)."""
    _checks.check_depth(np.asarray(depth) if not isinstance(depth, np.ndarray) else depth, what)
