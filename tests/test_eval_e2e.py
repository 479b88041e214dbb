"""End to end, offline: raw releases → ``sr3d prepare`` → lmms-eval (entry-point model ``sr3d`` + our tasks)
→ full metric sets, logged samples, and ``sr3d metrics`` on those samples giving the same numbers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _eval_data import prepare_all, raw_releases, tiny_model_dir

from sr3d_plugin.cli import main
from sr3d_plugin.evaluation import lmms_tasks as T
from sr3d_plugin.evaluation.schema import load_records
from sr3d_plugin.resources import eval_tasks_dir

pytestmark = pytest.mark.usefixtures("one_thread")

pytest.importorskip("lmms_eval")

SPLITS = {"scanqa": "val", "sqa3d": "test", "scan2cap": "val", "vsibench": "test"}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    raw = raw_releases(tmp_path_factory)
    data = tmp_path_factory.mktemp("e2e-data")
    prepare_all(raw, data)
    return {"raw": raw, "data": data, "model_dir": tiny_model_dir(tmp_path_factory)}


def _model_args(env: dict[str, Any], **extra: Any) -> str:
    args = {
        "pretrained": env["model_dir"],
        "num_frames": 4,
        "pointmap_dir": env["raw"]["pointmaps"],
        "device": "cpu",
        "max_new_tokens": 6,
        **extra,
    }
    return ",".join(f"{k}={v}" for k, v in args.items())


def _evaluate(
    model: Any, model_args: str | None, tasks: list[str], out: Path, **kwargs: Any
) -> tuple[dict, dict[str, Path]]:
    """simple_evaluate + the logging the lmms-eval CLI does (results JSON and one samples JSONL per task)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.loggers import EvaluationTracker
    from lmms_eval.tasks import TaskManager

    tm = TaskManager("WARNING", include_path=str(eval_tasks_dir()), include_defaults=False)
    tracker = EvaluationTracker(output_path=str(out))
    res = simple_evaluate(
        model=model, model_args=model_args, tasks=tasks, task_manager=tm, log_samples=True, bootstrap_iters=0,
        evaluation_tracker=tracker, verbosity="WARNING", datetime_str="run", **kwargs,
    )  # fmt: skip
    samples = res.pop("samples")
    tracker.save_results_aggregated(results=res, samples=samples, datetime_str="run")
    for name in res["configs"]:
        tracker.save_results_samples(task_name=name, samples=samples[name])
    files = {name: next(out.rglob(f"run_samples_{name}.jsonl")) for name in res["configs"]}
    return res, files


