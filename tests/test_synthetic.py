"""Synthetic posed RGB-D scenes: exact depth, consistent instance masks, sane layouts, the ScanNet writer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.geometry import Box3D, backproject, project_box_to_masks
from sr3d_plugin.synthetic import (
    LABEL_CATALOG,
    Room,
    SceneObject,
    default_scene,
    generate_scene,
    look_at,
    pinhole_intrinsics,
    read_objects,
    render,
    write_scannet_layout,
)
from sr3d_plugin.synthetic import layout as layout_mod

# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene():
    """The bundled demo scene (seed 0, 24 frames, 320×240)."""
    return default_scene()


@pytest.fixture(scope="module")
def world_points(scene):
    """``[V, H, W, 3]`` float64 aligned-frame points of every pixel of the demo scene."""
    return backproject(scene.depth.astype(np.float64), scene.intrinsics, scene.cam_to_world).numpy()


def _box_frame(obj: SceneObject) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return obj.box.center.numpy(), obj.box.size.numpy() / 2, obj.box.rotation.numpy()


# ----------------------------------------------------------------------------------------------
# analytic renders
# ----------------------------------------------------------------------------------------------


def test_facing_wall_depth_is_the_distance_everywhere_not_the_ray_length():
    room = Room(lower=[-2.0, -3.0, 0.0], upper=[4.0, 3.0, 3.0])
    eye = np.array([1.0, 0.0, 1.5])
    pose = look_at(eye, np.array([2.0, 0.0, 1.5]))
    k = pinhole_intrinsics(64, 48, hfov_deg=60.0)
    out = render([], room, k, pose[None], 64, 48)
    assert out.rgb.shape == (1, 48, 64, 3) and out.rgb.dtype == np.uint8
    assert out.depth.dtype == np.float32 and out.instance.dtype == np.int32
    # the whole image sees the wall x = 4, three metres ahead: z-depth is 3 at every pixel,
    # although the ray to a corner pixel is ~1.3× longer
    np.testing.assert_allclose(out.depth[0], 3.0, rtol=0, atol=1e-6)
    assert (out.instance == 0).all()
    corner_ray = 3.0 * math.sqrt(1 + ((0 - k[0, 2]) / k[0, 0]) ** 2 + ((0 - k[1, 2]) / k[1, 1]) ** 2)
    assert corner_ray > 3.5
    # the wall has texture: 0.4 m stripes across the ~3.5 m wide view
    row = out.rgb[0, 24].astype(int).sum(-1)
    assert int((np.diff(row) != 0).sum()) >= 6


def _room_exit_depth(room: Room, eye: np.ndarray, pose: np.ndarray, k: np.ndarray, width: int, height: int):
    """Brute force: the farthest intersection of each pixel ray with the room's six face rectangles (0 = none)."""
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    dirs = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u)], -1) @ pose[:3, :3].T
    best = np.zeros(u.shape)
    for axis in range(3):
        for bound in (room.lower[axis], room.upper[axis]):
            with np.errstate(divide="ignore", invalid="ignore"):
                t = (bound - eye[axis]) / dirs[..., axis]
                p = eye + t[..., None] * dirs
            on_face = np.all((p >= room.lower - 1e-9) & (p <= room.upper + 1e-9), axis=-1)
            best = np.where((t > 0) & on_face & (t > best), t, best)
    return best


def test_oblique_view_depth_matches_plane_intersection():
    room = Room(lower=[-2.0, -3.0, 0.0], upper=[4.0, 3.0, 3.0])
    eye = np.array([0.3, -0.4, 1.4])
    pose = look_at(eye, [4.0, 1.5, 0.9])  # yawed and pitched towards the floor
    k = pinhole_intrinsics(80, 60, hfov_deg=62.0, cx=41.3, cy=28.2)
    out = render([], room, k, pose, 80, 60)
    np.testing.assert_allclose(out.depth[0], _room_exit_depth(room, eye, pose, k, 80, 60), rtol=1e-6, atol=1e-6)
    assert (out.depth[0] > 0).all()


