"""Size limits on decoded inputs, checked from file headers before anything is decoded.

A 47-byte COCO RLE can claim a 16000 × 12000 mask, a small PNG a 20000 × 20000 image and a
``.npz`` of zeros a billion-element array. Every reader of the package asks :func:`check_pixels`
with the size the header announces, and refuses the file with
:class:`~sr3d_plugin.errors.SR3DLimitError` (an ``SR3DInputError``) naming the file, the size and
the limit — before decoding.

The limit (pixels per decoded file) is, in order of precedence:

1. :func:`set_max_pixels` (``None`` turns it off; :func:`max_pixels_limit` as a context manager
   sets it for a block);
2. the environment variable ``SR3D_MAX_PIXELS`` (an integer; ``0`` or ``none`` turns it off);
3. :data:`DEFAULT_MAX_PIXELS` = 89,478,485 — PIL's ``Image.MAX_IMAGE_PIXELS`` (≈ 89.5 Mpx, about
   a 1 GB 24-bit image decoded).

What counts as pixels: an image's width × height; a mask's height × width (RLE ``size``); a
``.npy`` / ``.npz`` array's element count without a trailing axis of 1–4 channels (xyz, RGB,
RGBA), i.e. frames × height × width for a ``[V, H, W, 3]`` point map or a ``[V, H, W]`` depth
stack: the limit bounds each file as a whole, not each frame.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from sr3d_plugin.errors import SR3DConfigError, SR3DInputError, SR3DLimitError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ENV_VAR",
    "check_npy_file",
    "check_npz_file",
    "check_pixels",
    "get_max_pixels",
    "max_pixels_limit",
    "npy_header",
    "open_image",
    "set_max_pixels",
]

#: PIL's own ``Image.MAX_IMAGE_PIXELS`` (1024 · 1024 · 1024 // 4 // 3)
DEFAULT_MAX_PIXELS = 89_478_485
#: environment variable read when no limit was set with :func:`set_max_pixels`
ENV_VAR = "SR3D_MAX_PIXELS"

_UNSET = object()
_override: Any = _UNSET
_pil_lock = threading.Lock()


def _parse_limit(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower().replace("_", "")
        if text in ("", "none", "off", "0"):
            return None
        try:
            value = int(float(text)) if ("e" in text or "." in text) else int(text)
        except ValueError:
            raise SR3DConfigError(f"{what} must be a positive integer (pixels) or 'none', got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SR3DConfigError(f"{what} must be a positive integer (pixels) or None, got {value!r}")
    if value < 0:
        raise SR3DConfigError(f"{what} must be a positive integer (pixels) or None, got {value}")
    return value or None


def get_max_pixels() -> int | None:
    """The pixel limit in force (module docstring); None when there is none."""
    if _override is not _UNSET:
        return _override
    env = os.environ.get(ENV_VAR)
    if env is not None:
        return _parse_limit(env, f"environment variable {ENV_VAR}")
    return DEFAULT_MAX_PIXELS


def set_max_pixels(limit: int | None) -> int | None:
    """Set the pixel limit for this process (None: no limit); returns the previous one.

    Overrides ``SR3D_MAX_PIXELS``. ``set_max_pixels(DEFAULT_MAX_PIXELS)`` restores the default.
    """
    global _override
    new = _parse_limit(limit, "limit=")
    try:
        previous = get_max_pixels()
    except SR3DConfigError:  # an unreadable environment value: it is being replaced anyway
        previous = None
    _override = new
    return previous


@contextlib.contextmanager
def max_pixels_limit(limit: int | None) -> Iterator[None]:
    """Context manager: the pixel limit is ``limit`` inside the block, as before after it."""
    global _override
    saved = _override
    _override = _parse_limit(limit, "limit=")
    try:
        yield
    finally:
        _override = saved


def check_pixels(pixels: int, what: str, shape: Sequence[int] | None = None) -> None:
    """Raise :class:`SR3DLimitError` when ``pixels`` exceeds the limit.

    Args:
        pixels: the number of pixels the input would decode to.
        what: the input, as the message should name it (e.g. ``"mask image '/data/m.png'"``).
        shape: the announced size (shown in the message), e.g. ``(width, height)``.
    """
    limit = get_max_pixels()
    if limit is None or pixels <= limit:
        return
    size = f"{' × '.join(str(int(s)) for s in shape)} = " if shape else ""
    raise SR3DLimitError(
        f"{what} would decode to {size}{pixels:,} pixels, more than the limit of {limit:,} pixels; "
        f"raise it with sr3d_plugin.limits.set_max_pixels(...) or the {ENV_VAR} environment variable "
        "if the file is trusted"
    )


def open_image(path: str | os.PathLike, what: str = "image") -> Any:
    """Open an image lazily (header only) after checking its size against the limit.

    Returns an open ``PIL.Image.Image`` (use it as a context manager). PIL's own decompression-bomb
    check is replaced by this limit: a larger limit set here is honoured, a smaller one applies.

    Raises:
        SR3DLimitError: width × height exceeds the limit.
        SR3DInputError: the file is not a readable image.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path).expanduser()
    limit = get_max_pixels()
    try:
        try:
            im = _pil_open(Image, p, limit)
        except Image.DecompressionBombError:
            # PIL refused before we saw the size: read the header again with PIL's check lifted
            with _pil_lock:
                saved = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
                try:
                    im = Image.open(p)
                finally:
                    Image.MAX_IMAGE_PIXELS = saved
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise SR3DInputError(f"{what} {str(p)!r} is not a readable image: {exc}") from exc
    w, h = im.size
    try:
        check_pixels(int(w) * int(h), f"{what} {str(p)!r}", (w, h))
    except SR3DLimitError:
        im.close()
        raise
    return im


