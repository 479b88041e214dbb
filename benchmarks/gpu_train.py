"""GPU half of issue 15 — PREPARED BUT NEVER RUN: no GPU was available when it was written (2026-12-02).

Run it on a machine with CUDA (``python benchmarks/gpu_train.py [--out gpu_train.json]``; about 5
minutes on one GPU; needs the ``[train]`` extra and, for the ZeRO rows, ``[deepspeed]``). It prints
one JSON object and, with ``--out``, writes it. What it measures, each against a baseline of the same run:

1. **Sharded runs on GPUs, figures as tests/test_distributed.py has them on CPUs**: the tiny recipe,
   4 steps at 4 samples per step, one process (``per_device_batch_size=2``,
   ``gradient_accumulation_steps=2``) against ``torchrun --nproc_per_node 2`` under DDP, FSDP2 (here
   accelerate's own FSDP plugin, NCCL) and ZeRO-2 / ZeRO-3: the largest weight difference relative to
   each tensor's largest magnitude, and the per-step loss differences. Needs two GPUs; with one it
   records why the rows are missing.
2. **Throughput and peak memory on one GPU**: tokens per second (input tokens / summed step time,
   warm-up step left out) and ``torch.cuda.max_memory_allocated`` (the trainer's ``peak_cuda_gib``)
   of the tiny and the mid-size model of ``benchmarks/bench_train.py``, in fp32 and bf16.
3. **Planner against the GPU**: for the same runs, ``sr3d train … --dry-run --json`` (the planner's
   ``estimated_peak_gib`` for that workload, which includes 0.75 GiB of assumed CUDA context that
   ``max_memory_allocated`` does not see, so ``allocated_peak`` is compared) against the measured peak.

Not covered, and why: QLoRA / LoRA of SR-3D-8B on a real GPU needs the SR-3D-8B (or NVILA-Lite-8B)
weights on that machine; the lent device machines reach no model hub. Where the weights are present,
``sr3d train qlora-8b model.path=DIR data.train_file=… training.max_steps=20 --json`` ends with an
``end`` event whose ``peak_cuda_gib`` is the figure to set against ``sr3d train qlora-8b --dry-run``
(12.4 GiB planned, docs/training.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_train import FSDP, MID, _throughput, _train  # noqa: E402


def _compare(ref: Path, ref_ev: list[dict], run: Path, ev: list[dict]) -> dict[str, float]:
    from safetensors.torch import load_file

    a = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    worst = max(float((a[k].float() - b[k].float()).abs().max() / a[k].float().abs().max().clamp_min(1e-12)) for k in a)
    la = [e["loss"] for e in ref_ev if e["event"] == "log"]
    lb = [e["loss"] for e in ev if e["event"] == "log"]
    return {"weights_max_rel_diff": worst, "loss_max_rel_diff": max(abs(x - y) / abs(x) for x, y in zip(la, lb))}


def _planned_allocated_gib(extra: list[str]) -> float:
    """The planner's allocated peak (no CUDA context) for the toy workload: 4 tiles per sample."""
    cmd = [sys.executable, "-m", "sr3d_plugin.cli", "train", "tiny-cpu", *extra, "--dry-run", "--json", "--tiles", "4"]
    plan = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    return float(plan["allocated_peak_gib"])


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu_train.py needs CUDA; this machine has none (see its docstring)", file=sys.stderr)
        return 2
    from sr3d_plugin.training.toy_data import region_qa

    gpus = torch.cuda.device_count()
    figures: dict[str, Any] = {"gpus": gpus, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="sr3d-gpu-train-") as tmp:
        data = Path(region_qa(Path(tmp) / "data", num_scenes=3, num_frames=6, sampled_frames=4, questions_per_scene=12))
        ref = Path(tmp) / "one"
        ref_ev = _train(1, ref, data, ["training.max_steps=4", "training.gradient_accumulation_steps=2"])
        if gpus >= 2:
            for name, extra in {
                "ddp": [],
                "fsdp2": [FSDP],
                "zero2": ["training.deepspeed=recipes/deepspeed/zero2.json"],
                "zero3": ["training.deepspeed=recipes/deepspeed/zero3.json"],
            }.items():
                out = Path(tmp) / name
                try:
                    ev = _train(2, out, data, ["training.max_steps=4", *extra])
                except RuntimeError as exc:
                    figures[f"agreement_{name}"] = f"failed: {str(exc)[-600:]}"
                    continue
                figures[f"agreement_{name}"] = _compare(ref, ref_ev, out, ev)
        else:
            figures["agreement"] = f"not measured: {gpus} GPU (two are needed for two processes)"
        for model, sizes in (("tiny", []), ("mid", [f"model.config_overrides={MID}"])):
            for precision in ("no", "bf16"):
                extra = [*sizes, f"training.mixed_precision={precision}", "training.max_steps=8"]
                out = Path(tmp) / f"speed-{model}-{precision}"
                ev = _train(1, out, data, extra)
                tps, _ = _throughput(ev)
                end = next(e for e in ev if e["event"] == "end")
                key = f"{model}_{'fp32' if precision == 'no' else 'bf16'}"
                figures[f"{key}_tokens_per_s"] = round(tps, 1)
                figures[f"{key}_peak_cuda_gib"] = end["peak_cuda_gib"]
                planned = _planned_allocated_gib([*sizes, f"training.mixed_precision={precision}"])
                figures[f"{key}_planned_allocated_gib"] = round(planned, 3)
                figures[f"{key}_planned_over_measured"] = round(planned / end["peak_cuda_gib"], 3)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