def test_box_in_front_of_the_camera_has_the_analytic_face_distance():
    k = pinhole_intrinsics(65, 49, hfov_deg=60.0)  # odd size: the centre pixel is the optical axis
    assert (k[0, 2], k[1, 2]) == (32.0, 24.0)
    pose = look_at([0.0, 0.0, 1.5], [1.0, 0.0, 1.5])
    front = SceneObject(3, "box", Box3D.from_center_size_yaw([2.8, 0.0, 1.5], [0.6, 0.5, 0.4], 0.0), (200, 40, 40))
    out = render([front], None, k, pose, 65, 49)
    assert out.depth[0, 24, 32] == pytest.approx(2.5, abs=1e-6)
    assert out.instance[0, 24, 32] == 3
    # nothing else: background has depth 0 and id 0
    assert out.depth[0, 0, 0] == 0 and out.instance[0, 0, 0] == 0
    # the same box turned by 45°: the axis meets its vertical edge at 2.8 − 0.3·cos45 − 0.25·sin45
    turned = SceneObject(3, "box", Box3D.from_center_size_yaw([2.8, 0.0, 1.5], [0.6, 0.6, 0.4], math.pi / 4), (1, 2, 3))
    out = render([turned], None, k, pose, 65, 49)
    assert out.depth[0, 24, 32] == pytest.approx(2.8 - 0.6 / math.sqrt(2), abs=1e-6)
    # box silhouette is where the box is hit, and its size matches the projection of the front face
    mask = out.instance[0] == 3
    rows = np.nonzero(mask.any(1))[0]
    half_h_px = k[1, 1] * 0.2 / (2.8 - 0.6 / math.sqrt(2))
    assert abs((rows.max() - rows.min() + 1) - 2 * half_h_px) <= 2


def test_camera_inside_a_box_or_outside_the_room_sees_inner_faces():
    k = pinhole_intrinsics(33, 25, hfov_deg=60.0)
    pose = look_at([0.0, 0.0, 1.0], [1.0, 0.0, 1.0])
    shell = SceneObject(9, "box", Box3D.from_center_size_yaw([0.5, 0.0, 1.0], [3.0, 6.0, 6.0], 0.0))
    out = render([shell], None, k, pose, 33, 25)
    assert (out.instance == 9).all()
    np.testing.assert_allclose(out.depth[0], 2.0, atol=1e-6)  # its inner face x = 2
    # a camera outside the room looks through the near wall at the far inner faces (dollhouse view)
    room = Room(lower=[-2.0, -1.0, 0.0], upper=[4.0, 1.0, 2.0])
    eye = np.array([-5.0, 0.0, 1.0])
    pose = look_at(eye, [0.0, 0.0, 1.0])
    out = render([], room, k, pose, 33, 25)
    seen = out.depth[0] > 0
    assert seen[12, 16] and not seen.all()
    assert out.depth[0, 12, 16] == pytest.approx(9.0, abs=1e-6)  # far wall x = 4
    np.testing.assert_allclose(out.depth[0], _room_exit_depth(room, eye, pose, k, 33, 25), atol=1e-6)
    assert (out.rgb[0][~seen] == 0).all()


def test_nearer_box_occludes_farther_box_and_ties_are_deterministic():
    k = pinhole_intrinsics(64, 48, hfov_deg=60.0)
    pose = look_at([0.0, 0.0, 1.0], [1.0, 0.0, 1.0])
    near = SceneObject(1, "box", Box3D.from_center_size_yaw([2.0, 0.3, 1.0], [0.4, 0.8, 0.8], 0.0))
    far = SceneObject(2, "cabinet", Box3D.from_center_size_yaw([4.0, 0.0, 1.0], [0.4, 2.0, 1.5], 0.0))
    a = render([near, far], None, k, pose, 64, 48)
    b = render([far, near], None, k, pose, 64, 48)
    np.testing.assert_array_equal(a.instance, b.instance)
    np.testing.assert_array_equal(a.depth, b.depth)
    assert set(np.unique(a.instance)) == {0, 1, 2}
    assert np.allclose(a.depth[a.instance == 1], 1.8, atol=1e-6)
    assert np.allclose(a.depth[a.instance == 2], 3.8, atol=1e-6)


