"""``sr3d prepare``: the dataset converters on synthetic files in the official raw formats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _eval_data import prepare_all, raw_releases

from sr3d_plugin import plugins
from sr3d_plugin.cli import main
from sr3d_plugin.errors import SR3DConfigError, SR3DInputError
from sr3d_plugin.evaluation.schema import load_records
from sr3d_plugin.regions import decode_coco_rle
from sr3d_plugin.sources.scannet import ScanNetReader


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return raw_releases(tmp_path_factory)


@pytest.fixture(scope="module")
def prepared(raw: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("prepared")
    return out, prepare_all(raw, out)


def _conv(name: str) -> Any:
    return plugins.create("dataset_converters", name)


def test_converters_are_registered_through_the_plugin_hook() -> None:
    names = set(plugins.registry("dataset_converters"))
    assert {"scannet", "scanqa", "sqa3d", "scan2cap", "vsibench"} <= names
    for name in names:
        conv = _conv(name)
        assert conv.name == name and conv.description and isinstance(conv.options, dict)


def test_every_prepared_file_follows_the_schema(prepared: tuple[Path, dict[str, Any]], raw: dict[str, Any]) -> None:
    out, summary = prepared
    scenes = raw["scenes"]
    assert summary["scannet"]["prepared"] == len(scenes) and not summary["scannet"]["failed"]
    for sc in scenes:
        fs = ScanNetReader(num_frames=0).read(out / "scenes" / sc.scene_id)
        assert len(fs) == sc.num_frames
        np.testing.assert_allclose(fs.cam_to_world, sc.cam_to_world, atol=1e-6)  # axis alignment applied
    qa = load_records(out / "scanqa" / "val.jsonl", "scanqa")
    assert len(qa) == 3 * len(scenes) and all(r["scene"] == f"scenes/{r['scene_id']}" for r in qa)
    assert qa[0]["answers"] == [scenes[0].objects[0].label, f"the {scenes[0].objects[0].label}"]
    sqa = load_records(out / "sqa3d" / "test.jsonl", "sqa3d")
    assert len(sqa) == 12 and sqa[0]["question_id"] == "220602000001" and sqa[0]["situation"].startswith("I am facing")
    vsi = load_records(out / "vsibench" / "test.jsonl", "vsibench")
    assert len(vsi) == 16 and all((out / r["video"]).is_file() for r in vsi)
    assert {r["options"] == [] for r in vsi} == {True, False}
    cap = load_records(out / "scan2cap" / "val.jsonl", "scan2cap")
    s = summary["scan2cap"]
    assert s["records"] == len(cap) and s["records"] + s["skipped"] == s["objects"] == 6
    skipped = [json.loads(line) for line in (out / "scan2cap" / "val.skipped.jsonl").read_text().splitlines()]
    assert len(skipped) == s["skipped"] and all(x["reason"] for x in skipped)


def test_scan2cap_regions_are_the_projected_input_box(
    prepared: tuple[Path, dict[str, Any]], raw: dict[str, Any]
) -> None:
    from sr3d_plugin.regions import box3d_masks

    out, _ = prepared
    recs = load_records(out / "scan2cap" / "val.jsonl", "scan2cap")
    rec = recs[0]
    sc = next(s for s in raw["scenes"] if s.scene_id == rec["scene_id"])
    obj = sc.object_by_id(int(rec["object_id"]))
    assert rec["question_id"] == f"{rec['scene_id']}|{rec['object_id']}|{rec['object_name']}"
    assert rec["references"] == [f"this is a {obj.label}. it is in the room number {k}." for k in (0, 1)]
    # proposals: the jittered box is chosen, its IoU with the GT box is stored
    assert 0.5 < rec["iou"] < 1.0 and rec["pred_box"] == rec["regions"][0]["box3d"] != rec["gt_box"]
    frames = ScanNetReader(num_frames=4).read(out / "scenes" / rec["scene_id"])
    assert rec["frame_ids"] == frames.frame_ids
    expected, _ = box3d_masks(rec["pred_box"], frames)
    got = {m["frame"]: decode_coco_rle(m["rle"]) for m in rec["regions"][0]["masks"]}
    assert set(got) == {f"@{frames.frame_ids[k]}" for k in expected}
    for k, mask in expected.items():
        assert np.array_equal(got[f"@{frames.frame_ids[k]}"], mask)


def test_scan2cap_without_proposals_uses_gt_boxes(raw: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "p"
    _conv("scannet").convert(raw["scans"], out, progress=False)
    s = _conv("scan2cap").convert(raw["scanrefer"], out, progress=False, num_frames=8)  # boxes from objects.json
    recs = load_records(out / "scan2cap" / "val.jsonl", "scan2cap")
    assert s["records"] == len(recs) == 6  # every object is visible in some of the 8 frames
    assert all(r["iou"] == 1.0 and r["pred_box"] == r["gt_box"] for r in recs)


def test_reruns_skip_finished_work_and_overwrite_redoes_it(raw: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "p"
    first = prepare_all(raw, out)
    assert first["scannet"]["prepared"] == 2
    cache = sorted((out / "scan2cap" / ".work").rglob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in cache]
    again = prepare_all(raw, out)
    assert again["scannet"] == {**again["scannet"], "prepared": 0, "already_prepared": 2}
    for name in ("scanqa", "sqa3d", "scan2cap", "vsibench"):
        assert again[name]["already_prepared"] is True
    # an interrupted scan2cap run resumes from its per-scene cache
    (out / "scan2cap" / "val.jsonl").unlink()
    _conv("scan2cap").convert(
        raw["scanrefer"], out, progress=False, boxes=str(raw["boxes"]), proposals=str(raw["proposals"]), num_frames=4
    )
    assert [p.stat().st_mtime_ns for p in cache] == stamps
    redo = _conv("scanqa").convert(raw["scanqa"], out, progress=False, overwrite=True)
    assert redo["records"] == 6


def test_posed_images_layout_with_separate_meta_and_frame_step(raw: dict[str, Any], tmp_path: Path) -> None:
    from PIL import Image

    sc = raw["scenes"][0]
    src = raw["scans"] / sc.scene_id
    flat = tmp_path / "posed_images" / sc.scene_id
    flat.mkdir(parents=True)
    for i in range(sc.num_frames):  # colour at twice the depth size, as in ScanNet exports
        Image.open(src / "color" / f"{i}.png").resize((2 * sc.width, 2 * sc.height)).save(flat / f"{i:05d}.jpg")
        shutil.copy(src / "depth" / f"{i}.png", flat / f"{i:05d}.png")
        shutil.copy(src / "pose" / f"{i}.txt", flat / f"{i:05d}.txt")
    k = np.loadtxt(src / "intrinsic" / "intrinsic_color.txt")
    k2 = k.copy()
    k2[:2] *= 2
    np.savetxt(flat / "intrinsic.txt", k2)
    meta = tmp_path / "scans_meta" / sc.scene_id
    meta.mkdir(parents=True)
    shutil.copy(src / f"{sc.scene_id}.txt", meta)
    out = tmp_path / "out"
    s = _conv("scannet").convert(
        tmp_path / "posed_images", out, progress=False, meta=str(tmp_path / "scans_meta"), frame_step=2
    )
    assert s["prepared"] == 1
    fs = ScanNetReader(num_frames=0).read(out / "scenes" / sc.scene_id)
    assert fs.frame_ids == ["0", "2", "4", "6"]
    np.testing.assert_allclose(fs.intrinsics[0], k[:3, :3], atol=1e-6)  # depth K scaled back to the depth size
    np.testing.assert_allclose(fs.cam_to_world, sc.cam_to_world[::2], atol=1e-6)


def test_bad_inputs_name_the_entry(raw: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    # questions whose scene is not prepared
    with pytest.raises(SR3DInputError, match=r"refer to 2 scene\(s\) missing .*scene0011_00 \(3 item"):
        _conv("scanqa").convert(raw["scanqa"], out, progress=False)
    _conv("scannet").convert(raw["scans"], out, progress=False, scenes="scene0011_00")
    s = _conv("scanqa").convert(raw["scanqa"], out, progress=False, skip_missing=True)
    assert s["records"] == 3 and s["skipped_missing_scene"] == 3 and s["missing_scenes"] == ["scene0012_00"]
    # a ScanQA entry without answers
    bad = tmp_path / "bad"
    bad.mkdir()
    data = json.loads((raw["scanqa"] / "ScanQA_v1.0_val.json").read_text())
    del data[2]["answers"]
    (bad / "ScanQA_v1.0_val.json").write_text(json.dumps(data))
    with pytest.raises(
        SR3DInputError, match=r"entry #2 \(question_id 'val-scene0011-2'\): missing field\(s\) \['answers'\]"
    ):
        _conv("scanqa").convert(bad, out, progress=False, overwrite=True)
    with pytest.raises(SR3DInputError, match="no public answers"):
        _conv("scanqa").convert(raw["scanqa"], out, "test_w_obj", progress=False)
    with pytest.raises(SR3DInputError, match=r"no file named ScanQA_v1.0_train.json"):
        _conv("scanqa").convert(raw["scanqa"], out, "train", progress=False)
    # an SQA3D annotation without its question
    sq = tmp_path / "sqa"
    shutil.copytree(raw["sqa3d"], sq)
    qf = sq / "v1_balanced_questions_test_scannetv2.json"
    q = json.loads(qf.read_text())
    q["questions"] = q["questions"][1:]
    qf.write_text(json.dumps(q))
    with pytest.raises(
        SR3DInputError, match=r"annotation #0 \(question_id 220602000001\): question_id '220602000001' is not in"
    ):
        _conv("sqa3d").convert(sq, out, progress=False)
    # an object without a box
    _conv("scannet").convert(raw["scans"], out, progress=False)
    boxes = tmp_path / "boxes"
    shutil.copytree(raw["boxes"], boxes)
    arr = np.load(boxes / "scene0011_00_aligned_bbox.npy")
    np.save(boxes / "scene0011_00_aligned_bbox.npy", arr[1:])
    with pytest.raises(SR3DInputError, match=r"no ground-truth box for object 1 of scene0011_00"):
        _conv("scan2cap").convert(raw["scanrefer"], out, progress=False, boxes=str(boxes), skip_missing=False)
    # videos that are not there
    with pytest.raises(SR3DInputError, match=r"16 question\(s\) refer to 2 missing video"):
        _conv("vsibench").convert(
            raw["vsibench"] / "test-00000-of-00001.parquet", out, progress=False, videos=str(tmp_path)
        )
    # an option the converter does not take
    with pytest.raises(
        SR3DConfigError, match=r"option\(s\) \['boxes'\] do not apply; options of scanqa: skip_missing="
    ):
        _conv("scanqa").convert(raw["scanqa"], out, progress=False, boxes="x")


def test_prepare_errors_name_parameters_and_the_command_names_flags(
    raw: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    # the library speaks Python: parameters as ``name=``
    with pytest.raises(SR3DInputError, match=r"use split='val'") as caught:
        _conv("scanqa").convert(raw["scanqa"], out, "test", progress=False)
    assert "--" not in str(caught.value)
    # the command translates the same errors into its flags
    argv = ["prepare", "scanqa", "--raw", str(raw["scanqa"]), "--out", str(out), "--no-progress"]
    assert main([*argv, "--boxes", "x"]) == 2
    err = capsys.readouterr().err
    assert "options of scanqa: --skip-missing" in err and "skip_missing=" not in err
    assert main([*argv, "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "use --split val" in err and "split=" not in err


def test_prepare_command(raw: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main(["prepare", "scannet", "--raw", str(raw["scans"]), "--out", str(out), "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["prepared"] == 2
    assert main(["prepare", "sqa3d", "--raw", str(raw["sqa3d"]), "--out", str(out), "--no-progress"]) == 0
    assert "records: 12" in capsys.readouterr().out
    assert main(["prepare", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "scan2cap:" in listing and "--proposals" in listing
    assert main(["prepare", "nope", "--raw", "x", "--out", "y"]) == 2
    assert "no dataset converter named 'nope'" in capsys.readouterr().err
    assert main(["prepare", "scanqa", "--raw", str(raw["scanqa"]), "--out", str(out), "--videos", "v"]) == 2
    assert "do not apply" in capsys.readouterr().err


def test_prepared_records_train_with_the_evaluation_prompts(prepared: tuple[Path, dict[str, Any]]) -> None:
    """``sr3d prepare`` output is training data: the user turn is the task's own evaluation prompt."""
    from sr3d_plugin.evaluation.lmms_tasks import doc_to_text, task_prompt_kwargs
    from sr3d_plugin.records import load_records as load_training_records

    out, _ = prepared
    for task in ("scanqa", "sqa3d", "scan2cap"):
        path = next(p for p in sorted((out / task).glob("*.jsonl")) if p.name.count(".") == 1)
        evaluation = load_records(path, task)
        training = load_training_records(path)
        assert len(training) == len(evaluation)
        first, rec = training[0], evaluation[0]
        assert first["conversations"][0]["value"] == doc_to_text(task, rec, task_prompt_kwargs(task))
        target = rec["references"][0] if task == "scan2cap" else rec["answers"][0]
        assert first["conversations"][1]["value"] == target.strip()
        assert first.get("regions", []) == rec.get("regions", [])
        if task == "scan2cap":
            assert "<mask>" in first["conversations"][0]["value"] and first["regions"]
    # and they become real training batches (scene frames, depth, poses and projected box masks)
    from sr3d_plugin.testing import build_tiny_model
    from sr3d_plugin.training.data import SR3DTrainDataset, TrainingSource
    from sr3d_plugin.training.recipe import DataSection

    model, processor = build_tiny_model()
    path = out / "scan2cap" / "val.jsonl"
    source = TrainingSource(records=load_training_records(path), base=path.parent)
    dataset = SR3DTrainDataset(source, processor, model.config, DataSection(train_file=str(path), num_frames=4))
    item = dataset[0]
    assert item["region_weights"].shape[0] == 1 and item["tile_xyz"].shape[0] == item["num_tiles"] == 4
    assert (item["labels"] != -100).any()
