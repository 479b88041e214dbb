"""Frame readers (ScanNet folders, images, frame lists, videos) and the Depth Anything V2 estimator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sr3d_plugin import plugins
from sr3d_plugin.errors import SR3DConfigError, SR3DInputError
from sr3d_plugin.sources import (
    DepthAnythingV2Estimator,
    FramesReader,
    ImageReader,
    ScanNetReader,
    VideoReader,
    uniform_frame_indices,
)
from sr3d_plugin.sources import video as video_mod

# ----------------------------------------------------------------------------------------------
# a small ScanNet-style scene written by the tests
# ----------------------------------------------------------------------------------------------

COLOR_W, COLOR_H = 32, 24
DEPTH_W, DEPTH_H = 16, 12
K_COLOR = np.array([[30.0, 0, 15.5], [0, 30.0, 11.5], [0, 0, 1]])
K_DEPTH = np.array([[15.0, 0, 7.5], [0, 15.0, 5.5], [0, 0, 1]])
AXIS = np.array([[0.0, -1.0, 0.0, 2.0], [1.0, 0.0, 0.0, -1.0], [0.0, 0.0, 1.0, 0.5], [0.0, 0.0, 0.0, 1.0]])


def _mat_text(m: np.ndarray) -> str:
    return "\n".join(" ".join(f"{x:.9g}" for x in row) for row in m) + "\n"


def raw_pose(i: int) -> np.ndarray:
    p = np.eye(4)
    p[:3, 3] = [0.1 * i, 0.0, 0.0]
    return p


def write_scene(
    root: Path,
    ids: list[int],
    invalid: tuple[int, ...] = (),
    axis: np.ndarray | None = AXIS,
    name: str = "scene0001_00",
) -> Path:
    """Colour value ``i`` encodes frame ``i``; depth is ``1000 + i`` mm everywhere."""
    scene = root / name
    for sub in ("color", "depth", "pose", "intrinsic"):
        (scene / sub).mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.fromarray(np.full((COLOR_H, COLOR_W, 3), i, np.uint8)).save(scene / "color" / f"{i}.png")
        Image.fromarray(np.full((DEPTH_H, DEPTH_W), 1000 + i, np.uint16)).save(scene / "depth" / f"{i}.png")
        pose = np.full((4, 4), -np.inf) if i in invalid else raw_pose(i)
        (scene / "pose" / f"{i}.txt").write_text(_mat_text(pose))
    k4c, k4d = np.eye(4), np.eye(4)
    k4c[:3, :3], k4d[:3, :3] = K_COLOR, K_DEPTH
    (scene / "intrinsic" / "intrinsic_color.txt").write_text(_mat_text(k4c))
    (scene / "intrinsic" / "intrinsic_depth.txt").write_text(_mat_text(k4d))
    if axis is not None:
        nums = " ".join(f"{x:.9g}" for x in axis.reshape(-1))
        (scene / f"{name}.txt").write_text(f"colorWidth = {COLOR_W}\naxisAlignment = {nums}\nsceneType = Office\n")
    return scene


def test_scannet_numeric_order_skips_invalid_poses_then_samples(tmp_path: Path) -> None:
    ids = list(range(12))
    scene = write_scene(tmp_path, ids, invalid=(3, 7))
    fs = ScanNetReader(num_frames=4).read(scene)
    valid = [i for i in ids if i not in (3, 7)]
    expected = [valid[j] for j in uniform_frame_indices(len(valid), 4)]
    assert expected == [0, 4, 8, 11]  # floor(linspace(0, 9, 4)) over the 10 valid frames
    assert fs.frame_ids == [str(i) for i in expected]
    # the pixels say which file was read (lexical order 0, 1, 10, 11, 2, … would give other frames)
    assert [int(np.asarray(im)[0, 0, 0]) for im in fs.images] == expected
    np.testing.assert_allclose(fs.depth[:, 0, 0], [(1000 + i) / 1000 for i in expected], rtol=0, atol=1e-6)
    assert fs.depth.shape == (4, DEPTH_H, DEPTH_W) and fs.depth.dtype == np.float32
    assert fs.images[0].size == (COLOR_W, COLOR_H)
    np.testing.assert_allclose(fs.intrinsics[0], K_DEPTH)
    np.testing.assert_allclose(fs.color_intrinsics[2], K_COLOR)
    assert fs.meta["invalid_pose_frames"] == [3, 7]
    assert fs.meta["valid_frames"] == 10 and fs.meta["total_frames"] == 12


def test_scannet_axis_alignment_is_left_multiplied(tmp_path: Path) -> None:
    scene = write_scene(tmp_path, [0, 5, 9])
    aligned = ScanNetReader(num_frames=32).read(scene)
    raw = ScanNetReader(num_frames=32, axis_align=False).read(scene)
    for n, i in enumerate([0, 5, 9]):
        np.testing.assert_allclose(raw.cam_to_world[n], raw_pose(i), atol=1e-9)
        np.testing.assert_allclose(aligned.cam_to_world[n], AXIS @ raw_pose(i), atol=1e-9)
    np.testing.assert_allclose(aligned.axis_align, AXIS)
    assert raw.axis_align is None
    # without the meta file nothing is applied
    scene2 = write_scene(tmp_path / "b", [0, 1], axis=None)
    np.testing.assert_allclose(ScanNetReader().read(scene2).cam_to_world[1], raw_pose(1), atol=1e-9)


def test_scannet_depth_scale_and_numeric_order_beyond_ten(tmp_path: Path) -> None:
    scene = write_scene(tmp_path, [2, 10, 1], axis=None)
    fs = ScanNetReader(num_frames=None, depth_scale=4000.0).read(scene)
    assert fs.frame_ids == ["1", "2", "10"]
    np.testing.assert_allclose(fs.depth[:, 3, 3], [1001 / 4000, 1002 / 4000, 1010 / 4000], atol=1e-7)


def test_scannet_errors(tmp_path: Path) -> None:
    with pytest.raises(SR3DInputError, match="scene folder not found"):
        ScanNetReader().read(tmp_path / "nope")
    scene = write_scene(tmp_path, [0, 1, 2])
    (scene / "depth" / "1.png").unlink()
    with pytest.raises(SR3DInputError, match=r"3 colour frames but 2 depth files.*\[1\]"):
        ScanNetReader().read(scene)

    scene = write_scene(tmp_path / "b", [0, 1])
    (scene / "pose" / "7.txt").write_text(_mat_text(np.eye(4)))
    with pytest.raises(SR3DInputError, match=r"without a colour frame: \[7\]"):
        ScanNetReader().read(scene)

    scene = write_scene(tmp_path / "c", [0, 1])
    (scene / "pose" / "1.txt").write_text("1 0 0 0\n0 1 0 x\n0 0 1 0\n0 0 0 1\n")
    with pytest.raises(SR3DInputError, match=r"1\.txt.*line 2.*not a number"):
        ScanNetReader().read(scene)

    scene = write_scene(tmp_path / "d", [0, 1])
    (scene / "scene0001_00.txt").write_text("axisAlignment = " + " ".join(["1"] * 15) + "\n")
    with pytest.raises(SR3DInputError, match="15 numbers; expected 16"):
        ScanNetReader().read(scene)

    scene = write_scene(tmp_path / "e", [0, 1], invalid=(0, 1))
    with pytest.raises(SR3DInputError, match="all 2 poses .* invalid"):
        ScanNetReader().read(scene)

    scene = write_scene(tmp_path / "f", [0, 1])
    (scene / "intrinsic" / "intrinsic_depth.txt").unlink()
    with pytest.raises(SR3DInputError, match="depth intrinsics not found"):
        ScanNetReader().read(scene)

    scene = write_scene(tmp_path / "g", [0, 1])
    Image.fromarray(np.zeros((DEPTH_H, DEPTH_W, 3), np.uint8)).save(scene / "depth" / "1.png")
    with pytest.raises(SR3DInputError, match="single-channel 16-bit PNG"):
        ScanNetReader().read(scene)

    scene = write_scene(tmp_path / "h", [0, 1])
    Image.fromarray(np.zeros((DEPTH_H + 2, DEPTH_W, 1), np.uint16)[..., 0]).save(scene / "depth" / "1.png")
    with pytest.raises(SR3DInputError, match="different shapes"):
        ScanNetReader().read(scene)


# ----------------------------------------------------------------------------------------------
# images and frame lists
# ----------------------------------------------------------------------------------------------


def test_image_reader_depth_png_npy_and_intrinsics(tmp_path: Path) -> None:
    img = tmp_path / "a.jpg"
    Image.fromarray(np.full((12, 16, 3), 90, np.uint8)).save(img)
    mm = np.arange(12 * 16, dtype=np.uint16).reshape(12, 16) * 10
    Image.fromarray(mm).save(tmp_path / "d.png")
    k4 = np.eye(4)
    k4[:3, :3] = K_DEPTH
    (tmp_path / "k.txt").write_text(_mat_text(k4))
    fs = ImageReader().read(img, depth=tmp_path / "d.png", intrinsics=tmp_path / "k.txt")
    assert len(fs) == 1 and fs.images[0].mode == "RGB"
    np.testing.assert_allclose(fs.depth[0], mm / 1000.0, atol=1e-6)
    np.testing.assert_allclose(fs.intrinsics[0], K_DEPTH)
    np.testing.assert_allclose(fs.color_intrinsics[0], K_DEPTH)  # same size: shared
    assert fs.cam_to_world is None

    metres = np.random.default_rng(0).uniform(0.5, 3, size=(12, 16)).astype(np.float32)
    np.save(tmp_path / "d.npy", metres)
    np.save(tmp_path / "k.npy", K_DEPTH)
    fs = ImageReader(depth=tmp_path / "d.npy", intrinsics=tmp_path / "k.npy").read(img)
    np.testing.assert_array_equal(fs.depth[0], metres)
    np.testing.assert_allclose(fs.intrinsics[0], K_DEPTH)


def test_image_reader_errors(tmp_path: Path) -> None:
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(img)
    with pytest.raises(SR3DInputError, match="image not found"):
        ImageReader().read(tmp_path / "missing.png")
    bad = np.ones((12, 16), np.float32)
    bad[3, 4] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(SR3DInputError, match=r"non-finite.*pixel \(3, 4\)"):
        ImageReader().read(img, depth=tmp_path / "nan.npy")
    np.save(tmp_path / "neg.npy", -np.ones((12, 16), np.float32))
    with pytest.raises(SR3DInputError, match="negative"):
        ImageReader().read(img, depth=tmp_path / "neg.npy")
    (tmp_path / "k.txt").write_text("1 0\n0 1\n")
    with pytest.raises(SR3DInputError, match="expected 3×3 or 4×4"):
        ImageReader().read(img, intrinsics=tmp_path / "k.txt")
    (tmp_path / "k0.txt").write_text("0 0 8\n0 10 6\n0 0 1\n")
    with pytest.raises(SR3DInputError, match="fx > 0"):
        ImageReader().read(img, intrinsics=tmp_path / "k0.txt")
    (tmp_path / "notimg.png").write_text("hello")
    with pytest.raises(SR3DInputError, match="not a readable image"):
        ImageReader().read(tmp_path / "notimg.png")


def test_frames_reader_poses_sampling_and_mismatches(tmp_path: Path) -> None:
    paths, depths, poses = [], [], []
    for i in range(5):
        paths.append(tmp_path / f"f{i}.png")
        Image.fromarray(np.full((12, 16, 3), 10 * i, np.uint8)).save(paths[-1])
        depths.append(tmp_path / f"d{i}.npy")
        np.save(depths[-1], np.full((12, 16), 1.0 + i, np.float32))
        poses.append(tmp_path / f"p{i}.txt")
        poses[-1].write_text(_mat_text(raw_pose(i)))
    np.save(tmp_path / "k.npy", K_DEPTH)
    fs = FramesReader(num_frames=3).read(paths, depth=depths, intrinsics=tmp_path / "k.npy", poses=poses)
    assert fs.frame_ids == ["f0", "f2", "f4"]
    np.testing.assert_allclose(fs.depth[:, 0, 0], [1.0, 3.0, 5.0])
    np.testing.assert_allclose(fs.cam_to_world[1], raw_pose(2))
    assert fs.has_metric_geometry
    with pytest.raises(SR3DInputError, match=r"4 depth map\(s\) for 5 frame\(s\)"):
        FramesReader().read(paths, depth=depths[:4])
    np.save(depths[3], np.ones((10, 16), np.float32))
    with pytest.raises(SR3DInputError, match="different shapes"):
        FramesReader().read(paths, depth=depths)
    poses[1].write_text(_mat_text(np.full((4, 4), -np.inf)))
    with pytest.raises(SR3DInputError, match="non-finite"):
        FramesReader().read(paths, poses=poses)


# ----------------------------------------------------------------------------------------------
# videos
# ----------------------------------------------------------------------------------------------


def write_video(path: Path, n: int, codec: str = "mpeg4") -> None:
    """Frame ``i`` is a flat grey ``20 + 5·i``."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.bit_rate = 2_000_000
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 + 5 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def decoded_index(im: Image.Image) -> int:
    return round((np.asarray(im, dtype=np.float64).mean() - 20) / 5)


