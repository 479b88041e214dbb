"""Point-map sources, the canonical pipeline, token grids, the on-disk cache and `sr3d pointmap`."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sr3d_plugin import hookimpl, plugins
from sr3d_plugin.cli import main
from sr3d_plugin.errors import SR3DInputError, SR3DPluginError
from sr3d_plugin.geometry import backproject, relative_depth_to_points
from sr3d_plugin.pointmap import (
    PointMapCache,
    canonical_pointmaps,
    centre_token_positions,
    choose_source,
    compute_pointmaps,
    default_cache_root,
    frame_token_positions,
    image_token_positions,
    pointmaps_with_cache,
)
from sr3d_plugin.sources import (
    DepthAnythingSource,
    FrameSet,
    GTDepthSource,
    PointMaps,
    ReconstructionSource,
    RelativeDepthSource,
    ScanNetReader,
)
from sr3d_plugin.testing import write_tiny_depth_anything
from sr3d_plugin.tiling import TileLayout, frame_layout

K = np.array([[20.0, 0.0, 7.5], [0.0, 20.0, 5.5], [0.0, 0.0, 1.0]])


def _images(n: int, w: int = 16, h: int = 12) -> list[Image.Image]:
    return [Image.new("RGB", (w, h), (10 * i, 0, 0)) for i in range(n)]


def _pose(t: tuple[float, float, float], yaw: float = 0.0) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    p = np.eye(4)
    p[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    p[:3, 3] = t
    return p


# ----------------------------------------------------------------------------------------------
# gt_depth
# ----------------------------------------------------------------------------------------------


def test_gt_depth_single_frame_camera_frame_and_validity() -> None:
    depth = np.full((1, 12, 16), 2.0, np.float32)
    depth[0, 0, :4] = 0.0
    fs = FrameSet(images=_images(1), depth=depth, intrinsics=K[None])
    pm = GTDepthSource().pointmaps(fs)
    assert pm.space == "world" and pm.canonical_mode == "sr3d" and pm.xyz.dtype == torch.float32
    # pixel (u=15, v=11): x = (15 − 7.5)·2/20, y = (11 − 5.5)·2/20
    np.testing.assert_allclose(pm.xyz[0, 11, 15].numpy(), [0.75, 0.55, 2.0], atol=1e-6)
    assert not pm.valid[0, 0, :4].any() and pm.valid[0, 1:].all()
    assert choose_source(fs) == "gt_depth"


def test_gt_depth_multi_view_shares_one_world_frame() -> None:
    # two cameras 1 m apart looking down +z at a wall 3 m in front of the first camera
    poses = np.stack([_pose((0, 0, 0)), _pose((1.0, 0, 0))])
    depth = np.full((2, 12, 16), 3.0, np.float32)
    fs = FrameSet(images=_images(2), depth=depth, intrinsics=np.repeat(K[None], 2, 0), cam_to_world=poses)
    pm = compute_pointmaps(fs, "gt_depth")
    # the wall point of pixel u = 14 in view 0 is seen at u = 14 − fx·(1 m)/(3 m) in view 1 (between pixels:
    # the world x is linear along the row, so interpolating view 1's row must give view 0's point)
    x0 = pm.xyz[0, 5, 14].numpy()
    u1 = 14 - 20.0 / 3.0
    assert x0[2] == pytest.approx(3.0)
    xs1 = pm.xyz[1, 5, :, 0].numpy()
    np.testing.assert_allclose(np.interp(u1, np.arange(16), xs1), x0[0], atol=1e-6)
    can = canonical_pointmaps(pm)
    assert float(can.amin()) == -1.0 and float(can.amax()) == 1.0


def test_gt_depth_errors() -> None:
    k2 = np.repeat(K[None], 2, 0)
    with pytest.raises(SR3DInputError, match="2 frames have depth but no camera poses"):
        GTDepthSource().pointmaps(FrameSet(images=_images(2), depth=np.ones((2, 12, 16), np.float32), intrinsics=k2))
    bad = np.ones((1, 12, 16), np.float32)
    bad[0, 2, 3] = np.nan
    with pytest.raises(SR3DInputError, match=r"frame 0 contains 1 non-finite.*\(2, 3\)"):
        GTDepthSource().pointmaps(FrameSet(images=_images(1), depth=bad, intrinsics=K[None]))
    with pytest.raises(SR3DInputError, match="negative"):
        GTDepthSource().pointmaps(
            FrameSet(images=_images(1), depth=-np.ones((1, 12, 16), np.float32), intrinsics=K[None])
        )
    with pytest.raises(SR3DInputError, match="all depth values .* invalid"):
        GTDepthSource().pointmaps(
            FrameSet(images=_images(1), depth=np.zeros((1, 12, 16), np.float32), intrinsics=K[None])
        )
    big_k = K.copy()
    big_k[0, 2] = 31.5  # colour intrinsics of a 64-pixel-wide image used on 16-pixel depth
    with pytest.raises(SR3DInputError, match="principal point .* outside the 16×12 depth map"):
        GTDepthSource().pointmaps(
            FrameSet(images=_images(1), depth=np.ones((1, 12, 16), np.float32), intrinsics=big_k[None])
        )
    with pytest.raises(SR3DInputError, match="aspect"):
        GTDepthSource().pointmaps(
            FrameSet(images=_images(1, 16, 16), depth=np.ones((1, 12, 16), np.float32), intrinsics=K[None])
        )
    with pytest.raises(SR3DInputError, match="needs depth intrinsics"):
        GTDepthSource().pointmaps(FrameSet(images=_images(1), depth=np.ones((1, 12, 16), np.float32)))
    with pytest.raises(SR3DInputError, match="needs depth maps"):
        GTDepthSource().pointmaps(FrameSet(images=_images(1)))


# ----------------------------------------------------------------------------------------------
# relative_depth and depth_anything (single view)
# ----------------------------------------------------------------------------------------------


def test_relative_depth_default_reads_the_image_like_sr_real() -> None:
    """SR-REAL's mm_utils.process_depth: d = value / 255 (value / max above 255); 0 is the nearest point, valid."""
    raw = np.tile(np.linspace(0, 200, 16).round(), (12, 1))[None].astype(np.float32)
    raw[0, 3, 4] = 0.0
    fs = FrameSet(images=_images(1), depth=raw / 1000.0, meta={"depth_scale": 1000.0})  # read as mm by default
    assert choose_source(fs) == "relative_depth"
    pm = RelativeDepthSource().pointmaps(fs)
    assert pm.space == "single_view" and bool(pm.valid.all())  # zero is valid
    np.testing.assert_allclose(pm.xyz[0].numpy(), relative_depth_to_points(raw[0] / 255.0).numpy(), atol=1e-6)
    assert float(pm.xyz[0, 3, 4, 2]) == pytest.approx(-1.0)  # value 0: z = 2·0 − 1, the nearest
    # no re-normalisation: a map that never reaches 255 keeps z < 1
    assert float(pm.xyz[0, ..., 2].max()) == pytest.approx(2 * 200 / 255 - 1, abs=1e-6)
    # 16-bit images with values above 255 are divided by their maximum
    wide = np.tile(np.linspace(0, 3000, 16).round(), (12, 1))[None].astype(np.float32)
    pm16 = RelativeDepthSource(depth_scale=1.0).pointmaps(FrameSet(images=_images(1), depth=wide))
    np.testing.assert_allclose(pm16.xyz[0].numpy(), relative_depth_to_points(wide[0] / 3000.0).numpy(), atol=1e-6)
    with pytest.raises(SR3DInputError, match="scaling='minmax'"):
        RelativeDepthSource(disparity=True)


