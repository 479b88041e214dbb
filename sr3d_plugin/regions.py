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

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sr3d_plugin import _checks
from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.masks import decode_coco_rle, encode_coco_rle, fit_mask, load_mask_image, load_rle_file, polygon_mask
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
    "region_from_record",
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

    def __post_init__(self) -> None:
        """A spec built directly (not parsed) obeys the same rules as :func:`parse_region_spec`'s."""
        where = f"region {self.text!r}"
        if self.kind not in REGION_KINDS:
            raise SR3DInputError(f"{where}: unknown kind {self.kind!r}; expected one of {', '.join(REGION_KINDS)}")
        if self.frame is not None:
            _checks.integer(self.frame, f"{where}: frame", minimum=0)
        values = tuple(self.values)
        if not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values):
            raise SR3DInputError(f"{where}: values {values!r} must be numbers")
        if not all(np.isfinite(values)):
            raise SR3DInputError(f"{where}: values {values!r} must be finite numbers")
        expected = {"box": "4", "polygon": "an even number >= 6", "box3d": "6 or 7"}
        n = len(values)
        ok = {
            "box": n == 4,
            "polygon": n >= 6 and n % 2 == 0,
            "box3d": n in (6, 7),
        }.get(self.kind, True)
        if not ok:
            raise SR3DInputError(f"{where}: {self.kind} has {n} numbers; expected {expected[self.kind]}")
        if self.kind == "box3d" and min(values[3:6]) <= 0:
            raise SR3DInputError(f"{where}: box3d sizes {values[3:6]} must be positive (metres)")
        if self.kind in ("mask", "rle") and not (isinstance(self.path, str) and self.path):
            raise SR3DInputError(f"{where}: {self.kind} needs a file path, got {self.path!r}")


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
    from sr3d_plugin.sources.base import FrameSet

    if not isinstance(frames, FrameSet):
        raise SR3DInputError(f"frames must be a FrameSet, got {_checks.describe(frames)}")
    values = tuple(_checks.as_array(values, "values", ndim=1).tolist())
    if len(values) not in (6, 7):
        raise SR3DInputError(f"values has {len(values)} numbers; expected cx, cy, cz, sx, sy, sz[, yaw]")
    if frames.cam_to_world is None or frames.intrinsics is None:
        raise SR3DInputError(
            "box3d regions need camera poses and intrinsics (a scene folder, or frames with poses and "
            "intrinsics); these frames have " + ("no poses" if frames.cam_to_world is None else "no intrinsics")
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
            out[i] = fit_mask(m, frames.images[i].size, f"projected 3D box on frame {i}")
    return out, box


# ----------------------------------------------------------------------------------------------
# resolution against a frame set
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FrameRef:
    """Which frame a record region names (the frame part of a :class:`RegionSpec`)."""

    text: str
    frame: int | None = None
    frame_id: str | None = None


def _frame_index(spec: RegionSpec | _FrameRef, index: int, frames: Any) -> int:
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
        mask = fit_mask(load_mask_image(spec.path), size, f"{where}: mask image {spec.path!r}")
    else:
        assert spec.path is not None
        mask = fit_mask(load_rle_file(spec.path), size, f"{where}: RLE mask {spec.path!r}")
    if not mask.any():
        raise SR3DInputError(
            f"{where}: the {spec.kind} mask on frame {k} is empty (no pixel inside the {width}×{height} image); "
            "expected at least one foreground pixel"
        )
    return Region({k: mask}, label=label)


_REGION_ALIAS = re.compile(r"<region(\d+)>")


def count_region_references(question: str, mask_token: str = "<mask>") -> tuple[int, list[int]]:
    """``(number of <mask> tokens, [K of every <regionK> alias])`` in a question."""
    if not isinstance(question, str) or not isinstance(mask_token, str) or not mask_token:
        raise SR3DInputError(f"question and mask_token must be text, got {_checks.describe(question)}")
    return question.count(mask_token), [int(m.group(1)) for m in _REGION_ALIAS.finditer(question)]


def check_question(question: Any, n_regions: int, image_token: str = "<image>", mask_token: str = "<mask>") -> None:
    """Fail unless ``question`` is non-empty text without image markers whose region references
    (``<mask>`` in order, or ``<regionK>`` aliases — not both) fit ``n_regions`` regions."""
    if not isinstance(question, str):
        raise SR3DInputError(f"question must be text, got {_checks.describe(question)}")
    if not question.strip():
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
    :class:`~sr3d_plugin.sources.base.FrameSet` (the frames after sampling), or an object with the
    same ``len``, ``images``, ``frame_ids`` and ``find`` (the data check's header-only frames).
    """
    from sr3d_plugin.sources.base import FrameSet

    if not isinstance(frames, FrameSet) and not all(
        hasattr(frames, a) for a in ("__len__", "images", "frame_ids", "find")
    ):
        raise SR3DInputError(f"frames must be a FrameSet, got {_checks.describe(frames)}")
    if isinstance(specs, (str, RegionSpec, Region)) or not isinstance(specs, Sequence):
        raise SR3DInputError(f"specs must be a list of region specs, got {_checks.describe(specs)}")
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
                k: fit_mask(m, frames.images[k].size, f"mask of region {i} on frame {k}") for k, m in item.masks.items()
            }
            out.append(Region(masks, label=item.label))
            continue
        spec = parse_region_spec(item) if isinstance(item, str) else item
        if not isinstance(spec, RegionSpec):
            raise SR3DInputError(f"region {i} is a {type(item).__name__}; expected a spec string, RegionSpec or Region")
        out.append(_spec_region(spec, i, frames))
    return out


# ----------------------------------------------------------------------------------------------
# regions of data records (JSON objects)
# ----------------------------------------------------------------------------------------------


def _frame_of(value: Any, frames: Any, where: str) -> int:
    """Frame index (after sampling) of a record region's ``frame`` (int, or ``"@ID"`` for an original frame id)."""
    if value is None:
        return _frame_index(_FrameRef(where), 0, frames)
    if isinstance(value, str) and value.startswith("@"):
        return _frame_index(_FrameRef(where, frame_id=value[1:]), 0, frames)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise SR3DInputError(f"{where}: frame={value!r}; expected a frame index >= 0 or '@<frame id>'")
    return _frame_index(_FrameRef(where, frame=int(value)), 0, frames)


def region_from_record(item: Any, frames: Any, base: str | Path | None = None, where: str = "region") -> Region:
    """One region of a data record (training or prepared evaluation data) on ``frames`` (after sampling).

    The one reader of record regions (:mod:`sr3d_plugin.records` and
    :class:`~sr3d_plugin.evaluation.record_inputs.RecordInputBuilder` both use it). Relative file
    paths are relative to ``base``.

    ``item`` is a spec string (``"frame=2 box=10,20,50,60"``, :mod:`sr3d_plugin.regions`) or an object
    with ``frame`` (index after sampling or ``"@ID"``) and one of ``box`` ``[x0, y0, x1, y1]``,
    ``mask`` (image path), ``rle`` (COCO RLE object or a JSON file), ``polygon`` ``[x0, y0, …]``, or
    ``box3d`` ``[cx, cy, cz, sx, sy, sz(, yaw)]`` (metres in the scene's aligned world frame); plus an
    optional ``label``. ``{"masks": [...], "box3d"?, "label"?}`` draws one region on several frames.

    Frame lookup (decided once, for every record): an integer ``frame`` is an index *after sampling*
    (as ``frame=K`` in a spec); ``"@ID"`` names an original frame id, looked up with
    :meth:`FrameSet.index_of <sr3d_plugin.sources.base.FrameSet.index_of>`; anything else (a bare
    string, a negative or boolean value) is an error. Unknown keys are errors. In a multi-frame region,
    masks on frames that sampling left out (an ``@ID`` not sampled, an index ``>= V``) and empty inline
    RLE masks (an object hidden on that frame) are skipped; with none left the ``box3d`` is projected
    onto the sampled frames, and without a ``box3d`` that is an error.
    """
    if isinstance(item, str):
        try:
            return resolve_regions([item], frames)[0]
        except SR3DInputError as exc:
            raise SR3DInputError(f"{where}: {exc}") from None
    if not isinstance(item, Mapping):
        raise SR3DInputError(f"{where} is a {type(item).__name__}; expected an object or a region spec string")
    if "masks" in item:
        return _multi_frame_region(item, frames, base, where)
    unknown = sorted(set(item) - {"frame", "label", *REGION_KINDS})
    if unknown:
        raise SR3DInputError(f"{where} has unknown keys {unknown}; expected frame, label and one of {REGION_KINDS}")
    kinds = [k for k in REGION_KINDS if k in item]
    if len(kinds) != 1:
        raise SR3DInputError(f"{where} names {kinds}; expected exactly one of {', '.join(REGION_KINDS)}")
    kind, value, label = kinds[0], item[kinds[0]], item.get("label")
    text = f"{where} ({kind})"
    if kind == "box3d":
        if "frame" in item:
            raise SR3DInputError(f"{where}: box3d regions cover every frame where the box is visible; drop 'frame'")
        spec = RegionSpec("box3d", text, values=_record_numbers(value, kind, where), label=label)
        return resolve_regions([spec], frames)[0]
    k = _frame_of(item.get("frame"), frames, where)
    if kind == "rle" and isinstance(value, dict):
        mask = decode_coco_rle(dict(value), what=f"{where} RLE")
        return resolve_regions([Region({k: mask}, label=label)], frames)[0]
    if kind in ("box", "polygon"):
        spec = RegionSpec(kind, text, frame=k, values=_record_numbers(value, kind, where), label=label)
    else:
        if not isinstance(value, str):
            raise SR3DInputError(f"{where}: {kind} must be a file path, got {value!r}")
        path = Path(value).expanduser()
        if base is not None and not path.is_absolute():
            path = Path(base) / path
        spec = RegionSpec(kind, text, frame=k, path=str(path), label=label)
    return resolve_regions([spec], frames)[0]


def _record_numbers(value: Any, kind: str, where: str) -> tuple[float, ...]:
    """The numbers of a record region's ``box`` / ``polygon`` / ``box3d`` list."""
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        raise SR3DInputError(f"{where}: {kind} must be a list of numbers, got {_checks.describe(value)}")
    return tuple(_checks.as_array(list(value), f"{where}: {kind}", ndim=1, nonempty=False).tolist())


def _on_sampled_frame(value: Any, frames: Any) -> bool:
    """False when a mask's ``frame`` (``"@ID"`` or an index after sampling) names a frame that sampling
    left out; True otherwise, including for a missing or malformed value, which
    :func:`region_from_record` then reports."""
    if isinstance(value, str) and value.startswith("@"):
        return frames.find(value) is not None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return value < len(frames)
    return True


def _multi_frame_region(item: Mapping[str, Any], frames: Any, base: str | Path | None, where: str) -> Region:
    """``{"masks": [{frame, box | mask | rle | polygon}, …], "box3d"?, "label"?}`` — one region drawn on
    several frames (the layout ``sr3d prepare`` writes). Masks on frames that were not sampled are
    skipped; with none left, the ``box3d`` is projected onto the sampled frames."""
    unknown = sorted(set(item) - {"masks", "box3d", "label"})
    if unknown:
        raise SR3DInputError(f"{where} has unknown keys {unknown}; expected masks, box3d and label")
    if not isinstance(item["masks"], list):
        raise SR3DInputError(f"{where}: masks must be a list of {{frame, box | mask | rle | polygon}} objects")
    merged: dict[int, np.ndarray] = {}
    for j, entry in enumerate(item["masks"]):
        if not isinstance(entry, Mapping):
            raise SR3DInputError(f"{where} mask {j} must be an object")
        if not _on_sampled_frame(entry.get("frame"), frames):
            continue  # drawn on a frame that was not sampled
        rle = entry.get("rle")
        if isinstance(rle, Mapping) and not decode_coco_rle(dict(rle), what=f"{where} mask {j} RLE").any():
            continue  # an empty inline RLE: the object is not visible on that frame
        part = region_from_record(entry, frames, base, f"{where} mask {j}")
        for k, m in part.masks.items():
            merged[k] = merged[k] | m if k in merged else m
    if merged:
        return Region(merged, label=item.get("label"))
    if item.get("box3d") is not None:
        return region_from_record({"box3d": item["box3d"], "label": item.get("label")}, frames, base, where)
    raise SR3DInputError(
        f"{where}: none of its masks lies on the {len(frames)} sampled frame(s) and it has no box3d to project; "
        "prepare the data with the frames the model samples"
    )


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
