"""Spatial question answering on synthetic scenes, generated from exact geometry.

Two kinds of scenes:

* **Single view** (:func:`single_view_scene`): floating boxes in a fixed room seen by a fixed camera.
  Each object's image position and angular size are drawn *independently of its depth*, and its 3D
  box is the same box scaled by its depth about the camera centre — a pinhole camera sees exactly
  the same picture at any depth. Objects never overlap in the image (no occlusion cue) and never
  touch the room. So apparent size, image position, shading and texture carry no information about
  depth: depth questions are answerable only from 3D positions. Because the room and camera are
  fixed, the canonical space of every single-view scene is the same affine map of camera
  coordinates (the bounds come from the room), so metric distances are learnable from it.
* **Multi view** (:func:`multi_view_scene`, :mod:`sr3d_plugin.synthetic.crossframe`): floating boxes
  in a fixed 8 m room seen by ``F`` shuffled cameras standing near its centre, each box placed in one
  camera's view with its depth independent of its image position and size. Cross-frame questions
  relate objects that no frame shows together; each region is drawn on a frame of its own object.

Question families (answers are short texts; region answers are ``"Region [k]"``):

====================  ========  ==========================================================
family                depth?    question
====================  ========  ==========================================================
closer                yes       which of two regions is closer to the camera
front_behind          yes       is A in front of or behind B
left_right            no        is A to the left or right of B
above_below           no        is A above or below B
distance              yes       how far apart are A and B (4 buckets)
larger                partly    which of two regions is larger in 3D
closer_to_third       yes       which of A, B is closer to C
count                 no        how many <colour> objects are there
mv_distance           yes       distance between regions drawn on two different frames
mv_closer_to_third    yes       which of A, B is closer to C (C never seen with A or B)
mv_closest_of_three   yes       which of A, B, C is closest to D (D never seen with them)
====================  ========  ==========================================================

Splits are by scene: each split draws its scene seeds from its own disjoint range, so held-out
scenes come from seeds never used in training.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import multiprocessing
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.geometry import Box3D, backproject, canonicalize
from sr3d_plugin.modeling.inputs import Region, VisualInput
from sr3d_plugin.synthetic.crossframe import COLORS, CROSS_FRAME_ROOM, CrossFrameScene, cross_frame_scene
from sr3d_plugin.synthetic.render import render
from sr3d_plugin.synthetic.scene import Room, SceneObject, look_at, pinhole_intrinsics

__all__ = [
    "ANSWER_CHOICES",
    "CROSS_FRAME_ROOM",
    "DEMO_SEED_BASE",
    "DEPTH_FAMILIES",
    "DISTANCE_BUCKETS",
    "MULTI_VIEW_FAMILIES",
    "MV_COMPARE_MARGIN",
    "MV_DISTANCE_BUCKETS",
    "MV_EDGE_MARGIN",
    "SINGLE_VIEW_FAMILIES",
    "SPLIT_SEED_BASE",
    "CrossFrameScene",
    "QASample",
    "SpatialQAConfig",
    "SpatialQADataset",
    "heuristic_baselines",
    "make_sample",
    "multi_view_scene",
    "scene_questions",
    "single_view_scene",
    "training_samples",
]

SINGLE_VIEW_FAMILIES = (
    "closer",
    "front_behind",
    "left_right",
    "above_below",
    "distance",
    "larger",
    "closer_to_third",
    "count",
)
MULTI_VIEW_FAMILIES = ("mv_distance", "mv_closer_to_third", "mv_closest_of_three")
#: families whose answer needs depth (the de-biased ones)
DEPTH_FAMILIES = (
    "closer",
    "front_behind",
    "distance",
    "closer_to_third",
    "mv_distance",
    "mv_closer_to_third",
    "mv_closest_of_three",
)

#: (upper bound in metres, answer text) for the 4 distance buckets
DISTANCE_BUCKETS: tuple[tuple[float, str], ...] = (
    (1.0, "Under 1 meter"),
    (2.0, "1 to 2 meters"),
    (3.0, "2 to 3 meters"),
    (math.inf, "Over 3 meters"),
)
#: cross-frame pairs (never seen together) are far apart; edges at the quartiles of their distances
MV_DISTANCE_BUCKETS: tuple[tuple[float, str], ...] = (
    (2.6, "Under 2.6 meters"),
    (3.3, "2.6 to 3.3 meters"),
    (4.0, "3.3 to 4 meters"),
    (math.inf, "Over 4 meters"),
)
#: cross-frame distances closer than this to a bucket edge are not asked (metres)
MV_EDGE_MARGIN = 0.15
#: "closer / closest" cross-frame questions need the two nearest distances this far apart (metres)
MV_COMPARE_MARGIN = 0.6


#: all answer strings per family (the choices a scorer can rank)
ANSWER_CHOICES: dict[str, tuple[str, ...]] = {
    "closer": ("Region [0]", "Region [1]"),
    "front_behind": ("In front", "Behind"),
    "left_right": ("Left", "Right"),
    "above_below": ("Above", "Below"),
    "distance": tuple(text for _, text in DISTANCE_BUCKETS),
    "larger": ("Region [0]", "Region [1]"),
    "closer_to_third": ("Region [0]", "Region [1]"),
    "count": ("0", "1", "2", "3", "4"),
    "mv_distance": tuple(text for _, text in MV_DISTANCE_BUCKETS),
    "mv_closer_to_third": ("Region [0]", "Region [1]"),
    "mv_closest_of_three": ("Region [0]", "Region [1]", "Region [2]"),
}

#: scene-seed ranges of the splits (disjoint)
SPLIT_SEED_BASE = {"train": 1_000_000, "val": 2_000_000, "test": 3_000_000}


@dataclass
class SpatialQAConfig:
    """Knobs of the generator (defaults: 64×64 renders, the tiny model's tile size)."""

    image_size: int = 64
    hfov_deg: float = 60.0
    depth_range: tuple[float, float] = (1.8, 6.2)
    angular_half_size: tuple[float, float] = (0.06, 0.12)
    num_objects: tuple[int, int] = (2, 4)
    num_frames: int = 6
    mv_image_size: int = 64
    min_region_pixels: int = 10
    box_probability: float = 0.5


# ----------------------------------------------------------------------------------------------
# single-view scenes
# ----------------------------------------------------------------------------------------------

#: camera height above the floor and the fixed room of single-view scenes (see module docstring)
_SV_CAMERA_HEIGHT = 0.9
_SV_ROOM = Room(lower=[-4.5, -0.5, 0.0], upper=[4.5, 8.0, 5.0])


@dataclass
class _SVObject:
    source: SceneObject | Callable[[], SceneObject]  # the object, or how to build it (on first use)
    depth: float  # camera z-depth of the centre, metres
    center_cam: np.ndarray  # [3] camera coordinates, metres
    image_center: np.ndarray  # [2] normalised image coordinates (x/z, y/z) of the centre
    angular_area: float  # (2·ax)·(2·az), normalised image units²
    color_name: str

    @property
    def obj(self) -> SceneObject:
        """The object (built lazily: most placements are rejected before anything needs their box)."""
        if not isinstance(self.source, SceneObject):
            self.source = self.source()
        return self.source


def _sv_object(index: int, color_name: str, center: np.ndarray, size: list[float], yaw: float) -> SceneObject:
    box = Box3D.from_center_size_yaw(center, size, yaw, validate=False)  # positive sizes, a yaw rotation
    return SceneObject(index, f"{color_name} object", box, COLORS[color_name])


@dataclass
class SingleViewScene:
    """One rendered single-view scene with its objects and exact geometry."""

    rgb: np.ndarray  # [H, W, 3] uint8
    depth: np.ndarray  # [H, W] float32 metres
    instance: np.ndarray  # [H, W] int32
    intrinsics: np.ndarray  # [3, 3]
    objects: list[_SVObject]
    canonical: torch.Tensor  # [1, H, W, 3]


#: colour names in the order the samplers draw them from
_COLOR_NAMES = sorted(COLORS)


def _sv_camera() -> np.ndarray:
    eye = np.array([0.0, 0.0, _SV_CAMERA_HEIGHT])
    return look_at(eye, eye + np.array([0.0, 1.0, 0.0]))


def _place_objects(rng: np.random.Generator, cfg: SpatialQAConfig, n: int) -> list[_SVObject]:
    """Non-overlapping objects: image position and angular size first, depth drawn independently."""
    k = pinhole_intrinsics(cfg.image_size, cfg.image_size, cfg.hfov_deg)
    pose = _sv_camera()
    margin = 1.5 / k[0, 0]  # at least ~1.5 px between objects in the image
    for _restart in range(50):
        placed: list[_SVObject] = []
        rects: list[tuple[float, float, float, float]] = []
        for _try in range(200):
            if len(placed) == n:
                return placed
            # the upper half of the image (the floor fills the lower half)
            ax, az = rng.uniform(*cfg.angular_half_size, size=2)
            ay = rng.uniform(0.05, 0.12)
            xn = rng.uniform(-0.55 + ax, 0.55 - ax)
            yn = rng.uniform(-0.55 + az, -az)
            rect = (xn - ax, yn - az, xn + ax, yn + az)
            if any(
                rect[0] < r[2] + margin
                and r[0] < rect[2] + margin
                and rect[1] < r[3] + margin
                and r[1] < rect[3] + margin
                for r in rects
            ):
                continue
            depth = float(rng.uniform(*cfg.depth_range))
            center_cam = np.array([xn * depth, yn * depth, depth])
            yaw = float(rng.uniform(-0.45, 0.45))
            center_world = pose[:3, :3] @ center_cam + pose[:3, 3]
            size = [2 * ax * depth, 2 * ay * depth, 2 * az * depth]
            color_name = str(rng.choice(_COLOR_NAMES))
            obj = functools.partial(_sv_object, len(placed) + 1, color_name, center_world, size, yaw)
            placed.append(_SVObject(obj, depth, center_cam, np.array([xn, yn]), 4 * ax * az, color_name))
            rects.append(rect)
        if len(placed) == n:
            return placed
    raise SR3DInputError(f"could not place {n} non-overlapping objects in a {cfg.image_size}-pixel view")


def _render_single_view(placed: list[_SVObject], cfg: SpatialQAConfig) -> SingleViewScene:
    size = cfg.image_size
    k = pinhole_intrinsics(size, size, cfg.hfov_deg)
    out = render([p.obj for p in placed], _SV_ROOM, k, _sv_camera()[None], size, size, edge_lines=False)
    depth_map = out.depth[0]
    pts = backproject(torch.from_numpy(depth_map.astype(np.float64)), torch.from_numpy(k))
    canonical = canonicalize(pts[None]).to(torch.float32)
    return SingleViewScene(out.rgb[0], depth_map, out.instance[0], k, placed, canonical)


def single_view_scene(rng: np.random.Generator, cfg: SpatialQAConfig, count: int | None = None) -> SingleViewScene:
    """Floating boxes whose image position and angular size are independent of their depth."""
    n = count if count is not None else int(rng.integers(cfg.num_objects[0], cfg.num_objects[1] + 1))
    return _render_single_view(_place_objects(rng, cfg, n), cfg)


# ----------------------------------------------------------------------------------------------
# multi-view scenes
# ----------------------------------------------------------------------------------------------


def multi_view_scene(seed: int, num_frames: int = 6, image_size: int = 64) -> CrossFrameScene:
    """The cross-frame scene of ``seed`` (:func:`sr3d_plugin.synthetic.crossframe.cross_frame_scene`; cached)."""
    return cross_frame_scene(int(seed), int(num_frames), int(image_size))


# ----------------------------------------------------------------------------------------------
# samples
# ----------------------------------------------------------------------------------------------


@dataclass
class QASample:
    """One question: visual input (with canonical point maps and regions), text and bookkeeping."""

    id: str
    family: str
    question: str
    answer: str
    visual: VisualInput
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def choices(self) -> tuple[str, ...]:
        return ANSWER_CHOICES[self.family]

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question}, {"role": "assistant", "content": self.answer}]


