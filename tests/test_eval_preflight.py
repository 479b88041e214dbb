"""Evaluation pre-flight (issue 13 item 4): before any model loads, every selected task's inputs are checked;
`sr3d eval` skips and lists the tasks that cannot run (default) or refuses (--strict)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from _eval_data import prepare_all, raw_releases, tiny_model_dir

from sr3d_plugin.cli import main
from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.evaluation.preflight import (
    check_documents,
    depth_model_available,
    model_depth_model,
    model_needs_positions,
    preflight,
    task_split,
)

ALL = ["sr3d_scanqa", "sr3d_sqa3d", "sr3d_scan2cap", "sr3d_vsibench"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    raw = raw_releases(tmp_path_factory)
    data = tmp_path_factory.mktemp("preflight-data")
    prepare_all(raw, data)
    return {"raw": raw, "data": data, "model_dir": tiny_model_dir(tmp_path_factory)}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))  # the default depth model is not cached


def _copy(data: Path, dest: Path) -> Path:
    """The prepared folder with its own record files (scenes and videos linked, not copied)."""
    dest.mkdir()
    for entry in data.iterdir():
        if entry.name in ("scenes", "videos"):
            (dest / entry.name).symlink_to(entry, target_is_directory=True)
        else:
            shutil.copytree(entry, dest / entry.name)
    return dest


def test_splits_come_from_the_task_yamls() -> None:
    assert [task_split(t) for t in ("scanqa", "sqa3d", "scan2cap", "vsibench")] == ["val", "test", "val", "test"]


def test_everything_present_passes(env: dict[str, Any]) -> None:
    report = preflight(env["data"], "sr3d_3d", pointmap_dir=env["raw"]["pointmaps"])
    assert report.ok and report.runnable == ALL and all(c.records > 0 for c in report.checks)


def test_offline_vsibench_without_point_maps_or_depth_model_cannot_run(env: dict[str, Any]) -> None:
    report = preflight(env["data"], "sr3d_3d")
    assert report.runnable == ALL[:3]  # scenes carry depth maps
    (bad,) = report.failed
    assert bad.task == "vsibench" and "have no geometry source" in bad.problems[0]
    assert "not in the Hugging Face cache and the hub is offline" in bad.problems[0]
    assert "pointmap_dir=" in bad.message() and "depth_model=" in bad.message()
    with pytest.raises(SR3DInputError, match="1 of 4 task.* cannot run:\nsr3d_vsibench"):
        report.raise_if_failed()
    report.raise_if_failed(only_if_none_runnable=True)  # the others can run


def test_geometry_rules_follow_the_depth_source(env: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "da"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert preflight(env["data"], "sr3d_vsibench", depth_model=str(folder)).ok
    assert depth_model_available(str(tmp_path / "nothing"))[0] is False
    assert depth_model_available("depth-anything/Depth-Anything-V2-Small-hf", offline=False)[0] is True
    recon = preflight(env["data"], "sr3d_3d", depth_source="reconstruction")
    assert recon.runnable == [] and all("no point-map file" in c.problems[0] for c in recon.failed)
    gt = preflight(env["data"], "sr3d_3d", depth_source="gt", pointmap_dir=env["raw"]["pointmaps"])
    assert gt.runnable == ALL[:3] and "no depth maps" in gt.failed[0].problems[0]
    assert preflight(env["data"], "sr3d_3d", needs_positions=False).ok  # no positional encoding: no geometry


def test_missing_records_visual_inputs_and_mask_counts(env: dict[str, Any], tmp_path: Path) -> None:
    data = _copy(env["data"], tmp_path / "data")
    (data / "sqa3d" / "test.jsonl").unlink()
    path = data / "scanqa" / "val.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    recs[0]["scene"] = "scenes/gone"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cap = data / "scan2cap" / "val.jsonl"
    caps = [json.loads(line) for line in cap.read_text().splitlines()]
    caps[1]["regions"] = caps[1]["regions"] * 2
    cap.write_text("".join(json.dumps(r) + "\n" for r in caps))
    report = preflight(data, "sr3d_3d", pointmap_dir=env["raw"]["pointmaps"])
    failed = {c.task: c for c in report.failed}
    assert set(failed) == {"sqa3d", "scanqa", "scan2cap"} and report.runnable == ["sr3d_vsibench"]
    assert "no prepared records (test.jsonl not found)" in failed["sqa3d"].problems[0]
    assert "`sr3d prepare sqa3d" in failed["sqa3d"].message()
    assert "1 record(s) name a missing visual input: scene" in failed["scanqa"].problems[0]
    assert "gone" in failed["scanqa"].problems[0]
    assert "1 <mask> token(s) but 2 region(s)" in failed["scan2cap"].problems[0]


def _no_subprocess(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        calls.append(list(cmd))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    return calls


def test_sr3d_eval_vsibench_offline_fails_before_any_question(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = _no_subprocess(monkeypatch)
    base = ["eval", "--data", str(env["data"]), "--model", str(env["model_dir"])]
    assert main([*base, "--tasks", "sr3d_vsibench"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sr3d eval: error: evaluation pre-flight") and "no selected task can run" in err
    assert "sr3d_vsibench" in err and "no geometry source" in err and "pointmap_dir=" in err
    assert calls == []  # lmms-eval (and so the model) never started
    # the group: vsibench is skipped and listed, the three others run
    assert main(base) == 1  # (the fake lmms-eval writes no results)
    err = capsys.readouterr().err
    assert "skipping 1 task(s) that cannot run (sr3d_vsibench)" in err and "--strict" in err
    (cmd,) = calls
    assert cmd[cmd.index("--tasks") + 1] == ",".join(ALL[:3])
    # --strict refuses the whole run
    calls.clear()
    assert main([*base, "--strict"]) == 2
    assert "1 of 4 task(s) cannot run" in capsys.readouterr().err and calls == []
    # with point maps every task runs, as the group
    assert main([*base, "--model-args", f"pointmap_dir={env['raw']['pointmaps']}", "--strict"]) == 1
    assert calls[-1][calls[-1].index("--tasks") + 1] == "sr3d_3d"
    # --no-preflight: as before
    assert main([*base, "--tasks", "sr3d_vsibench", "--no-preflight"]) == 1
    assert calls[-1][calls[-1].index("--tasks") + 1] == "sr3d_vsibench"


def test_dry_run_shows_the_tasks_that_would_run(env: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--data", str(env["data"]), "--model", str(env["model_dir"]), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert f"--tasks {','.join(ALL[:3])}" in captured.out and "skipping 1 task(s)" in captured.err


def test_model_without_positional_encoding_needs_no_geometry(tmp_path: Path, env: dict[str, Any]) -> None:
    assert model_needs_positions(env["model_dir"]) is True
    (tmp_path / "config.json").write_text(json.dumps({"use_position_encoding": False}))
    assert model_needs_positions(tmp_path) is False
    (tmp_path / "config.json").write_text(json.dumps({"depth_model": "/models/da-small"}))
    assert model_needs_positions(tmp_path) is True and model_depth_model(tmp_path) == "/models/da-small"
    assert model_depth_model(tmp_path / "absent") is None


def test_lmms_model_start_up_check(env: dict[str, Any]) -> None:
    """The check the lmms-eval model runs before its first question (without the model: a stand-in pipeline)."""
    from sr3d_plugin.evaluation.record_inputs import DATA_DIR_FIELD

    video = next((env["data"] / "vsibench").glob("*.jsonl"))
    docs = [
        ("sr3d_vsibench", {**json.loads(line), DATA_DIR_FIELD: str(env["data"])})
        for line in video.read_text().splitlines()
    ]
    pipeline = SimpleNamespace(needs_positions=True, config=SimpleNamespace(depth_model=None))
    inputs = SimpleNamespace(pipeline=pipeline, depth_source="auto", pointmap_dir=None, depth_model=None)
    with pytest.raises(SR3DInputError, match="no geometry source .* of: sr3d_vsibench: video scene0011_00.mp4"):
        check_documents(docs, inputs)
    check_documents(docs, SimpleNamespace(**{**vars(inputs), "pointmap_dir": Path(env["raw"]["pointmaps"])}))
    check_documents(docs, SimpleNamespace(**{**vars(inputs), "pipeline": SimpleNamespace(needs_positions=False)}))
    assert os.environ["HF_HUB_OFFLINE"] == "1"
