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


def test_generating_in_processes_gives_the_same_samples() -> None:
    families = {"mv_distance": 2, "mv_closer_to_third": 1, "closer_to_third": 1, "distance": 1, "count": 1}
    one = qa.training_samples(96, families, split="val", seed=3, scenes=40)
    two = qa.training_samples(96, families, split="val", seed=3, scenes=40, workers=2)
    assert [(s.id, s.question, s.answer) for s in one] == [(s.id, s.question, s.answer) for s in two]
    for a, b in zip(one, two):
        assert a.meta == b.meta and len(a.visual.regions) == len(b.visual.regions)
        for ra, rb in zip(a.visual.regions, b.visual.regions):
            assert ra.masks.keys() == rb.masks.keys()
            assert all(np.array_equal(ra.masks[k], rb.masks[k]) for k in ra.masks)
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.visual.images, b.visual.images))
        assert torch.equal(a.visual.points, b.visual.points)
    # samples of one process that share a scene still share its point map (no copy per question)
    shared = collections.Counter(id(s.visual.points) for s in two if s.family.startswith("mv_"))
    assert max(shared.values()) > 1
    with pytest.raises(SR3DInputError, match=r"workers must be an integer in \[1, 64\], got 0"):
        qa.training_samples(8, ["closer"], workers=0)


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


def _object_ids(scene: qa.CrossFrameScene, frame: int, mask: np.ndarray) -> set[int]:
    return set(np.unique(scene.instance[frame][mask]).tolist()) - {0}


@pytest.mark.parametrize("family", qa.MULTI_VIEW_FAMILIES)
def test_cross_frame_regions_are_never_seen_together_and_answers_follow_geometry(family: str) -> None:
    for i in range(8):
        s = qa.make_sample("val", i, family)
        scene = qa.multi_view_scene(s.meta["scene_seed"])
        assert s.visual.multi_view and len(s.visual.images) == 6
        ids = []
        for region, frame in zip(s.visual.regions, s.meta["frames"], strict=True):
            assert region.frames == [frame]
            if s.meta["region_kind"] == "mask":
                (oid,) = _object_ids(scene, frame, np.asarray(region.masks[frame]))
                ids.append(oid)
            else:  # a box covers its object (and maybe others)
                assert _object_ids(scene, frame, np.asarray(region.masks[frame]))
        if not ids:
            continue
        counts = scene.pixel_counts()
        centers = {o.id: o.box.center.numpy() for o in scene.objects}
        target = ids[-1] if family != "mv_distance" else ids[1]
        related = ids[:-1] if family != "mv_distance" else ids[:1]
        for oid in related:  # no frame shows the object and the one it is related to
            assert not ((counts[oid - 1] > 0) & (counts[target - 1] > 0)).any()
        dists = [float(np.linalg.norm(centers[o] - centers[target])) for o in related]
        if family == "mv_distance":
            upper = next(u for u, text in qa.MV_DISTANCE_BUCKETS if text == s.answer)
            assert dists[0] < upper and abs(dists[0] - s.meta["distance"]) < 1e-9
            assert min(abs(dists[0] - u) for u, _ in qa.MV_DISTANCE_BUCKETS[:-1]) >= qa.MV_EDGE_MARGIN
        else:
            k = int(s.answer[-2])
            assert dists[k] == min(dists)
            assert sorted(dists)[1] - sorted(dists)[0] >= qa.MV_COMPARE_MARGIN


def test_cross_frame_answers_are_balanced_and_scenes_share_one_canonical_map() -> None:
    for family in qa.MULTI_VIEW_FAMILIES:
        choices = qa.ANSWER_CHOICES[family]
        answers = [qa.make_sample("val", i, family).answer for i in range(2 * len(choices))]
        assert collections.Counter(answers) == {c: 2 for c in choices}
    # the canonical map is the room's in every scene: a wall point maps to the same canonical value
    from sr3d_plugin.geometry import canonical_transform

    room = qa.CROSS_FRAME_ROOM
    expected = canonical_transform(torch.tensor(np.stack([room.lower, room.upper])))
    for seed in (11, 12, 13):
        scene = qa.multi_view_scene(qa.SPLIT_SEED_BASE["test"] + seed)
        flat = scene.canonical.reshape(-1, 3)
        assert torch.allclose(flat.amin(0), torch.full((3,), -1.0), atol=1e-5)
        assert torch.allclose(flat.amax(0), torch.full((3,), 1.0), atol=1e-5)
        assert scene.canonical.shape == (6, 64, 64, 3) and expected.scale.abs().min() > 2.0
    with pytest.raises(SR3DInputError, match="num_frames >= 4"):
        qa.multi_view_scene(5, num_frames=3)