def _region(mask: np.ndarray, frame: int, as_box: bool) -> Region:
    if as_box:
        ys, xs = np.nonzero(mask)
        box_mask = np.zeros_like(mask, dtype=bool)
        box_mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
        return Region({frame: box_mask})
    return Region({frame: mask.astype(bool)})


def _bucket(distance: float, buckets: tuple[tuple[float, str], ...]) -> int:
    return next(i for i, (upper, _) in enumerate(buckets) if distance < upper)


def _sv_accept(family: str, objs: list[_SVObject], want: int | None, rng: np.random.Generator) -> dict[str, Any] | None:
    """Check a placement for ``family`` before rendering; ``want`` is the pre-drawn target
    (distance bucket, or 0/1 for "the 2D heuristic agrees / disagrees") that de-biases the
    training/test distributions; ``None`` accepts any valid layout. Returns the answer facts."""
    a, b = objs[0], objs[1]
    if family in ("closer", "front_behind"):
        if abs(a.depth - b.depth) < 0.5:
            return None
        return {"first": a.depth < b.depth}
    if family == "left_right":
        dx = a.image_center[0] - b.image_center[0]
        return None if abs(dx) < 0.05 else {"first": dx < 0}
    if family == "above_below":
        dy = a.image_center[1] - b.image_center[1]
        return None if abs(dy) < 0.05 else {"first": dy < 0}
    if family == "distance":
        # a narrow band of image separations, so the 2D separation says little about the bucket
        sep = float(np.linalg.norm(a.image_center - b.image_center))
        dist = float(np.linalg.norm(a.center_cam - b.center_cam))
        bucket = _bucket(dist, DISTANCE_BUCKETS)
        if want is None:
            return {"bucket": bucket, "distance": dist}
        if not 0.22 <= sep <= 0.32:
            return None
        return {"bucket": want, "distance": dist} if bucket == want else None
    if family == "larger":
        va, vb = float(a.obj.box.size.prod()), float(b.obj.box.size.prod())
        if max(va, vb) / min(va, vb) < 1.5:
            return None
        agrees = (a.angular_area > b.angular_area) == (va > vb)
        return {"first": va > vb} if want is None or agrees == bool(want) else None
    if family == "closer_to_third":
        c = objs[2]
        da = float(np.linalg.norm(a.center_cam - c.center_cam))
        db = float(np.linalg.norm(b.center_cam - c.center_cam))
        if abs(da - db) < 0.5:
            return None
        pa = float(np.linalg.norm(a.image_center - c.image_center))
        pb = float(np.linalg.norm(b.image_center - c.image_center))
        agrees = (pa < pb) == (da < db)
        return {"first": da < db} if want is None or agrees == bool(want) else None
    if family == "count":
        pool = [*sorted({o.color_name for o in objs}), str(rng.choice(sorted(COLORS)))]
        color = str(rng.choice(pool))
        return {"color": color, "count": sum(o.color_name == color for o in objs)}
    raise SR3DInputError(f"unknown single-view family {family!r}; expected one of {SINGLE_VIEW_FAMILIES}")


