"""Property tests of the public surface (issue 12 item 2): finite, well-shaped results or an SR3DError.

Every public function of geometry, tiling, regions, masks (codecs, not decode limits), point maps,
sources, visual inputs and records is called on generated inputs — random shapes, dtypes (complex and
boolean included) and values (NaN, ±inf, 0, huge, empty) mixed with near-valid inputs that differ from
a valid one in a single entry (a scaled or skewed intrinsics matrix, a reflected pose, …). Each call
must either return a result whose every float is finite and whose shape is the documented one, or raise
:class:`~sr3d_plugin.errors.SR3DError`; any other exception, or a NaN/inf in a result, fails the test.

Deterministic (``derandomize=True``, no example database) and bounded: ``SR3D_PROPERTY_EXAMPLES``
(default 40) examples per function. ``SR3D_PROBE_TALLY=<file.json>`` writes the number of generated
inputs per function group and their outcomes (``ok`` / ``refused``) when the module finishes.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from sr3d_plugin import geometry, masks, pointmap, regions, tiling
from sr3d_plugin.errors import SR3DError
from sr3d_plugin.records import RecordReader, load_records, record_messages, validate_record
from sr3d_plugin.sources import base, files, pointmap_sources, reconstruction
from sr3d_plugin.sources.depth_anything import resolve_dtype
from sr3d_plugin.visual_inputs import positions, read_frames, visual_input

EXAMPLES = int(os.environ.get("SR3D_PROPERTY_EXAMPLES", "40"))
PROPS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)

TALLY: Counter = Counter()
#: a few refusal messages per function (written with the tally, to read what users are told)
MESSAGES: dict[str, list[str]] = {}


@pytest.fixture(scope="module", autouse=True)
def _write_tally():
    yield
    path = os.environ.get("SR3D_PROBE_TALLY")
    if path:
        groups: dict[str, dict[str, int]] = {}
        for (group, outcome), n in sorted(TALLY.items()):
            groups.setdefault(group, {})[outcome] = n
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"outcomes": groups, "messages": MESSAGES}, fh, indent=1)


# ----------------------------------------------------------------------------------------------
# the property
# ----------------------------------------------------------------------------------------------


def _non_finite(value: Any, depth: int = 0) -> str | None:
    """Where a result holds NaN/inf (None when every float in it is finite)."""
    if depth > 4:
        return None
    if isinstance(value, torch.Tensor):
        if (torch.is_floating_point(value) or value.is_complex()) and not bool(torch.isfinite(value).all()):
            return f"tensor {tuple(value.shape)}"
        return None
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            return f"array {value.shape}"
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (list, tuple)):
        items = list(value)
    elif is_dataclass(value) and not isinstance(value, type):
        items = [getattr(value, f.name) for f in fields(value)]
    else:
        return None
    for item in items:
        where = _non_finite(item, depth + 1)
        if where:
            return where
    return None


def probe(group: str, fn: Callable[..., Any], *args: Any, passes_non_finite: bool = False, **kwargs: Any) -> Any:
    """Call ``fn``; an SR3DError is a refusal (returns None), anything else but a finite result fails.

    ``passes_non_finite``: ``fn`` documents that it hands non-finite input through (e.g. ScanNet's
    ``-inf`` invalid poses in :func:`~sr3d_plugin.sources.files.read_matrix`); the caller then checks
    that finite input gave a finite result.
    """
    try:
        out = fn(*args, **kwargs)
    except SR3DError as exc:
        assert str(exc), "an SR3DError without a message"
        TALLY[(group, "refused")] += 1
        seen = MESSAGES.setdefault(getattr(fn, "__qualname__", str(fn)), [])
        if len(seen) < 6 and str(exc) not in seen:
            seen.append(str(exc))
        return None
    except Exception as exc:  # the property: no other exception type leaves a public function
        TALLY[(group, "raw exception")] += 1
        raise AssertionError(f"{getattr(fn, '__qualname__', fn)} raised {type(exc).__name__}: {exc}") from exc
    where = None if passes_non_finite else _non_finite(out)
    if where:
        TALLY[(group, "non-finite result")] += 1
        raise AssertionError(f"{getattr(fn, '__qualname__', fn)} returned non-finite values in {where}")
    TALLY[(group, "ok")] += 1
    return out


# ----------------------------------------------------------------------------------------------
# strategies
# ----------------------------------------------------------------------------------------------

DTYPES = [np.float16, np.float32, np.float64, np.int32, np.uint8, np.bool_, np.complex64]
SPECIAL = [0.0, -0.0, 1.0, -1.0, 1e-30, 3e38, -3e38, 1e300, math.nan, math.inf, -math.inf]


def any_array(max_dims: int = 4, max_side: int = 5) -> st.SearchStrategy:
    """Arrays of any dtype and shape (0-d and empty included), any values (NaN, inf, huge)."""
    return hnp.arrays(
        dtype=st.sampled_from(DTYPES),
        shape=hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=max_side),
    )


def garbage() -> st.SearchStrategy:
    """Values of the wrong kind entirely."""
    return st.one_of(
        st.none(),
        st.text(max_size=5),
        st.integers(-5, 5),
        st.sampled_from(SPECIAL),
        st.lists(st.floats(allow_nan=True), max_size=4),
        st.just([[1.0, 2.0], [3.0]]),
        st.just({"a": 1}),
        any_array(),
    )


def mutated(valid: np.ndarray, draw: Callable) -> np.ndarray:
    """``valid`` with one entry replaced by a special value, or scaled, or cast to another dtype."""
    with np.errstate(all="ignore"):  # the mutations overflow on purpose
        return _mutated(valid, draw)


def _mutated(valid: np.ndarray, draw: Callable) -> np.ndarray:
    arr = np.array(valid, dtype=np.float64, copy=True)
    how = draw(st.sampled_from(["entry", "scale", "dtype", "none"]))
    if how == "entry" and arr.size:
        idx = draw(st.integers(0, arr.size - 1))
        arr.reshape(-1)[idx] = draw(st.one_of(st.sampled_from(SPECIAL), st.floats(-1e3, 1e3)))
    elif how == "scale":
        arr = arr * draw(st.sampled_from([-1.0, 0.0, 2.0, 1e-20, 1e30]))
    elif how == "dtype":
        return arr.astype(draw(st.sampled_from([np.float32, np.complex128, np.int64, np.float16])))
    return arr


@st.composite
def intrinsics_st(draw: Callable, h: int = 6, w: int = 8) -> np.ndarray:
    fx, fy = draw(st.floats(0.5, 500)), draw(st.floats(0.5, 500))
    k = np.array([[fx, 0.0, draw(st.floats(0, w))], [0.0, fy, draw(st.floats(0, h))], [0.0, 0.0, 1.0]])
    return k if draw(st.booleans()) else mutated(k, draw)


@st.composite
def rotation_st(draw: Callable) -> np.ndarray:
    q = np.array([draw(st.floats(-1, 1)) for _ in range(4)]) + np.array([1e-3, 0, 0, 0])
    a, b, c, d = q / np.linalg.norm(q)
    return np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d],
        ]
    )


@st.composite
def pose_st(draw: Callable, valid_only: bool = False) -> np.ndarray:
    t = np.eye(4)
    t[:3, :3] = draw(rotation_st())
    t[:3, 3] = [draw(st.floats(-10, 10)) for _ in range(3)]
    if valid_only or draw(st.booleans()):
        return t
    if draw(st.booleans()):
        t[:3, 0] *= -1  # a reflection
        return t
    return mutated(t, draw)


@st.composite
def depth_st(draw: Callable, v: int | None = None, h: int | None = None, w: int | None = None) -> np.ndarray:
    """Mostly plausible depth ``[V, H, W]`` metres; sometimes with a special value or of another dtype."""
    v = v or draw(st.integers(1, 3))
    h = h or draw(st.integers(1, 6))
    w = w or draw(st.integers(1, 6))
    d = draw(hnp.arrays(np.float64, (v, h, w), elements=st.floats(0, 20)))
    return d if draw(st.booleans()) else mutated(d, draw)


def float_array(shape: tuple[int, ...], lo: float = -1e3, hi: float = 1e3) -> st.SearchStrategy:
    return hnp.arrays(np.float64, shape, elements=st.floats(lo, hi))


@st.composite
def points_st(draw: Callable) -> Any:
    """A point map-ish array: right layout with odd values, or anything."""
    if draw(st.integers(0, 3)) == 0:
        return draw(any_array())
    v, h, w = draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.float16]))
    elems = st.one_of(st.floats(-1e3, 1e3), st.sampled_from([3e38, -3e38, 1e-30, 0.0]))
    arr = draw(hnp.arrays(np.float64, (v, h, w, 3), elements=elems))
    with np.errstate(over="ignore", invalid="ignore"):
        arr = arr.astype(dtype)
    return arr if draw(st.booleans()) else mutated(arr, draw)


def frameset(v: int = 2, h: int = 6, w: int = 8, **geometry_kwargs: Any) -> base.FrameSet:
    images = [Image.new("RGB", (w, h), (40 * i, 80, 120)) for i in range(v)]
    return base.FrameSet(images=images, **geometry_kwargs)


def posed_frames(v: int = 2, h: int = 6, w: int = 8) -> base.FrameSet:
    k = np.array([[6.0, 0, w / 2], [0, 6.0, h / 2], [0, 0, 1]])
    poses = np.repeat(np.eye(4)[None], v, axis=0)
    poses[:, 0, 3] = np.arange(v) * 0.1
    depth = np.full((v, h, w), 2.0, np.float32)
    return frameset(v, h, w, depth=depth, intrinsics=np.repeat(k[None], v, 0), cam_to_world=poses)


# ----------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------


@PROPS
@given(st.data())
def test_backproject(data: st.DataObject) -> None:
    depth = data.draw(st.one_of(depth_st(), any_array()))
    k = data.draw(st.one_of(intrinsics_st(), garbage()))
    pose = data.draw(st.one_of(st.none(), pose_st(), garbage()))
    out = probe("geometry", geometry.backproject, depth, k, pose)
    if out is not None:
        assert tuple(out.shape) == (*tuple(np.shape(depth)), 3)


@PROPS
@given(points=points_st(), valid=st.one_of(st.none(), any_array()), mode=st.sampled_from(["sr3d", "robust", "x"]))
def test_canonicalize(points: Any, valid: Any, mode: str) -> None:
    out = probe("geometry", geometry.canonicalize, points, valid, mode)
    if out is not None:
        assert tuple(out.shape) == tuple(np.shape(points))
        assert float(out.abs().max()) <= 1.0 + 1e-3 if out.numel() else True


@PROPS
@given(points=points_st(), other=st.one_of(points_st(), garbage()))
def test_canonical_transform_apply_invert(points: Any, other: Any) -> None:
    tf = probe("geometry", geometry.canonical_transform, points)
    if tf is not None:
        probe("geometry", tf.apply, other)
        probe("geometry", tf.invert, other)


@PROPS
@given(values=st.one_of(any_array(), float_array((3, 4), 0, 1e4)), quantize=st.booleans())
def test_relative_depth_conversions(values: Any, quantize: bool) -> None:
    d = probe("geometry", geometry.depth_image_to_relative, values)
    if d is not None:
        assert d.shape == np.shape(values) and d.min() >= 0 and d.max() <= 1
    r = probe("geometry", geometry.disparity_to_relative_depth, values, quantize)
    if r is not None:
        assert tuple(r.shape) == np.shape(values) and float(r.min()) >= 0 and float(r.max()) <= 1
        probe("geometry", geometry.relative_depth_to_points, r)
    p = probe("geometry", geometry.relative_depth_to_points, values)
    if p is not None:
        assert tuple(p.shape) == (*tuple(np.shape(values)), 3)


@PROPS
@given(
    points=points_st(),
    grid=st.one_of(st.integers(-2, 6), st.tuples(st.integers(0, 4), st.integers(1, 4)), garbage()),
    valid=st.one_of(st.none(), any_array()),
)
def test_pool_to_grid(points: Any, grid: Any, valid: Any) -> None:
    out = probe("geometry", geometry.pool_to_grid, points, grid, valid)
    if out is not None:
        g, cover = out
        gh, gw = (grid, grid) if isinstance(grid, int) else grid
        assert tuple(g.shape) == (*tuple(np.shape(points)[:-3]), gh, gw, 3)
        assert tuple(cover.shape) == tuple(g.shape[:-1])


@st.composite
def box_args(draw: Callable) -> tuple[Any, Any, Any]:
    center = draw(st.one_of(float_array((3,), -20, 20), garbage(), st.just([1e300, 0.0, 0.0])))
    size = draw(st.one_of(float_array((3,), 0.01, 5), garbage()))
    rot = draw(
        st.one_of(
            rotation_st(),
            st.just(np.full((3, 3), np.nan)),
            st.just(np.diag([1.0, 1.0, -1.0])),
            st.just(np.eye(3) * 2),
            garbage(),
        )
    )
    return center, size, rot


@PROPS
@given(args=box_args(), points=st.one_of(float_array((4, 3), -30, 30), garbage()), yaw=st.sampled_from(SPECIAL))
def test_box3d(args: tuple[Any, Any, Any], points: Any, yaw: float) -> None:
    box = probe("geometry", geometry.Box3D, *args)
    probe("geometry", geometry.Box3D.from_center_size_yaw, args[0], args[1], yaw)
    if box is not None:
        probe("geometry", box.corners)
        inside = probe("geometry", box.contains, points)
        if inside is not None:
            assert tuple(inside.shape) == tuple(np.shape(points))[:-1]
        probe("geometry", geometry.box_iou_3d_axis_aligned, box, box)


@PROPS
@given(
    points=st.one_of(float_array((5, 3), -1e3, 1e3), any_array()),
    k=st.one_of(intrinsics_st(), garbage()),
    pose=st.one_of(st.none(), pose_st(), garbage()),
)
def test_project_points(points: Any, k: Any, pose: Any) -> None:
    out = probe("geometry", geometry.project_points, points, k, pose)
    if out is not None:
        uv, _z = out
        assert tuple(uv.shape) == (*tuple(np.shape(points))[:-1], 2)


@PROPS
@given(
    k=intrinsics_st(),
    pose=st.one_of(pose_st(), garbage()),
    size=st.one_of(st.tuples(st.integers(-1, 6), st.integers(1, 8)), garbage()),
    depth=st.one_of(st.none(), depth_st(v=1, h=6, w=8), any_array()),
    tol=st.sampled_from([0.05, -1.0, math.nan, 0.0]),
)
def test_project_box_to_masks(k: Any, pose: Any, size: Any, depth: Any, tol: float) -> None:
    box = geometry.Box3D.from_center_size_yaw([0.0, 0.0, 2.0], [1.0, 1.0, 1.0])
    out = probe("geometry", geometry.project_box_to_masks, box, k, pose, size, depth, tol)
    if out is not None:
        assert out.dtype == torch.bool and tuple(out.shape[-2:]) == tuple(size)


# ----------------------------------------------------------------------------------------------
# tiling
# ----------------------------------------------------------------------------------------------

SIZE = st.one_of(st.integers(-3, 2000), st.sampled_from([0, True, 2.5, None, "7", 10**12]))


@PROPS
@given(w=SIZE, h=SIZE, lo=st.integers(-1, 4), hi=st.one_of(st.integers(-1, 14), st.just(10**6)), tile=SIZE)
def test_tile_plan(w: Any, h: Any, lo: int, hi: int, tile: Any) -> None:
    probe("tiling", tiling.candidate_grids, lo, hi)
    layout = probe("tiling", tiling.plan_tiles, w, h, lo, hi, tile)
    if layout is not None:
        assert lo <= layout.num_grid_tiles <= hi
        boxes = layout.tile_boxes()
        assert len(boxes) == layout.cols * layout.rows
    probe("tiling", tiling.frame_layout, tile)
    probe("tiling", tiling.TileLayout, w, h, tile)


@st.composite
def layout_st(draw: Callable) -> Any:
    if draw(st.integers(0, 5)) == 0:
        return draw(garbage())
    return tiling.TileLayout(
        draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 6)), draw(st.booleans())
    )


@PROPS
@given(
    x=st.one_of(any_array(max_dims=3, max_side=6), points_st()),
    layout=layout_st(),
    mode=st.sampled_from(["cv2_area", "cv2_nearest", "area", "bilinear", "lanczos"]),
)
def test_tile_arrays(x: Any, layout: Any, mode: str) -> None:
    t = x if not isinstance(x, np.ndarray) or x.dtype.kind != "f" else torch.from_numpy(np.ascontiguousarray(x))
    out = probe("tiling", tiling.tile_array, t, layout, mode)
    if out is not None:
        assert tuple(out.shape) == (layout.num_tiles, np.shape(x)[0], layout.tile_size, layout.tile_size)
    m = probe("tiling", tiling.tile_mask, x, layout)
    if m is not None:
        assert m.dtype == torch.bool and m.shape[0] == layout.num_tiles
    pm = np.asarray(x)[0] if np.ndim(x) == 4 and np.shape(x)[0] else x
    tiles = probe("tiling", tiling.tile_pointmap, pm, layout, None)
    if tiles is not None:
        assert tuple(tiles[0].shape) == (layout.num_tiles, layout.tile_size, layout.tile_size, 3)
    if isinstance(x, np.ndarray) and x.ndim == 3 and x.dtype.kind == "f":
        probe("tiling", tiling.resize_area_cv2, torch.from_numpy(np.ascontiguousarray(x)), (2, 3))


@PROPS
@given(
    size=st.one_of(st.tuples(st.integers(-1, 9), st.integers(-1, 9)), garbage()),
    layout=layout_st(),
    a=st.integers(-2, 50),
    b=st.one_of(st.integers(-2, 50), garbage()),
)
def test_tile_image_and_resize_tables(size: Any, layout: Any, a: int, b: Any) -> None:
    if isinstance(size, tuple) and min(size) > 0:
        img = Image.new("RGB", size)
        out = probe("tiling", tiling.tile_image, img, layout)
        if out is not None:
            assert len(out) == layout.num_tiles
            assert all(t.size == (layout.tile_size, layout.tile_size) for t in out)
    probe("tiling", tiling.cv2_area_matrices, size, (a, 3))
    probe("tiling", tiling.cv2_nearest_indices, a, b)


# ----------------------------------------------------------------------------------------------
# regions and masks
# ----------------------------------------------------------------------------------------------

SPEC_WORDS = st.sampled_from(
    [
        "frame=0",
        "frame=1",
        "frame=-1",
        "frame=@1",
        "frame=@",
        "box=1,1,5,4",
        "box=0,0,0,0",
        "box=nan,1,2,3",
        "box=1,2",
        "box=-100,-100,-50,-50",
        "box=1e308,0,1e309,3",
        "polygon=1,1,6,1,3,5",
        "polygon=1,1",
        "box3d=0,0,2,1,1,1",
        "box3d=1e300,0,2,1,1,1",
        "box3d=0,0,2,1,1,-1",
        "box3d=0,0,2,1,1,1,nan",
        "mask=missing.png",
        "rle=missing.json",
        "label=chair",
        "label='a b'",
        "'",
        "=",
        "x=1",
    ]
)


@PROPS
@given(words=st.lists(SPEC_WORDS, min_size=0, max_size=4), n_frames=st.integers(1, 2))
def test_region_specs(words: list[str], n_frames: int) -> None:
    text = " ".join(words)
    spec = probe("regions", regions.parse_region_spec, text)
    frames = posed_frames(n_frames)
    out = probe("regions", regions.resolve_regions, [text], frames)
    if out is not None:
        assert len(out) == 1 and all(m.shape == (6, 8) for m in out[0].masks.values())
        probe("regions", regions.region_summary, out[0], 0, frames, spec)


RECORD_VALUES = st.one_of(
    st.lists(st.one_of(st.floats(-10, 10), st.sampled_from(SPECIAL)), max_size=8),
    st.just([1.0, 1.0, 5.0, 4.0]),
    st.just([0.0, 0.0, 2.0, 1.0, 1.0, 1.0]),
    garbage(),
)


@PROPS
@given(
    kind=st.sampled_from(["box", "polygon", "box3d", "rle", "mask", "nope"]),
    value=RECORD_VALUES,
    frame=st.one_of(st.none(), st.integers(-1, 3), st.sampled_from(["@0", "@9", "0", True, 1.5])),
)
def test_region_from_record(kind: str, value: Any, frame: Any) -> None:
    item: dict[str, Any] = {kind: value}
    if frame is not None:
        item["frame"] = frame
    if kind == "rle" and isinstance(value, list):
        item[kind] = {"size": [6, 8], "counts": value}
    out = probe("regions", regions.region_from_record, item, posed_frames(2))
    if out is not None:
        assert all(m.shape == (6, 8) and m.any() for m in out.masks.values())


@PROPS
@given(
    kind=st.sampled_from([*list(regions.REGION_KINDS), "other"]),
    values=st.lists(st.one_of(st.floats(-5, 5), st.sampled_from(SPECIAL), st.just(True)), max_size=8),
    frame=st.one_of(st.none(), st.integers(-2, 3), st.just(1.5)),
    question=st.one_of(
        st.text(max_size=12), st.sampled_from(["<mask>", "<region0> <region3>", "<image> hi"]), garbage()
    ),
)
def test_region_objects_and_questions(kind: str, values: list, frame: Any, question: Any) -> None:
    spec = probe("regions", regions.RegionSpec, kind, "t", frame, None, tuple(values), "f.png")
    if spec is not None:
        probe("regions", regions.resolve_regions, [spec], posed_frames(2))
    probe("regions", regions.box3d_masks, values, posed_frames(2))
    probe("regions", regions.check_question, question, 1)
    probe("regions", regions.count_region_references, question)


@PROPS
@given(
    mask=st.one_of(any_array(max_dims=3, max_side=7), hnp.arrays(np.bool_, (5, 7))),
    size=st.one_of(st.tuples(st.integers(-1, 14), st.integers(-1, 10)), garbage()),
    coords=st.one_of(st.lists(st.one_of(st.floats(-5, 20), st.sampled_from(SPECIAL)), max_size=9), garbage()),
)
def test_mask_codecs(mask: Any, size: Any, coords: Any) -> None:
    rle = probe("masks", masks.encode_coco_rle, mask)
    if rle is not None:
        back = probe("masks", masks.decode_coco_rle, rle)
        assert np.array_equal(back, np.asarray(mask).astype(bool))  # the codecs round-trip
        probe("masks", masks.decode_coco_rle, {**rle, "size": size})
    probe("masks", masks.fit_mask, mask, size, "mask")
    probe("masks", masks.polygon_mask, coords, size)


# ----------------------------------------------------------------------------------------------
# sources and point maps
# ----------------------------------------------------------------------------------------------


@PROPS
@given(
    v=st.integers(1, 3),
    depth=st.one_of(st.none(), depth_st(h=4, w=5), any_array()),
    k=st.one_of(st.none(), intrinsics_st(4, 5), garbage()),
    pose=st.one_of(st.none(), pose_st(), garbage()),
    source=st.sampled_from(["auto", "gt_depth", "relative_depth"]),
)
def test_frameset_sources_and_positions(v: int, depth: Any, k: Any, pose: Any, source: str) -> None:
    kw: dict[str, Any] = {}
    for name, value, item in (("depth", depth, 2), ("intrinsics", k, 2), ("cam_to_world", pose, 2)):
        if value is None:
            continue
        kw[name] = value
        if isinstance(value, np.ndarray) and value.ndim == item:
            kw[name] = np.repeat(value[None], v, axis=0)  # one per frame
    fs = probe("sources", frameset, v, 4, 5, **kw)
    if fs is None:
        return
    choice = probe("sources", pointmap.choose_source, fs)
    if choice == "gt_depth":
        pm = probe("sources", pointmap_sources.GTDepthSource().pointmaps, fs)
        if pm is not None:
            assert tuple(pm.xyz.shape) == (v, 4, 5, 3)
            probe("pointmap", pointmap.canonical_pointmaps, pm)
    if fs.depth is not None:
        probe("sources", pointmap_sources.RelativeDepthSource().pointmaps, fs)
    out = probe("visual_inputs", positions, fs, source)
    if out is not None:
        canonical, _, _ = out
        assert tuple(canonical.shape[:3]) == (v, *np.shape(fs.depth)[1:])
        pos = probe("pointmap", pointmap.frame_token_positions, canonical, None, 4, 8)
        if pos is not None:
            assert tuple(pos.shape) == (v, 4, 4, 3)


@PROPS
@given(
    xyz=points_st(),
    valid=st.one_of(st.none(), any_array()),
    conf=st.one_of(st.none(), any_array()),
    min_conf=st.one_of(st.none(), st.sampled_from([0.5, math.nan, -math.inf])),
)
def test_pointmaps_and_reconstructions(xyz: Any, valid: Any, conf: Any, min_conf: Any) -> None:
    vmask = np.ones(np.shape(xyz)[:-1], bool) if valid is None and np.ndim(xyz) >= 1 else valid
    probe("sources", base.PointMaps, xyz, vmask, conf)
    rec = probe("sources", reconstruction.reconstruction_from_array, xyz)
    if rec is not None:
        assert rec.xyz.dtype == np.float32 and rec.valid.shape == rec.xyz.shape[:3]
        fs = frameset(len(rec), rec.xyz.shape[1], rec.xyz.shape[2])
        src = probe("sources", reconstruction.ReconstructionSource, xyz, min_conf)
        if src is not None:
            probe("sources", src.pointmaps, fs)


@PROPS
@given(
    canonical=st.one_of(float_array((3, 4, 3), -1, 1), any_array()),
    valid=st.one_of(st.none(), any_array(), hnp.arrays(np.bool_, (3, 4))),
    total=st.one_of(st.integers(-2, 100), garbage()),
    count=st.one_of(st.integers(-2, 40), garbage()),
    fid=st.one_of(st.text(max_size=8), st.integers(-5, 10**20)),
)
def test_pointmap_helpers_and_frame_sampling(canonical: Any, valid: Any, total: Any, count: Any, fid: Any) -> None:
    rgb = probe("pointmap", pointmap.colour_pointmap, canonical, valid)
    if rgb is not None:
        assert rgb.dtype == np.uint8 and rgb.shape == np.shape(canonical)
    layout = tiling.plan_tiles(8, 6, 1, 4, 4)
    pos = probe("pointmap", pointmap.image_token_positions, canonical, layout, 2, None)
    if pos is not None:
        assert tuple(pos.shape) == (layout.num_tiles, 2, 2, 3)
    idx = probe("sources", base.uniform_frame_indices, total, count)
    if idx is not None:
        assert idx == sorted(set(idx)) and len(idx) == min(total, count) and idx[0] >= 0 and idx[-1] < total
    probe("sources", base.normalise_frame_id, fid)
    probe("sources", resolve_dtype, fid, torch.device("cpu"))


@pytest.fixture(scope="module")
def npz_dir(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("probe_files")


@PROPS
@given(arr=st.one_of(any_array(), points_st(), depth_st()), scale=st.sampled_from([1000.0, 0.0, math.nan, -1.0]))
def test_files(npz_dir: Any, arr: Any, scale: float) -> None:
    np.save(npz_dir / "a.npy", arr)
    np.savez(npz_dir / "r.npz", xyz=arr)
    np.savetxt(npz_dir / "m.txt", np.atleast_2d(arr.real.astype(np.float64)).reshape(-1, 1)[:16].reshape(-1, 1).T)
    m = probe("sources", files.read_matrix, npz_dir / "a.npy", passes_non_finite=True)
    if m is not None and np.isfinite(arr.astype(np.complex128)).all():
        assert np.isfinite(m).all()
    probe("sources", files.load_intrinsics_file, npz_dir / "a.npy")
    probe("sources", files.load_intrinsics_file, npz_dir / "m.txt")
    m = probe("sources", files.load_pose_file, npz_dir / "a.npy", passes_non_finite=True)
    if m is not None and np.isfinite(arr.astype(np.complex128)).all():
        assert np.isfinite(m).all()
    d = probe("sources", files.load_depth_file, npz_dir / "a.npy", scale)
    if d is not None:
        assert d.dtype == np.float32 and d.ndim == 2
    rec = probe("sources", reconstruction.load_reconstruction, npz_dir / "r.npz")
    if rec is not None:
        assert rec.xyz.ndim == 4 and np.isfinite(rec.xyz).all()


# ----------------------------------------------------------------------------------------------
# visual inputs and records
# ----------------------------------------------------------------------------------------------


class _Config:
    num_video_frames = 4
    use_position_encoding = True
    canonical_mode = "sr3d"


FIELD_VALUES = st.one_of(
    st.none(),
    st.sampled_from([0, -1, 2, 1.5, "x", True, math.nan, 5.0, 1000.0, [], [[1.0]]]),
    st.just(np.eye(3).tolist()),
    st.just([[[6.0, 0, 4], [0, 6.0, 3], [0, 0, 2.0]]] * 2),
    st.just([np.eye(4).tolist()] * 2),
    st.just([[[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 0], [0, 0, 0, 1]]] * 2),
)


@PROPS
@given(
    depth_scale=FIELD_VALUES,
    intrinsics=FIELD_VALUES,
    poses=FIELD_VALUES,
    num_frames=FIELD_VALUES,
    with_depth=st.booleans(),
)
def test_records_and_read_frames(
    depth_scale: Any, intrinsics: Any, poses: Any, num_frames: Any, with_depth: bool
) -> None:
    imgs = [np.full((6, 8, 3), 30 * i, np.uint8) for i in range(2)]
    rec: dict[str, Any] = {
        "id": "r",
        "frames": imgs,
        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}],
    }
    for key, value in (
        ("depth_scale", depth_scale),
        ("intrinsics", intrinsics),
        ("poses", poses),
        ("num_frames", num_frames),
    ):
        if value is not None:
            rec[key] = value
    if with_depth:
        rec["depth"] = [np.full((6, 8), 1.5, np.float32)] * 2
    probe("records", validate_record, {k: v for k, v in rec.items() if k != "frames"} | {"frames": ["a.png"]})
    reader = RecordReader(_Config())
    fs = probe("records", reader.frames, rec, os.getcwd())
    if fs is not None:
        assert len(fs) >= 1
        probe("records", reader.positions, rec, fs, os.getcwd())
    probe(
        "visual_inputs",
        read_frames,
        frames=imgs,
        depth=rec.get("depth"),
        intrinsics=intrinsics,
        poses=poses,
        num_frames=num_frames if num_frames is not None else 2,
        depth_scale=depth_scale if depth_scale is not None else 1000.0,
    )


# ----------------------------------------------------------------------------------------------
# invariants
# ----------------------------------------------------------------------------------------------


@PROPS
@given(
    depth=depth_st(v=2, h=4, w=5).filter(lambda d: d.dtype == np.float64 and np.isfinite(d).all() and (d >= 0).all()),
    poses=st.lists(pose_st(valid_only=True), min_size=2, max_size=2),
    shift=float_array((3,), -50, 50),
    scale=float_array((3,), 0.1, 10),
)
def test_canonical_space_ignores_scene_translation_and_axis_scale(
    depth: np.ndarray, poses: list, shift: np.ndarray, scale: np.ndarray
) -> None:
    """All frames moved together (and stretched per world axis) land on the same canonical points:
    the canonical space depends on the scene's extent only. (It is *not* invariant to rotations of the
    whole scene: the released convention takes axis-aligned min/max.)"""
    k = np.array([[4.0, 0, 2.5], [0, 4.0, 2.0], [0, 0, 1]])
    world = geometry.backproject(depth, k, np.stack(poses)).numpy()
    c1 = geometry.canonicalize(world).numpy()
    c2 = geometry.canonicalize(world * scale + shift).numpy()
    span = world.reshape(-1, 3).max(0) - world.reshape(-1, 3).min(0)
    keep = span > 1e-6  # a degenerate axis maps to 0 either way
    assert np.allclose(c1[..., keep], c2[..., keep], atol=1e-6)
    moved = [np.asarray(p).copy() for p in poses]
    for p in moved:
        p[:3, 3] += shift
    c3 = geometry.canonicalize(geometry.backproject(depth, k, np.stack(moved))).numpy()
    assert np.allclose(c1[..., keep], c3[..., keep], atol=1e-6)


@PROPS
@given(
    depth=hnp.arrays(np.float64, (4, 5), elements=st.floats(0.2, 20)),
    pose=pose_st(valid_only=True),
    f=st.tuples(st.floats(0.5, 500), st.floats(0.5, 500)),
    c=st.tuples(st.floats(-5, 10), st.floats(-5, 10)),
)
def test_projection_inverts_backprojection(depth: np.ndarray, pose: np.ndarray, f: tuple, c: tuple) -> None:
    k = np.array([[f[0], 0.0, c[0]], [0.0, f[1], c[1]], [0.0, 0.0, 1.0]])
    pts = geometry.backproject(depth, k, pose).reshape(-1, 3)
    uv, z = geometry.project_points(pts, k, pose)
    v, u = np.meshgrid(np.arange(4), np.arange(5), indexing="ij")
    assert np.allclose(uv.numpy(), np.stack([u.ravel(), v.ravel()], -1), atol=1e-5)
    assert np.allclose(z.numpy(), depth.ravel(), rtol=1e-9)


@PROPS
@given(
    w=st.integers(1, 3000),
    h=st.integers(1, 3000),
    hi=st.integers(1, 12),
    tile=st.sampled_from([14, 448]),
    thumb=st.booleans(),
)
def test_tile_plan_covers_the_image(w: int, h: int, hi: int, tile: int, thumb: bool) -> None:
    """The tiles of a plan partition the resized image exactly; a thumbnail comes only with >1 tile."""
    layout = tiling.plan_tiles(w, h, 1, hi, tile, thumb)
    rw, rh = layout.resized_size
    cover = np.zeros((rh, rw), np.int32)
    for x0, y0, x1, y1 in layout.tile_boxes():
        assert x1 - x0 == tile and y1 - y0 == tile
        cover[y0:y1, x0:x1] += 1
    assert (cover == 1).all()
    assert layout.num_tiles == layout.cols * layout.rows + int(thumb and layout.cols * layout.rows > 1)
    assert (layout.cols, layout.rows) in tiling.candidate_grids(1, hi)


def test_known_silent_wrong_answers_are_refused(tmp_path: Any) -> None:
    """The inputs of issue 12 that used to give a wrong answer without a word."""
    np.savez(tmp_path / "complex.npz", xyz=np.ones((1, 2, 2, 3), np.complex128) * (1 + 2j))
    with pytest.raises(SR3DError, match="complex"):
        reconstruction.load_reconstruction(tmp_path / "complex.npz")
    np.save(tmp_path / "complex.npy", np.ones((3, 3), np.complex64))
    with pytest.raises(SR3DError, match="real numbers"):
        files.read_matrix(tmp_path / "complex.npy")
    depth = np.full((4, 5), 2.0)
    k = np.array([[4.0, 0, 2.0], [0, 4.0, 2.0], [0, 0, 1]])
    with pytest.raises(SR3DError, match=r"last row .*\[0, 0, 1\].*divide it by K\[2, 2\]"):
        geometry.backproject(depth, k * 2)
    skewed = k.copy()
    skewed[0, 1] = 0.5
    with pytest.raises(SR3DError, match="skew"):
        geometry.backproject(depth, skewed)
    with pytest.raises(SR3DError, match="non-finite"):
        geometry.Box3D([0, 0, 0], [1, 1, 1], np.full((3, 3), np.nan))
    with pytest.raises(SR3DError, match="det = -1"):
        geometry.Box3D([0, 0, 0], [1, 1, 1], np.diag([1.0, 1.0, -1.0]))
    with pytest.raises(SR3DError, match="box center .* out of range"):
        geometry.Box3D([1e300, 0, 0], [1, 1, 1], np.eye(3))
    huge = torch.tensor([[3e38, -3e38, 1.0], [-3e38, 3e38, 2.0]], dtype=torch.float32)
    out = geometry.canonicalize(huge)
    assert torch.isfinite(out).all() and out.dtype == torch.float32
    assert torch.equal(out[:, :2].abs(), torch.ones(2, 2))
    with pytest.raises(SR3DError, match="complex"):
        reconstruction.reconstruction_from_array(np.ones((1, 2, 2, 3), np.complex64))
    with pytest.raises(SR3DError, match="2-D or 3-D"):
        geometry.disparity_to_relative_depth(np.arange(5.0))
    for g in (0, -1):
        with pytest.raises(SR3DError, match="grid_size"):
            geometry.pool_to_grid(torch.zeros(4, 4, 3), g)
    frames = frameset(2, 4, 5, depth=np.ones((2, 4, 5)), intrinsics=np.stack([k, k]))
    with pytest.raises(SR3DError, match="no camera poses.*poses="):
        positions(frames)
    single = frameset(1, 4, 5, depth=np.ones((1, 4, 5)), intrinsics=k[None])
    canonical, _, info = positions(single)  # one frame: its camera frame is the world frame
    assert info["source"] == "gt_depth" and torch.isfinite(canonical).all()
    with pytest.raises(SR3DError, match="depth_scale"):
        RecordReader(_Config()).frames({"id": "r", "image": np.zeros((4, 4, 3), np.uint8), "depth_scale": None}, ".")


# ----------------------------------------------------------------------------------------------
# the remaining entry points: whole visual inputs, estimators, files with arbitrary content
# ----------------------------------------------------------------------------------------------


class _Estimator:
    """A stand-in depth estimator returning whatever the example says (the source must check it)."""

    def __init__(self, out: Any) -> None:
        self.out = out

    def estimate(self, images: Any) -> Any:
        return self.out


@PROPS
@given(
    est=st.one_of(any_array(), float_array((2, 6, 8), 0, 1), float_array((2, 6, 8), -5, 5)),
    depth=st.one_of(st.none(), depth_st(v=2, h=6, w=8)),
    regions_=st.lists(SPEC_WORDS, max_size=2),
)
def test_whole_visual_inputs(est: Any, depth: Any, regions_: list[str]) -> None:
    fs = frameset(2, 6, 8)
    pm = probe("sources", pointmap_sources.DepthAnythingSource(_Estimator(est)).pointmaps, fs)
    if pm is not None:
        assert tuple(pm.xyz.shape) == (2, 6, 8, 3)
    probe("geometry", geometry.valid_depth_mask, est)
    imgs = [np.zeros((6, 8, 3), np.uint8)] * 2
    k = np.array([[6.0, 0, 4], [0, 6.0, 3], [0, 0, 1]])
    poses = np.repeat(np.eye(4)[None], 2, axis=0)
    bundle = probe(
        "visual_inputs",
        visual_input,
        frames=imgs,
        depth=None if depth is None else list(depth),
        intrinsics=k,
        poses=poses,
        regions=[" ".join(regions_)] if regions_ else (),
        needs_positions=depth is not None,
    )
    if bundle is not None:
        assert len(bundle.visual.regions) == (1 if regions_ else 0)
        probe("visual_inputs", bundle.summary)
        res = probe("pointmap", pointmap.pointmaps_with_cache, bundle.frames, cache=False)
        if res is not None:
            assert tuple(res.canonical.shape) == (2, 6, 8, 3)


@PROPS
@given(
    content=st.one_of(
        st.binary(max_size=40),
        st.text(max_size=40),
        st.sampled_from(
            ["[]", "[1]", '{"id": 1}', "[{}]", '{"size": [2, 2], "counts": [1, 3]}', '{"size": [2, 2], "counts": "0"}']
        ),
    )
)
def test_files_with_arbitrary_content(npz_dir: Any, content: Any) -> None:
    for name in ("x.json", "x.jsonl", "x.png", "x.txt"):
        path = npz_dir / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    probe("records", load_records, npz_dir / "x.json")
    probe("records", load_records, npz_dir / "x.jsonl")
    probe("masks", masks.load_rle_file, npz_dir / "x.json")
    probe("masks", masks.load_mask_image, npz_dir / "x.png")
    probe("sources", files.read_matrix, npz_dir / "x.txt", passes_non_finite=True)
    probe("sources", files.load_rgb, npz_dir / "x.png")
    probe("sources", files.load_depth_file, npz_dir / "x.png")


@PROPS
@given(
    turns=st.lists(
        st.fixed_dictionaries(
            {
                "from": st.sampled_from(["human", "gpt", "system", "x"]),
                "value": st.one_of(st.text(max_size=10), st.sampled_from(["<image>\nhi", "<video>"]), st.none()),
            }
        ),
        max_size=3,
    ),
    n=st.integers(-1, 3),
)
def test_record_messages(turns: list, n: int) -> None:
    rec = {"id": "r", "conversations": turns}
    probe("records", validate_record, rec)
    try:
        validate_record(rec)
    except SR3DError:
        return
    out = probe("records", record_messages, rec, n)
    if out is not None and n > 0:
        assert out[[m["role"] for m in out].index("user")]["content"].startswith("<image>" * n)


@PROPS
@given(a=garbage(), b=garbage())
def test_source_options(a: Any, b: Any) -> None:
    """Every reader and point-map source checks its options when it is made."""
    from sr3d_plugin.sources.images import FramesReader, ImageReader
    from sr3d_plugin.sources.scannet import ScanNetReader
    from sr3d_plugin.sources.video import VideoReader

    probe("sources", pointmap_sources.GTDepthSource, "sr3d", a, 0.02)
    probe("sources", pointmap_sources.GTDepthSource, "robust", None, b)
    probe("sources", pointmap_sources.RelativeDepthSource, False, True, "sr3d", a)
    probe("sources", reconstruction.ReconstructionSource, np.zeros((1, 2, 2, 3)), a, "robust", b)
    probe("sources", FramesReader, a, 1000.0)
    probe("sources", FramesReader, None, b)
    probe("sources", ImageReader, depth_scale=a)
    probe("sources", ScanNetReader, a, 1000.0)
    probe("sources", ScanNetReader, 2, b)
    probe("sources", VideoReader, a)
    probe("sources", base.FrameSet, a)
    probe("visual_inputs", read_frames, image=np.zeros((4, 4, 3), np.uint8), num_frames=a, depth_scale=1000.0)
    probe("visual_inputs", read_frames, image=np.zeros((4, 4, 3), np.uint8), depth_scale=b)


def test_degenerate_inputs_of_issue_12_get_clear_errors() -> None:
    """The raw tracebacks of issue 12, each now an SR3DError that names the parameter."""
    k = np.array([[4.0, 0, 2.0], [0, 4.0, 2.0], [0, 0, 1]])
    cases: list[tuple[Callable[[], Any], str]] = [
        (lambda: geometry.relative_depth_to_points(np.zeros((0, 0))), "depth01"),
        (lambda: geometry.canonicalize(np.float32(1.0)), "points"),
        (lambda: geometry.project_points(np.zeros((2, 2)), k), "points"),
        (lambda: tiling.plan_tiles(10, 10, tile_size=0), "tile_size"),
        (lambda: tiling.tile_image(Image.new("RGB", (4, 4)), tiling.TileLayout(1, 1, 0)), "tile_size"),
        (lambda: geometry.pool_to_grid(np.zeros((0, 4, 3)), 2), "points"),
        (lambda: geometry.depth_image_to_relative(np.zeros((0, 3))), "values"),
        (lambda: tiling.candidate_grids(1, 10**6), "max_tiles"),
    ]
    reader = RecordReader(_Config())
    image = np.zeros((4, 4, 3), np.uint8)
    for value, name in (({"depth_scale": None}, "depth_scale"), ({"intrinsics": 5.0}, "intrinsics")):
        rec = {"id": "r", "image": image, **value}
        cases.append((lambda rec=rec: reader.frames(rec, "."), name))
    cases.append((lambda: reader.frames({"id": "r", "frames": [image, image], "poses": 3.0}, "."), "poses"))
    for call, name in cases:
        with pytest.raises(SR3DError, match=name):
            call()
