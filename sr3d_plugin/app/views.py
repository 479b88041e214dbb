"""Pure functions behind ``sr3d app``: boxes from clicks, regions carried to other frames, overlays.

Nothing here imports gradio or torch, so these functions are tested (and reusable) without the app.

* :func:`box_spec_from_corners` — two clicks on a frame → the region spec ``"frame=K box=x0,y0,x1,y1"``
  that :meth:`~sr3d_plugin.inference.SR3DPipeline.ask` takes.
* :func:`region_specs` — the app's region text (one spec per line) → checked spec strings.
* :func:`region_reach` — a region drawn on some frames → the pixels of *every* frame that see the same
  3D surface (voxels of the shared canonical point map, SR3D-FACTS §3).
* :func:`draw_regions` / :func:`draw_corner` — frames with the regions painted on them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from sr3d_plugin import _checks
from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.masks import fit_mask
from sr3d_plugin.regions import parse_region_spec

__all__ = [
    "DEFAULT_VOXEL",
    "REGION_RGB",
    "box_spec_from_corners",
    "display_scale",
    "draw_corner",
    "draw_regions",
    "region_reach",
    "region_specs",
]

#: region colours (RGB), region ``k`` uses ``REGION_RGB[k % len(REGION_RGB)]``
REGION_RGB: tuple[tuple[int, int, int], ...] = (
    (255, 59, 48),
    (52, 199, 89),
    (0, 122, 255),
    (255, 204, 0),
    (175, 82, 222),
)

#: voxel edge used by :func:`region_reach`, in canonical units: the canonical space spans [-1, 1] along
#: each axis (each axis scaled on its own, SR3D-FACTS §3), so 0.04 is 1/50 of the scene's extent along
#: that axis — a few centimetres to ~10 cm in a room
DEFAULT_VOXEL = 0.04


def display_scale(image_size: tuple[int, int], target: int = 640) -> int:
    """Whole-number factor a frame of ``(width, height)`` pixels is enlarged by on the page, so that its longer
    side is at most ``target`` pixels (at least 1: large frames are shown as they are, the browser shrinks them).
    A click at display pixel ``(u, v)`` is frame pixel ``(u // factor, v // factor)``."""
    width, height = (int(v) for v in image_size)
    return max(1, int(target) // max(width, height, 1))


def box_spec_from_corners(
    frame: int, first: Sequence[float], second: Sequence[float], image_size: tuple[int, int]
) -> str:
    """The region spec of the box spanned by two clicked corners on ``frame``.

    Args:
        frame: frame index after sampling (``frame=K`` of :mod:`sr3d_plugin.regions`).
        first, second: ``(x, y)`` pixel coordinates of the two clicks, in any order (image pixels,
            x to the right, y down; as Gradio's select event reports them).
        image_size: ``(width, height)`` of the frame in pixels.

    Returns:
        ``"frame=K box=x0,y0,x1,y1"`` with integer pixels, ``x0 < x1``, ``y0 < y1``, clamped to the
        image; the clicked pixels are inside the box (the upper bounds are exclusive).
    """
    k = _checks.integer(frame, "frame", minimum=0)
    if not isinstance(image_size, (tuple, list)) or len(image_size) != 2:
        raise SR3DInputError(f"image_size must be (width, height), got {_checks.describe(image_size)}")
    width = _checks.integer(image_size[0], "image_size width", minimum=1)
    height = _checks.integer(image_size[1], "image_size height", minimum=1)
    points = []
    for name, p in (("first", first), ("second", second)):
        xy = _checks.as_array(p, name, ndim=1)
        if xy.shape != (2,):
            raise SR3DInputError(f"{name} corner must be (x, y) pixels, got {list(xy)}")
        x, y = float(xy[0]), float(xy[1])
        if not (0 <= x < width and 0 <= y < height):
            raise SR3DInputError(
                f"{name} corner ({x:g}, {y:g}) lies outside the {width}×{height} frame {k}; "
                f"expected 0 <= x < {width} and 0 <= y < {height}"
            )
        points.append((int(x), int(y)))
    (ax, ay), (bx, by) = points
    x0, x1 = min(ax, bx), max(ax, bx) + 1
    y0, y1 = min(ay, by), max(ay, by) + 1
    if x1 - x0 < 2 or y1 - y0 < 2:
        raise SR3DInputError(
            f"the corners ({ax}, {ay}) and ({bx}, {by}) on frame {k} span a box of {x1 - x0}×{y1 - y0} pixels; "
            "click two opposite corners of the object (at least 2 pixels apart in x and in y)"
        )
    return f"frame={k} box={x0},{y0},{x1},{y1}"


def region_specs(text: str | None) -> list[str]:
    """The region specs of the app's text box: one per non-empty line (``#`` starts a comment line).

    Each line is checked with :func:`sr3d_plugin.regions.parse_region_spec`; an error names the line.
    """
    if text is None:
        return []
    if not isinstance(text, str):
        raise SR3DInputError(f"regions must be text (one region spec per line), got {_checks.describe(text)}")
    specs = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            parse_region_spec(line)
        except SR3DInputError as exc:
            raise SR3DInputError(f"regions line {n}: {exc}") from None
        specs.append(line)
    return specs


def region_reach(
    masks: Mapping[int, np.ndarray], points: Any, valid: Any = None, voxel: float = DEFAULT_VOXEL
) -> dict[int, np.ndarray]:
    """Every frame's pixels that see the 3D surface a region covers on the frames it is drawn on.

    The region's pixels are lifted to 3D through the point map (all frames share one canonical
    space, SR3D-FACTS §3) and quantised into voxels of edge ``voxel``; a pixel of any frame is
    reached when its own 3D point falls into one of those voxels. Occlusion needs no extra test:
    a point map holds only the surfaces each frame actually sees. A box region covers whatever lies
    inside the box, background included, so its reach includes that background too.

    Args:
        masks: frame index → ``[h, w]`` bool mask (any size with the point map's aspect ratio).
        points: ``[V, H, W, 3]`` point map (canonical or world coordinates, one space for all frames).
        valid: optional ``[V, H, W]`` bool, False where a pixel has no 3D point.
        voxel: voxel edge in the point map's units (> 0).

    Returns:
        frame index → ``[H, W]`` bool mask at the point map's size, for every frame the region
        reaches (always including the frames it is drawn on).
    """
    pts = _checks.as_array(points, "points", ndim=4, finite=False)
    if pts.shape[-1] != 3:
        raise SR3DInputError(f"points must be [V, H, W, 3], got shape {pts.shape}")
    v_count, height, width = pts.shape[:3]
    voxel = _checks.finite_number(voxel, "voxel", positive=True)
    ok = np.isfinite(pts).all(axis=-1)
    if valid is not None:
        ok &= _checks.as_mask(valid, "valid", (v_count, height, width)).numpy()
    drawn = np.zeros((v_count, height, width), dtype=bool)
    if not isinstance(masks, Mapping) or not masks:
        raise SR3DInputError(f"masks must map frame indices to masks, got {_checks.describe(masks)}")
    for k, m in masks.items():
        k = _checks.integer(k, "masks frame", minimum=0)
        if k >= v_count:
            raise SR3DInputError(f"masks has frame {k}, but the point map has {v_count} frame(s) (0..{v_count - 1})")
        drawn[k] |= fit_mask(m, (width, height), f"mask on frame {k}")
    seed = drawn & ok
    reach = drawn.copy()
    if seed.any():
        lo = pts[ok].min(axis=0)
        cells = np.floor((np.where(ok[..., None], pts, lo) - lo) / voxel).astype(np.int64)
        dims = cells[ok].max(axis=0) + 1
        keys = (cells[..., 0] * dims[1] + cells[..., 1]) * dims[2] + cells[..., 2]
        reach |= ok & np.isin(keys, np.unique(keys[seed]))
    return {k: reach[k] for k in range(v_count) if reach[k].any()}


def _rgb(index: int) -> tuple[int, int, int]:
    return REGION_RGB[index % len(REGION_RGB)]


def draw_regions(
    image: Image.Image | np.ndarray,
    regions: Sequence[tuple[int, np.ndarray]],
    *,
    drawn: Sequence[int] = (),
    alpha: float = 0.4,
) -> Image.Image:
    """``image`` with regions painted on it: each mask tinted in its colour, its box outlined, ``R{k}`` written.

    Args:
        image: the frame (PIL image or ``[H, W, 3]`` uint8).
        regions: ``(region index k, [h, w] bool mask)`` pairs; masks are brought to the image size.
        drawn: region indices drawn on this very frame (outlined twice as thick; the others are
            where the region reaches).
        alpha: tint opacity in [0, 1].

    Returns:
        A new RGB image of the same size.
    """
    if isinstance(image, Image.Image):
        base = image
    else:
        arr = _checks.as_array(image, "image", ndim=3, dtype=np.uint8)
        if arr.shape[-1] != 3:
            raise SR3DInputError(f"image must be [H, W, 3] uint8, got shape {arr.shape}")
        base = Image.fromarray(arr)
    alpha = _checks.finite_number(alpha, "alpha", minimum=0.0, maximum=1.0)
    out = np.asarray(base.convert("RGB"), dtype=np.float64).copy()
    boxes = []
    for k, mask in regions:
        m = fit_mask(mask, base.size, f"mask of region {k}")
        if not m.any():
            continue
        out[m] = (1 - alpha) * out[m] + alpha * np.asarray(_rgb(k), dtype=np.float64)
        ys, xs = np.nonzero(m)
        boxes.append((k, (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))))
    result = Image.fromarray(out.round().astype(np.uint8))
    pen = ImageDraw.Draw(result)
    for k, (x0, y0, x1, y1) in boxes:
        pen.rectangle((x0, y0, x1, y1), outline=_rgb(k), width=3 if k in drawn else 1)
        pen.text((x0 + 2, y0 - 11 if y0 >= 11 else y0 + 2), f"R{k}", fill=_rgb(k))
    return result


def draw_corner(image: Image.Image, corner: Sequence[float], index: int = 0) -> Image.Image:
    """A copy of ``image`` with a cross at a first clicked ``corner`` ``(x, y)`` in region ``index``'s colour."""
    out = image.convert("RGB").copy()
    x, y = (int(c) for c in corner)
    pen = ImageDraw.Draw(out)
    color = _rgb(index)
    pen.line((x - 5, y, x + 5, y), fill=color, width=2)
    pen.line((x, y - 5, x, y + 5), fill=color, width=2)
    return out