def test_relative_depth_minmax_option_far_is_one() -> None:
    """The named ``scaling="minmax"`` option (off by default): re-normalise over depth > 0, zero invalid."""
    depth = np.tile(np.linspace(1.0, 4.0, 16, dtype=np.float32), (12, 1))[None]
    depth[0, 0, 0] = 0.0  # invalid in this mode
    fs = FrameSet(images=_images(1), depth=depth)
    pm = RelativeDepthSource(scaling="minmax", quantize=False).pointmaps(fs)
    assert pm.space == "single_view" and not bool(pm.valid[0, 0, 0]) and bool(pm.valid[0, 0, 1])
    d = (depth[0] - 1.0) / 3.0
    d[0, 0] = 1.0
    np.testing.assert_allclose(pm.xyz[0].numpy(), relative_depth_to_points(d).numpy(), atol=1e-6)
    # far (right edge, d = 1): z = 1 and the point sits at (u, v, 1)
    np.testing.assert_allclose(pm.xyz[0, 11, 15].numpy(), [1.0, 1.0, 1.0], atol=1e-6)
    assert torch.equal(pm.canonical(), pm.xyz)  # single view: already canonical
    q = RelativeDepthSource(scaling="minmax").pointmaps(fs)  # 8-bit levels as in the released data
    z = (q.xyz[0, ..., 2].numpy() + 1) / 2
    np.testing.assert_allclose(z * 255, np.round(z * 255), atol=1e-3)
    disp = RelativeDepthSource(scaling="minmax", disparity=True, quantize=False).pointmaps(
        FrameSet(images=_images(1), depth=1.0 / np.maximum(depth, 1.0))
    )
    assert float(disp.xyz[0, 5, 15, 2]) == pytest.approx(1.0) and float(disp.xyz[0, 5, 0, 2]) == pytest.approx(-1.0)
    with pytest.raises(SR3DInputError, match="no valid pixel"):
        RelativeDepthSource(scaling="minmax").pointmaps(
            FrameSet(images=_images(1), depth=np.zeros((1, 12, 16), np.float32))
        )


class _FakeEstimator:
    """Stand-in depth estimator: a horizontal ramp (registered through the public hook)."""

    def __init__(self, shape_error: bool = False) -> None:
        self.shape_error = shape_error

    def estimate(self, images: list[Image.Image]) -> np.ndarray:
        w, h = images[0].size
        ramp = np.tile(np.linspace(0.0, 1.0, w), (h, 1))
        if self.shape_error:
            ramp = ramp[:, :-1]
        return np.stack([ramp] * len(images)).astype(np.float32)