_SV_QUESTIONS = {
    "closer": ("Which is closer to the camera, <region0> or <region1>?", ("Region [0]", "Region [1]")),
    "front_behind": ("Is <region0> in front of or behind <region1>?", ("In front", "Behind")),
    "left_right": ("Is <region0> to the left or to the right of <region1>?", ("Left", "Right")),
    "above_below": ("Is <region0> above or below <region1>?", ("Above", "Below")),
    "larger": ("Which is larger, <region0> or <region1>?", ("Region [0]", "Region [1]")),
    "closer_to_third": ("Which is closer to <region2>, <region0> or <region1>?", ("Region [0]", "Region [1]")),
}


def _sv_sample(
    rng: np.random.Generator, family: str, cfg: SpatialQAConfig, bucket: int | None = None
) -> tuple[str, str, VisualInput, dict]:
    n_regions = 3 if family == "closer_to_third" else (0 if family == "count" else 2)
    if family == "distance":
        want = int(rng.integers(len(DISTANCE_BUCKETS))) if bucket is None else int(bucket) % len(DISTANCE_BUCKETS)
    else:
        want = int(rng.integers(2))
    for _attempt in range(2000):
        if family == "count":
            n = int(rng.integers(2, 5))
        elif family == "closer_to_third":
            n = int(rng.integers(3, cfg.num_objects[1] + 1)) if cfg.num_objects[1] >= 3 else 3
        else:
            n = int(rng.integers(cfg.num_objects[0], cfg.num_objects[1] + 1))
        objs = _place_objects(rng, cfg, n)
        facts = _sv_accept(family, objs, want, rng)
        if facts is None:
            continue
        scene = _render_single_view(objs, cfg)
        masks = [scene.instance == o.obj.id for o in objs[:n_regions]]
        if masks and min(int(m.sum()) for m in masks) < cfg.min_region_pixels:
            continue
        as_box = bool(rng.random() < cfg.box_probability)
        regions = [_region(m, 0, as_box) for m in masks]
        meta: dict[str, Any] = {"region_kind": "box" if as_box else "mask"}
        if len(masks) >= 2:
            meta.update(
                area=[int(m.sum()) for m in masks],
                row=[float(_centroid(m)[1]) for m in masks],
                col=[float(_centroid(m)[0]) for m in masks],
                depth=[objs[i].depth for i in range(n_regions)],
            )
        if family == "distance":
            q, ans = "How far apart are <region0> and <region1>?", DISTANCE_BUCKETS[facts["bucket"]][1]
            meta.update(distance=facts["distance"], pixel_distance=_pixel_dist(masks[0], masks[1]))
        elif family == "count":
            q, ans = f"How many {facts['color']} objects are there?", str(facts["count"])
        else:
            q, answers = _SV_QUESTIONS[family]
            ans = answers[0] if facts["first"] else answers[1]
            if family == "closer_to_third":
                meta.update(pixel_distance=[_pixel_dist(masks[0], masks[2]), _pixel_dist(masks[1], masks[2])])
        visual = VisualInput([Image.fromarray(scene.rgb)], points=scene.canonical, regions=regions, multi_view=False)
        return q, ans, visual, meta
    raise SR3DInputError(f"could not generate a {family!r} question after 2000 layouts")


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def _pixel_dist(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(_centroid(a) - _centroid(b)))


