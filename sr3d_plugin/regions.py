"""Region prompts from text specs: boxes, mask images, COCO RLE, polygons and projected 3D boxes.

A region spec is one string of ``key=value`` words (quote values with spaces, shell style)::

    frame=3 box=10,20,110,140            a pixel box (x0, y0, x1, y1) on frame 3
    frame=3 mask=chair.png               a binary mask image (any non-zero pixel is set)
    frame=3 rle=chair.json               COCO RLE ({"size": [h, w], "counts": str | [int]})
    frame=3 polygon=10,20,110,20,60,140  polygon vertices x0,y0,x1,y1,… in pixels (≥ 3 vertices)
    box3d=1.2,0.4,0.5,0.6,0.6,1.0,0.3    3D box cx,cy,cz,sx,sy,sz[,yaw] in the scene's (aligned) world
                                         frame, metres and radians about +z; projected onto every frame
                                         where it is visible (depth test when depth is known)
    frame=@120 box=…                     ``@ID`` names an original frame (file stem / frame number)
    … label=chair                        an optional name used in messages and summaries

Frame indices ``K`` count the frames *after* sampling (``0 … V−1`` in the order the model sees
them); ``frame=@ID`` refers to an original frame id instead and must be one of the sampled frames.
For a single image ``frame`` may be left out. Every mask ends up at its frame's image size.
"""

from __future__ import annotations

import json
import re
import shlex
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.modeling.inputs import Region

__all__ = [
    "REGION_KINDS",
    "RegionSpec",
    "box3d_masks",
    "check_question",
    "count_region_references",
    "decode_coco_rle",
    "encode_coco_rle",
    "load_mask_image",
    "load_rle_file",
    "parse_region_spec",
    "polygon_mask",
    "region_summary",
    "resolve_regions",
]

#: the region kinds a spec may name (exactly one per spec)
REGION_KINDS = ("box", "mask", "rle", "polygon", "box3d")
_KEYS = {"frame", "label", *REGION_KINDS}


@dataclass(frozen=True)
class RegionSpec:
    """A parsed region spec.

    Attributes:
        kind: one of :data:`REGION_KINDS`.
        text: the spec as given (for messages and summaries).
        frame: frame index after sampling, or None.
        frame_id: original frame id from ``frame=@ID``, or None.
        values: numbers of ``box`` / ``polygon`` / ``box3d``.
        path: file of ``mask`` / ``rle``.
        label: optional name.
    """

    kind: str
    text: str
    frame: int | None = None
    frame_id: str | None = None
    values: tuple[float, ...] = ()
    path: str | None = None
    label: str | None = None


def _numbers(value: str, key: str, text: str) -> tuple[float, ...]:
    parts = [p for p in value.replace(";", ",").split(",") if p.strip()]
    try:
        nums = tuple(float(p) for p in parts)
    except ValueError as exc:
        raise SR3DInputError(f"region {text!r}: {key}={value!r} must be comma-separated numbers") from exc
    if not all(np.isfinite(nums)):
        raise SR3DInputError(f"region {text!r}: {key}={value!r} has non-finite numbers")
    return nums