@pytest.mark.parametrize("suffix", ["mp4", "mkv"])
def test_video_uniform_sampling(tmp_path: Path, suffix: str) -> None:
    import av

    assert "mpeg4" in av.codecs_available
    path = tmp_path / f"clip.{suffix}"
    write_video(path, 37)
    fs = VideoReader(num_frames=8).read(path)
    expected = [int(i) for i in np.floor(np.linspace(0, 36, 8))]
    assert fs.meta["frame_indices"] == expected
    assert [decoded_index(im) for im in fs.images] == expected
    assert fs.frame_ids == [str(i) for i in expected]
    assert fs.meta["total_frames"] == 37 and fs.meta["fps"] == pytest.approx(10.0)
    assert all(im.mode == "RGB" and im.size == (64, 48) for im in fs.images)
    if suffix == "mkv":  # Matroska stores no frame count: the reader must count itself
        assert fs.meta["metadata_frames"] == 0


def test_video_wrong_metadata_and_short_video(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "clip.mp4"
    write_video(path, 30)
    monkeypatch.setattr(video_mod, "metadata_frame_count", lambda p: 100)  # a lying container
    fs = VideoReader(num_frames=4).read(path)
    assert [decoded_index(im) for im in fs.images] == [0, 9, 19, 29]
    assert fs.meta["total_frames"] == 30 and fs.meta["metadata_frames"] == 100
    monkeypatch.undo()
    fs = VideoReader(num_frames=32).read(path)  # fewer frames than asked: all of them
    assert [decoded_index(im) for im in fs.images] == list(range(30))


def test_video_errors(tmp_path: Path) -> None:
    with pytest.raises(SR3DInputError, match="video file not found"):
        VideoReader().read(tmp_path / "none.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 10)
    with pytest.raises(SR3DInputError, match="junk.mp4"):
        VideoReader().read(tmp_path / "junk.mp4")
    with pytest.raises(SR3DInputError, match=r"num_frames=0 .*expected (a positive integer|an integer >= 1)"):
        VideoReader(num_frames=0)


# ----------------------------------------------------------------------------------------------
# Depth Anything V2 (tiny random model built from a config, loaded from a local folder)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_depth_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sr3d_plugin.testing import write_tiny_depth_anything

    return write_tiny_depth_anything(tmp_path_factory.mktemp("tiny-depth-anything"))


def test_depth_anything_estimator_matches_manual_pipeline(tiny_depth_model: Path) -> None:
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, size=(30, 50, 3), dtype=np.uint8)) for _ in range(3)]
    est = plugins.create("depth_estimators", "depth_anything_v2", model=str(tiny_depth_model), device="cpu")
    assert isinstance(est, DepthAnythingV2Estimator)
    depth = est.estimate(images)
    assert depth.shape == (3, 30, 50) and depth.dtype == np.float32
    assert depth.min() == 0.0 and depth.max() == 1.0
    np.testing.assert_allclose(depth * 255, np.round(depth * 255), atol=1e-4)  # 8-bit levels

    # independent recomputation of SR-REAL's path (transformers 4.x processors resize the uint8 image
    # with PIL): PIL bicubic to the processor's size → processor without resize → model → bicubic to
    # the image size → 1 − minmax → uint8 cast
    proc = AutoImageProcessor.from_pretrained(tiny_depth_model)
    model = AutoModelForDepthEstimation.from_pretrained(tiny_depth_model).eval()

    def manual(inputs):
        with torch.no_grad():
            pred = model(**inputs).predicted_depth
        up = torch.nn.functional.interpolate(pred[:, None], size=(30, 50), mode="bicubic", align_corners=False)[0, 0]
        return up, 1.0 - ((up - up.min()) / (up.max() - up.min())).numpy()  # far (small disparity) = 1

    h, w = proc(images=images[1:2], return_tensors="pt")["pixel_values"].shape[-2:]
    small = images[1].resize((int(w), int(h)), Image.Resampling.BICUBIC)
    up, expected = manual(proc(images=[small], do_resize=False, return_tensors="pt"))
    np.testing.assert_allclose(depth[1], (expected * 255).astype(np.uint8) / 255, atol=1.01 / 255)
    raw = DepthAnythingV2Estimator(model=str(tiny_depth_model), device="cpu", quantize=False).estimate(images[1])
    np.testing.assert_allclose(raw[0], expected, atol=1e-4)
    assert np.argmax(raw[0]) == np.argmin(up.numpy())  # the farthest pixel has the smallest prediction
    # pil_resize=False (an option): the installed processor resizes by itself
    _, expected_own = manual(proc(images=images[1:2], return_tensors="pt"))
    own = DepthAnythingV2Estimator(
        model=str(tiny_depth_model), device="cpu", quantize=False, pil_resize=False
    ).estimate(images[1])
    np.testing.assert_allclose(own[0], expected_own, atol=1e-4)