def _metrics_cli(task: str, samples: Path, data: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict:
    code = main(["metrics", task, str(samples), "--data", str(data), "--split", SPLITS[task], "--json", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


@pytest.mark.slow
def test_prepare_then_lmms_eval_then_sr3d_metrics(
    env: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SR3D_DATA", str(env["data"]))
    res, files = _evaluate("sr3d", _model_args(env), [T.GROUP_NAME], tmp_path / "out", batch_size=2)
    for task, name in T.TASK_NAMES.items():
        records = load_records(env["data"] / task / f"{SPLITS[task]}.jsonl", task)
        got = res["results"][name]
        # the full metric set of the benchmark, every one reported
        for metric in T.metric_names(task):
            assert f"{metric},none" in got, (name, metric)
        assert got["empty_predictions,none"] == 0
        assert res["versions"][name] == 1.0
        meta = res["configs"][name]["metadata"]
        assert meta["prompt_version"] and meta["data_sha256"] and meta["records"] == len(records)
        assert res["configs"][name]["lmms_eval_specific_kwargs"]["pre_prompt"] is not None
        # every prediction is logged
        lines = [json.loads(line) for line in files[name].read_text().splitlines()]
        assert len(lines) == len(records) == res["n-samples"][name]["effective"]
        # sr3d metrics on the logged predictions gives the task's numbers
        cli = _metrics_cli(task, files[name], env["data"], capsys)
        assert cli["counts"]["answered"] == len(records) and cli["counts"]["missing"] == 0
        for metric, value in cli["scores"].items():
            assert got[f"{metric},none"] == value, (name, metric)
    scan2cap = res["results"]["sr3d_scan2cap"]
    assert any(scan2cap[f"{m},none"] for m in ("METEOR", "ROUGE-L", "BLEU-4"))  # not all zeros: a real comparison
    # a prediction for a question that is not in the annotations is a clear error
    bad = tmp_path / "bad.jsonl"
    bad.write_text(files["sr3d_sqa3d"].read_text() + json.dumps({"question_id": "nope", "prediction": "x"}) + "\n")
    assert main(["metrics", "sqa3d", str(bad), "--data", str(env["data"]), "--split", "test"]) == 2
    assert "unknown question_id(s), e.g. ['nope']" in capsys.readouterr().err


@pytest.mark.slow
def test_partly_right_predictions_and_a_failed_input(
    env: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model object whose text is the reference for every other question; one scene has a broken frame."""
    from sr3d_plugin.evaluation.lmms_model import SR3DLmms

    data = tmp_path / "data"
    shutil.copytree(env["data"], data, symlinks=True)
    scene = data / "scenes" / "scene0012_00"
    color = scene / "color"
    color.unlink()  # a real folder (not the link to the raw scan) with one unreadable frame
    shutil.copytree(env["raw"]["scans"] / "scene0012_00" / "color", color)
    (color / "0.png").write_bytes(b"not an image")
    monkeypatch.setenv("SR3D_DATA", str(data))

    class HalfRight(SR3DLmms):
        def _generate_batch(self, prepared: list, gen: dict, stops: list) -> dict[int, str]:
            real = super()._generate_batch(prepared, gen, stops)
            out = {}
            for i, _, _ in prepared:
                task, split, doc_id = self._args[i][4], self._args[i][5], self._args[i][3]
                doc = self.task_dict[task][split][doc_id]
                truth = (doc.get("answers") or [doc.get("ground_truth")])[0]
                out[i] = truth if doc_id % 2 == 0 else real[i]
            return out

        def generate_until(self, requests: list) -> list[str]:
            self._args = [r.args for r in requests]
            return super().generate_until(requests)

    lm = HalfRight(**dict(kv.split("=", 1) for kv in _model_args(env).split(",")))
    res, files = _evaluate(lm, None, ["sr3d_sqa3d", "sr3d_vsibench"], tmp_path / "out")
    sqa = res["results"]["sr3d_sqa3d"]
    records = load_records(data / "sqa3d" / "test.jsonl", "sqa3d")
    failed = [r for r in records if r["scene_id"] == "scene0012_00"]
    assert sqa["empty_predictions,none"] == len(failed) == 6  # the broken scene's questions, counted, not crashed
    assert len(lm.failures) == 6 and "0.png" in lm.failures[0][3]
    assert 0 < sqa["EM,none"] < 100 and res["results"]["sr3d_vsibench"]["overall,none"] > 0
    for task in ("sqa3d", "vsibench"):
        cli = _metrics_cli(task, files[f"sr3d_{task}"], data, capsys)
        for metric, value in cli["scores"].items():
            assert res["results"][f"sr3d_{task}"][f"{metric},none"] == value, (task, metric)
    assert _metrics_cli("sqa3d", files["sr3d_sqa3d"], data, capsys)["counts"]["empty"] == 6


def test_eval_command_builds_the_lmms_eval_call(
    env: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SR3D_DATA", raising=False)
    assert main(["eval", "--model", str(env["model_dir"]), "--dry-run"]) == 2
    assert "give --data DIR" in capsys.readouterr().err
    assert main(["eval", "--data", str(env["data"]), "--dry-run"]) == 2
    assert "--model PATH" in capsys.readouterr().err
    code = main(
        ["eval", "--data", str(env["data"]), "--model", str(env["model_dir"]), "--model-args", "num_frames=8",
         "--tasks", "sr3d_scanqa", "--limit", "2", "--log_samples", "--dry-run", "--", "--verbosity", "DEBUG"]
    )  # fmt: skip
    assert code == 0
    line = capsys.readouterr().out
    assert f"SR3D_DATA={env['data'].resolve()}" in line and "HF_HUB_OFFLINE=1" in line
    assert "-m lmms_eval --model sr3d" in line and f"--include_path {eval_tasks_dir()}" in line
    assert f"pretrained={env['model_dir'].resolve()},num_frames=8" in line
    assert "--limit 2 --log_samples --verbosity DEBUG" in line and "accelerate" not in line
    assert (
        main(
            [
                "eval",
                "--data",
                str(env["data"]),
                "--model",
                str(env["model_dir"]),
                "--num-processes",
                "2",
                "--cpu",
                "--dry-run",
            ]
        )
        == 0
    )
    line = capsys.readouterr().out
    assert "ACCELERATE_USE_CPU=1" in line and "accelerate.commands.launch --multi_gpu --num_processes 2" in line


@pytest.mark.slow
def test_two_processes_through_accelerate_launch(
    env: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`sr3d eval --num-processes 2 --cpu`: accelerate launch, lmms-eval's own CLI, gloo on CPU."""
    out = tmp_path / "mp"
    cmd = [
        sys.executable, "-c", "import sys; from sr3d_plugin.cli import main; sys.exit(main())", "eval", "--data", str(env["data"]), "--model", str(env["model_dir"]),
        "--model-args", f"num_frames=4,pointmap_dir={env['raw']['pointmaps']},max_new_tokens=6",
        "--tasks", T.GROUP_NAME, "--num-processes", "2", "--cpu", "--batch_size", "2", "--log_samples",
        "--output-path", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "world_size=2" in log and "Running on rank 1" in log
    results = json.loads(next(out.rglob("*_results.json")).read_text())
    for task, name in T.TASK_NAMES.items():
        samples = next(out.rglob(f"*_samples_{name}.jsonl"))
        records = load_records(env["data"] / task / f"{SPLITS[task]}.jsonl", task)
        assert len(samples.read_text().splitlines()) == len(records)  # gathered from both processes
        if task in ("sqa3d", "vsibench"):  # (the caption tasks' equality is checked above; METEOR is slow)
            cli = _metrics_cli(task, samples, env["data"], capsys)
            for metric, value in cli["scores"].items():
                assert results["results"][name][f"{metric},none"] == value, (name, metric)