def test_render_accepts_per_view_intrinsics_and_rejects_bad_input():
    room = Room(lower=[-2.0, -2.0, 0.0], upper=[2.0, 2.0, 2.5])
    poses = np.stack([look_at([0.0, 0.0, 1.2], [1.0, 0.2 * i, 1.0]) for i in range(3)])
    ks = np.stack([pinhole_intrinsics(32, 24, hfov_deg=50.0 + 5 * i) for i in range(3)])
    out = render([], room, torch.from_numpy(ks), torch.from_numpy(poses), 32, 24)
    assert out.depth.shape == (3, 24, 32) and (out.depth > 0).all()
    with pytest.raises(SR3DInputError, match="intrinsics"):
        render([], room, ks[:2], poses, 32, 24)
    scaled = poses.copy()
    scaled[:, :3, :3] *= 2.0
    with pytest.raises(SR3DInputError, match="rigid"):
        render([], room, ks, scaled, 32, 24)
    with pytest.raises(SR3DInputError, match="image size"):
        render([], room, ks, poses, 0, 24)
    with pytest.raises(SR3DInputError, match="id"):
        SceneObject(0, "chair", Box3D.from_center_size_yaw([0, 0, 0.5], [1, 1, 1], 0.0))


def test_faces_are_shaded_differently():
    k = pinhole_intrinsics(96, 72, hfov_deg=60.0)
    pose = look_at([0.0, -0.0, 2.2], [2.5, 0.0, 0.3])
    box = SceneObject(1, "box", Box3D.from_center_size_yaw([2.5, 0.0, 0.5], [1.0, 1.0, 1.0], 0.6), (180, 120, 60))
    out = render([box], None, k, pose, 96, 72, edge_lines=False)
    colours = {tuple(c) for c in out.rgb[0][out.instance[0] == 1]}
    assert len(colours) == 3  # top and two side faces, each with its own Lambert factor


# ----------------------------------------------------------------------------------------------
# generated scenes
# ----------------------------------------------------------------------------------------------


