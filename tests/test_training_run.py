"""End-to-end training runs of the tiny recipe on the CPU (subprocesses): loss falls, SIGKILL + resume
gives identical weights, checkpoints are atomic, merge, QLoRA, and two gloo processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _training_helpers import cli_env, events, run_train, toy_jsonl
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return toy_jsonl(tmp_path_factory)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, toy: Path) -> Path:
    """An uninterrupted 16-step run (reference for resume and merge; run once, shared by xdist workers)."""
    from filelock import FileLock

    out = tmp_path_factory.getbasetemp().parent / "sr3d-train-full"
    with FileLock(str(out) + ".lock"):
        if not (out / "adapter" / "adapter_model.safetensors").is_file():
            shutil.rmtree(out, ignore_errors=True)
            proc = run_train(
                out, toy, "training.max_steps=16", "training.save_steps=4", "training.save_total_limit=null"
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_tiny_recipe_trains_on_cpu_and_loss_falls(tmp_path: Path, toy: Path) -> None:
    out = tmp_path / "run"
    t0 = time.perf_counter()
    # the environment says one thread (OMP_NUM_THREADS=1); training.cpu_threads pins the run's count
    proc = run_train(out, toy, "training.logging_steps=1", "logging.report_to=[tensorboard]", "training.cpu_threads=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = events(proc.stdout)
    start = next(e for e in ev if e["event"] == "start")
    assert start["cpu_threads"] == 2
    names = [row["name"] for row in start["trainable"]]
    assert any(n.startswith("llm.") and "lora_" in n for n in names)
    for module in ("perception_encoder", "mm_projector", "region_extractor"):
        assert any(n.startswith(module + ".") for n in names), module
    assert not any("vision_tower" in n for n in names)
    assert start["trainable_params"] == sum(row["numel"] for row in start["trainable"])
    losses = [e["loss"] for e in ev if e["event"] == "log"]
    assert len(losses) == 60
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "processor_config.json").is_file()
    assert list((out / "logs").rglob("events.out.tfevents.*")), "TensorBoard events"
    assert sum(1 for _ in (out / "log.jsonl").open()) >= 60
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    assert kept == ["checkpoint-40", "checkpoint-60"]  # save_total_limit 2
    print(f"tiny recipe: {time.perf_counter() - t0:.1f} s, loss {first:.3f} -> {last:.3f}")


def test_sigkill_and_resume_give_identical_weights(tmp_path: Path, toy: Path, full_run: Path) -> None:
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "sr3d_plugin.training",
        "tiny-cpu",
        f"training.output_dir={out}",
        "data.generator=null",
        f"data.train_file={toy}",
        "logging.report_to=[]",
        "training.max_steps=16",
        "training.save_steps=4",
        "training.save_total_limit=null",
        "--json",
    ]
    child = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not (out / "checkpoint-4").is_dir() and child.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # somewhere inside the following steps (or the next save)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    steps = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert steps and steps[-1] < 16, f"the run finished before it was killed: {steps}"
    for s in steps:  # never a half-written checkpoint-N
        ckpt = out / f"checkpoint-{s}"
        assert (ckpt / "trainer_state.json").is_file() and (ckpt / "adapter" / "adapter_model.safetensors").is_file()
        assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == s
    proc = run_train(
        out, toy, "training.max_steps=16", "training.save_steps=4", "training.save_total_limit=null", "--resume"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = next(e for e in events(proc.stdout) if e["event"] == "resume")
    assert resumed["global_step"] == steps[-1]
    assert not list(out.glob(".checkpoint-*"))  # stale temporary folders are cleaned
    a, b = _adapter(full_run), _adapter(out)
    assert a.keys() == b.keys() and len(a) > 20
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a fresh start in a folder with checkpoints is refused
    again = run_train(out, toy, "training.max_steps=16")
    assert again.returncode == 2 and "--resume" in again.stderr


def test_merge_output_matches_adapter_model(tmp_path: Path, full_run: Path, toy: Path) -> None:
    from peft import PeftModel

    from sr3d_plugin.builders import load_model
    from sr3d_plugin.cli import main
    from sr3d_plugin.training.data import SR3DCollator, SR3DTrainDataset, load_training_source
    from sr3d_plugin.training.recipe import load_recipe

    merged_dir = tmp_path / "merged"
    assert main(["merge", str(full_run), str(merged_dir), "--json"]) == 0
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "processor_config.json").is_file()
    merged, proc = load_model(merged_dir)
    assert json.loads((merged_dir / "config.json").read_text())["model_type"] == "sr3d"
    base, _ = load_model(full_run / "base-model")
    adapted = PeftModel.from_pretrained(base, str(full_run / "adapter")).eval()
    recipe, _ = load_recipe("tiny-cpu", ["data.generator=null", f"data.train_file={toy}", "data.pointmap_cache=null"])
    ds = SR3DTrainDataset(load_training_source(recipe.data), proc, merged.config, recipe.data)
    batch = SR3DCollator(proc.tokenizer.pad_token_id)([ds[i] for i in range(4)])
    with torch.no_grad():
        a, b = merged(**batch).logits, adapted(**batch).logits
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    # the trained modules really replaced the base ones
    original = load_file(str(full_run / "base-model" / "model.safetensors"))
    assert not torch.equal(merged.mm_projector.layers[2].weight, original["mm_projector.layers.2.weight"])
    assert not torch.equal(
        merged.llm.model.layers[0].mlp.down_proj.weight, original["llm.model.layers.0.mlp.down_proj.weight"]
    )
    assert torch.equal(
        merged.vision_tower.embeddings.patch_embedding.weight,
        original["vision_tower.embeddings.patch_embedding.weight"],
    )


def test_qlora_8b_recipe_on_a_vila_layout_checkpoint(tmp_path: Path, toy: Path) -> None:
    """The bundled qlora-8b recipe, unchanged but for sizes that a CPU can run, on a tiny stand-in of
    a released VILA-layout checkpoint: 4-bit LLM, LoRA + trained SR-3D modules, then merge."""
    pytest.importorskip("bitsandbytes")
    from sr3d_plugin.builders import load_model
    from sr3d_plugin.cli import main
    from sr3d_plugin.testing import write_tiny_vila_checkpoint

    ckpt = write_tiny_vila_checkpoint(tmp_path / "vila")
    out = tmp_path / "qlora"
    cmd = [
        sys.executable,
        "-m",
        "sr3d_plugin.training",
        "qlora-8b",
        f"model.path={ckpt}",
        f"training.output_dir={out}",
        f"data.train_file={toy}",
        "data.num_frames=4",
        "data.num_workers=0",
        "data.pointmap_cache=null",
        "model.dtype=float32",
        "quantization.compute_dtype=float32",
        "training.mixed_precision=no",
        "training.optimizer=adamw",
        "training.gradient_accumulation_steps=2",
        "training.max_steps=3",
        "training.logging_steps=1",
        "logging.report_to=[]",
        "--json",
    ]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = events(proc.stdout)
    losses = [e["loss"] for e in ev if e["event"] == "log"]
    assert len(losses) == 3 and all(l == l for l in losses)  # finite
    assert all(e["grad_norm"] > 0 for e in ev if e["event"] == "log")
    adapter = _adapter(out)
    assert any("lora_B" in k and adapter[k].abs().sum() > 0 for k in adapter)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        ckpt.resolve()
    )
    # the 4-bit run resumes from its pickle-free checkpoint
    more = subprocess.run(
        [*("training.max_steps=4" if a == "training.max_steps=3" else a for a in cmd), "--resume"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert more.returncode == 0, more.stderr[-3000:]
    assert next(e for e in events(more.stdout) if e["event"] == "resume")["global_step"] == 3
    merged_dir = tmp_path / "merged"
    assert main(["merge", str(out), str(merged_dir)]) == 0
    merged, _ = load_model(merged_dir)
    assert merged.config.model_type == "sr3d"
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())


def test_two_gloo_processes_train_with_torchrun(tmp_path: Path, toy: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    out = tmp_path / "ddp"
    cmd = [
        torchrun,
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "sr3d_plugin.training",
        "tiny-cpu",
        f"training.output_dir={out}",
        "data.generator=null",
        f"data.train_file={toy}",
        "logging.report_to=[]",
        "training.max_steps=3",
        "training.save_steps=2",
        "training.logging_steps=1",
        "data.num_workers=0",
        "--json",
    ]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ev = events(proc.stdout)
    start = next(e for e in ev if e["event"] == "start")
    assert start["processes"] == 2 and "MULTI_CPU" in start["distributed"]
    assert sum(1 for e in ev if e["event"] == "start") == 1  # only the main process reports
    assert [e["step"] for e in ev if e["event"] == "log"] == [1, 2, 3]
    assert (out / "checkpoint-2" / "trainer_state.json").is_file() and (out / "adapter").is_dir()
    assert (out / "checkpoint-3" / "rng_1.json").is_file()  # both ranks' RNG states (JSON + safetensors)
    assert not [p for p in out.rglob("*") if p.suffix in (".pkl", ".bin", ".pt")]  # no pickles anywhere
    # both processes resume from the pickle-free checkpoint
    more = subprocess.run(
        [*("training.max_steps=4" if a == "training.max_steps=3" else a for a in cmd), "--resume"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert more.returncode == 0, more.stderr[-4000:]
    ev = events(more.stdout)
    assert next(e for e in ev if e["event"] == "resume")["global_step"] == 3
    assert [e["step"] for e in ev if e["event"] == "log"] == [4]