def test_depth_anything_estimator_sizes_and_options(tiny_depth_model: Path) -> None:
    est = DepthAnythingV2Estimator(model=str(tiny_depth_model), device="cpu", batch_size=2)
    a = Image.new("RGB", (40, 20), (10, 200, 30))
    b = Image.fromarray(np.random.default_rng(1).integers(0, 255, size=(33, 21, 3), dtype=np.uint8))
    out = est.estimate_list([a, b, b])
    assert [o.shape for o in out] == [(20, 40), (33, 21), (33, 21)]
    np.testing.assert_array_equal(out[1], out[2])
    with pytest.raises(SR3DInputError, match="different sizes"):
        est.estimate([a, b])
    with pytest.raises(SR3DConfigError, match="unknown dtype"):
        DepthAnythingV2Estimator(model=str(tiny_depth_model), dtype="float128")
    with pytest.raises(SR3DInputError, match="cannot load depth model"):
        DepthAnythingV2Estimator(model=str(tiny_depth_model.parent / "missing"), device="cpu").estimate(a)


def test_components_are_registered() -> None:
    assert {"scannet", "image", "frames", "video"} <= set(plugins.registry("frame_readers"))
    assert "depth_anything_v2" in plugins.registry("depth_estimators")
    assert {"gt_depth", "relative_depth", "depth_anything", "reconstruction"} <= set(
        plugins.registry("pointmap_sources")
    )
    assert isinstance(plugins.create("frame_readers", "scannet", num_frames=8), ScanNetReader)