def _mv_region_facts(frame: int, mask: np.ndarray) -> dict[str, float]:
    """The 2D facts of one region (what a 2D shortcut could use): frame, centroid, box size, area."""
    ys, xs = np.nonzero(mask)
    size = float(mask.shape[0])
    return {
        "frame": float(frame),
        "col": float(xs.mean()) / size,
        "row": float(ys.mean()) / size,
        "width": float(xs.max() - xs.min() + 1) / size,
        "height": float(ys.max() - ys.min() + 1) / size,
        "area": float(mask.sum()) / size**2,
    }


_MV_QUESTIONS = {
    "mv_distance": "How far apart are <region0> and <region1>?",
    "mv_closer_to_third": "Which is closer to <region2>, <region0> or <region1>?",
    "mv_closest_of_three": "Which is closest to <region3>: <region0>, <region1> or <region2>?",
}


def _mv_sample(
    rng: np.random.Generator, family: str, cfg: SpatialQAConfig, scene_seed: int, target: int | None
) -> tuple[str, str, VisualInput, dict]:
    """One cross-frame question about scene ``scene_seed``: every object it relates is never seen in
    the same frame as the object(s) it is related to, and each region is drawn on its home frame, where its
    object covers at least ``cfg.min_region_pixels``. ``target`` is the wanted answer index (distance
    bucket, or the position of the closest region); None accepts any."""
    if family not in MULTI_VIEW_FAMILIES:
        raise SR3DInputError(f"unknown multi-view family {family!r}; expected one of {MULTI_VIEW_FAMILIES}")
    scene = multi_view_scene(scene_seed, cfg.num_frames, cfg.mv_image_size)
    counts = scene.pixel_counts()  # [N, F]
    seen = counts >= cfg.min_region_pixels
    present = (counts > 0).astype(np.int64)
    apart = (present @ present.T) == 0  # [N, N] never in the same frame
    # a region is drawn on the frame its object was placed for: there its apparent size and position
    # were drawn independently of its depth; in another frame the size would be home depth / that
    # frame's depth, which says how central the object is
    home = np.asarray(scene.home_frame)
    usable = np.nonzero(seen[np.arange(len(home)), home])[0]
    centers = scene.centers()
    dist = np.linalg.norm(centers[:, None] - centers[None], axis=-1)
    order: list[int] | None = None
    if family == "mv_distance":
        cands = [(a, b) for a in usable for b in usable if a < b and apart[a, b]]
        edges = np.array([u for u, _ in MV_DISTANCE_BUCKETS[:-1]])
        ok = [
            (a, b)
            for a, b in cands
            if np.min(np.abs(edges - dist[a, b])) >= MV_EDGE_MARGIN
            and (target is None or _bucket(float(dist[a, b]), MV_DISTANCE_BUCKETS) == target)
        ]
        if ok:
            a, b = ok[int(rng.integers(len(ok)))]
            order = [int(a), int(b)][:: 1 if rng.random() < 0.5 else -1]
            ans = MV_DISTANCE_BUCKETS[_bucket(float(dist[a, b]), MV_DISTANCE_BUCKETS)][1]
    elif family == "mv_closer_to_third":
        ok = [
            (a, b, c)
            for c in usable
            for a in usable
            for b in usable
            if a < b
            and c not in (a, b)
            and apart[a, c]
            and apart[b, c]
            and abs(dist[a, c] - dist[b, c]) >= MV_COMPARE_MARGIN
        ]
        if ok:
            a, b, c = ok[int(rng.integers(len(ok)))]
            order = [int(a), int(b), int(c)]
            ans = "Region [0]" if dist[a, c] < dist[b, c] else "Region [1]"
    else:  # mv_closest_of_three
        ok = []
        for d in usable:
            others = [o for o in usable if o != d and apart[o, d]]
            if len(others) < 3:
                continue
            for _ in range(4):
                trio = [int(v) for v in rng.choice(others, size=3, replace=False)]
                ds = sorted(dist[o, d] for o in trio)
                if ds[1] - ds[0] >= MV_COMPARE_MARGIN:
                    ok.append((*trio, int(d)))
        if ok:
            *trio, d = ok[int(rng.integers(len(ok)))]
            closest = min(trio, key=lambda o: dist[o, d])
            rest = [o for o in trio if o != closest]
            rng.shuffle(rest)
            slot = int(rng.integers(3)) if target is None else int(target) % 3
            rest.insert(slot, closest)
            order = [*rest, d]
            ans = f"Region [{slot}]"
    if order is None:
        raise _NoQuestion(f"scene {scene_seed} has no {family} question")
    as_box = bool(rng.random() < cfg.box_probability)
    regions, facts = [], []
    for i in order:
        frame = int(home[i])
        mask = scene.instance[frame] == scene.objects[i].id
        regions.append(_region(mask, frame, as_box))
        facts.append(_mv_region_facts(frame, np.asarray(regions[-1].masks[frame])))
    meta: dict[str, Any] = {key: [f[key] for f in facts] for key in facts[0]}
    meta["frames"] = [int(f) for f in meta.pop("frame")]
    meta.update(region_kind="box" if as_box else "mask", scene_seed=scene_seed)
    if family == "mv_distance":
        meta["distance"] = float(dist[order[0], order[1]])
    else:
        meta["distances"] = [float(dist[o, order[-1]]) for o in order[:-1]]
    visual = VisualInput(list(scene.frames), points=scene.canonical, regions=regions, multi_view=True)
    return _MV_QUESTIONS[family], ans, visual, meta