class _EstimatorPlugin:
    @hookimpl
    def register_depth_estimators(self, register) -> None:
        register("fake_ramp", _FakeEstimator)


def test_depth_anything_source_uses_registered_estimator() -> None:
    name = plugins.register_plugin(_EstimatorPlugin(), name="test-fake-estimator")
    try:
        fs = FrameSet(images=_images(2, 20, 10))
        assert choose_source(fs) == "depth_anything"
        pm = compute_pointmaps(fs, "depth_anything", estimator="fake_ramp")
        ramp = np.tile(np.linspace(0.0, 1.0, 20), (10, 1))
        np.testing.assert_allclose(pm.xyz[1].numpy(), relative_depth_to_points(ramp).numpy(), atol=1e-6)
        assert pm.space == "single_view" and bool(pm.valid.all())
        with pytest.raises(SR3DInputError, match="returned shape"):
            DepthAnythingSource(estimator="fake_ramp", shape_error=True).pointmaps(fs)
        with pytest.raises(SR3DInputError, match="different sizes"):
            DepthAnythingSource(estimator="fake_ramp").pointmaps(FrameSet(images=[*_images(1), *_images(1, 8, 8)]))
    finally:
        plugins.unregister_plugin(name)
    with pytest.raises(SR3DPluginError, match="fake_ramp"):
        DepthAnythingSource(estimator="fake_ramp")


# ----------------------------------------------------------------------------------------------
# reconstruction
# ----------------------------------------------------------------------------------------------


def _recon(tmp_path: Path, v: int = 4, h: int = 6, w: int = 8, **extra) -> Path:
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(v, h, w, 3)).astype(np.float32)
    xyz[:, 0, 0] = [100.0, 100.0, 100.0]  # outliers, marked invalid
    valid = np.ones((v, h, w), bool)
    valid[:, 0, 0] = False
    conf = np.tile(np.linspace(0.0, 1.0, w, dtype=np.float32), (v, h, 1))
    arrays = {"xyz": xyz, "valid": valid, "confidence": conf, **extra}
    path = tmp_path / "recon.npz"
    np.savez(path, **arrays)
    return path


def test_reconstruction_source(tmp_path: Path) -> None:
    path = _recon(tmp_path, frame_ids=np.array(["0", "10", "20", "30"]))
    fs = FrameSet(images=_images(4, 16, 12), frame_ids=["0", "10", "20", "30"])
    pm = ReconstructionSource(path).pointmaps(fs)
    assert pm.canonical_mode == "robust" and pm.confidence is not None
    assert not bool(pm.valid[:, 0, 0].any())
    can = canonical_pointmaps(pm)  # robust: the 100 m outliers do not squash the scene
    assert float(can[pm.valid].abs().max()) == pytest.approx(1.0, abs=1e-6)
    assert float(can[pm.valid].std()) > 0.2
    # min_confidence drops the left columns
    pm2 = ReconstructionSource(path, min_confidence=0.5).pointmaps(fs)
    assert not bool(pm2.valid[..., :3].any()) and bool(pm2.valid[..., 4:].all())
    # frames matched by id: a reconstruction of more frames serves a sampled subset, in order
    sub = FrameSet(images=_images(2, 16, 12), frame_ids=["30", "10"])
    pm3 = ReconstructionSource(path).pointmaps(sub)
    data = np.load(path)
    np.testing.assert_array_equal(pm3.xyz[0, 2:].numpy(), data["xyz"][3, 2:])
    np.testing.assert_array_equal(pm3.xyz[1, 2:].numpy(), data["xyz"][1, 2:])


def test_reconstruction_errors(tmp_path: Path) -> None:
    path = _recon(tmp_path)
    with pytest.raises(SR3DInputError, match="4 point maps but there are 3 frames"):
        ReconstructionSource(path).pointmaps(FrameSet(images=_images(3, 16, 12)))
    with pytest.raises(SR3DInputError, match="aspect"):
        ReconstructionSource(path).pointmaps(FrameSet(images=_images(4, 12, 16)))
    np.savez(tmp_path / "noconf.npz", xyz=np.ones((4, 6, 8, 3), np.float32))
    with pytest.raises(SR3DInputError, match="no 'confidence'"):
        ReconstructionSource(tmp_path / "noconf.npz", min_confidence=0.1).pointmaps(FrameSet(images=_images(4, 16, 12)))
    np.savez(tmp_path / "nokey.npz", points=np.ones((4, 6, 8, 3), np.float32))
    with pytest.raises(SR3DInputError, match="expected 'xyz'"):
        ReconstructionSource(tmp_path / "nokey.npz").pointmaps(FrameSet(images=_images(4, 16, 12)))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(SR3DInputError, match="without pickle"):
        ReconstructionSource(tmp_path / "obj.npy").pointmaps(FrameSet(images=_images(1, 16, 12)))
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(SR3DInputError, match="broken.npz"):
        ReconstructionSource(tmp_path / "broken.npz").pointmaps(FrameSet(images=_images(1, 16, 12)))
    with pytest.raises(SR3DInputError, match="needs a point-map file"):
        ReconstructionSource()
    # .npy: xyz alone, non-finite points are invalid
    xyz = np.ones((2, 6, 8, 3), np.float32)
    xyz[1, 2, 3] = np.nan
    np.save(tmp_path / "pts.npy", xyz)
    pm = ReconstructionSource(tmp_path / "pts.npy").pointmaps(FrameSet(images=_images(2, 16, 12)))
    assert int((~pm.valid).sum()) == 1 and not bool(pm.valid[1, 2, 3])
    assert bool(torch.isfinite(pm.xyz).all())


