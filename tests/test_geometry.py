"""Geometry conventions (SR3D-FACTS §3) and bad-input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.geometry import (
    Box3D,
    backproject,
    canonical_transform,
    canonicalize,
    disparity_to_relative_depth,
    pool_to_grid,
    project_box_to_masks,
    project_points,
    relative_depth_to_points,
)


def _pose(yaw: float, t: tuple[float, float, float]) -> torch.Tensor:
    c, s = math.cos(yaw), math.sin(yaw)
    m = torch.eye(4, dtype=torch.float64)
    m[:3, :3] = torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=torch.float64)
    m[:3, 3] = torch.tensor(t, dtype=torch.float64)
    return m


K = torch.tensor([[300.0, 0, 159.5], [0, 310.0, 119.5], [0, 0, 1]], dtype=torch.float64)


def test_backproject_matches_pixel_index_formula() -> None:
    depth = torch.rand(2, 6, 8, dtype=torch.float64) * 3 + 0.5
    poses = torch.stack([_pose(0.3, (1, 2, 3)), _pose(-1.0, (0, -1, 0.5))])
    pts = backproject(depth, K, poses)
    assert pts.shape == (2, 6, 8, 3) and pts.dtype == torch.float64
    for v in range(2):
        for y, x in [(0, 0), (5, 7), (3, 2)]:
            z = depth[v, y, x]
            cam = torch.tensor([(x - K[0, 2]) * z / K[0, 0], (y - K[1, 2]) * z / K[1, 1], z, 1.0], dtype=torch.float64)
            assert torch.allclose(pts[v, y, x], (poses[v] @ cam)[:3], atol=1e-12)
    # float32 stays float32; [H, W] input gives [H, W, 3]
    single = backproject(depth[0].float(), K.float())
    assert single.shape == (6, 8, 3) and single.dtype == torch.float32


def test_project_points_inverts_backproject() -> None:
    depth = torch.full((4, 5), 2.0, dtype=torch.float64)
    pose = _pose(0.7, (0.2, 0.1, -0.3))
    pts = backproject(depth, K, pose)
    uv, z = project_points(pts.reshape(-1, 3), K, pose)
    ys, xs = torch.meshgrid(torch.arange(4.0), torch.arange(5.0), indexing="ij")
    assert torch.allclose(uv[:, 0], xs.reshape(-1).double(), atol=1e-9)
    assert torch.allclose(uv[:, 1], ys.reshape(-1).double(), atol=1e-9)
    assert torch.allclose(z, torch.full_like(z, 2.0))


def test_canonicalize_sr3d_is_rotate_then_global_minmax_including_invalid() -> None:
    pts = torch.randn(3, 5, 7, 3, dtype=torch.float64) * 4
    pts[0, 0, 0] = 0.0  # an invalid pixel back-projected to a camera centre still counts
    valid = torch.ones(3, 5, 7, dtype=torch.bool)
    valid[0, 0, 0] = False
    rot = torch.tensor([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=torch.float64)
    rows = pts.reshape(-1, 3) @ rot
    lo, hi = rows.min(0).values, rows.max(0).values
    expected = (2 * (rows - lo) / (hi - lo) - 1).reshape(pts.shape)
    out = canonicalize(pts, valid, mode="sr3d")
    assert torch.allclose(out, expected, atol=1e-12)
    assert float(out.min()) == -1.0 and float(out.max()) == 1.0
    # float32 agrees to 1e-5
    assert torch.allclose(canonicalize(pts.float()), expected.float(), atol=1e-5)


def test_canonicalize_robust_ignores_invalid_points() -> None:
    pts = torch.rand(2, 4, 4, 3, dtype=torch.float64)
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    pts[1, 2, 2] = torch.tensor([100.0, -100.0, 50.0], dtype=torch.float64)
    valid[1, 2, 2] = False
    robust = canonicalize(pts, valid, mode="robust")
    assert float(robust[valid].abs().max()) <= 1.0 + 1e-12
    assert torch.equal(robust[1, 2, 2], torch.zeros(3, dtype=torch.float64))
    exact = canonicalize(pts, valid, mode="sr3d")
    assert float(exact[valid].min()) > 0.9  # the outlier (the minimum on every axis) squeezed the exact range
    tf = canonical_transform(pts, valid, mode="robust")
    assert torch.allclose(tf.invert(tf.apply(pts)), pts, atol=1e-12)


def test_same_surface_point_seen_from_two_cameras_shares_canonical_coordinates() -> None:
    poses = torch.stack([_pose(0.0, (0, 0, 0)), _pose(0.35, (-1.5, 0.1, 0.4))])
    depth = torch.full((2, 240, 320), 3.0, dtype=torch.float64)
    # a surface point on the ray of pixel (y0, x0) of frame 0, 4 m away
    y0, x0 = 100, 170
    depth[0, y0, x0] = 4.0
    point = backproject(depth[0], K, poses[0])[y0, x0]
    # frame 1: shift the principal point so that the same point falls exactly on an integer pixel
    uv, z = project_points(point[None], K, poses[1])
    x1, y1 = round(float(uv[0, 0])), round(float(uv[0, 1]))
    k1 = K.clone()
    k1[0, 2] += x1 - float(uv[0, 0])
    k1[1, 2] += y1 - float(uv[0, 1])
    depth[1, y1, x1] = float(z[0])
    pts = backproject(depth, torch.stack([K, k1]), poses)
    assert torch.allclose(pts[0, y0, x0], pts[1, y1, x1], atol=1e-9)
    can = canonicalize(pts)
    assert float((can[0, y0, x0] - can[1, y1, x1]).abs().max()) < 1e-5
    can32 = canonicalize(pts.float())
    assert float((can32[0, y0, x0] - can32[1, y1, x1]).abs().max()) < 1e-5


def test_relative_depth_to_points_formula() -> None:
    d = torch.rand(5, 9, dtype=torch.float64)
    pts = relative_depth_to_points(d)
    y, x = 3, 7
    u, v, z = 2 * x / 8 - 1, 2 * y / 4 - 1, 2 * d[y, x] - 1
    assert torch.allclose(pts[y, x], torch.tensor([u * z, v * z, z], dtype=torch.float64))
    with pytest.raises(SR3DInputError, match=r"\[0, 1\]"):
        relative_depth_to_points(d + 1.5)


def test_disparity_to_relative_depth_far_is_one_and_quantised() -> None:
    pred = torch.tensor([[10.0, 5.0], [0.0, 2.5]])
    d = disparity_to_relative_depth(pred, quantize=False)
    assert torch.allclose(d, torch.tensor([[0.0, 0.5], [1.0, 0.75]]))
    q = disparity_to_relative_depth(torch.rand(7, 7))
    assert torch.allclose(q * 255, (q * 255).round(), atol=1e-4)


def test_pool_to_grid_equals_area_interpolation_and_respects_validity() -> None:
    pts = torch.randn(2, 448, 448, 3)
    grid, cover = pool_to_grid(pts, 32)
    ref = F.interpolate(pts.permute(0, 3, 1, 2), size=(32, 32), mode="area").permute(0, 2, 3, 1)
    assert torch.allclose(grid, ref, atol=1e-6) and torch.all(cover == 1)
    valid = torch.zeros(2, 448, 448, dtype=torch.bool)
    valid[:, :14, :7] = True  # half of the first token's pixels
    grid_v, cover_v = pool_to_grid(pts, 32, valid)
    assert torch.allclose(grid_v[:, 0, 0], pts[:, :14, :7].mean(dim=(1, 2)), atol=1e-5)
    assert torch.allclose(cover_v[:, 0, 0], torch.full((2,), 0.5))
    assert torch.all(grid_v[:, 1:, :] == 0) and torch.all(cover_v[:, 1:, :] == 0)


def test_box_masks_silhouette_and_depth_test() -> None:
    box = Box3D.from_center_size_yaw([0.0, 0.0, 3.0], [1.0, 1.0, 1.0], yaw=0.3)
    pose = torch.eye(4, dtype=torch.float64)
    sil = project_box_to_masks(box, K, pose, (240, 320))
    assert sil.shape == (240, 320) and sil[120, 160] and not sil[0, 0]
    corners_uv, _ = project_points(box.corners(), K, pose)
    inside = sil.nonzero().double()
    assert float(inside[:, 1].min()) >= float(corners_uv[:, 0].min()) - 1
    assert float(inside[:, 1].max()) <= float(corners_uv[:, 0].max()) + 1
    occluder = torch.full((240, 320), 10.0, dtype=torch.float64)
    occluder[:, :160] = 1.0  # a wall at 1 m hides the left half
    vis = project_box_to_masks(box, K, pose, (240, 320), depth=occluder)
    assert not vis[:, :160].any()
    assert not vis[:, 160:].any()  # the right half sees the background at 10 m *through* the box
    # a camera inside the box's x/y slabs sees only its front face (z = 2.5): every silhouette
    # pixel whose observed surface is that face is visible
    front = Box3D.from_aabb([-0.5, -0.5, 2.5], [0.5, 0.5, 3.5])
    sil_front = project_box_to_masks(front, K, pose, (240, 320))
    surface = torch.full((240, 320), 10.0, dtype=torch.float64)
    surface[sil_front] = 2.5
    vis2 = project_box_to_masks(front, K, pose, (240, 320), depth=surface)
    assert torch.equal(vis2, sil_front) and vis2.sum() > 1000


@pytest.mark.parametrize(
    "depth,match",
    [
        (torch.tensor([[1.0, float("nan")], [1.0, 1.0]]), "non-finite"),
        (torch.tensor([[1.0, float("inf")], [1.0, 1.0]]), "non-finite"),
        (torch.tensor([[1.0, -0.5], [1.0, 1.0]]), "negative"),
    ],
)
def test_bad_depth_is_named(depth: torch.Tensor, match: str) -> None:
    with pytest.raises(SR3DInputError, match=match):
        backproject(depth, K)


def test_bad_geometry_inputs_raise_clear_errors() -> None:
    depth = torch.ones(2, 4, 4)
    with pytest.raises(SR3DInputError, match="singular"):
        backproject(depth[0], torch.zeros(3, 3))
    with pytest.raises(SR3DInputError, match="singular"):
        backproject(depth[0], torch.tensor([[0.0, 0, 1], [0, 1, 1], [0, 0, 1]]))
    scaled = torch.eye(4)
    scaled[:3, :3] *= 2
    with pytest.raises(SR3DInputError, match="not rigid"):
        backproject(depth, K, torch.stack([torch.eye(4), scaled]))
    with pytest.raises(SR3DInputError, match="one per frame"):
        backproject(depth, torch.stack([K, K, K]))
    with pytest.raises(SR3DInputError, match="one per frame"):
        backproject(depth, K, torch.eye(4).expand(3, 4, 4))
    with pytest.raises(SR3DInputError, match="all points are invalid"):
        canonicalize(torch.zeros(2, 3, 3), torch.zeros(2, 3, dtype=torch.bool), mode="robust")
    with pytest.raises(SR3DInputError, match="unknown canonical mode"):
        canonicalize(torch.zeros(2, 3), mode="fancy")  # type: ignore[arg-type]
    with pytest.raises(SR3DInputError, match="size must be positive"):
        Box3D.from_aabb([0, 0, 0], [1, 0, 1])
    with pytest.raises(SR3DInputError, match="depth shape"):
        project_box_to_masks(Box3D.from_aabb([0, 0, 1], [1, 1, 2]), K, torch.eye(4), (4, 4), depth=torch.ones(5, 5))
    with pytest.raises(SR3DInputError, match="last row"):
        bad = torch.eye(4)
        bad[3, 0] = 1
        backproject(depth[0], K, bad)
    assert np.isfinite(canonicalize(np.ones((3, 3, 3))).numpy()).all()  # degenerate axes map to 0


def test_projected_3d_boxes_cover_the_visible_pixels_of_their_objects() -> None:
    """On a rendered scan, each object's 3D box projected with the depth test matches the object's
    rendered instance mask (occluded parts excluded): IoU >= 0.95 on every frame showing >= 300 px."""
    from sr3d_plugin.synthetic import generate_scene

    scene = generate_scene(3, num_frames=6, width=320, height=240)
    ious = []
    for obj in scene.objects:
        truth = scene.instance == obj.id
        frames = [f for f in range(scene.num_frames) if truth[f].sum() >= 300]
        if not frames:
            continue
        masks = project_box_to_masks(
            obj.box,
            scene.intrinsics,
            scene.cam_to_world[frames],
            (scene.height, scene.width),
            depth=scene.depth[frames],
        ).numpy()
        for k, f in enumerate(frames):
            inter = (masks[k] & truth[f]).sum()
            ious.append(inter / (masks[k] | truth[f]).sum())
    assert len(ious) >= 5
    assert min(ious) >= 0.95, sorted(ious)[:3]


def test_unvalidated_boxes_hold_the_same_tensors() -> None:
    from sr3d_plugin.geometry import Box3D

    for center, size, yaw in [
        (np.array([1.0, -2.0, 0.5]), [0.4, 0.3, 0.2], 0.3),  # float64 centre, a list size (float32 first)
        ([0.1, 0.2, 0.3], np.array([1.0, 2.0, 3.0], dtype=np.float32), -1.2),
        (torch.tensor([4.0, 5.0, 6.0]), torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64), 0.0),
    ]:
        a = Box3D.from_center_size_yaw(center, size, yaw)
        b = Box3D.from_center_size_yaw(center, size, yaw, validate=False)
        for name in ("center", "size", "rotation"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype == torch.float64 and torch.equal(x, y), name
    with pytest.raises(SR3DInputError, match="box size must be positive"):
        Box3D.from_center_size_yaw([0.0, 0.0, 0.0], [1.0, -1.0, 1.0], 0.0)