class _NoQuestion(SR3DInputError):
    pass


def make_sample(
    split: str, index: int, family: str, seed: int = 0, cfg: SpatialQAConfig | None = None, scenes: int = 2000
) -> QASample:
    """The deterministic sample ``index`` of ``family`` in ``split``.

    Single-view samples render their own scene from the seed ``(SPLIT_SEED_BASE[split] + index, seed)``;
    multi-view samples share ``scenes`` scenes per split (seeds ``SPLIT_SEED_BASE[split] + j``).
    """
    if split not in SPLIT_SEED_BASE:
        raise SR3DInputError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SEED_BASE)}")
    cfg = cfg or SpatialQAConfig()
    base = SPLIT_SEED_BASE[split]
    rng = np.random.default_rng([base + index, seed, _family_code(family)])
    if family in SINGLE_VIEW_FAMILIES:
        q, ans, visual, meta = _sv_sample(rng, family, cfg, bucket=index)
    elif family in MULTI_VIEW_FAMILIES:
        target = {"mv_distance": index % len(MV_DISTANCE_BUCKETS), "mv_closest_of_three": index % 3}.get(family)
        for shift in range(scenes):
            scene_seed = base + (index + shift) % scenes
            try:
                q, ans, visual, meta = _mv_sample(rng, family, cfg, scene_seed, target)
                break
            except _NoQuestion:
                continue
        else:
            raise SR3DInputError(f"no scene of split {split} supports a {family} question")
    else:
        raise SR3DInputError(
            f"unknown question family {family!r}; expected one of {SINGLE_VIEW_FAMILIES + MULTI_VIEW_FAMILIES}"
        )
    sample = QASample(f"{split}-{family}-{index}", family, q, ans, visual, meta)
    return _balanced(sample, index)