def test_generation_is_deterministic_and_seed_dependent():
    a = generate_scene(11, num_frames=6, width=64, height=48)
    b = generate_scene(11, num_frames=6, width=64, height=48)
    c = generate_scene(12, num_frames=6, width=64, height=48)
    for name in ("rgb", "depth", "instance", "intrinsics", "cam_to_world", "axis_align", "raw_cam_to_world"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert [o.to_dict() for o in a.objects] == [o.to_dict() for o in b.objects]
    assert not np.array_equal(a.depth, c.depth)
    assert not np.array_equal(a.cam_to_world, c.cam_to_world)


def test_scene_arrays_and_camera_conventions(scene):
    v, h, w = 24, 240, 320
    assert scene.rgb.shape == (v, h, w, 3) and scene.rgb.dtype == np.uint8
    assert scene.depth.shape == (v, h, w) and scene.depth.dtype == np.float32
    assert scene.instance.shape == (v, h, w) and scene.instance.dtype == np.int32
    assert scene.intrinsics.dtype == np.float64 and scene.cam_to_world.dtype == np.float64
    k = scene.intrinsics
    assert k[0, 0] == k[1, 1]
    hfov = math.degrees(2 * math.atan(w / 2 / k[0, 0]))
    assert 50 < hfov < 70
    assert abs(k[0, 2] - (w - 1) / 2) < 0.05 * w and abs(k[1, 2] - (h - 1) / 2) < 0.05 * h
    assert (scene.depth > 0).all()  # closed room: every ray hits something
    lo, hi = scene.room.lower, scene.room.upper
    assert lo[2] == 0.0 and 3.0 <= hi[0] - lo[0] <= 7.0 and 3.0 <= hi[1] - lo[1] <= 7.0 and 2.5 <= hi[2] <= 3.0
    centre = scene.room.center
    for pose in scene.cam_to_world:
        r, eye = pose[:3, :3], pose[:3, 3]
        np.testing.assert_allclose(r.T @ r, np.eye(3), atol=1e-12)
        assert np.linalg.det(r) == pytest.approx(1.0)
        assert 1.2 <= eye[2] <= 1.7
        assert np.all(eye[:2] > lo[:2] + 0.4) and np.all(eye[:2] < hi[:2] - 0.4)
        forward, down = r[:, 2], r[:, 1]
        assert -0.6 < forward[2] < -0.05  # slight downward pitch
        assert down[2] < 0 and abs(r[2, 0]) < 1e-9  # no roll: image x stays horizontal
        assert forward[:2] @ (centre[:2] - eye[:2]) > 0  # looks into the room
    # a smooth loop: neighbouring frames are close, and the path goes all round the centre
    eyes = scene.cam_to_world[:, :3, 3]
    steps = np.linalg.norm(np.diff(eyes, axis=0, append=eyes[:1]), axis=1)
    assert steps.max() < 2.5 * np.median(steps)
    az = np.unwrap(np.arctan2(eyes[:, 1] - centre[1], eyes[:, 0] - centre[0]))
    assert abs(az[-1] - az[0]) > 1.8 * math.pi


def test_axis_alignment_is_a_nontrivial_yaw_and_relates_raw_and_aligned_poses(scene):
    a = scene.axis_align
    np.testing.assert_allclose(a[2, :3], [0, 0, 1], atol=1e-12)
    np.testing.assert_allclose(a[:3, 2], [0, 0, 1], atol=1e-12)
    np.testing.assert_allclose(a[3], [0, 0, 0, 1])
    assert abs(a[0, 1]) > 1e-3 and np.linalg.norm(a[:2, 3]) > 1e-3
    np.testing.assert_allclose(a @ scene.raw_cam_to_world, scene.cam_to_world, atol=1e-12)
    assert not np.allclose(scene.raw_cam_to_world, scene.cam_to_world, atol=1e-3)


def test_objects_stand_on_the_floor_inside_the_room_without_overlap():
    for seed in range(6):
        s = generate_scene(seed, num_frames=12, width=64, height=48, num_objects=(4, 8))
        assert 4 <= len(s.objects) <= 8
        assert sorted(o.id for o in s.objects) == list(range(1, len(s.objects) + 1))
        for obj in s.objects:
            assert obj.label in LABEL_CATALOG
            corners = obj.box.corners().numpy()
            assert corners[:, 2].min() == pytest.approx(0.0, abs=1e-12)
            assert np.all(corners >= s.room.lower - 1e-9) and np.all(corners <= s.room.upper + 1e-9)
            r = obj.box.rotation.numpy()
            np.testing.assert_allclose(r[:, 2], [0, 0, 1], atol=1e-12)  # yaw only
            (w0, w1), (d0, d1), (z0, z1), _ = LABEL_CATALOG[obj.label]
            size = obj.box.size.numpy()
            assert w0 <= size[0] <= w1 and d0 <= size[1] <= d1 and z0 <= size[2] <= z1
        # no two boxes share volume: a dense grid of points inside each lies outside all others
        g = (np.stack(np.meshgrid(*[np.linspace(-0.5, 0.5, 9)] * 3, indexing="ij"), -1).reshape(-1, 3)) * 0.999
        for a in s.objects:
            pts = a.box.center.numpy() + (g * a.box.size.numpy()) @ a.box.rotation.numpy().T
            for b in s.objects:
                if b is not a:
                    assert not bool(b.box.contains(pts).any()), f"seed {seed}: {a.label} overlaps {b.label}"
        visible = set(np.unique(s.instance).tolist())
        assert {o.id for o in s.objects} <= visible, f"seed {seed}: some object is never seen"
        yaws = [o.yaw for o in s.objects]
        assert np.ptp(yaws) > 0.1  # orientations vary


def test_every_object_is_visible_and_seen_from_several_sides(scene, world_points):
    eyes = scene.cam_to_world[:, :3, 3]
    spreads = []
    for obj in scene.objects:
        per_frame = (scene.instance == obj.id).reshape(scene.num_frames, -1).sum(1)
        assert per_frame.max() >= 0.002 * scene.width * scene.height, obj.label
        # at least two side faces seen (≥ 20 pixels lying on the face plane)
        c, h, r = _box_frame(obj)
        local = (world_points[scene.instance == obj.id] - c) @ r
        sides = sum(int((np.abs(local[:, ax] - sgn * h[ax]) < 1e-4).sum() >= 20) for ax in (0, 1) for sgn in (-1, 1))
        assert sides >= 2, obj.label
        # range of viewing directions (azimuth of the camera around the object)
        seen = per_frame > 20
        az = np.sort(np.degrees(np.arctan2(eyes[seen, 1] - c[1], eyes[seen, 0] - c[0])))
        spreads.append(360 - np.diff(np.concatenate([az, az[:1] + 360])).max())
    assert min(spreads) > 30  # every object from several viewpoints
    assert max(spreads) > 180  # objects in the open are seen from all round


def test_instance_pixels_backproject_onto_their_boxes(scene, world_points):
    assert len(scene.objects) >= 4
    for obj in scene.objects:
        m = scene.instance == obj.id
        pts = world_points[m]
        assert bool(obj.box.contains(pts, margin=1e-4).all()), obj.label
        # and on the surface, not inside: the distance to the nearest face is ~0
        c, h, r = _box_frame(obj)
        local = np.abs((pts - c) @ r)
        assert np.abs(h - local).min(axis=1).max() < 1e-4
        # geometry.project_box_to_masks agrees (checked on the frame showing most of the object):
        # every labelled pixel is inside the box silhouette, and with depth it finds nearly only them
        frames = np.argsort(m.reshape(scene.num_frames, -1).sum(1))[-1:]
        poses, mf = scene.cam_to_world[frames], m[frames]
        size = (scene.height, scene.width)
        sil = project_box_to_masks(obj.box, scene.intrinsics, poses, size).numpy()
        assert bool(sil[mf].all()), obj.label
        vis = project_box_to_masks(
            obj.box, scene.intrinsics, poses, size, depth=scene.depth[frames], depth_tolerance=1e-3
        ).numpy()
        assert bool(vis[mf].all()) and (vis & ~mf).sum() <= 0.02 * int(mf.sum()) + 20, obj.label
    # room pixels lie on the room's faces, outside every box
    bg = world_points[scene.instance == 0][::3]
    lo, hi = scene.room.lower, scene.room.upper
    assert np.minimum(np.abs(bg - lo), np.abs(bg - hi)).min(axis=1).max() < 1e-4
    assert bool(np.all((bg > lo - 1e-4) & (bg < hi + 1e-4)))
    for obj in scene.objects:
        assert not bool(obj.box.contains(bg, margin=-1e-4).any())


def test_object_centres_recovered_from_depth(scene, world_points):
    recovered = 0
    for obj in scene.objects:
        r = obj.box.rotation.numpy()
        coords = world_points[scene.instance == obj.id] @ r  # along the box axes (yaw known)
        lo_hi = []
        for ax in range(3):
            lo, hi = coords[:, ax].min(), coords[:, ax].max()
            n_lo = int((np.abs(coords[:, ax] - lo) < 1e-5).sum())
            n_hi = int((np.abs(coords[:, ax] - hi) < 1e-5).sum())
            lo_hi.append((lo, hi, n_lo >= 20, n_hi >= 20))
        (x0, x1, sx0, sx1), (y0, y1, sy0, sy1), (_, z1, _, sz1) = lo_hi
        if not (sx0 and sx1 and sy0 and sy1 and sz1):
            continue  # some face was never seen
        recovered += 1
        est = r @ np.array([(x0 + x1) / 2, (y0 + y1) / 2, z1 / 2])  # the bottom rests on z = 0
        assert np.abs(est - obj.box.center.numpy()).max() < 1e-3, obj.label
        assert np.abs(np.array([x1 - x0, y1 - y0, z1]) - obj.box.size.numpy()).max() < 1e-3
    assert recovered >= 1


def test_short_sequences_and_fixed_counts():
    s = generate_scene(4, num_frames=1, width=48, height=36, num_objects=3)
    assert s.rgb.shape == (1, 36, 48, 3) and len(s.objects) == 3
    s = generate_scene(4, num_frames=3, width=48, height=36, num_objects=0)
    assert s.objects == [] and (s.instance == 0).all()
    with pytest.raises(SR3DInputError, match="labels"):
        generate_scene(0, labels=["unicorn"])
    with pytest.raises(SR3DInputError, match="seed"):
        generate_scene(-1)


def test_render_speed_budget_smoke(scene):
    # a 24-frame 320×240 scene renders in about a second on one core; allow generous slack for CI
    import time

    t0 = time.perf_counter()
    out = render(scene.objects, scene.room, scene.intrinsics, scene.cam_to_world, 320, 240)
    assert time.perf_counter() - t0 < 10.0
    np.testing.assert_array_equal(out.rgb, scene.rgb)
    np.testing.assert_array_equal(out.depth, scene.depth)


# ----------------------------------------------------------------------------------------------
# ScanNet-style writer
# ----------------------------------------------------------------------------------------------


def _png_header(path) -> tuple[int, int]:
    """(bit depth, colour type) from a PNG's IHDR chunk."""
    data = path.read_bytes()[:26]
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return data[24], data[25]


@pytest.fixture(scope="module")
def small_scene():
    return generate_scene(7, num_frames=5, width=80, height=60)


def test_writer_round_trip(small_scene, tmp_path):
    s = small_scene
    out = write_scannet_layout(s, tmp_path)
    assert out == tmp_path / s.scene_id and out.is_dir()
    v = s.num_frames
    for i in range(v):
        for sub, ext in (("color", "png"), ("depth", "png"), ("pose", "txt"), ("instance-filt", "png")):
            assert (out / sub / f"{i}.{ext}").is_file()
    assert not (out / "color" / f"{v}.png").exists()
    for i in range(v):
        color = np.asarray(Image.open(out / "color" / f"{i}.png"))
        np.testing.assert_array_equal(color, s.rgb[i])
        assert _png_header(out / "depth" / f"{i}.png") == (16, 0)  # 16-bit greyscale
        depth_mm = np.asarray(Image.open(out / "depth" / f"{i}.png")).astype(np.int64)
        np.testing.assert_array_equal(depth_mm, np.round(s.depth[i].astype(np.float64) * 1000).astype(np.int64))
        assert np.abs(depth_mm / 1000.0 - s.depth[i]).max() <= 0.0005 + 1e-6
        inst = np.asarray(Image.open(out / "instance-filt" / f"{i}.png")).astype(np.int64)
        np.testing.assert_array_equal(inst, s.instance[i])
        pose = np.loadtxt(out / "pose" / f"{i}.txt")
        assert pose.shape == (4, 4)
        np.testing.assert_allclose(pose, s.raw_cam_to_world[i], atol=1e-8)
    # the meta file's axisAlignment maps the raw poses onto the aligned ones
    meta = (out / f"{s.scene_id}.txt").read_text().splitlines()
    line = next(ln for ln in meta if ln.startswith("axisAlignment"))
    align = np.array([float(x) for x in line.split("=", 1)[1].split()]).reshape(4, 4)
    assert any(ln.startswith("sceneType") for ln in meta)
    for i in range(v):
        pose = np.loadtxt(out / "pose" / f"{i}.txt")
        np.testing.assert_allclose(align @ pose, s.cam_to_world[i], atol=1e-7)
    for name in ("intrinsic_color.txt", "intrinsic_depth.txt"):
        k4 = np.loadtxt(out / "intrinsic" / name)
        assert k4.shape == (4, 4)
        np.testing.assert_allclose(k4[:3, :3], s.intrinsics, atol=1e-8)
        np.testing.assert_allclose(k4[3], [0, 0, 0, 1])
    # objects.json round trip
    records = json.loads((out / "objects.json").read_text())
    assert {"id", "label", "center", "size", "rotation", "color"} <= set(records[0])
    back = read_objects(out)
    assert [(o.id, o.label, o.color) for o in back] == [(o.id, o.label, o.color) for o in s.objects]
    for a, b in zip(back, s.objects):
        for field in ("center", "size", "rotation"):
            np.testing.assert_allclose(getattr(a.box, field).numpy(), getattr(b.box, field).numpy(), atol=1e-12)
    # only the scene folder is left in root (no temporary siblings)
    assert [p.name for p in tmp_path.iterdir()] == [s.scene_id]


def test_writer_jpg_and_custom_id_and_overwrite(small_scene, tmp_path):
    out = write_scannet_layout(small_scene, tmp_path, scene_id="scene0999_00", color_format="jpg")
    assert out.name == "scene0999_00" and (out / "scene0999_00.txt").is_file()
    img = np.asarray(Image.open(out / "color" / "0.jpg"))
    assert img.shape == (60, 80, 3)
    assert np.abs(img.astype(int) - small_scene.rgb[0].astype(int)).mean() < 6  # lossy but close
    (out / "stale.txt").write_text("old")
    write_scannet_layout(small_scene, tmp_path, scene_id="scene0999_00")
    assert not (out / "stale.txt").exists() and (out / "color" / "0.png").is_file()
    with pytest.raises(SR3DInputError, match="color_format"):
        write_scannet_layout(small_scene, tmp_path, color_format="bmp")
    with pytest.raises(SR3DInputError, match="scene id"):
        write_scannet_layout(small_scene, tmp_path, scene_id="../escape")


def test_writer_is_atomic(small_scene, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = layout_mod._save_image

    def flaky(img, path, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("disk full")
        real(img, path, **kwargs)

    monkeypatch.setattr(layout_mod, "_save_image", flaky)
    with pytest.raises(OSError, match="disk full"):
        write_scannet_layout(small_scene, tmp_path)
    assert not (tmp_path / small_scene.scene_id).exists()
    assert list(tmp_path.iterdir()) == []  # no half-written temporary folder either
    # an existing complete scene survives a failed rewrite untouched
    monkeypatch.setattr(layout_mod, "_save_image", real)
    out = write_scannet_layout(small_scene, tmp_path)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    calls["n"] = 0
    monkeypatch.setattr(layout_mod, "_save_image", flaky)
    with pytest.raises(OSError):
        write_scannet_layout(small_scene, tmp_path)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == [small_scene.scene_id]


def test_read_objects_errors(tmp_path):
    with pytest.raises(SR3DInputError, match="objects.json"):
        read_objects(tmp_path)
    (tmp_path / "objects.json").write_text("{not json")
    with pytest.raises(SR3DInputError, match="JSON"):
        read_objects(tmp_path)
    (tmp_path / "objects.json").write_text(json.dumps([{"id": 1, "label": "chair"}]))
    with pytest.raises(SR3DInputError, match="center"):
        read_objects(tmp_path)


def test_frame_set_view(small_scene):
    fs = small_scene.to_frame_set()
    assert len(fs) == small_scene.num_frames and fs.has_metric_geometry
    assert fs.images[0].size == (80, 60)
    np.testing.assert_array_equal(np.asarray(fs.images[2]), small_scene.rgb[2])
    np.testing.assert_array_equal(fs.cam_to_world, small_scene.cam_to_world)
