"""Mask codecs: COCO RLE (compressed string or run list), binary mask images and polygons.

Every decoder returns a ``[H, W]`` bool mask; :func:`fit_mask` brings a mask to a frame's image
size (nearest, or a box filter for masks thinner than one resized pixel). Used by
:mod:`sr3d_plugin.regions` (region prompts) and by the data preparation that writes RLE.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from sr3d_plugin import _checks
from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.limits import check_pixels, open_image

__all__ = [
    "decode_coco_rle",
    "encode_coco_rle",
    "fit_mask",
    "load_mask_image",
    "load_rle_file",
    "polygon_mask",
]


def _counts_from_string(s: str) -> list[int]:
    """COCO's compressed counts (LEB128-like, 5 bits per char offset by 48, deltas from count i−2)."""
    counts: list[int] = []
    p = 0
    n = len(s)
    while p < n:
        x = 0
        k = 0
        more = True
        while more:
            if p >= n:
                raise SR3DInputError(f"RLE counts string is truncated at character {p}")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise SR3DInputError(f"RLE counts string has an invalid character {s[p]!r} at {p}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _counts_to_string(counts: Sequence[int]) -> str:
    out: list[str] = []
    for i, value in enumerate(counts):
        x = int(value) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def decode_coco_rle(rle: dict[str, Any], what: str = "RLE", backend: str = "auto") -> np.ndarray:
    """Decode a COCO RLE (``{"size": [h, w], "counts": str | list[int]}``) into an ``[h, w]`` bool mask.

    ``counts`` may be compressed (COCO's string form) or uncompressed (a list of run lengths,
    column-major, starting with a run of zeros).

    Args:
        rle: the RLE object.
        what: name used in error messages.
        backend: ``"auto"`` (``pycocotools`` for compressed counts when it is installed, else the
            built-in decoder), ``"pycocotools"`` or ``"builtin"``. Both decoders give the same mask.
    """
    if backend not in ("auto", "pycocotools", "builtin"):
        raise SR3DInputError(f"unknown RLE backend {backend!r}; expected 'auto', 'pycocotools' or 'builtin'")
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise SR3DInputError(f"{what} must be an object with 'size' [h, w] and 'counts'; got {_short(rle)}")
    size = rle["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise SR3DInputError(f"{what} 'size' must be [height, width] positive integers, got {size!r}")
    h, w = int(size[0]), int(size[1])
    check_pixels(h * w, what, (h, w))  # from the header, before the counts are read
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", errors="replace")
    if isinstance(counts, str):
        if backend != "builtin":
            try:
                import pycocotools.mask as mask_utils
            except ImportError:
                if backend == "pycocotools":
                    raise SR3DInputError("backend='pycocotools' but pycocotools is not installed") from None
            else:
                # check the runs first: the C decoder does not validate them
                _check_runs(_counts_from_string(counts), h, w, what)
                with warnings.catch_warnings():  # pycocotools' __array__ warns under numpy 2
                    warnings.simplefilter("ignore", DeprecationWarning)
                    decoded = mask_utils.decode({"size": [h, w], "counts": counts.encode("ascii")})
                return np.asarray(decoded, dtype=bool)
        runs = _counts_from_string(counts)
    elif isinstance(counts, (list, tuple)) and all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
        runs = [int(c) for c in counts]
    else:
        raise SR3DInputError(f"{what} 'counts' must be a string or a list of integers, got {_short(counts)}")
    return _runs_to_mask(runs, h, w, what)


def _check_runs(runs: Sequence[int], h: int, w: int, what: str) -> None:
    if any(r < 0 for r in runs):
        raise SR3DInputError(f"{what} has negative run lengths; the counts are corrupt")
    total = int(sum(runs))
    if total != h * w:
        raise SR3DInputError(f"{what} run lengths sum to {total}; expected height × width = {h} × {w} = {h * w}")


def _runs_to_mask(runs: Sequence[int], h: int, w: int, what: str) -> np.ndarray:
    _check_runs(runs, h, w, what)
    flat = np.zeros(h * w, dtype=bool)
    pos = 0
    for i, run in enumerate(runs):
        if i % 2:
            flat[pos : pos + run] = True
        pos += run
    return flat.reshape((h, w), order="F")


def encode_coco_rle(mask: np.ndarray, compressed: bool = True) -> dict[str, Any]:
    """Encode an ``[h, w]`` mask as COCO RLE (``counts`` a string when ``compressed``, else a list)."""
    m = _checks.as_mask(mask, "mask").numpy()
    if m.ndim != 2 or 0 in m.shape:
        raise SR3DInputError(f"mask must be a non-empty [H, W] mask, got shape {m.shape}")
    flat = m.reshape(-1, order="F")
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(edges).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    counts: str | list[int] = _counts_to_string(runs) if compressed else [int(r) for r in runs]
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": counts}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_rle_file(path: str | Path) -> np.ndarray:
    """Read a COCO RLE JSON file (an RLE object, or an annotation with ``segmentation``) as a bool mask."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise SR3DInputError(f"RLE file not found: {str(p)!r}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SR3DInputError(f"RLE file {str(p)!r} is not readable JSON: {exc}") from exc
    if isinstance(data, dict) and "segmentation" in data and "counts" not in data:
        data = data["segmentation"]
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
        data = data[0]
    return decode_coco_rle(data, f"RLE file {str(p)!r}")


def load_mask_image(path: str | Path) -> np.ndarray:
    """Read a binary mask image as ``[H, W]`` bool: any non-zero pixel (or non-zero alpha) is set."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise SR3DInputError(f"mask image not found: {str(p)!r}")
    try:
        with open_image(p, "mask image") as im:
            mode = im.mode
            arr = np.array(im)
    except (UnidentifiedImageError, OSError) as exc:
        raise SR3DInputError(f"mask image {str(p)!r} is not a readable image: {exc}") from exc
    if arr.ndim == 3:
        if mode in ("RGBA", "LA", "PA") and (arr[..., -1] < 255).any():
            return arr[..., -1] > 0
        return (arr[..., : (1 if mode in ("LA",) else 3)] > 0).any(axis=-1)
    return arr > 0


def polygon_mask(coords: Sequence[float], size: tuple[int, int]) -> np.ndarray:
    """Rasterise a polygon ``x0, y0, x1, y1, …`` (pixels) into an ``[H, W]`` bool mask of ``size = (W, H)``.

    Pixels on the outline are included (PIL's polygon fill).
    """
    width, height = _image_size(size, "size")
    check_pixels(int(width) * int(height), "polygon mask", (width, height))
    c = _checks.as_array(coords, "coords", ndim=1).tolist()
    if len(c) < 6 or len(c) % 2:
        raise SR3DInputError(f"coords has {len(c)} numbers; expected x, y pairs of at least 3 vertices")
    if max(abs(v) for v in c) > 1e9:
        raise SR3DInputError(f"coords reach {max(abs(v) for v in c):.3g}; expected pixel coordinates")
    pts = [(c[i], c[i + 1]) for i in range(0, len(c) - 1, 2)]
    canvas = Image.new("1", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(pts, fill=1, outline=1)
    return np.array(canvas, dtype=bool)


# ----------------------------------------------------------------------------------------------
# 3D boxes
# ----------------------------------------------------------------------------------------------


def _image_size(size: Any, name: str) -> tuple[int, int]:
    """``(width, height)`` positive integers."""
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise SR3DInputError(f"{name} must be (width, height), got {_checks.describe(size)}")
    return _checks.integer(size[0], name, minimum=1), _checks.integer(size[1], name, minimum=1)


def fit_mask(mask: np.ndarray, image_size: tuple[int, int], what: str) -> np.ndarray:
    """``mask`` at the image size (nearest); an error when the aspect ratio differs by more than 2 %."""
    width, height = _image_size(image_size, "image_size")
    mask = _checks.as_mask(mask, what).numpy()
    if mask.ndim != 2 or 0 in mask.shape:
        raise SR3DInputError(f"{what} must be a non-empty [H, W] mask, got shape {mask.shape}")
    mh, mw = mask.shape
    if (mw, mh) == (width, height):
        return mask.astype(bool)
    if abs(mw / mh - width / height) > 0.02 * (width / height):
        raise SR3DInputError(
            f"{what} is {mw}×{mh} but the frame is {width}×{height}; expected the frame's size or aspect ratio"
        )
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
    out = np.array(resized) > 127
    if not out.any():  # thinner than a resized pixel: keep it with a box filter
        out = np.array(Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.Resampling.BOX)) > 0
    return out