def _pil_open(image_mod: Any, p: Path, limit: int | None) -> Any:
    import warnings

    pil_limit = image_mod.MAX_IMAGE_PIXELS
    if pil_limit is not None and (limit is None or limit > pil_limit):
        # our limit is larger than PIL's: lift PIL's for this header read (ours is checked after)
        with _pil_lock:
            image_mod.MAX_IMAGE_PIXELS = None
            try:
                return image_mod.open(p)
            finally:
                image_mod.MAX_IMAGE_PIXELS = pil_limit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", image_mod.DecompressionBombWarning)
        return image_mod.open(p)


def npy_header(fh: IO[bytes], what: str) -> tuple[tuple[int, ...], Any]:
    """``(shape, dtype)`` from the header of the ``.npy`` stream ``fh`` (left after the header)."""
    import numpy as np

    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        else:  # pragma: no cover - numpy rejects unknown versions in read_magic
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, OSError, SyntaxError, EOFError) as exc:
        raise SR3DInputError(f"{what} is not a readable .npy array: {exc}") from exc
    return tuple(int(s) for s in shape), dtype


def _array_pixels(shape: tuple[int, ...]) -> int:
    dims = list(shape)
    if len(dims) >= 3 and 1 <= dims[-1] <= 4:
        dims = dims[:-1]
    return math.prod(dims) if dims else 1


def check_npy_file(path: str | os.PathLike, what: str = "array file") -> tuple[tuple[int, ...], Any]:
    """Check a ``.npy`` file's announced size against the limit; returns ``(shape, dtype)``."""
    p = Path(path).expanduser()
    label = f"{what} {str(p)!r}"
    try:
        with open(p, "rb") as fh:
            shape, dtype = npy_header(fh, label)
    except OSError as exc:
        raise SR3DInputError(f"{label} is not readable: {exc}") from exc
    check_pixels(_array_pixels(shape), label, shape)
    return shape, dtype


def check_npz_file(path: str | os.PathLike, what: str = "array file") -> dict[str, tuple[int, ...]]:
    """Check every array of a ``.npz`` file (headers only) against the limit; returns their shapes."""
    p = Path(path).expanduser()
    label = f"{what} {str(p)!r}"
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        with zipfile.ZipFile(p) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as fh:
                    shape, _ = npy_header(fh, f"{label} member {info.filename!r}")
                name = info.filename[: -len(".npy")]
                check_pixels(_array_pixels(shape), f"{label} array {name!r}", shape)
                shapes[name] = shape
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError, NotImplementedError) as exc:
        raise SR3DInputError(f"{label} is not a readable .npz archive: {exc}") from exc
    return shapes
