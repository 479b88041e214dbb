"""The one visual-input path: FrameSet ids, readers on arrays, the record-region reader, the batched pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.masks import encode_coco_rle
from sr3d_plugin.regions import region_from_record
from sr3d_plugin.sources.base import FrameSet, normalise_frame_id
from sr3d_plugin.sources.images import FramesReader
from sr3d_plugin.sources.reconstruction import ReconstructionSource
from sr3d_plugin.visual_inputs import DEPTH_SOURCES, depth_source_name, positions, read_frames


def _images(n: int, w: int = 16, h: int = 12) -> list[Image.Image]:
    return [Image.fromarray(np.full((h, w, 3), 20 * i, np.uint8)) for i in range(n)]


# ----------------------------------------------------------------------------------------------
# FrameSet ids
# ----------------------------------------------------------------------------------------------


def test_frame_ids_follow_one_rule() -> None:
    for spelling in ("@frames/000010.jpg", "000010.png", " 000010 ", "10", 10, "scene/10"):
        assert normalise_frame_id(spelling) == "10"
    assert normalise_frame_id("f0") == "f0" and normalise_frame_id("1.5") == "1.5"
    fs = FrameSet(images=_images(3), frame_ids=["000000", "000020", "kitchen"])
    assert fs.index_of("20") == 1 and fs.index_of("@000020.jpg") == 1 and fs.index_of(0) == 0
    assert fs.index_of("kitchen.png") == 2
    assert fs.find("30") is None
    with pytest.raises(SR3DInputError, match=r"frame id '30' is not among the 3 frame\(s\)"):
        fs.index_of("30")
    # validated once, when built: two spellings of one frame are an error
    with pytest.raises(SR3DInputError, match="name the same frame"):
        FrameSet(images=_images(2), frame_ids=["010", "10"])
    # select keeps the rule
    assert fs.select([2, 1]).index_of("20") == 1


# ----------------------------------------------------------------------------------------------
# readers take arrays as well as paths
# ----------------------------------------------------------------------------------------------


def test_frames_reader_arrays_equal_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = [rng.integers(0, 255, (12, 16, 3), dtype=np.uint8) for _ in range(5)]
    depth = [rng.uniform(0.5, 3.0, (12, 16)).astype(np.float32) for _ in range(5)]
    poses = [np.eye(4) for _ in range(5)]
    for i, p in enumerate(poses):
        p[:3, 3] = [0.1 * i, 0, 0]
    k = np.array([[20.0, 0, 8], [0, 20.0, 6], [0, 0, 1]])
    paths, dpaths = [], []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rgb[i]).save(paths[-1])
        dpaths.append(tmp_path / f"{i}.npy")
        np.save(dpaths[-1], depth[i])
    np.save(tmp_path / "k.npy", k)
    ppaths = []
    for i in range(5):
        ppaths.append(tmp_path / f"p{i}.txt")
        ppaths[-1].write_text("\n".join(" ".join(str(v) for v in row) for row in poses[i]))
    from_files = FramesReader(num_frames=3).read(paths, depth=dpaths, intrinsics=tmp_path / "k.npy", poses=ppaths)
    from_arrays = FramesReader(num_frames=3).read(rgb, depth=np.stack(depth), intrinsics=k, poses=np.stack(poses))
    assert from_files.meta["sampled_indices"] == from_arrays.meta["sampled_indices"] == [0, 2, 4]
    for a, b in zip(from_files.images, from_arrays.images):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(from_files.depth, from_arrays.depth)
    np.testing.assert_allclose(from_files.intrinsics, from_arrays.intrinsics)
    np.testing.assert_allclose(from_files.cam_to_world, from_arrays.cam_to_world)
    assert "input_files" in from_files.meta and "input_files" not in from_arrays.meta  # cache keys by content
    with pytest.raises(SR3DInputError, match=r"2 depth map\(s\) for 5 frame\(s\)"):
        FramesReader().read(rgb, depth=depth[:2])
    with pytest.raises(SR3DInputError, match="fx > 0"):
        FramesReader().read(rgb, intrinsics=np.zeros((3, 3)))
    with pytest.raises(SR3DInputError, match=r"pose of frame 1 holds non-finite"):
        FramesReader().read(rgb, poses=[np.eye(4), np.full((4, 4), np.nan), *poses[2:]])


def test_reconstruction_source_arrays_match_frames(tmp_path: Path) -> None:
    fs = read_frames(frames=_images(8), num_frames=4)
    assert fs.meta["sampled_indices"] == [0, 2, 4, 7]
    xyz = np.random.default_rng(1).normal(size=(8, 12, 16, 3)).astype(np.float32)
    xyz[3, 0, 0] = np.nan
    # one point map per original frame: picked by the sampled indices
    pm = ReconstructionSource(xyz).pointmaps(fs)
    np.testing.assert_allclose(pm.xyz.numpy(), xyz[[0, 2, 4, 7]])
    # the same as the file, and as the position helper
    np.savez(tmp_path / "r.npz", xyz=xyz)
    pm_file = ReconstructionSource(tmp_path / "r.npz").pointmaps(fs)
    np.testing.assert_allclose(pm.xyz.numpy(), pm_file.xyz.numpy())
    assert torch.equal(pm.valid, pm_file.valid)
    canon, valid, info = positions(fs, "reconstruction", points=xyz)
    assert canon.shape == (4, 12, 16, 3) and valid is not None and info["source"] == "reconstruction"
    assert "points" not in info  # an array, not a file
    # one per sampled frame also works; anything else is an error naming both counts
    assert ReconstructionSource(xyz[[0, 2, 4, 7]]).pointmaps(fs).xyz.shape[0] == 4
    with pytest.raises(SR3DInputError, match=r"has 5 point maps but there are 4 frames sampled from 8"):
        ReconstructionSource(xyz[:5]).pointmaps(fs)
    # array options give a content key (cache)
    assert ReconstructionSource(xyz).options()["path"] != ReconstructionSource(xyz + 1).options()["path"]


def test_one_depth_source_vocabulary() -> None:
    from sr3d_plugin import plugins

    assert set(DEPTH_SOURCES) - {"auto"} == set(plugins.registry("pointmap_sources"))
    assert depth_source_name("gt") == "gt_depth" and depth_source_name("points") == "reconstruction"
    for name in DEPTH_SOURCES:
        assert depth_source_name(name) == name
    with pytest.raises(SR3DInputError, match=r"depth_source='lidar'; expected one of auto, gt_depth"):
        depth_source_name("lidar")
    fs = read_frames(frames=_images(2), num_frames=2)
    with pytest.raises(SR3DInputError, match="needs depth maps"):
        positions(fs, "gt_depth")
    with pytest.raises(SR3DInputError, match="needs depth_model"):
        positions(fs, "depth_anything")
    with pytest.raises(SR3DInputError, match="no depth, point maps or depth model"):
        positions(fs)


# ----------------------------------------------------------------------------------------------
# the record-region reader
# ----------------------------------------------------------------------------------------------


def test_record_region_reader_edge_cases() -> None:
    # 6 original frames, sampled ones carry the original ids "0", "2", "5"
    fs = FrameSet(images=_images(3), frame_ids=["0", "2", "5"])
    box = np.zeros((12, 16), bool)
    box[2:6, 3:9] = True
    empty = np.zeros((12, 16), bool)
    # "@ID" is an original frame id; an id that sampling left out is skipped
    item = {"masks": [{"frame": "@5", "rle": encode_coco_rle(box)}, {"frame": "@3", "rle": encode_coco_rle(box)}]}
    assert region_from_record(item, fs).frames == [2]
    # a bare integer is an index after sampling (frame 2 is original "5"), past the end: skipped
    item = {"masks": [{"frame": 2, "rle": encode_coco_rle(box)}, {"frame": 3, "rle": encode_coco_rle(box)}]}
    assert region_from_record(item, fs).frames == [2]
    # empty inline RLE masks are skipped like unsampled frames
    item = {"masks": [{"frame": "@0", "rle": encode_coco_rle(empty)}, {"frame": "@2", "rle": encode_coco_rle(box)}]}
    region = region_from_record(item, fs)
    assert region.frames == [1] and int(region.masks[1].sum()) == int(box.sum())
    # nothing left and no box3d: an error
    item = {"masks": [{"frame": "@0", "rle": encode_coco_rle(empty)}]}
    with pytest.raises(SR3DInputError, match="no box3d to project"):
        region_from_record(item, fs)
    # a bare string frame is neither an index nor '@ID'
    with pytest.raises(SR3DInputError, match="expected a frame index >= 0 or '@<frame id>'"):
        region_from_record({"masks": [{"frame": "5", "rle": encode_coco_rle(box)}]}, fs)
    # unknown keys are errors, on the region and on its masks
    with pytest.raises(SR3DInputError, match=r"unknown keys \['colour'\]"):
        region_from_record({"masks": [], "colour": "red"}, fs)
    with pytest.raises(SR3DInputError, match=r"unknown keys \['depth'\]"):
        region_from_record({"masks": [{"frame": 0, "box": [1, 1, 5, 5], "depth": 2}]}, fs)
    # spec strings keep the caller's location in their errors
    with pytest.raises(SR3DInputError, match=r"record 'a' region 0: .*frame 7"):
        region_from_record("frame=7 box=1,1,5,5", fs, where="record 'a' region 0")


def test_training_and_evaluation_read_regions_alike() -> None:
    from sr3d_plugin.evaluation.record_inputs import RecordInputBuilder

    fs = FrameSet(images=_images(3), frame_ids=["0", "2", "5"])
    box = np.zeros((12, 16), bool)
    box[2:6, 3:9] = True
    record = {"question_id": "q", "regions": [{"masks": [{"frame": "@2", "rle": encode_coco_rle(box)}], "label": "x"}]}
    builder = RecordInputBuilder.__new__(RecordInputBuilder)  # regions() uses no pipeline state
    (ev,) = builder.regions(record, fs)
    tr = region_from_record(record["regions"][0], fs)
    assert ev.frames == tr.frames == [1] and ev.label == tr.label == "x"
    assert np.array_equal(ev.masks[1], tr.masks[1])


# ----------------------------------------------------------------------------------------------
# batched pipeline
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():  # type: ignore[no-untyped-def]
    from sr3d_plugin.inference import SR3DPipeline
    from sr3d_plugin.testing import build_tiny_model

    model, processor = build_tiny_model(seed=0)
    return SR3DPipeline(model.eval(), processor, device="cpu")


def test_generate_and_score_batched_equal_single_calls(pipe) -> None:  # type: ignore[no-untyped-def]
    from sr3d_plugin.modeling.inputs import Region, VisualInput

    rng = np.random.default_rng(0)
    visuals, prompts = [], []
    for i, (w, h, n) in enumerate([(64, 48, 1), (40, 40, 2), (80, 30, 1)]):
        imgs = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for _ in range(n)]
        pts = torch.from_numpy(rng.uniform(-1, 1, (n, h, w, 3)).astype(np.float32))
        mask = np.zeros((h, w), bool)
        mask[2:10, 3:12] = True
        vis = VisualInput(imgs, points=pts, regions=[Region({0: mask})], multi_view=n > 1)
        visuals.append(vis)
        prompts.append(pipe.processor.build_prompt(["Where is <mask>?", "Is <mask> red?", "Describe <mask>."][i], vis))
    gen = {"max_new_tokens": 4, "do_sample": False}
    batched = pipe.generate(prompts, visuals, return_details=True, **gen)
    single = [pipe.generate([p], [v], return_details=True, **gen)[0] for p, v in zip(prompts, visuals)]
    assert [b["text"] for b in batched] == [s["text"] for s in single]
    assert [b["prompt_tokens"] for b in batched] == [s["prompt_tokens"] for s in single]
    assert [b["num_tiles"] for b in batched] == [s["num_tiles"] for s in single]
    conts = ["left", "a red chair", "yes"]
    scores = pipe.score(pipe.processor(prompts, visuals, padding_side="left"), conts)
    for p, v, c, s in zip(prompts, visuals, conts, scores):
        (one,) = pipe.score(pipe.processor([p], [v]), [c])
        assert s.logprob == pytest.approx(one.logprob, abs=1e-4) and s.num_tokens == one.num_tokens
        assert s.greedy == one.greedy and s.logprob < 0
        lp, n = pipe.answer_logprob(pipe.encode([p], [v]), c)
        assert lp == pytest.approx(one.logprob, abs=1e-5) and n == one.num_tokens
    # stop strings cut the answers; mismatched lengths are errors
    text = batched[0]["text"]
    if len(text) >= 2:
        cut = pipe.generate(prompts[:1], visuals[:1], stop=[text[1:]], **gen)
        assert cut == [text[: text.find(text[1:])].strip()] and len(cut[0]) < len(text)
    with pytest.raises(SR3DInputError, match="2 prompt"):
        pipe.generate(prompts[:2], visuals[:1], **gen)
    with pytest.raises(SR3DInputError, match="has no tokens"):
        pipe.score(pipe.processor(prompts[:1], visuals[:1]), [""])


def test_frame_set_checks_depth_intrinsics_and_poses_once_when_built() -> None:
    """The point-map sources trust a FrameSet: bad geometry is refused when the set is made, naming the frame."""
    from PIL import Image

    from sr3d_plugin.sources.base import FrameSet

    imgs = [Image.new("RGB", (8, 6)) for _ in range(2)]
    depth = np.ones((2, 6, 8), dtype=np.float32)
    k = np.tile(np.array([[5.0, 0, 4], [0, 5.0, 3], [0, 0, 1]]), (2, 1, 1))
    poses = np.tile(np.eye(4), (2, 1, 1))
    fs = FrameSet(images=imgs, depth=depth, intrinsics=k, cam_to_world=poses, frame_ids=["a", "b"])
    assert fs.cam_to_world.dtype == np.float64 and fs.depth.shape == (2, 6, 8)
    bad = depth.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(SR3DInputError, match="depth of frame b contains 1 non-finite"):
        FrameSet(images=imgs, depth=bad, intrinsics=k, frame_ids=["a", "b"])
    with pytest.raises(SR3DInputError, match=r"intrinsics must be \[2, 3, 3\]"):
        FrameSet(images=imgs, depth=depth, intrinsics=k[:, :2], frame_ids=["a", "b"])
    p = poses.copy()
    p[0, 0, 3] = np.inf
    with pytest.raises(SR3DInputError, match=r"frames \['a'\] have non-finite poses"):
        FrameSet(images=imgs, depth=depth, intrinsics=k, cam_to_world=p, frame_ids=["a", "b"])
    with pytest.raises(SR3DInputError, match="depth must be real numbers"):
        FrameSet(images=imgs, depth=depth.astype(np.complex64), frame_ids=["a", "b"])