#: two-choice families whose answer flips when regions 0 and 1 are swapped
_SWAPPABLE = {"closer", "front_behind", "left_right", "above_below", "larger", "closer_to_third", "mv_closer_to_third"}


def _balanced(sample: QASample, index: int) -> QASample:
    """Give two-choice questions the answer ``choices[index % 2]`` by swapping regions 0 and 1.

    The questions are symmetric in the two regions, so the swap flips the answer and nothing else;
    every split then has exactly balanced answers (a constant guess scores chance, to the question).
    Distance buckets are balanced by drawing bucket ``index % 4``.
    """
    if sample.family not in _SWAPPABLE:
        return sample
    choices = ANSWER_CHOICES[sample.family]
    if sample.answer == choices[index % 2]:
        return sample
    regions = list(sample.visual.regions)
    regions[0], regions[1] = regions[1], regions[0]
    meta = dict(sample.meta)
    for key in ("area", "row", "col", "depth", "pixel_distance", "frames", "objects"):
        if isinstance(meta.get(key), list) and len(meta[key]) >= 2:
            values = list(meta[key])
            values[0], values[1] = values[1], values[0]
            meta[key] = values
    v = sample.visual
    visual = VisualInput(list(v.images), points=v.points, valid=v.valid, regions=regions, multi_view=v.multi_view)
    other = choices[1] if sample.answer == choices[0] else choices[0]
    return QASample(sample.id, sample.family, sample.question, other, visual, meta)


