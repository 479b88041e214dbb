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


# --------------------------------------------------------------------------- Scan2Cap boxes from ScanNet's files
def _vertex_level_boxes(info: dict[str, Any], meta: Path) -> dict[str, list[float]]:
    # independent of the converter: the aligned vertices of each object, min/max per axis
    line = next(x for x in meta.read_text().splitlines() if x.startswith("axisAlignment"))
    align = np.asarray([float(v) for v in line.split("=")[1].split()], dtype=np.float64).reshape(4, 4)
    raw = info["raw_vertices"].astype(np.float64)
    aligned = raw @ align[:3, :3].T + align[:3, 3]
    out = {}
    for oid, idx in info["object_vertices"].items():
        lo, hi = aligned[idx].min(axis=0), aligned[idx].max(axis=0)
        out[str(oid)] = [*((lo + hi) / 2), *(hi - lo)]
    return out


def test_scan2cap_boxes_from_official_scannet_files(
    raw: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from _eval_data import write_scannet_object_files

    scans = tmp_path / "scans"
    written = {sc.scene_id: write_scannet_object_files(sc, scans, seed=i) for i, sc in enumerate(raw["scenes"])}
    out = tmp_path / "p"
    _conv("scannet").convert(raw["scans"], out, progress=False)
    s = _conv("scan2cap").convert(raw["scanrefer"], out, progress=False, scans=str(scans), num_frames=8)
    recs = load_records(out / "scan2cap" / "val.jsonl", "scan2cap")
    assert s["records"] == len(recs) == 6 and "ScanNet files" in s["boxes"]
    for rec in recs:
        sid = rec["scene_id"]
        expected = _vertex_level_boxes(written[sid], scans / sid / f"{sid}.txt")[rec["object_id"]]
        np.testing.assert_allclose(rec["gt_box"], expected, rtol=0, atol=1e-12)
        assert rec["pred_box"] == rec["gt_box"] and rec["iou"] == 1.0
        # and the same boxes as the ScanRefer-preprocessed alternative (float32 vertices: ~1e-6)
        obj = next(
            o for o in next(x for x in raw["scenes"] if x.scene_id == sid).objects if str(o.id) == rec["object_id"]
        )
        corners = np.asarray(obj.box.corners())
        hull = [*((corners.min(0) + corners.max(0)) / 2), *(corners.max(0) - corners.min(0))]
        np.testing.assert_allclose(rec["gt_box"], hull, atol=1e-5)

    # the command: --scans; --boxes stays an alternative with the same records
    cli_out = tmp_path / "cli"
    _conv("scannet").convert(raw["scans"], cli_out, progress=False)
    argv = ["prepare", "scan2cap", "--raw", str(raw["scanrefer"]), "--out", str(cli_out), "--no-progress"]
    assert main([*argv, "--scans", str(scans), "--num-frames", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 6
    assert load_records(cli_out / "scan2cap" / "val.jsonl", "scan2cap") == recs
    alt = tmp_path / "alt"
    _conv("scannet").convert(raw["scans"], alt, progress=False)
    _conv("scan2cap").convert(raw["scanrefer"], alt, progress=False, boxes=str(raw["boxes"]), num_frames=8)
    for a, b in zip(load_records(alt / "scan2cap" / "val.jsonl", "scan2cap"), recs):
        assert a["question_id"] == b["question_id"]
        np.testing.assert_allclose(a["gt_box"], b["gt_box"], atol=1e-5)
    assert main([*argv, "--scans", str(scans), "--boxes", str(raw["boxes"]), "--overwrite"]) == 2
    assert "give --boxes" in capsys.readouterr().err


def test_scannet_object_boxes_reference_rules(tmp_path: Path) -> None:
    from sr3d_plugin.data.scannet_objects import read_ply_vertices, scannet_object_boxes, scannet_scene_files

    sid = "scene0001_00"
    d = tmp_path / sid
    d.mkdir()
    verts = [(0, 0, 0), (1, 2, 3), (4, 0, 0), (5, 1, 1), (9, 9, 9), (2, 2, 2)]
    header = "ply\nformat ascii 1.0\nelement vertex 6\nproperty float x\nproperty float y\nproperty float z\n"
    header += "property uchar red\nelement face 1\nproperty list uchar int vertex_indices\nend_header\n"
    (d / f"{sid}_vh_clean_2.ply").write_text(header + "".join(f"{x} {y} {z} 7\n" for x, y, z in verts) + "3 0 1 2\n")
    np.testing.assert_array_equal(read_ply_vertices(d / f"{sid}_vh_clean_2.ply"), np.asarray(verts, np.float32))
    (d / f"{sid}_vh_clean_2.0.010000.segs.json").write_text(json.dumps({"segIndices": [10, 10, 20, 20, 30, 40]}))
    groups = [
        {"objectId": 0, "label": "chair", "segments": [10, 20]},
        {"objectId": 1, "label": "table", "segments": [20]},  # segment 20 listed again: the later group wins
        {"objectId": 2, "label": "lamp", "segments": []},  # no vertex: no box
        {"objectId": 3, "label": "bed", "segments": [40]},
    ]
    (d / f"{sid}.aggregation.json").write_text(json.dumps({"segGroups": groups}))
    # axis alignment: a translation by (1, 0, -1) and a 90° turn about z
    a = np.array([[0, -1, 0, 1], [1, 0, 0, 0], [0, 0, 1, -1], [0, 0, 0, 1]], dtype=np.float64)
    (d / f"{sid}.txt").write_text("axisAlignment = " + " ".join(str(v) for v in a.reshape(-1)) + "\n")
    boxes = scannet_object_boxes(scannet_scene_files(tmp_path, sid))
    assert list(boxes) == ["0", "1", "3"]
    # chair: raw (0,0,0), (1,2,3) -> aligned (1,0,-1), (-1,1,2)
    assert boxes["0"] == (0.0, 0.5, 0.5, 2.0, 1.0, 3.0)
    # table: raw (4,0,0), (5,1,1) -> aligned (1,4,-1), (0,5,0)
    assert boxes["1"] == (0.5, 4.5, -0.5, 1.0, 1.0, 1.0)
    assert boxes["3"] == (-1.0, 2.0, 1.0, 0.0, 0.0, 0.0)
    # errors name the file and what is wrong
    with pytest.raises(SR3DInputError, match=r"ScanNet file\(s\) not found: .*scene0002_00.aggregation.json"):
        scannet_scene_files(tmp_path, "scene0002_00")
    (d / f"{sid}.aggregation.json").write_text(json.dumps({"segGroups": [{"objectId": 0, "segments": [99]}]}))
    with pytest.raises(SR3DInputError, match=r"segGroups\[0\]: segment 99 is not in"):
        scannet_object_boxes(scannet_scene_files(tmp_path, sid))
    (d / f"{sid}_vh_clean_2.0.010000.segs.json").write_text(json.dumps({"segIndices": [10, 10]}))
    with pytest.raises(SR3DInputError, match=r"has 2 segIndices but .* has 6 vertices"):
        scannet_object_boxes(scannet_scene_files(tmp_path, sid))
    short = b"ply\nformat binary_little_endian 1.0\nelement vertex 5\n"
    short += b"property float x\nproperty float y\nproperty float z\nend_header\n"
    (d / f"{sid}_vh_clean_2.ply").write_bytes(short + b"\0" * 12)
    with pytest.raises(SR3DInputError, match=r"ends inside the 'vertex' element \(12 of 60 bytes\)"):
        read_ply_vertices(d / f"{sid}_vh_clean_2.ply")


def test_scan2cap_official_boxes_need_the_frames_alignment(raw: dict[str, Any], tmp_path: Path) -> None:
    from _eval_data import write_scannet_object_files

    scans = tmp_path / "scans"
    for i, sc in enumerate(raw["scenes"]):
        write_scannet_object_files(sc, scans, seed=i)
    sid = raw["scenes"][0].scene_id
    (scans / sid / f"{sid}.txt").write_text("sceneType = Bedroom\n")  # no axisAlignment: identity
    out = tmp_path / "p"
    _conv("scannet").convert(raw["scans"], out, progress=False)
    with pytest.raises(SR3DInputError, match=rf"axis alignment of .*{sid}.txt differs from the one the prepared"):
        _conv("scan2cap").convert(raw["scanrefer"], out, progress=False, scans=str(scans))
    (scans / sid / f"{sid}.aggregation.json").unlink()
    with pytest.raises(SR3DInputError, match=r"ScanNet file\(s\) not found"):
        _conv("scan2cap").convert(raw["scanrefer"], out, progress=False, scans=str(scans))
    # no boxes anywhere: the error says what to give
    bare = tmp_path / "bare"
    _conv("scannet").convert(raw["scans"], bare, progress=False)
    for sc in raw["scenes"]:
        (bare / "scenes" / sc.scene_id / "objects.json").unlink(missing_ok=True)
    with pytest.raises(SR3DInputError, match=r"give scans= .* or boxes="):
        _conv("scan2cap").convert(raw["scanrefer"], bare, progress=False)