def parse_region_spec(text: str) -> RegionSpec:
    """Parse one region spec (see the module docstring for the syntax)."""
    if not isinstance(text, str) or not text.strip():
        raise SR3DInputError(f"region spec {text!r} is empty; expected e.g. 'frame=0 box=10,20,110,140'")
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise SR3DInputError(f"region {text!r} cannot be split into words: {exc}") from exc
    items: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        key = key.strip().lower()
        if not sep or not value:
            raise SR3DInputError(
                f"region {text!r}: {word!r} is not key=value; expected keys {', '.join(sorted(_KEYS))}"
            )
        if key not in _KEYS:
            raise SR3DInputError(f"region {text!r}: unknown key {key!r}; expected one of {', '.join(sorted(_KEYS))}")
        if key in items:
            raise SR3DInputError(f"region {text!r}: {key}= is given twice")
        items[key] = value
    kinds = [k for k in REGION_KINDS if k in items]
    if len(kinds) != 1:
        raise SR3DInputError(
            f"region {text!r} names {len(kinds)} region kinds {kinds}; expected exactly one of {', '.join(REGION_KINDS)}"
        )
    kind = kinds[0]
    frame: int | None = None
    frame_id: str | None = None
    if "frame" in items:
        raw = items["frame"].strip()
        if kind == "box3d":
            raise SR3DInputError(
                f"region {text!r}: box3d regions cover every frame where the box is visible; drop frame={raw}"
            )
        if raw.startswith("@"):
            frame_id = raw[1:].strip()
            if not frame_id:
                raise SR3DInputError(f"region {text!r}: frame=@ needs a frame id after '@'")
        else:
            try:
                frame = int(raw)
            except ValueError as exc:
                raise SR3DInputError(
                    f"region {text!r}: frame={raw!r} must be a frame index (0-based, after sampling) or @<frame id>"
                ) from exc
            if frame < 0:
                raise SR3DInputError(f"region {text!r}: frame={frame} must be >= 0")
    value = items[kind]
    values: tuple[float, ...] = ()
    path = None
    if kind == "box":
        values = _numbers(value, kind, text)
        if len(values) != 4:
            raise SR3DInputError(f"region {text!r}: box={value!r} has {len(values)} numbers; expected x0,y0,x1,y1")
    elif kind == "polygon":
        values = _numbers(value, kind, text)
        if len(values) % 2 or len(values) < 6:
            raise SR3DInputError(
                f"region {text!r}: polygon={value!r} has {len(values)} numbers; expected x,y pairs of at least 3 vertices"
            )
    elif kind == "box3d":
        values = _numbers(value, kind, text)
        if len(values) not in (6, 7):
            raise SR3DInputError(
                f"region {text!r}: box3d={value!r} has {len(values)} numbers; expected cx,cy,cz,sx,sy,sz[,yaw]"
            )
        if min(values[3:6]) <= 0:
            raise SR3DInputError(f"region {text!r}: box3d sizes {values[3:6]} must be positive (metres)")
    else:
        path = value
    return RegionSpec(kind, text, frame, frame_id, values, path, items.get("label"))