def _family_code(family: str) -> int:
    names = SINGLE_VIEW_FAMILIES + MULTI_VIEW_FAMILIES
    return names.index(family) if family in names else 999


class SpatialQADataset(torch.utils.data.Dataset):
    """A deterministic map-style dataset of :class:`QASample` items mixing several families.

    Item ``i`` is family ``families[i % len(families)]``; a family listed several times is drawn that
    many times as often (each draw is a different question: per-family indices never repeat).
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 1000,
        families: tuple[str, ...] | list[str] = SINGLE_VIEW_FAMILIES,
        seed: int = 0,
        cfg: SpatialQAConfig | None = None,
        scenes: int = 2000,
    ) -> None:
        if size <= 0:
            raise SR3DInputError(f"dataset size must be positive, got {size}")
        unknown = [f for f in families if f not in SINGLE_VIEW_FAMILIES + MULTI_VIEW_FAMILIES]
        if unknown or not families:
            raise SR3DInputError(f"unknown question families {unknown or families}")
        self.split, self.size, self.families, self.seed = split, size, tuple(families), seed
        self.cfg = cfg or SpatialQAConfig()
        self.scenes = scenes

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> QASample:
        if not 0 <= index < self.size:
            raise IndexError(index)
        slot = index % len(self.families)
        family = self.families[slot]
        repeats = self.families.count(family)
        occurrence = self.families[:slot].count(family)
        family_index = (index // len(self.families)) * repeats + occurrence
        return make_sample(self.split, family_index, family, self.seed, self.cfg, self.scenes)


def training_samples(
    size: int = 6000,
    families: str | Sequence[str] | dict[str, int] = "all",
    split: str = "train",
    seed: int = 0,
    scenes: int = 2000,
    image_size: int = 64,
    out_dir: str | None = None,
    workers: int = 1,
) -> list[QASample]:
    """A materialised list of ``size`` samples (the ``data.generator`` of the tiny recipes).

    Args:
        size: number of samples (families interleaved round-robin).
        families: ``"single"``, ``"multi"``, ``"all"``, a list of family names (a name listed ``k``
            times is drawn ``k`` times as often), or a mapping family → weight (integer).
        split: ``train`` / ``val`` / ``test`` (disjoint scene seeds).
        seed: sample seed.
        scenes: multi-view scenes of the split (shared by the multi-view questions).
        image_size: render size (the tiny model's tile size).
        out_dir: ignored (the trainer passes its run folder to generators).
        workers: processes that generate (contiguous index ranges, one thread each); every sample
            is a function of its index alone, so the list is the same for any number.
    """
    del out_dir
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 64:
        raise SR3DInputError(f"workers must be an integer in [1, 64], got {workers!r}")
    names = {
        "single": SINGLE_VIEW_FAMILIES,
        "multi": MULTI_VIEW_FAMILIES,
        "all": SINGLE_VIEW_FAMILIES + MULTI_VIEW_FAMILIES,
    }
    if isinstance(families, str) and families in names:
        fams: tuple[str, ...] = tuple(names[families])
    elif isinstance(families, dict):
        fams = tuple(f for f, weight in families.items() for _ in range(int(weight)))
    else:
        fams = tuple(families)
    cfg = SpatialQAConfig(image_size=image_size, mv_image_size=image_size)
    dataset = SpatialQADataset(split, size=size, families=fams, seed=seed, cfg=cfg, scenes=scenes)
    workers = min(workers, max(1, size // 32))  # a few dozen samples per process at least
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods():  # else (Windows): one process
        return _generate_in_processes(dataset, workers)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    try:
        return [dataset[i] for i in range(size)]
    finally:
        torch.set_num_threads(previous)


def _generate_range(dataset: SpatialQADataset, start: int, stop: int) -> bytes:
    torch.set_num_threads(1)
    # one pickle per range: the samples of a range that share a scene keep sharing its arrays
    return pickle.dumps([dataset[i] for i in range(start, stop)], protocol=pickle.HIGHEST_PROTOCOL)


def _generate_in_processes(dataset: SpatialQADataset, workers: int) -> list[QASample]:
    """``[dataset[i] for i in range(len(dataset))]`` computed by ``workers`` forked processes.

    The children are forked from this process and send back pickles of the samples they made;
    nothing is read from outside, so unpickling here trusts only our own children.
    """
    size = len(dataset)
    bounds = [size * k // workers for k in range(workers + 1)]
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(_generate_range, dataset, bounds[k], bounds[k + 1]) for k in range(workers)]
        out: list[QASample] = []
        for future in futures:
            out.extend(pickle.loads(future.result()))  # our own forked children made these bytes
    return out


#: seed range of demo scenes (disjoint from every split)
DEMO_SEED_BASE = 9_000_000


def scene_questions(seed: int = 0, cfg: SpatialQAConfig | None = None, objects: int = 4) -> list[QASample]:
    """A handful of questions about ONE fresh single-view scene and ONE fresh multi-view scene.

    Unlike the training/test splits, the questions are not re-balanced (they describe whatever the
    scene contains); depth two-choice questions (closer, front/behind) are asked about every pair
    whose depths differ by at least 0.5 m.
    """
    cfg = cfg or SpatialQAConfig()
    rng = np.random.default_rng([DEMO_SEED_BASE + int(seed)])
    for _attempt in range(200):
        objs = _place_objects(rng, cfg, objects)
        pairs = [
            (i, j) for i in range(objects) for j in range(i + 1, objects) if abs(objs[i].depth - objs[j].depth) >= 0.5
        ]
        if len(pairs) >= 3:
            break
    scene = _render_single_view(objs, cfg)
    masks = [scene.instance == o.obj.id for o in objs]
    if min(int(m.sum()) for m in masks) < cfg.min_region_pixels:
        return scene_questions(seed + 7919, cfg, objects)
    image = Image.fromarray(scene.rgb)
    out: list[QASample] = []

    def add(family: str, order: list[int], q: str, ans: str, meta: dict[str, Any]) -> None:
        regions = [_region(masks[k], 0, as_box=True) for k in order]
        meta = {**meta, "objects": [objs[k].obj.label for k in order], "depth": [objs[k].depth for k in order]}
        visual = VisualInput([image], points=scene.canonical, regions=regions, multi_view=False)
        out.append(QASample(f"demo{seed}-{len(out)}", family, q, ans, visual, meta))

    for n, (i, j) in enumerate(pairs[:4]):
        family = "closer" if n % 2 == 0 else "front_behind"
        facts = _sv_accept(family, [objs[i], objs[j]], None, rng)
        q, answers = _SV_QUESTIONS[family]
        add(family, [i, j], q, answers[0] if facts["first"] else answers[1], {})
    i, j = pairs[0]
    facts = _sv_accept("distance", [objs[i], objs[j]], None, rng)
    add(
        "distance",
        [i, j],
        "How far apart are <region0> and <region1>?",
        DISTANCE_BUCKETS[facts["bucket"]][1],
        {"distance": facts["distance"]},
    )
    mv_seed = DEMO_SEED_BASE + int(seed)
    for family in MULTI_VIEW_FAMILIES:
        try:
            q, ans, visual, meta = _mv_sample(rng, family, cfg, mv_seed, None)
        except _NoQuestion:
            continue
        out.append(QASample(f"demo{seed}-{len(out)}", family, q, ans, visual, meta))
    return out


def heuristic_baselines(samples: list[QASample]) -> dict[str, float]:
    """Accuracy of the obvious 2D heuristics on depth families ("bigger is closer", "lower is closer",
    "nearer in the image is closer" for distance comparisons, "bigger in the image is larger")."""
    hits: dict[str, list[bool]] = {}

    def add(name: str, ok: bool) -> None:
        hits.setdefault(name, []).append(ok)

    for s in samples:
        if s.family in ("closer", "front_behind"):
            first_closer = s.answer in ("Region [0]", "In front")
            area, row = s.meta["area"], s.meta["row"]
            add(f"{s.family}/bigger_is_closer", (area[0] > area[1]) == first_closer)
            add(f"{s.family}/lower_is_closer", (row[0] > row[1]) == first_closer)
        elif s.family == "larger":
            area = s.meta["area"]
            add("larger/bigger_in_image", (area[0] > area[1]) == (s.answer == "Region [0]"))
        elif s.family == "closer_to_third":
            pix = s.meta["pixel_distance"]
            add("closer_to_third/nearer_in_image", (pix[0] < pix[1]) == (s.answer == "Region [0]"))
    # distance buckets from the 2D separation alone: the best monotone map (quartiles fitted on these samples)
    dist = [s for s in samples if s.family == "distance"]
    if dist:
        pix = np.array([s.meta["pixel_distance"] for s in dist])
        truth = np.array([ANSWER_CHOICES["distance"].index(s.answer) for s in dist])
        edges = np.quantile(pix, [0.25, 0.5, 0.75])
        guess = np.searchsorted(edges, pix)
        hits["distance/pixel_separation_quartiles"] = list(guess == truth)
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}
