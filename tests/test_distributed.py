"""Sharded and multi-process training on the CPU, compared with one process of the same global batch.

Every run trains the tiny recipe for 4 steps at 4 samples per optimizer step: the reference is one
process with ``per_device_batch_size=2`` and ``gradient_accumulation_steps=2``; the others are two
gloo processes (``torchrun --standalone``; ``accelerate launch`` with ``recipes/accelerate/fsdp.yaml``
once) with ``per_device_batch_size=2`` under DDP, FSDP2
(``training.fsdp``) and DeepSpeed ZeRO-2 / ZeRO-3 (``training.deepspeed``). Both layouts see the same
micro-batches (docs/training.md, "Data order"), so:

* DDP is bit-identical to the reference: each micro-batch is computed alone in both, the loss of a
  process is divided by half the step's token count (an exact factor 2), and gloo sums two numbers.
* FSDP2 and ZeRO shard the gradients, so the gradient norm used for clipping (``max_grad_norm``) is
  summed from shards in another order (about 1e-7 relative); Adam's ``m / sqrt(v)`` carries that into
  the weights: within 1e-4 of each tensor's largest magnitude (measured: 1.6e-5 after 4 steps). The
  losses, computed before clipping touches anything, agree to 1e-6 (measured: equal). Without
  clipping, FSDP2 is bit-identical too (test below).

Resuming across world sizes: a checkpoint of the two-process run finishes in one process with weights
identical to the uninterrupted reference, and vice versa under FSDP; a resume that would change the
samples per step is refused, naming both layouts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from _training_helpers import events, run_train, toy_jsonl
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("distributed")]

STEPS = ("training.max_steps=4", "training.save_steps=2", "training.save_total_limit=null")
COMMON = (*STEPS, "training.per_device_batch_size=2", "training.logging_steps=1", "data.num_workers=0")
ONE = (*COMMON, "training.gradient_accumulation_steps=2")  # 1 process x 2 x 2 = 4 samples per step
FSDP = (
    "training.fsdp={fsdp_version: 2, auto_wrap_policy: transformer_based_wrap, "
    "transformer_cls_names_to_wrap: [Qwen2DecoderLayer, SiglipEncoderLayer]}"
)
WEIGHT_TOL = 1e-4  # of each tensor's largest magnitude (clipping norm summed from shards; see above)
LOSS_TOL = 1e-6


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return toy_jsonl(tmp_path_factory)


def _train(out: Path, toy: Path, *extra: str, processes: int = 1) -> list[dict]:
    proc = run_train(out, toy, *extra, processes=processes, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return events(proc.stdout)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, toy: Path) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("one") / "run"
    return out, _train(out, toy, *ONE)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, toy: Path) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("ddp") / "run"
    return out, _train(out, toy, *COMMON, processes=2)


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _losses(ev: list[dict]) -> list[float]:
    return [e["loss"] for e in ev if e["event"] == "log"]


def _worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and len(a) > 20
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)


def _assert_close_run(ref: tuple[Path, list[dict]], run: Path, ev: list[dict], steps: int = 4) -> float:
    ref_losses, losses = _losses(ref[1])[-steps:], _losses(ev)
    assert len(losses) == steps
    for a, b in zip(ref_losses, losses):
        assert abs(a - b) <= LOSS_TOL * abs(a), (ref_losses, losses)
    worst = _worst(_adapter(ref[0]), _adapter(run))
    assert worst <= WEIGHT_TOL, worst
    return worst


def _cut_at(run: Path, dest: Path, step: int) -> Path:
    """A copy of ``run`` as if it had stopped right after checkpoint-``step``."""
    shutil.copytree(run, dest)
    for extra in dest.glob("checkpoint-*"):
        if int(extra.name.split("-")[1]) > step:
            shutil.rmtree(extra)
    shutil.rmtree(dest / "adapter")
    return dest


def test_ddp_two_processes_equal_one_process_bit_for_bit(reference, ddp) -> None:
    start = next(e for e in ddp[1] if e["event"] == "start")
    assert start["processes"] == 2 and "MULTI_CPU" in start["distributed"]
    assert _losses(ddp[1]) == _losses(reference[1])
    a, b = _adapter(reference[0]), _adapter(ddp[0])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_two_processes_match_one_process(tmp_path: Path, toy: Path, reference) -> None:
    out = tmp_path / "fsdp"
    ev = _train(out, toy, *COMMON, FSDP, processes=2)
    start = next(e for e in ev if e["event"] == "start")
    assert start["processes"] == 2 and start["sharding"] == "fsdp2-cpu"
    assert not [e for e in ev if e["event"] == "warning"]  # FSDP really ran (no "falls back" warning)
    worst = _assert_close_run(reference, out, ev)
    norms = [(e["grad_norm"], r["grad_norm"]) for e, r in zip(ev, reference[1]) if e["event"] == "log"]
    assert all(abs(a - b) <= 1e-6 * b for a, b in norms)
    print(f"FSDP2 x2 vs 1 process: losses {_losses(ev)}, weights within {worst:.2e} of max")


def test_fsdp_without_clipping_is_bit_identical(tmp_path: Path, toy: Path) -> None:
    one = _train(tmp_path / "one", toy, *ONE, "training.max_grad_norm=null")
    two = _train(tmp_path / "two", toy, *COMMON, FSDP, "training.max_grad_norm=null", processes=2)
    assert _losses(one) == _losses(two)
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_checkpoint_resumes_in_one_process(tmp_path: Path, toy: Path, reference, ddp) -> None:
    run = _cut_at(ddp[0], tmp_path / "run", 2)
    proc = run_train(run, toy, *ONE, "--resume", timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ev = events(proc.stdout)
    assert next(e for e in ev if e["event"] == "resume")["global_step"] == 2
    assert _losses(ev) == _losses(reference[1])[2:]  # steps 3 and 4 saw the same samples
    a, b = _adapter(reference[0]), _adapter(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_process_checkpoint_resumes_in_two_fsdp_processes(tmp_path: Path, toy: Path, reference) -> None:
    run = _cut_at(reference[0], tmp_path / "run", 2)
    proc = run_train(run, toy, *COMMON, FSDP, "--resume", processes=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ev = events(proc.stdout)
    assert next(e for e in ev if e["event"] == "resume")["global_step"] == 2
    warnings = [e["message"] for e in ev if e["event"] == "warning"]
    assert any("no RNG state of process 1" in w for w in warnings)  # written by one process
    _assert_close_run(reference, run, ev, steps=2)


def test_resume_with_another_global_batch_is_refused(tmp_path: Path, toy: Path, ddp) -> None:
    run = _cut_at(ddp[0], tmp_path / "run", 2)
    proc = run_train(run, toy, *COMMON, "--resume")  # one process x 2 x 1: 2 samples per step, not 4
    assert proc.returncode == 2
    err = proc.stderr
    assert "2 process(es) x per_device_batch_size 2 x gradient_accumulation_steps 1 = 4 samples per step" in err
    assert "1 process(es) x per_device_batch_size 2 x gradient_accumulation_steps 1 = 2 samples per step" in err
    assert "training.per_device_batch_size=4 or training.gradient_accumulation_steps=2" in err
    assert not (run / "adapter").exists()


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_processes_match_one_process(tmp_path: Path, toy: Path, reference, stage: int) -> None:
    out = tmp_path / f"zero{stage}"
    ev = _train(out, toy, *COMMON, f"training.deepspeed=recipes/deepspeed/zero{stage}.json", processes=2)
    start = next(e for e in ev if e["event"] == "start")
    assert start["processes"] == 2 and start["sharding"] == "deepspeed" and "DEEPSPEED" in start["distributed"]
    worst = _assert_close_run(reference, out, ev)
    print(f"ZeRO-{stage} x2 vs 1 process: weights within {worst:.2e} of max")


def test_accelerate_launch_with_the_fsdp_config_runs_fsdp2_on_cpus(tmp_path: Path, toy: Path, reference) -> None:
    """The documented line: ``accelerate launch --config_file recipes/accelerate/fsdp.yaml`` (2 processes, fp32)."""
    import socket
    import subprocess
    import sys

    from _training_helpers import cli_env

    from sr3d_plugin.resources import recipes_dir

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "launch"
    cmd = [
        *(
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(recipes_dir() / "accelerate/fsdp.yaml"),
        ),
        *("--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(port)),
        *("-m", "sr3d_plugin.training", "tiny-cpu", f"training.output_dir={out}", "data.generator=null"),
        *(f"data.train_file={toy}", "logging.report_to=[]", *COMMON, "--json"),
    ]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ev = events(proc.stdout)
    start = next(e for e in ev if e["event"] == "start")
    assert start["processes"] == 2 and start["sharding"] == "fsdp2-cpu"
    _assert_close_run(reference, out, ev)


def test_cpu_fsdp_options_outside_the_cpu_path_are_refused_by_name() -> None:
    from sr3d_plugin.errors import SR3DConfigError
    from sr3d_plugin.testing import build_tiny_model
    from sr3d_plugin.training.sharding import cpu_fsdp_plugin, shard_model_on_cpu

    with pytest.raises(SR3DConfigError, match=r"training.fsdp.fsdp_version=1: .*expected fsdp_version: 2"):
        cpu_fsdp_plugin({"fsdp_version": 1})
    with pytest.raises(SR3DConfigError, match=r"training.fsdp.cpu_offload=true"):
        cpu_fsdp_plugin({"fsdp_version": 2, "cpu_offload": True})
    plugin = cpu_fsdp_plugin(
        {
            "fsdp_version": 2,
            "auto_wrap_policy": "transformer_based_wrap",
            "transformer_cls_names_to_wrap": ["NoSuchLayer"],
        }
    )
    model, _ = build_tiny_model()
    with pytest.raises(SR3DConfigError, match=r"has no module of class \['NoSuchLayer'\]"):
        shard_model_on_cpu(model, plugin)  # refused before any process group is needed
