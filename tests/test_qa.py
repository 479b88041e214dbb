"""Synthetic spatial QA: answers follow the exact geometry, 2D shortcuts are removed, splits are disjoint."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.synthetic import qa


def test_samples_are_deterministic_and_splits_differ() -> None:
    a = qa.make_sample("train", 3, "closer")
    b = qa.make_sample("train", 3, "closer")
    c = qa.make_sample("test", 3, "closer")
    assert a.question == b.question and a.answer == b.answer
    assert np.array_equal(np.asarray(a.visual.images[0]), np.asarray(b.visual.images[0]))
    assert torch.equal(a.visual.points, b.visual.points)
    assert not np.array_equal(np.asarray(a.visual.images[0]), np.asarray(c.visual.images[0]))
    seeds = {split: base for split, base in qa.SPLIT_SEED_BASE.items()}
    assert (
        len(set(seeds.values())) == 3
        and min(abs(x - y) for x in seeds.values() for y in seeds.values() if x != y) >= 10**6
    )


@pytest.mark.parametrize("family", ["closer", "front_behind"])
def test_depth_answers_follow_geometry_and_2d_heuristics_are_at_chance(family: str) -> None:
    samples = [qa.make_sample("val", i, family) for i in range(150)]
    for s in samples:
        d0, d1 = s.meta["depth"][:2]
        first_closer = s.answer in ("Region [0]", "In front")
        assert first_closer == (d0 < d1)
        # the region's pooled canonical depth axis agrees with the metric depth order
        pts = s.visual.points[0]
        z = [float(pts[torch.as_tensor(r.masks[0])][:, 1].mean()) for r in s.visual.regions]  # canonical y = −z_cam
        assert (z[0] > z[1]) == (d0 < d1) or s.meta["region_kind"] == "box"
    base = qa.heuristic_baselines(samples)
    assert abs(base[f"{family}/bigger_is_closer"] - 0.5) < 0.12
    assert abs(base[f"{family}/lower_is_closer"] - 0.5) < 0.12
    counts = collections.Counter(s.answer for s in samples)
    assert min(counts.values()) > 0.3 * len(samples)


def test_depth_is_independent_of_image_statistics() -> None:
    """The same layout at a different depth renders the same picture (objects scale with depth)."""
    cfg = qa.SpatialQAConfig()
    rng = np.random.default_rng(0)
    objs = qa._place_objects(rng, cfg, 2)
    near = qa._render_single_view(objs, cfg)
    far_objs = []
    for o in objs:
        scale = 1.3
        box = o.obj.box
        pose = qa._sv_camera()
        cam_center = o.center_cam * scale
        center = pose[:3, :3] @ cam_center + pose[:3, 3]
        moved = qa.Box3D(center, box.size * scale, box.rotation)
        far_objs.append(
            qa._SVObject(
                qa.SceneObject(o.obj.id, o.obj.label, moved, o.obj.color),
                o.depth * scale,
                cam_center,
                o.image_center,
                o.angular_area,
                o.color_name,
            )
        )
    far = qa._render_single_view(far_objs, cfg)
    obj_pixels = near.instance > 0
    assert np.array_equal(near.instance, far.instance)
    assert np.abs(near.rgb[obj_pixels].astype(int) - far.rgb[obj_pixels].astype(int)).max() <= 2
    assert not np.allclose(near.depth[obj_pixels], far.depth[obj_pixels])


def test_other_families_are_consistent() -> None:
    for s in [qa.make_sample("val", i, "left_right") for i in range(20)]:
        cols = s.meta["col"]
        assert (s.answer == "Left") == (cols[0] < cols[1])
    for s in [qa.make_sample("val", i, "distance") for i in range(20)]:
        upper = dict((text, up) for up, text in qa.DISTANCE_BUCKETS)[s.answer]
        assert s.meta["distance"] < upper
    for s in [qa.make_sample("val", i, "count") for i in range(10)]:
        assert s.answer.isdigit() and not s.visual.regions
    dist = [qa.make_sample("val", i, "distance") for i in range(120)]
    assert qa.heuristic_baselines(dist)["distance/pixel_separation_quartiles"] < 0.40  # chance is 0.25
    third = [qa.make_sample("val", i, "closer_to_third") for i in range(80)]
    assert abs(qa.heuristic_baselines(third)["closer_to_third/nearer_in_image"] - 0.5) < 0.15


def test_cross_frame_questions_draw_regions_on_frames_where_the_other_object_is_absent() -> None:
    for i in range(6):
        s = qa.make_sample("val", i, "mv_distance", scenes=12)
        assert s.visual.multi_view and len(s.visual.images) == 6
        f0, f1 = s.meta["frames"]
        assert f0 != f1
        r0, r1 = s.visual.regions
        assert r0.frames == [f0] and r1.frames == [f1]
        scene = qa.multi_view_scene(s.meta["scene_seed"])
        inst = scene.instance
        ids0 = set(np.unique(inst[f0][r0.masks[f0]])) - {0}
        ids1 = set(np.unique(inst[f1][r1.masks[f1]])) - {0}
        if s.meta["region_kind"] == "mask":
            (a,), (b,) = ids0, ids1
            assert not (inst[f1] == a).any() and not (inst[f0] == b).any()
    s = qa.make_sample("val", 0, "mv_closer_to_third", scenes=12)
    assert len(s.visual.regions) == 3 and s.answer in ("Region [0]", "Region [1]")


def test_dataset_and_errors() -> None:
    ds = qa.SpatialQADataset("train", size=6, families=("closer", "count"))
    assert len(ds) == 6 and ds[0].family == "closer" and ds[1].family == "count"
    with pytest.raises(IndexError):
        ds[6]
    with pytest.raises(SR3DInputError, match="unknown question families"):
        qa.SpatialQADataset("train", size=3, families=("teleport",))
    with pytest.raises(SR3DInputError, match="unknown split"):
        qa.make_sample("holdout", 0, "closer")


def test_weighted_families_never_repeat_a_question() -> None:
    ds = qa.SpatialQADataset("train", size=6, families=("closer", "closer", "count"))
    fams = [ds[i].family for i in range(6)]
    assert fams == ["closer", "closer", "count"] * 2
    closer = [ds[i] for i in (0, 1, 3, 4)]
    assert len({np.asarray(s.visual.images[0]).tobytes() for s in closer}) == 4
    assert len(qa.training_samples(4, {"closer": 3, "count": 1}, image_size=32)) == 4


def test_two_choice_answers_are_exactly_balanced_and_still_true() -> None:
    for family in ("closer", "front_behind", "mv_closer_to_third"):
        samples = [qa.make_sample("val", i, family, scenes=12) for i in range(8)]
        answers = [s.answer for s in samples]
        choices = qa.ANSWER_CHOICES[family]
        assert answers == [choices[i % 2] for i in range(8)]
    for s in [qa.make_sample("val", i, "closer") for i in range(8)]:
        d0, d1 = s.meta["depth"][:2]
        assert (s.answer == "Region [0]") == (d0 < d1)
    buckets = [qa.make_sample("val", i, "distance").answer for i in range(8)]
    assert buckets == [qa.DISTANCE_BUCKETS[i % 4][1] for i in range(8)]