# ----------------------------------------------------------------------------------------------
# token grids
# ----------------------------------------------------------------------------------------------


def test_frame_token_positions_row_major_and_matches_tiling() -> None:
    h, w = 48, 64
    ys, xs = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    pts = np.stack([xs, ys, np.zeros_like(xs)], -1).astype(np.float32)
    canon = torch.from_numpy(np.stack([pts, -pts]))
    tok = frame_token_positions(canon, grid=8, tile_size=64)
    assert tok.shape == (2, 8, 8, 3)
    assert bool((tok[0, :, 1:, 0] > tok[0, :, :-1, 0]).all())  # x grows along columns
    assert bool((tok[0, 1:, :, 1] > tok[0, :-1, :, 1]).all())  # y grows along rows
    torch.testing.assert_close(tok[1], -tok[0])
    via_tiling = image_token_positions(pts, frame_layout(64), grid=8)
    torch.testing.assert_close(via_tiling[0], tok[0], atol=1e-5, rtol=0)


def test_frame_token_positions_valid_weighting_and_speed() -> None:
    canon = torch.zeros(2, 30, 40, 3)
    canon[..., 0] = 0.5
    valid = torch.ones(2, 30, 40, dtype=torch.bool)
    canon[:, :, :20] = 9.0  # garbage on the invalid half
    valid[:, :, :20] = False
    pos, cover = frame_token_positions(canon, valid, grid=4, tile_size=40, return_coverage=True)
    torch.testing.assert_close(pos[:, :, 2:, 0], torch.full((2, 4, 2), 0.5))
    assert bool((pos[:, :, :2] == 0).all()) and bool((cover[:, :, :2] == 0).all())
    plain = frame_token_positions(canon, grid=4, tile_size=40)
    assert float(plain[0, 0, 0, 0]) == pytest.approx(9.0)  # the reference averages every pixel
    big = torch.rand(32, 240, 320, 3)
    t = time.perf_counter()
    out = frame_token_positions(big, torch.rand(32, 240, 320) > 0.2)
    assert out.shape == (32, 32, 32, 3) and time.perf_counter() - t < 5.0


def test_image_token_positions_follow_the_tile_layout() -> None:
    h, w = 30, 60
    xs = np.tile(np.linspace(-1, 1, w, dtype=np.float32), (h, 1))
    pts = np.stack([xs, np.zeros_like(xs), np.ones_like(xs)], -1)
    layout = TileLayout(2, 1, tile_size=28, thumbnail=True)
    tok = image_token_positions(pts, layout, grid=4)
    assert tok.shape == (3, 4, 4, 3)
    assert float(tok[0, ..., 0].max()) < 0 < float(tok[1, ..., 0].min())  # left tile, right tile
    assert float(tok[2, ..., 0].mean()) == pytest.approx(0.0, abs=1e-5)  # thumbnail covers the whole image
    valid = np.ones((h, w), bool)
    valid[:, :30] = False
    tv, cover = image_token_positions(pts, layout, grid=4, valid=valid, return_coverage=True)
    assert bool((cover[0] == 0).all()) and bool((tv[0] == 0).all()) and bool((cover[1] == 1).all())


def test_centre_token_positions_read_the_patch_centres_like_region_masks() -> None:
    # a 16×16 map, grid 4 → 4-px patches; the bilinear resize reads pixels 1 and 2 of each patch
    h = w = 16
    pts = torch.zeros(h, w, 3)
    pts[..., 0] = torch.arange(w, dtype=torch.float32).view(1, -1)
    pts[..., 1] = torch.arange(h, dtype=torch.float32).view(-1, 1)
    pts[..., 2] = 5.0
    layout = TileLayout(1, 1, tile_size=16, thumbnail=False)
    tok = centre_token_positions(pts, layout, grid=4)
    assert tok.shape == (1, 4, 4, 3)
    assert torch.allclose(tok[0, 0, :, 0], torch.tensor([1.5, 5.5, 9.5, 13.5]))  # centre of pixels 4i+1, 4i+2
    assert torch.allclose(tok[0, :, 0, 1], torch.tensor([1.5, 5.5, 9.5, 13.5]))
    # a small object (depth 1) in front of a far wall (depth 5): area pooling puts its token in mid-air,
    # centre sampling on the object, and the token a region mask selects is exactly that token
    pts[..., 2] = 5.0
    obj = torch.zeros(h, w, dtype=torch.bool)
    obj[4:7, 5:8] = True  # 3×3 px, over the centre pixels of the patch at (1, 1) only
    pts[obj, 2] = 1.0
    area = image_token_positions(pts, TileLayout(1, 1, tile_size=16, thumbnail=False), grid=4)
    assert float(area[0, 1, 1, 2]) == pytest.approx((9 * 1.0 + 7 * 5.0) / 16)  # 7 of its 16 pixels are wall
    assert float(centre_token_positions(pts, layout, grid=4)[0, 1, 1, 2]) == pytest.approx(1.0)
    from sr3d_plugin.modeling.region_extractor import mask_weights

    weights = mask_weights(obj[None, None], 4).reshape(4, 4)
    assert int(weights.argmax()) == 1 * 4 + 1
    # invalid points get no weight; a token with no valid centre pixel is 0
    valid = torch.ones(h, w, dtype=torch.bool)
    valid[:8, :8] = False
    tv = centre_token_positions(pts, layout, grid=4, valid=valid)
    assert bool((tv[0, :2, :2] == 0).all()) and torch.allclose(tv[0, 2:, 2:], tok[0, 2:, 2:])
    with pytest.raises(SR3DInputError, match="must be \\[H, W, 3\\]"):
        centre_token_positions(torch.zeros(4, 4), layout, grid=2)


