"""``sr3d ask`` end to end on a tiny random model and synthetic scenes (offline, in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sr3d_plugin.cli import main
from sr3d_plugin.testing import write_tiny_depth_anything


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from sr3d_plugin.synthetic import generate_scene, write_scannet_layout
    from sr3d_plugin.testing import build_tiny_model

    root = tmp_path_factory.mktemp("ask")
    model, processor = build_tiny_model(seed=1)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    scene = generate_scene(5, num_frames=8, width=160, height=120, num_objects=3)
    scene_dir = write_scannet_layout(scene, root / "scans")
    return {"root": root, "model": str(root / "model"), "scene": scene, "scene_dir": scene_dir}


def ask(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    rc = main(["ask", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def ask_json(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    rc, out, err = ask(capsys, *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


def _error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    rc, out, err = ask(capsys, *argv)
    assert rc == 2 and out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("sr3d ask: error: ")
    return lines[-1]


def test_single_image_with_depth_json(data: dict, capsys: pytest.CaptureFixture) -> None:
    from sr3d_plugin.inference import SR3DPipeline

    d = data["scene_dir"]
    args = [
        "--model", data["model"],
        "--image", str(d / "color" / "0.png"),
        "--depth", str(d / "depth" / "0.png"),
        "--intrinsics", str(d / "intrinsic" / "intrinsic_depth.txt"),
        "--region", "box=10,10,80,100",
        "--question", "What is <mask>?",
        "--score-answer", "A lamp on the floor.",
        "--max-new-tokens", "5",
    ]  # fmt: skip
    res = ask_json(capsys, *args)
    for key in ("answer", "answer_logprob", "regions", "num_frames", "num_tiles", "prompt_tokens", "timings"):
        assert key in res
    assert res["num_frames"] == 1 and res["num_tiles"] >= 1
    assert res["prompt_tokens"] > res["num_tiles"] * 4  # 4 LLM tokens per tile of the tiny model
    assert res["geometry"]["source"] == "gt_depth"
    assert res["regions"] == [
        {
            "index": 0,
            "spec": "box=10,10,80,100",
            "kind": "box",
            "label": None,
            "frames": [0],
            "frame_ids": ["0"],
            "pixel_area": [70 * 90],
            "bbox": [[10, 10, 80, 100]],
            "image_size": [[160, 120]],
        }
    ]
    assert {"load", "geometry", "encode", "generate", "score", "total"} <= set(res["timings"])
    assert res["timings"]["total"] >= res["timings"]["generate"]
    # the same request through the Python API gives the same fields
    pipe = SR3DPipeline.from_pretrained(data["model"], device="cpu")
    api = pipe.ask(
        "What is <mask>?",
        image=d / "color" / "0.png",
        depth=d / "depth" / "0.png",
        intrinsics=d / "intrinsic" / "intrinsic_depth.txt",
        regions=["box=10,10,80,100"],
        score_answer="A lamp on the floor.",
        max_new_tokens=5,
    )
    assert api["answer"] == res["answer"]
    assert api["answer_logprob"] == pytest.approx(res["answer_logprob"], abs=1e-5)
    assert set(api) == set(res)


def test_scene_folder_and_frame_files_agree(data: dict, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    scene, d = data["scene"], data["scene_dir"]
    common = ["--model", data["model"], "--region", "frame=2 box=30,20,90,80", "--question", "Where is <mask>?"]
    common += ["--score-answer", "In the corner.", "--max-new-tokens", "4"]
    res_scene = ask_json(capsys, *common, "--scene", str(d))
    assert res_scene["num_frames"] == 8 and res_scene["num_tiles"] == 8
    assert res_scene["regions"][0]["frames"] == [2] and res_scene["regions"][0]["pixel_area"] == [60 * 60]
    # the same frames as loose files, with the axis-aligned poses the scene reader computes
    poses = []
    for i in range(8):
        p = tmp_path / f"pose{i}.txt"
        np.savetxt(p, scene.cam_to_world[i])
        poses.append(str(p))
    res_frames = ask_json(
        capsys,
        *common,
        "--frames", *[str(d / "color" / f"{i}.png") for i in range(8)],
        "--depth", *[str(d / "depth" / f"{i}.png") for i in range(8)],
        "--poses", *poses,
        "--intrinsics", str(d / "intrinsic" / "intrinsic_depth.txt"),
    )  # fmt: skip
    assert (
        res_frames["geometry"]
        == res_scene["geometry"]
        == {
            "source": "gt_depth",
            "space": "world",
            "canonical_mode": "sr3d",
        }
    )
    assert res_frames["answer"] == res_scene["answer"]
    assert res_frames["answer_logprob"] == pytest.approx(res_scene["answer_logprob"], abs=1e-3)
    assert res_frames["prompt_tokens"] == res_scene["prompt_tokens"]


def _write_video(path: Path, frames: np.ndarray) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_with_reconstruction_points(data: dict, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    from sr3d_plugin.geometry import backproject

    scene = data["scene"]
    video = tmp_path / "clip.mp4"
    _write_video(video, scene.rgb)
    xyz = backproject(
        torch.from_numpy(scene.depth.astype(np.float64)),
        torch.from_numpy(np.repeat(scene.intrinsics[None], 8, 0)),
        torch.from_numpy(scene.cam_to_world),
    ).numpy()
    npz = tmp_path / "recon.npz"
    np.savez(npz, xyz=xyz.astype(np.float32), frame_ids=np.array([str(i) for i in range(8)]))
    args = ["--model", data["model"], "--video", str(video), "--points", str(npz), "--num-frames", "4"]
    res = ask_json(capsys, *args, "--region", "frame=@7 box=0,0,50,50", "--question", "Is <mask> red?")
    assert res["frame_ids"] == ["0", "2", "4", "7"] and res["num_tiles"] == 4
    assert res["regions"][0]["frames"] == [3]
    assert res["geometry"] == {
        "source": "reconstruction",
        "space": "world",
        "canonical_mode": "robust",
        "points": str(npz),
    }
    msg = _error(capsys, "--model", data["model"], "--video", str(video), "--question", "Hi")
    assert "no depth source was given" in msg and "depth-anything" in msg.lower()


def test_image_with_local_depth_model(data: dict, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    depth_model = write_tiny_depth_anything(tmp_path / "tiny-da", seed=3)
    d = data["scene_dir"]
    res = ask_json(
        capsys,
        "--model", data["model"], "--image", str(d / "color" / "3.png"), "--depth-model", str(depth_model),
        "--device", "cpu", "--question", "What is here?", "--max-new-tokens", "3",
    )  # fmt: skip
    assert res["geometry"]["source"] == "depth_anything" and res["geometry"]["space"] == "single_view"
    assert res["geometry"]["depth_model"] == str(depth_model)


def test_fixed_seed_repeats_and_plain_output(data: dict, capsys: pytest.CaptureFixture) -> None:
    d = data["scene_dir"]
    args = ["--model", data["model"], "--scene", str(d), "--num-frames", "4", "--question", "Describe the room."]
    args += ["--do-sample", "--temperature", "1.5", "--max-new-tokens", "8", "--seed", "7"]
    rc1, out1, err1 = ask(capsys, *args)
    rc2, out2, _ = ask(capsys, *args)
    assert rc1 == rc2 == 0
    assert out1 == out2 and out1.endswith("\n") and len(out1.splitlines()) <= 2
    assert "4 frame(s); 4 tile(s)" in err1 and "geometry gt_depth (sr3d)" in err1


def test_cli_errors_are_one_line_with_exit_code_2(data: dict, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    d = data["scene_dir"]
    m = ["--model", data["model"]]
    scene = ["--scene", str(d)]
    msg = _error(capsys, *m, *scene, "--region", "frame=0 box=1,1,20,20", "--question", "<mask> or <mask>?")
    assert "2 <mask> token(s) but 1 region(s)" in msg
    msg = _error(capsys, *m, *scene, "--num-frames", "4", "--region", "frame=4 box=1,1,20,20", "--question", "<mask>?")
    assert "frame 4, but there are 4 frame(s) after sampling (0..3)" in msg
    msg = _error(capsys, *m, *scene, "--region", "frame=0 box=-50,-50,-1,-1", "--question", "<mask>?")
    assert "lies outside the 160×120 image of frame 0" in msg
    msg = _error(capsys, *m, *scene, "--region", "frame=0 mask=/nonexistent/m.png", "--question", "<mask>?")
    assert "mask image not found: '/nonexistent/m.png'" in msg
    msg = _error(
        capsys, *m, "--frames", str(d / "color" / "0.png"), str(d / "color" / "1.png"),
        "--depth", str(d / "depth" / "0.png"), "--question", "Hi",
    )  # fmt: skip
    assert "1 depth map(s) for 2 frame(s)" in msg
    msg = _error(capsys, "--model", str(tmp_path / "missing"), *scene, "--question", "Hi")
    assert "does not exist" in msg
    msg = _error(capsys, *m, "--image", str(d / "color" / "0.png"), "--question", "Hi")
    assert "no depth source was given" in msg
    msg = _error(capsys, *m, *scene, "--region", "box3d=50,50,50,1,1,1", "--question", "<mask>?")
    assert "not visible in any of the 8 frame(s)" in msg