def test_cross_frame_depth_is_independent_of_image_position() -> None:
    """Every object's depth in its home view comes from one range wherever it sits in the image: no wall,
    floor or ceiling caps it (a cap ties depth to the pixel row and leaked the comparison answers)."""
    from sr3d_plugin.synthetic.crossframe import CROSS_FRAME_DEPTH

    rows, depths = [], []
    for seed in range(120):
        scene = qa.multi_view_scene(qa.SPLIT_SEED_BASE["val"] + seed)
        for obj, home in zip(scene.objects, scene.home_frame, strict=True):
            world_to_cam = np.linalg.inv(scene.cam_to_world[home])
            _x, y, z = world_to_cam[:3, :3] @ obj.box.center.numpy() + world_to_cam[:3, 3]
            assert CROSS_FRAME_DEPTH[0] - 1e-9 <= z <= CROSS_FRAME_DEPTH[1] + 1e-9
            rows.append(abs(y / z))
            depths.append(z)
    rows_a, depths_a = np.array(rows), np.array(depths)
    assert abs(np.corrcoef(rows_a, depths_a)[0, 1]) < 0.1
    # objects near the top / bottom of the image are as deep as those near the middle
    edge, middle = depths_a[rows_a > 0.2], depths_a[rows_a < 0.1]
    assert len(edge) > 50 and abs(edge.mean() - middle.mean()) < 0.12


@pytest.mark.parametrize("family", qa.MULTI_VIEW_FAMILIES)
def test_2d_shortcuts_stay_near_chance_on_cross_frame_questions(family: str) -> None:
    """A 2D classifier (pixel positions, box sizes, areas, frame indices, region order) fitted on training
    questions answers held-out ones near chance."""
    from sr3d_plugin.synthetic.shortcuts import fit_2d_shortcut, shortcut_features

    train = qa.training_samples(400, [family], split="train", seed=5)
    test = qa.training_samples(240, [family], split="test")
    chance = 1 / len(qa.ANSWER_CHOICES[family])
    got = fit_2d_shortcut(train, test, epochs=40)
    assert abs(got["mlp"] - chance) < 0.08 and abs(got["majority"] - chance) < 1e-6  # balanced (float32)
    assert shortcut_features(test[0]).shape == (len(test[0].visual.regions) * 11 + 1,)


def test_2d_shortcut_classifier_finds_a_rigged_rule() -> None:
    from sr3d_plugin.synthetic.shortcuts import fit_2d_shortcut

    # the same classifier does find a 2D rule when one exists: answer = which region lies further left
    train = qa.training_samples(400, ["mv_closer_to_third"], split="train", seed=5)
    test = qa.training_samples(200, ["mv_closer_to_third"], split="test")
    rigged = []
    for s in [*train, *test]:
        first = s.meta["col"][0] < s.meta["col"][1]
        rigged.append(
            qa.QASample(s.id, s.family, s.question, "Region [0]" if first else "Region [1]", s.visual, s.meta)
        )
    assert fit_2d_shortcut(rigged[: len(train)], rigged[len(train) :], epochs=40)["mlp"] > 0.85
    with pytest.raises(SR3DInputError, match="one cross-frame family"):
        fit_2d_shortcut(train[:5], qa.training_samples(5, ["mv_distance"], split="test"))


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
        samples = [qa.make_sample("val", i, family, scenes=40) for i in range(8)]
        answers = [s.answer for s in samples]
        choices = qa.ANSWER_CHOICES[family]
        assert answers == [choices[i % 2] for i in range(8)]
    for s in [qa.make_sample("val", i, "closer") for i in range(8)]:
        d0, d1 = s.meta["depth"][:2]
        assert (s.answer == "Region [0]") == (d0 < d1)
    buckets = [qa.make_sample("val", i, "distance").answer for i in range(8)]
    assert buckets == [qa.DISTANCE_BUCKETS[i % 4][1] for i in range(8)]
