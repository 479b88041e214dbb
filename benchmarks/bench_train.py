"""Training throughput and memory on this machine's CPUs: 1 vs 2 processes, and planner vs measured per recipe.

Throughput: the tiny recipe's trainer (``python -m sr3d_plugin.training``, the same code path as
``sr3d train``) on synthetic region QA, for the tiny model and a mid-size one (6-layer 384-wide Qwen2,
96-wide SigLIP), each with 4 samples per optimizer step as one process (``per_device_batch_size=2``,
``gradient_accumulation_steps=2``), two gloo processes under DDP, and two under FSDP2
(``torchrun --standalone --nproc_per_node 2``), all in this run. Tokens per second = input tokens
(padding excluded, all processes) / summed step wall time (forward, backward, optimizer; data loading
excluded), the first step (warm-up) left out; the
ratios are against the one-process run of the same model. Memory: the peak resident set size of
process 0 (``getrusage``; model build and Python included, so at these sizes it is mostly the
interpreter and libraries).

Planner: for every bundled recipe whose shape builds on a CPU (LoRA or full finetune, fp32 or bf16
autocast, gradient checkpointing as the recipe has it; QLoRA needs a base folder on disk and is left
out) the LLM and vision tower are scaled down (4-layer 128-wide Qwen2, 112-px tiles, 8 frames) and one
training step is measured with :func:`~sr3d_plugin.training.memory.measure_training_step` (bytes of
live tensors, the CPU analogue of ``torch.cuda.max_memory_allocated``); the figure is estimate /
measured (target 0.85-1.15). Sharded recipes are measured in one process (their per-process share
of states is the planner's division, not measured here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

DESCRIPTION = "training: tokens/s and peak RSS, tiny and mid-size, 1 vs 2 CPU processes (DDP, FSDP2); planner/measured"

MID = "{llm_hidden: 384, llm_layers: 6, vision_hidden: 96}"
FSDP = (
    "training.fsdp={fsdp_version: 2, auto_wrap_policy: transformer_based_wrap, "
    "transformer_cls_names_to_wrap: [Qwen2DecoderLayer, SiglipEncoderLayer]}"
)
LAYOUTS = {  # name: (processes, overrides); 4 samples per optimizer step each
    "1proc": (1, ["training.gradient_accumulation_steps=2"]),
    "ddp2": (2, []),
    "fsdp2": (2, [FSDP]),
}
PLAN_DIMS = {"tile_size": 112, "llm_hidden": 128, "llm_layers": 4, "vision_hidden": 64}


def _train(processes: int, out: Path, data: Path, extra: list[str]) -> list[dict[str, Any]]:
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    cmd = [
        *launcher,
        *("-m", "sr3d_plugin.training", "tiny-cpu", f"training.output_dir={out}", "data.generator=null"),
        *(f"data.train_file={data}", "logging.report_to=[]", "data.num_workers=0", "training.logging_steps=1"),
        *("training.save_steps=0", "training.per_device_batch_size=2", *extra, "--json"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"training run failed ({' '.join(cmd[-6:])}):\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _throughput(events: list[dict[str, Any]]) -> tuple[float, float]:
    logs = [e for e in events if e["event"] == "log"][1:]  # the first step warms up
    tokens = sum(e["input_tokens"] for e in logs)
    seconds = sum(e["step_seconds"] for e in logs)
    end = next(e for e in events if e["event"] == "end")
    return tokens / seconds, float(end["peak_rss_mib"])


def _planner_shapes(quick: bool) -> dict[str, Any]:
    from sr3d_plugin.training.memory import measure_training_step
    from sr3d_plugin.training.recipe import bundled_recipes, load_recipe

    figures: dict[str, Any] = {}
    names = [n for n, _, _ in bundled_recipes()]
    for name in names[:2] if quick else names:
        recipe, _ = load_recipe(name, check_files=False)
        if recipe.quantization.load_in_4bit:
            figures[f"plan_{name}"] = (
                "not measured (4-bit: measure_training_step builds in memory, QLoRA needs a base folder)"
            )
            continue
        recipe.model.path, recipe.model.preset = None, "tiny"
        recipe.model.config_overrides = dict(PLAN_DIMS)
        recipe.training.deepspeed, recipe.training.fsdp = None, None
        recipe.data.num_frames = 8
        plan, peak = measure_training_step(recipe, 8)
        figures[f"plan_{name}_estimate_mib"] = round(plan.allocated_peak_bytes / 2**20, 2)
        figures[f"plan_{name}_measured_mib"] = round(peak / 2**20, 2)
        figures[f"plan_{name}_ratio"] = round(plan.allocated_peak_bytes / peak, 3)
    return figures


def run(quick: bool = False) -> dict[str, Any]:
    from sr3d_plugin.training.toy_data import region_qa

    figures: dict[str, Any] = {"cpu_count": os.cpu_count()}
    steps = 3 if quick else 8
    with tempfile.TemporaryDirectory(prefix="sr3d-bench-train-") as tmp:
        data = Path(region_qa(Path(tmp) / "data", num_scenes=3, num_frames=6, sampled_frames=4, questions_per_scene=12))
        for model, sizes in (("tiny", []), ("mid", [f"model.config_overrides={MID}"])):
            base = None
            for layout, (processes, extra) in LAYOUTS.items():
                out = Path(tmp) / f"{model}-{layout}"
                ev = _train(processes, out, data, [f"training.max_steps={steps}", *sizes, *extra])
                tps, rss = _throughput(ev)
                figures[f"{model}_{layout}_tokens_per_s"] = round(tps, 1)
                figures[f"{model}_{layout}_peak_rss_mib"] = rss
                if base is None:
                    base = tps
                else:
                    figures[f"{model}_{layout}_vs_1proc_throughput"] = round(tps / base, 3)
    figures.update(_planner_shapes(quick))
    return figures