def test_token_point_sampling_is_a_model_option_the_processor_follows(tmp_path: Path) -> None:
    from sr3d_plugin.errors import SR3DConfigError
    from sr3d_plugin.modeling.configuration_sr3d import SR3DConfig
    from sr3d_plugin.modeling.processing_sr3d import SR3DProcessor
    from sr3d_plugin.synthetic.qa import training_samples
    from sr3d_plugin.testing import build_tiny_model

    assert SR3DConfig().token_point_sampling == "area"  # the released convention by default
    with pytest.raises(SR3DConfigError, match="token_point_sampling='middle'"):
        SR3DConfig(token_point_sampling="middle")
    _, base = build_tiny_model(tile_size=64, patch_size=8)
    assert base.token_point_sampling == "area"
    assert build_tiny_model(token_point_sampling="center")[1].token_point_sampling == "center"
    sample = training_samples(1, ["mv_distance"], split="test", image_size=64)[0]
    prompt = base.build_prompt(sample.question, sample.visual)
    area = base([prompt], [sample.visual])["tile_xyz"]
    base.token_point_sampling = "center"
    centre = base([prompt], [sample.visual])["tile_xyz"]
    pts = torch.as_tensor(sample.visual.points).permute(0, 3, 1, 2).float()
    expect = torch.nn.functional.interpolate(pts, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(centre, expect.permute(0, 2, 3, 1), atol=1e-6)
    assert not torch.allclose(area, centre, atol=1e-3)
    base.save_pretrained(tmp_path)
    assert SR3DProcessor.from_pretrained(tmp_path).token_point_sampling == "center"
    with pytest.raises(SR3DConfigError, match="token_point_sampling='mean'"):
        SR3DProcessor(token_point_sampling="mean")


def test_centre_sampling_puts_small_cross_frame_regions_on_their_objects() -> None:
    """Region positions as the region extractor pools them, against the mean of the region's own pixels:
    with the tiny model's 8-px patches area pooling drags them metres towards the wall behind."""
    from sr3d_plugin.synthetic.qa import training_samples
    from sr3d_plugin.testing import build_tiny_model

    _, proc = build_tiny_model(tile_size=64, patch_size=8)
    samples = training_samples(24, ["mv_distance"], split="test", image_size=64)
    errors: dict[str, list[float]] = {"area": [], "center": []}
    for mode in errors:
        proc.token_point_sampling = mode
        for s in samples:
            batch = proc([proc.build_prompt(s.question, s.visual)], [s.visual])
            xyz = batch["tile_xyz"].reshape(batch["tile_xyz"].shape[0], -1, 3)
            w = batch["region_weights"]
            pooled = torch.einsum("rtl,tlc->rc", w, xyz) / w.sum(dim=(1, 2)).clamp_min(1e-8)[:, None]
            for r, p in zip(s.visual.regions, pooled, strict=True):
                ((frame, mask),) = r.masks.items()
                own = torch.as_tensor(s.visual.points[frame])[torch.as_tensor(mask)].mean(0)
                errors[mode].append(float((p - own).norm()))
    area, centre = np.median(errors["area"]), np.median(errors["center"])
    assert centre < 0.5 * area, (centre, area)


# ----------------------------------------------------------------------------------------------
# the synthetic scene through the ScanNet reader
# ----------------------------------------------------------------------------------------------


def _distance_outside_surface(box, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(how far outside the box, how far inside from the nearest face) per point, metres."""
    local = (torch.from_numpy(points).double() - box.center) @ box.rotation
    half = box.size / 2
    out = (local.abs() - half).clamp_min(0).norm(dim=-1)
    inside = (half - local.abs()).amin(dim=-1).clamp_min(0)
    return out.numpy(), inside.numpy()


@pytest.fixture(scope="module")
def synthetic_pair(tmp_path_factory: pytest.TempPathFactory):
    """A generated scene whose frame 1 is re-rendered so that one surface point of frame 0 falls exactly
    on a pixel centre of frame 1; written in the ScanNet layout."""
    synthetic = pytest.importorskip("sr3d_plugin.synthetic")
    from sr3d_plugin.geometry import project_points

    scene = synthetic.generate_scene(5, num_frames=3, width=64, height=48)
    k = scene.intrinsics
    world0 = backproject(scene.depth[0].astype(np.float64), k, scene.cam_to_world[0]).numpy()
    for v0, u0 in np.argwhere(scene.instance[0] > 0)[::7]:
        p = world0[v0, u0]
        uv, z = project_points(p[None], k, scene.cam_to_world[1])
        u, v, z = float(uv[0, 0]), float(uv[0, 1]), float(z[0])
        ru, rv = round(u), round(v)
        if z <= 0.2 or not (0 <= ru < 64 and 0 <= rv < 48):
            continue
        shift = np.array([(u - ru) * z / k[0, 0], (v - rv) * z / k[1, 1], 0.0])
        pose = scene.cam_to_world[1].copy()
        pose[:3, 3] += pose[:3, :3] @ shift
        r = synthetic.render(scene.objects, scene.room, k, pose[None], 64, 48)
        if abs(float(r.depth[0, rv, ru]) - z) < 1e-5:
            break
    else:  # pragma: no cover - the seed is fixed
        pytest.fail("no surface point of frame 0 is visible in frame 1")
    scene.rgb[1], scene.depth[1], scene.instance[1] = r.rgb[0], r.depth[0], r.instance[0]
    scene.cam_to_world[1] = pose
    scene.raw_cam_to_world[1] = np.linalg.inv(scene.axis_align) @ pose
    folder = synthetic.write_scannet_layout(scene, tmp_path_factory.mktemp("synthetic"))
    return scene, folder, (int(v0), int(u0)), (rv, ru)


def test_synthetic_scene_round_trip_recovers_object_points(synthetic_pair) -> None:
    scene, folder, _, _ = synthetic_pair
    fs = ScanNetReader(num_frames=None).read(folder)
    assert fs.frame_ids == ["0", "1", "2"]
    assert fs.meta["objects_file"].endswith("objects.json") and len(fs.meta["instance_files"]) == 3
    np.testing.assert_allclose(fs.cam_to_world, scene.cam_to_world, atol=1e-6)  # axis alignment applied
    pm = compute_pointmaps(fs, "auto")
    exact = backproject(scene.depth.astype(np.float64), scene.intrinsics, scene.cam_to_world).numpy()
    assert np.abs(pm.xyz.numpy() - exact).max() < 1e-3  # millimetre PNG depth → < 1 mm
    seen = centred_axes = 0
    for obj in scene.objects:
        mask = scene.instance == obj.id
        if not mask.any():
            continue
        seen += 1
        outside, inside = _distance_outside_surface(obj.box, pm.xyz.numpy()[mask].astype(np.float64))
        assert outside.max() < 1e-3 and inside.max() < 1e-3  # on the box surface, within 1 mm
        # centre from opposite faces: along a box axis whose two faces are both seen, the middle of the
        # points' extent is the box centre (within 1 mm)
        local = (pm.xyz.numpy()[mask].astype(np.float64) - obj.box.center.numpy()) @ obj.box.rotation.numpy()
        half = obj.box.size.numpy() / 2
        for a in range(3):
            lo, hi = local[:, a].min(), local[:, a].max()
            if lo < -half[a] + 1e-3 and hi > half[a] - 1e-3:
                assert abs((lo + hi) / 2) < 1e-3
                centred_axes += 1
    assert seen >= 2 and centred_axes >= 2


def test_synthetic_surface_point_shares_canonical_coordinates(synthetic_pair, tmp_path: Path) -> None:
    import shutil

    scene, folder, (v0, u0), (v1, u1) = synthetic_pair
    exact_dir = tmp_path / folder.name
    shutil.copytree(folder, exact_dir)
    for i in range(scene.num_frames):  # exact metric depth (.npy, metres) instead of rounded millimetres
        (exact_dir / "depth" / f"{i}.png").unlink()
        np.save(exact_dir / "depth" / f"{i}.npy", scene.depth[i])
    fs = ScanNetReader(num_frames=None).read(exact_dir)
    pm = compute_pointmaps(fs, "gt_depth")
    for mode in ("sr3d", "robust"):
        can = canonical_pointmaps(pm, mode).numpy()
        assert np.abs(can[0, v0, u0] - can[1, v1, u1]).max() < 1e-5
    assert np.abs(pm.xyz[0, v0, u0].numpy() - pm.xyz[1, v1, u1].numpy()).max() < 1e-5


# ----------------------------------------------------------------------------------------------
# cache
# ----------------------------------------------------------------------------------------------


class _CountingSource:
    calls = 0

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def options(self) -> dict:
        return {"scale": self.scale}

    def pointmaps(self, frames: FrameSet) -> PointMaps:
        type(self).calls += 1
        xyz = torch.arange(len(frames) * 4 * 5 * 3, dtype=torch.float32).reshape(len(frames), 4, 5, 3) * self.scale
        return PointMaps(xyz=xyz, valid=torch.ones(len(frames), 4, 5, dtype=torch.bool), canonical_mode="robust")


class _CountingPlugin:
    @hookimpl
    def register_pointmap_sources(self, register) -> None:
        register("counting", _CountingSource)


@pytest.fixture()
def counting_source():
    name = plugins.register_plugin(_CountingPlugin(), name="test-counting-source")
    _CountingSource.calls = 0
    yield _CountingSource
    plugins.unregister_plugin(name)


def _files_frames(tmp_path: Path, n: int = 2) -> FrameSet:
    from sr3d_plugin.sources import FramesReader

    paths = []
    for i in range(n):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(np.full((4, 5, 3), i, np.uint8)).save(paths[-1])
    return FramesReader().read(paths)


def test_cache_hit_miss_and_invalidation(tmp_path: Path, counting_source) -> None:
    cache = PointMapCache(tmp_path / "cache")
    fs = _files_frames(tmp_path)
    r1 = pointmaps_with_cache(fs, "counting", cache=cache)
    assert not r1.cache_hit and counting_source.calls == 1 and r1.cache_path.is_file()
    assert r1.canonical_mode == "robust"
    r2 = pointmaps_with_cache(fs, "counting", cache=cache)
    assert r2.cache_hit and counting_source.calls == 1
    torch.testing.assert_close(r2.canonical, r1.canonical)
    torch.testing.assert_close(r2.pointmaps.xyz, r1.pointmaps.xyz)
    # another option, another canonical mode → other keys
    assert not pointmaps_with_cache(fs, "counting", cache=cache, scale=2.0).cache_hit
    assert not pointmaps_with_cache(fs, "counting", canonical_mode="sr3d", cache=cache).cache_hit
    assert counting_source.calls == 3
    # a changed input file (new mtime) → recomputed
    img = Path(fs.meta["input_files"][0])
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert not pointmaps_with_cache(fs, "counting", cache=cache).cache_hit
    assert counting_source.calls == 4
    # cache off
    r = pointmaps_with_cache(fs, "counting", cache=False)
    assert r.cache_path is None and counting_source.calls == 5
    assert not list((tmp_path / "cache").rglob(".*tmp"))  # atomic writes leave no temp files


def test_cache_in_memory_frames_are_keyed_by_content(tmp_path: Path, counting_source) -> None:
    cache = PointMapCache(tmp_path)
    a = FrameSet(images=_images(2, 5, 4))
    assert not pointmaps_with_cache(a, "counting", cache=cache).cache_hit
    assert pointmaps_with_cache(FrameSet(images=_images(2, 5, 4)), "counting", cache=cache).cache_hit
    b = FrameSet(images=[Image.new("RGB", (5, 4), (1, 2, 3)), *_images(1, 5, 4)])
    assert not pointmaps_with_cache(b, "counting", cache=cache).cache_hit


def test_corrupt_cache_file_is_recomputed_with_a_warning(tmp_path: Path, counting_source) -> None:
    cache = PointMapCache(tmp_path)
    fs = FrameSet(images=_images(1, 5, 4))
    r1 = pointmaps_with_cache(fs, "counting", cache=cache)
    r1.cache_path.write_bytes(b"garbage, not an npz")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        r2 = pointmaps_with_cache(fs, "counting", cache=cache)
    assert not r2.cache_hit and counting_source.calls == 2
    torch.testing.assert_close(r2.canonical, r1.canonical)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pointmaps_with_cache(fs, "counting", cache=cache).cache_hit  # rewritten, valid again


def test_default_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SR3D_CACHE", str(tmp_path))
    assert default_cache_root() == tmp_path / "pointmaps"
    monkeypatch.delenv("SR3D_CACHE")
    assert default_cache_root() == Path.home() / ".cache" / "sr3d" / "pointmaps"


# ----------------------------------------------------------------------------------------------
# `sr3d pointmap`
# ----------------------------------------------------------------------------------------------


def _write_scene(root: Path) -> Path:
    scene = root / "scene0007_00"
    for sub in ("color", "depth", "pose", "intrinsic"):
        (scene / sub).mkdir(parents=True)
    k4 = np.eye(4)
    k4[:3, :3] = K
    for sub in ("intrinsic_color.txt", "intrinsic_depth.txt"):
        (scene / "intrinsic" / sub).write_text("\n".join(" ".join(map(str, r)) for r in k4))
    for i in range(5):
        Image.fromarray(np.full((12, 16, 3), 40 * i, np.uint8)).save(scene / "color" / f"{i}.jpg")
        Image.fromarray(np.full((12, 16), 1500 + 100 * i, np.uint16)).save(scene / "depth" / f"{i}.png")
        (scene / "pose" / f"{i}.txt").write_text(
            "\n".join(" ".join(map(str, r)) for r in _pose((0.2 * i, 0, 0), 0.1 * i))
        )
    return scene


def test_cli_scene_json_out_preview_and_cache(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    scene = _write_scene(tmp_path)
    out, preview, cache = tmp_path / "o.npz", tmp_path / "p.png", tmp_path / "cache"
    argv = ["pointmap", "--scene", str(scene), "--num-frames", "3", "--cache-dir", str(cache), "--json", "--quiet"]
    assert main([*argv, "--out", str(out), "--preview", str(preview)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["frames"] == 3 and summary["frame_ids"] == ["0", "2", "4"]
    assert summary["source"] == "gt_depth" and summary["canonical_mode"] == "sr3d"
    assert summary["shapes"]["xyz"] == [3, 12, 16, 3] and summary["shapes"]["token_positions"] == [3, 32, 32, 3]
    assert summary["valid_fraction"] == 1.0 and summary["cache"]["hit"] is False
    assert summary["canonical_bounds"]["min"] == [-1.0, -1.0, -1.0]
    data = np.load(out)
    assert data["canonical"].shape == (3, 12, 16, 3) and list(data["frame_ids"]) == ["0", "2", "4"]
    fs = ScanNetReader(num_frames=3).read(scene)
    expected = canonical_pointmaps(GTDepthSource().pointmaps(fs)).numpy()
    np.testing.assert_allclose(data["canonical"], expected, atol=1e-6)
    with Image.open(preview) as im:
        assert im.size[0] > 2 * im.size[1] and im.mode == "RGB"  # frames beside their point maps
        arr = np.asarray(im)
    assert arr.std() > 10
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["cache"]["hit"] is True and again["cache"]["path"] == summary["cache"]["path"]
    assert again["canonical_bounds"] == summary["canonical_bounds"]
    assert main([*argv, "--canonical", "robust"]) == 0
    assert json.loads(capsys.readouterr().out)["cache"]["hit"] is False


def test_cli_image_inputs_and_points(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    img = tmp_path / "im.png"
    Image.fromarray(np.full((12, 16, 3), 128, np.uint8)).save(img)
    np.save(tmp_path / "d.npy", np.tile(np.linspace(1, 2, 16, dtype=np.float32), (12, 1)))
    np.savetxt(tmp_path / "k.txt", K)
    base = ["pointmap", "--image", str(img), "--no-cache", "--json", "--quiet"]
    assert main([*base, "--depth", str(tmp_path / "d.npy"), "--intrinsics", str(tmp_path / "k.txt")]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == "gt_depth"
    assert main([*base, "--depth", str(tmp_path / "d.npy")]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["source"] == "relative_depth" and s["space"] == "single_view" and s["cache"]["hit"] is False
    np.savez(tmp_path / "r.npz", xyz=np.random.default_rng(0).normal(size=(1, 6, 8, 3)).astype(np.float32))
    assert main([*base, "--points", str(tmp_path / "r.npz"), "--out", str(tmp_path / "o.npz")]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["source"] == "reconstruction" and s["canonical_mode"] == "robust"


def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["pointmap", "--scene", str(tmp_path / "missing"), "--quiet", "--no-cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sr3d pointmap: error:") and "scene folder not found" in err and "\n" not in err
    img = tmp_path / "im.png"
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(img)
    np.save(tmp_path / "d.npy", np.zeros((12, 16), np.float32))
    np.savetxt(tmp_path / "k.txt", K)
    argv = [
        "pointmap",
        "--image",
        str(img),
        "--depth",
        str(tmp_path / "d.npy"),
        "--intrinsics",
        str(tmp_path / "k.txt"),
    ]
    assert main([*argv, "--quiet", "--no-cache"]) == 2
    assert "all depth values" in capsys.readouterr().err
    assert main(["pointmap", "--image", str(img), "--source", "reconstruction", "--quiet", "--no-cache"]) == 2
    assert "--points" in capsys.readouterr().err
    assert main(["pointmap", "--image", str(img), "--source", "nope", "--quiet", "--no-cache"]) == 2
    assert "nope" in capsys.readouterr().err


def test_cli_synthetic(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("sr3d_plugin.synthetic")
    argv = ["pointmap", "--synthetic", "--cache-dir", str(tmp_path / "c"), "--json", "--quiet"]
    assert main([*argv, "--preview", str(tmp_path / "p.png")]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["input"]["kind"] == "synthetic" and s["frames"] == 24 and s["source"] == "gt_depth"
    assert s["valid_fraction"] > 0.99 and (tmp_path / "p.png").is_file()
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["cache"]["hit"] is True


def test_cli_video_with_local_depth_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import av

    write_tiny_depth_anything(tmp_path / "tiny")
    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for i in range(12):
            frame = av.VideoFrame.from_ndarray(np.full((32, 48, 3), 10 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    argv = ["pointmap", "--video", str(clip), "--num-frames", "4", "--depth-model", str(tmp_path / "tiny")]
    argv += [
        "--device",
        "cpu",
        "--cache-dir",
        str(tmp_path / "c"),
        "--json",
        "--quiet",
        "--out",
        str(tmp_path / "o.npz"),
    ]
    assert main(argv) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["source"] == "depth_anything" and s["space"] == "single_view"
    assert s["frame_ids"] == ["0", "3", "7", "11"] and s["shapes"]["xyz"] == [4, 32, 48, 3]
    z = np.load(tmp_path / "o.npz")["xyz"][..., 2]
    assert z.min() >= -1.0 and z.max() <= 1.0
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["cache"]["hit"] is True
