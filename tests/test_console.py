"""The console of the commands: quiet (known third-party warnings filtered), informative (run and log folders,
grouped trainable summary, resume hint), ``--json`` one object per line, no duplicate steps after a resume,
merge naming trained modules; ``--model tiny``, ``data.train_file`` over a generator, ``sr3d synthetic``."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sr3d_plugin.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

KNOWN_NOISE = ("is_gradient_checkpointing", "save_embedding_layers", "gemm_4bit_forward", "kernels-community")


def _env() -> dict[str, str]:
    """Offline, one thread; warnings NOT ignored (the filters under test must do that)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return env


def _sr3d(*argv: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sr3d_plugin.cli", *argv]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _json_lines(stdout: str) -> list[dict]:
    """Every non-empty stdout line is one JSON object (fails on a multi-line or non-JSON line)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "no output"
    rows = [json.loads(line) for line in lines]
    assert all(isinstance(r, dict | list) for r in rows)
    return rows


def _train_args(out: Path) -> list[str]:
    return [
        "train",
        "tiny-cpu",
        f"training.output_dir={out}",
        "training.max_steps=2",
        "training.save_steps=1",
        "training.logging_steps=1",
        "data.generator_args.num_scenes=1",
        "data.num_workers=0",
    ]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("console") / "run"
    return out, _sr3d(*_train_args(out))


def test_train_console_is_quiet_and_names_the_folders(run_dir) -> None:
    out, res = run_dir
    assert res.returncode == 0, res.stderr[-2000:]
    for noise in KNOWN_NOISE:
        assert noise not in res.stderr and noise not in res.stdout, noise
    assert f"run folder: {out}" in res.stdout
    assert f"log folder: {out / 'logs'}" in res.stdout
    assert f"tensorboard --logdir {out / 'logs'}" in res.stdout
    # grouped: one line per group, no per-tensor list without --verbose
    for group in ("lora", "mm_projector", "perception_encoder", "region_extractor"):
        assert any(line.strip().startswith(group) and "tensors" in line for line in res.stdout.splitlines())
    assert "lora_A" not in res.stdout
    start = next(json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if '"start"' in x)
    assert any("lora_A" in row["name"] for row in start["trainable"])  # the full list stays in the event
    assert sum(start["group_tensors"].values()) == len(start["trainable"])
    assert start["log_dir"] == str(out / "logs")


def test_verbose_lists_every_tensor() -> None:
    from sr3d_plugin.training.model_setup import format_trainable

    report = {
        "trainable_params": 30,
        "frozen_params": 5,
        "groups": {"lora": 30},
        "group_tensors": {"lora": 2},
        "trainable": [{"name": "a.lora_A.weight", "numel": 10}, {"name": "a.lora_B.weight", "numel": 20}],
    }
    short, full = format_trainable(report), format_trainable(report, verbose=True)
    assert "lora_A" not in short and "2 tensors" in short and "30 params" in short
    assert "a.lora_A.weight  10" in full and "a.lora_B.weight  20" in full


def test_resume_leaves_no_duplicate_steps_and_json_is_one_object_per_line(run_dir, tmp_path: Path) -> None:
    src, res = run_dir
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path / "run"
    shutil.copytree(src, out)
    shutil.rmtree(out / "checkpoint-2")  # killed after logging step 2, before its checkpoint was complete
    before = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in before if r["event"] == "log"] == [1, 2]
    res2 = _sr3d(*_train_args(out), "--resume", "--json")
    assert res2.returncode == 0, res2.stderr[-2000:]
    events = _json_lines(res2.stdout)
    assert [e["event"] for e in events][:2] == ["resume", "start"] and events[-1]["event"] == "end"
    for noise in KNOWN_NOISE:
        assert noise not in res2.stderr, noise
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["event"] == "log"] == [1, 2]
    assert [r["step"] for r in rows if r["event"] == "checkpoint"] == [1, 2]


def test_merge_reports_trained_modules_as_trained(run_dir, tmp_path: Path, capsys, caplog) -> None:
    out, res = run_dir
    assert res.returncode == 0, res.stderr[-2000:]
    with caplog.at_level(logging.WARNING):
        assert main(["merge", str(out), str(tmp_path / "merged"), "--json"]) == 0
    info = _json_lines(capsys.readouterr().out)
    assert len(info) == 1
    assert set(info[0]["trained_modules"]) >= {"region_extractor", "perception_encoder", "mm_projector"}
    assert not any("region_extractor" in n and "fresh" in n for n in info[0]["notes"])
    assert "created fresh" not in caplog.text or "region_extractor has no weights" not in caplog.text
    assert "region_extractor has no weights" not in caplog.text


def test_ctrl_c_names_the_checkpoint_and_the_resume_command(run_dir, monkeypatch, capsys) -> None:
    out, res = run_dir
    assert res.returncode == 0, res.stderr[-2000:]
    import sr3d_plugin.training.trainer as trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    argv = _train_args(out)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert f"last complete checkpoint: {out / 'checkpoint-2'}" in err
    assert f"continue with: sr3d train tiny-cpu training.output_dir={out} " in err and err.rstrip().endswith("--resume")
    assert main([*argv, "--json"]) == 130
    (event,) = _json_lines(capsys.readouterr().out)
    assert event["event"] == "interrupted" and event["checkpoint"] == str(out / "checkpoint-2")
    assert event["resume_command"].endswith("--resume")


def test_ctrl_c_before_any_checkpoint_says_so(tmp_path: Path, monkeypatch, capsys) -> None:
    import sr3d_plugin.training.trainer as trainer

    monkeypatch.setattr(trainer, "train", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert main(_train_args(tmp_path / "none")) == 130
    assert "no complete checkpoint" in capsys.readouterr().err


def test_known_log_record_is_dropped_and_others_pass(caplog) -> None:
    from sr3d_plugin import _quiet

    _quiet.install_log_filters()
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops"):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "boom")
        log.warning("another bitsandbytes message")
    assert "gemm_4bit_forward" not in caplog.text and "another bitsandbytes message" in caplog.text


def test_known_warnings_silenced_only_inside_and_only_those() -> None:
    import warnings

    from sr3d_plugin._quiet import known_warnings_silenced

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with known_warnings_silenced():
            warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed", FutureWarning, stacklevel=2)
            warnings.warn(
                "Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.", stacklevel=2
            )
            warnings.warn("something else", UserWarning, stacklevel=2)
        warnings.warn("`is_gradient_checkpointing` is deprecated (outside)", FutureWarning, stacklevel=2)
    assert [str(w.message) for w in seen] == ["something else", "`is_gradient_checkpointing` is deprecated (outside)"]


def test_dry_run_json_is_one_object_per_line(capsys) -> None:
    assert main(["train", "tiny-cpu", "--dry-run", "--json"]) == 0
    (plan,) = _json_lines(capsys.readouterr().out)
    assert plan["recipe"].endswith("tiny-cpu.yaml")


@pytest.mark.parametrize(
    "argv",
    [
        ["recipes", "--json"],
        ["recipes", "--show", "tiny-cpu", "--json"],
        ["plugins", "--json"],
        ["tasks-path", "--json"],
        ["prepare", "--list", "--json"],
    ],
)
def test_json_output_of_commands_parses_line_by_line(argv, capsys) -> None:
    assert main(argv) == 0
    _json_lines(capsys.readouterr().out)


def test_train_file_overrides_a_generator_recipe(tmp_path: Path) -> None:
    from sr3d_plugin.errors import SR3DConfigError
    from sr3d_plugin.training.recipe import load_recipe

    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    recipe, _ = load_recipe("tiny-cpu", [f"data.train_file={data}"], check_files=False)
    assert recipe.data.train_file == str(data) and recipe.data.generator is None
    gen, _ = load_recipe("tiny-cpu", [], check_files=False)
    assert gen.data.generator is not None and gen.data.train_file is None
    with pytest.raises(SR3DConfigError, match="exactly one of data.train_file and data.generator"):
        load_recipe("tiny-cpu", [f"data.train_file={data}", "data.generator=m:f"], check_files=False)


def test_tiny_resolves_to_the_bundled_model(tmp_path: Path, monkeypatch) -> None:
    from sr3d_plugin.inference import SR3DPipeline
    from sr3d_plugin.resources import package_dir, resolve_model_name

    bundled = package_dir() / "assets" / "tiny-sr3d"
    assert Path(resolve_model_name("tiny")) == bundled and (bundled / "config.json").is_file()
    assert resolve_model_name("some/folder") == "some/folder"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()  # a folder of that name in the working directory wins
    assert resolve_model_name("tiny") == "tiny"
    monkeypatch.chdir(bundled.parent)
    pipe = SR3DPipeline.from_pretrained("tiny", device="cpu")
    assert pipe.model.config.model_type == "sr3d"


@pytest.fixture(scope="module")
def synthetic_scene(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    assert main(["synthetic", str(root), "--frames", "4", "--width", "96", "--height", "72", "--json"]) == 0
    return root / "scene0000_00"


def test_json_of_synthetic_and_validate_data_parse_line_by_line(synthetic_scene: Path, tmp_path: Path, capsys) -> None:
    assert main(["synthetic", str(tmp_path), "--frames", "2", "--width", "48", "--height", "48", "--json"]) == 0
    (info,) = _json_lines(capsys.readouterr().out)
    assert info["frames"] == 2 and Path(info["scene"]).is_dir()
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"id": "a", "conversations": []}) + "\n")
    main(["validate-data", str(records), "--no-files", "--json"])  # valid or not: the report is one object
    (report,) = _json_lines(capsys.readouterr().out)
    assert report


def test_synthetic_writes_a_scannet_style_scan(synthetic_scene: Path) -> None:
    d = synthetic_scene
    for sub in ("color", "depth", "pose"):
        assert sorted(p.stem for p in (d / sub).iterdir()) == ["0", "1", "2", "3"], sub
    assert (d / "intrinsic" / "intrinsic_depth.txt").is_file() and (d / "objects.json").is_file()
    depth = np.asarray(Image.open(d / "depth" / "0.png"))
    assert depth.shape == (72, 96) and depth.dtype == np.uint16 and depth.max() > 0
    boxes = json.loads((d / "boxes.json").read_text())
    assert boxes
    for b in boxes:  # each 2D box is the tight box of that object's pixels in the instance map
        ids = np.asarray(Image.open(d / "instance-filt" / f"{b['frame']}.png"))
        ys, xs = np.nonzero(ids == b["id"])
        assert b["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_synthetic_refuses_bad_sizes(tmp_path: Path, capsys) -> None:
    assert main(["synthetic", str(tmp_path), "--frames", "0"]) == 2
    assert "--frames 0" in capsys.readouterr().err


def test_pointmap_and_ask_run_on_the_synthetic_scan(synthetic_scene: Path, capsys) -> None:
    assert main(["pointmap", "--scene", str(synthetic_scene), "--no-cache", "--json"]) == 0
    (summary,) = _json_lines(capsys.readouterr().out)
    assert summary
    b = json.loads((synthetic_scene / "boxes.json").read_text())[0]
    region = f"frame={b['frame']} box={','.join(map(str, b['box']))}"
    res = _sr3d(
        "ask",
        "--model",
        "tiny",
        "--scene",
        str(synthetic_scene),
        "--region",
        region,
        "--question",
        "What is <region0>?",
        "--device",
        "cpu",
        "--json",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    (answer,) = _json_lines(res.stdout)
    assert isinstance(answer["answer"], str) and answer["num_frames"] == 4
    assert answer["regions"][0]["bbox"][0] == b["box"]
    for noise in KNOWN_NOISE:
        assert noise not in res.stderr, noise


def test_drop_log_entries_after(tmp_path: Path) -> None:
    from sr3d_plugin.training.trainer import drop_log_entries_after

    log = tmp_path / "log.jsonl"
    rows = [{"event": "start"}, {"event": "log", "step": 1}, {"event": "checkpoint", "step": 2}]
    rows += [{"event": "log", "step": 3}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n" + '{"event": "log", "st')
    assert drop_log_entries_after(log, 2) == 2
    assert log.read_text().splitlines() == [*(json.dumps(r) for r in rows[:3]), "not json"]
    assert drop_log_entries_after(log, 2) == 0
    assert drop_log_entries_after(tmp_path / "absent.jsonl", 0) == 0