# ----------------------------------------------------------------------------------------------
# COCO RLE
# ----------------------------------------------------------------------------------------------


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
    m = np.asarray(mask).astype(bool)
    if m.ndim != 2:
        raise SR3DInputError(f"mask must be [H, W], got shape {m.shape}")
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
        with Image.open(p) as im:
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
    width, height = size
    pts = [(float(coords[i]), float(coords[i + 1])) for i in range(0, len(coords) - 1, 2)]
    canvas = Image.new("1", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(pts, fill=1, outline=1)
    return np.array(canvas, dtype=bool)


# ----------------------------------------------------------------------------------------------
# 3D boxes
# ----------------------------------------------------------------------------------------------


def box3d_masks(
    values: Sequence[float], frames: Any, depth_tolerance: float = 0.05
) -> tuple[dict[int, np.ndarray], Any]:
    """Project a 3D box onto every frame of a posed :class:`~sr3d_plugin.sources.base.FrameSet`.

    Args:
        values: ``cx, cy, cz, sx, sy, sz[, yaw]`` (metres, radians about +z) in the frames' world frame
            (the axis-aligned frame for ScanNet-style scenes).
        frames: frames with ``intrinsics`` and ``cam_to_world`` (and ``depth`` for the occlusion test).
        depth_tolerance: metres a surface may lie outside the box and still count (depth test).

    Returns:
        ``({frame index: [H, W] bool mask at the image size}, Box3D)`` for the frames where the box is seen.
    """
    import torch

    from sr3d_plugin.geometry import Box3D, project_box_to_masks

    if frames.cam_to_world is None or frames.intrinsics is None:
        raise SR3DInputError(
            "box3d regions need camera poses and intrinsics (a --scene folder, or --frames with --poses and "
            "--intrinsics); these frames have " + ("no poses" if frames.cam_to_world is None else "no intrinsics")
        )
    box = Box3D.from_center_size_yaw(list(values[:3]), list(values[3:6]), float(values[6]) if len(values) > 6 else 0.0)
    if frames.depth is not None:
        depth = np.asarray(frames.depth, dtype=np.float64)
        size = depth.shape[1:]
    else:
        depth = None
        # intrinsics describe the depth maps; without depth they describe the images
        size = (frames.images[0].size[1], frames.images[0].size[0])
    masks = project_box_to_masks(
        box,
        torch.from_numpy(np.asarray(frames.intrinsics, dtype=np.float64)),
        torch.from_numpy(np.asarray(frames.cam_to_world, dtype=np.float64)),
        (int(size[0]), int(size[1])),
        depth=None if depth is None else torch.from_numpy(depth),
        depth_tolerance=depth_tolerance,
    )
    out: dict[int, np.ndarray] = {}
    for i, m in enumerate(masks.numpy()):
        if m.any():
            out[i] = _fit_to_image(m, frames.images[i].size, f"projected 3D box on frame {i}")
    return out, box


# ----------------------------------------------------------------------------------------------
# resolution against a frame set
# ----------------------------------------------------------------------------------------------


def _fit_to_image(mask: np.ndarray, image_size: tuple[int, int], what: str) -> np.ndarray:
    """``mask`` at the image size (nearest); an error when the aspect ratio differs by more than 2 %."""
    width, height = image_size
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


def _frame_index(spec: RegionSpec, index: int, frames: Any) -> int:
    v = len(frames)
    if spec.frame_id is not None:
        k = frames.find(spec.frame_id)
        if k is None:
            shown = ", ".join(frames.frame_ids[:8]) + (" …" if v > 8 else "")
            raise SR3DInputError(
                f"region {index} ({spec.text!r}) refers to frame id {spec.frame_id!r}, which is not among the "
                f"{v} sampled frame(s) ({shown}); pick one of those ids, or an index frame=0..{v - 1}"
            )
        return k
    if spec.frame is None:
        if v == 1:
            return 0
        raise SR3DInputError(
            f"region {index} ({spec.text!r}) does not say which frame it is drawn on; add frame=K "
            f"(0..{v - 1}, counted after sampling) or frame=@<frame id>"
        )
    if spec.frame >= v:
        raise SR3DInputError(
            f"region {index} ({spec.text!r}) is on frame {spec.frame}, but there are {v} frame(s) after sampling "
            f"(0..{v - 1}); frame indices count the sampled frames — use frame=@<frame id> for an original frame"
        )
    return spec.frame


def _spec_region(spec: RegionSpec, index: int, frames: Any) -> Region:
    label = spec.label
    if spec.kind == "box3d":
        masks, _ = box3d_masks(spec.values, frames)
        if not masks:
            raise SR3DInputError(
                f"region {index} ({spec.text!r}): the 3D box is not visible in any of the {len(frames)} frame(s) "
                "(outside every view or hidden behind other surfaces); check its centre and size in the scene's "
                "axis-aligned world frame"
            )
        return Region(masks, label=label)
    k = _frame_index(spec, index, frames)
    size = frames.images[k].size
    width, height = size
    where = f"region {index} ({spec.text!r})"
    if spec.kind == "box":
        x0, y0, x1, y1 = spec.values
        if x1 <= x0 or y1 <= y0:
            raise SR3DInputError(f"{where}: box {spec.values} is empty; expected x0 < x1 and y0 < y1 (pixels)")
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            raise SR3DInputError(
                f"{where}: box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) lies outside the {width}×{height} image of frame {k}; "
                f"expected pixel coordinates within 0..{width} × 0..{height}"
            )
        return Region.from_box(k, (x0, y0, x1, y1), size, label=label)
    if spec.kind == "polygon":
        mask = polygon_mask(spec.values, size)
    elif spec.kind == "mask":
        assert spec.path is not None
        mask = _fit_to_image(load_mask_image(spec.path), size, f"{where}: mask image {spec.path!r}")
    else:
        assert spec.path is not None
        mask = _fit_to_image(load_rle_file(spec.path), size, f"{where}: RLE mask {spec.path!r}")
    if not mask.any():
        raise SR3DInputError(
            f"{where}: the {spec.kind} mask on frame {k} is empty (no pixel inside the {width}×{height} image); "
            "expected at least one foreground pixel"
        )
    return Region({k: mask}, label=label)


_REGION_ALIAS = re.compile(r"<region(\d+)>")


def count_region_references(question: str, mask_token: str = "<mask>") -> tuple[int, list[int]]:
    """``(number of <mask> tokens, [K of every <regionK> alias])`` in a question."""
    return question.count(mask_token), [int(m.group(1)) for m in _REGION_ALIAS.finditer(question)]


def check_question(question: Any, n_regions: int, image_token: str = "<image>", mask_token: str = "<mask>") -> None:
    """Fail unless ``question`` is non-empty text without image markers whose region references
    (``<mask>`` in order, or ``<regionK>`` aliases — not both) fit ``n_regions`` regions."""
    if not isinstance(question, str) or not question.strip():
        raise SR3DInputError(f"the question is empty ({question!r}); expected some text")
    if image_token in question:
        raise SR3DInputError(
            f"the question contains {image_token}; image markers are added automatically — remove them"
        )
    bare, aliases = count_region_references(question, mask_token)
    if bare and aliases:
        raise SR3DInputError(f"the question mixes {mask_token} and <regionK> references; use one style")
    if aliases:
        bad = sorted({k for k in aliases if k >= n_regions})
        if bad:
            raise SR3DInputError(
                f"the question refers to <region{bad[0]}> but {n_regions} region(s) were given"
                + (f" (<region0>..<region{n_regions - 1}>)" if n_regions else "")
            )
    elif bare != n_regions:
        raise SR3DInputError(
            f"the question has {bare} {mask_token} token(s) but {n_regions} region(s) were given; "
            f"expected one {mask_token} per region, in order (or <regionK> aliases)"
        )


def resolve_regions(specs: Sequence[str | RegionSpec | Region], frames: Any) -> list[Region]:
    """Turn specs (strings or :class:`RegionSpec`) and ready :class:`Region` objects into regions on ``frames``.

    Masks are brought to their frame's image size. ``frames`` is a
    :class:`~sr3d_plugin.sources.base.FrameSet` (the frames after sampling).
    """
    out: list[Region] = []
    v = len(frames)
    for i, item in enumerate(specs):
        if isinstance(item, Region):
            for k in item.masks:
                if not 0 <= k < v:
                    raise SR3DInputError(
                        f"region {i} is drawn on frame {k}, but there are {v} frame(s) after sampling (0..{v - 1})"
                    )
            masks = {
                k: _fit_to_image(m, frames.images[k].size, f"mask of region {i} on frame {k}")
                for k, m in item.masks.items()
            }
            out.append(Region(masks, label=item.label))
            continue
        spec = parse_region_spec(item) if isinstance(item, str) else item
        if not isinstance(spec, RegionSpec):
            raise SR3DInputError(f"region {i} is a {type(item).__name__}; expected a spec string, RegionSpec or Region")
        out.append(_spec_region(spec, i, frames))
    return out


def region_summary(region: Region, index: int, frames: Any, spec: str | RegionSpec | None = None) -> dict[str, Any]:
    """JSON-ready description of a region as understood: frames, frame ids, pixel areas and boxes.

    Returns ``{"index", "spec", "kind", "label", "frames", "frame_ids", "pixel_area", "bbox", "image_size"}``
    where ``pixel_area[j]`` / ``bbox[j]`` (``[x0, y0, x1, y1]``, exclusive upper bounds, image pixels)
    belong to ``frames[j]``.
    """
    if isinstance(spec, str):
        try:
            kind = parse_region_spec(spec).kind
        except SR3DInputError:
            kind = "mask"
        text: str | None = spec
    elif isinstance(spec, RegionSpec):
        kind, text = spec.kind, spec.text
    else:
        kind, text = "mask", None
    ks = region.frames
    return {
        "index": index,
        "spec": text,
        "kind": kind,
        "label": region.label,
        "frames": ks,
        "frame_ids": [str(frames.frame_ids[k]) for k in ks],
        "pixel_area": [int(region.masks[k].sum()) for k in ks],
        "bbox": [list(region.bbox(k)) for k in ks],
        "image_size": [list(frames.images[k].size) for k in ks],
    }
