"""Memory planner vs measured peak, and the dry-run plan of the QLoRA SR-3D-8B / 32-frame recipe.

Measured: one real training step (forward, backward, AdamW) of a small SR-3D (4-layer Qwen2, 112-px
tiles, LoRA + PE/projector/region extractor) under :class:`~sr3d_plugin.training.memory.LiveTensorMeter`
(bytes of live tensor storages, weights and optimizer states included) on the CPU — or, with CUDA,
``torch.cuda.max_memory_allocated``. Figures: estimate / measured per setting (target 0.85–1.15),
and the ``qlora-8b`` estimate (target ≤ 20 GiB) with the time the dry run takes (no weights loaded).
"""

from __future__ import annotations

import time
from typing import Any

DESCRIPTION = "memory planner: estimate/measured on a small model (CPU), qlora-8b 32-frame plan (GiB)"


def _measure(checkpointing: bool, frames: int, bf16: bool) -> tuple[float, float]:
    from sr3d_plugin.training.memory import measure_training_step
    from sr3d_plugin.training.recipe import load_recipe

    recipe, _ = load_recipe(
        {"model": {"preset": "tiny", "dtype": "bfloat16" if bf16 else "float32"}, "data": {"generator": "x:y"}},
        [
            f"training.gradient_checkpointing={str(checkpointing).lower()}",
            f"training.mixed_precision={'bf16' if bf16 else 'no'}",
            f"data.num_frames={frames}",
            "lora.r=8",
        ],
    )
    recipe.model.config_overrides = {"tile_size": 112, "llm_hidden": 128, "llm_layers": 4, "vision_hidden": 64}
    plan, peak = measure_training_step(recipe, frames)
    return plan.allocated_peak_bytes / 2**20, peak / 2**20


def run(quick: bool = False) -> dict[str, Any]:
    from sr3d_plugin.training.memory import plan_memory
    from sr3d_plugin.training.recipe import load_recipe

    figures: dict[str, Any] = {}
    settings = (
        [(True, 16, False), (False, 16, False)]
        if quick
        else [
            (True, 16, False),
            (False, 16, False),
            (True, 32, False),
            (True, 16, True),
            (False, 16, True),
        ]
    )
    for ckpt, frames, bf16 in settings:
        est, meas = _measure(ckpt, frames, bf16)
        key = f"{'gc' if ckpt else 'no_gc'}_{frames}f_{'bf16' if bf16 else 'fp32'}"
        figures[f"{key}_estimate_mib"] = round(est, 2)
        figures[f"{key}_measured_mib"] = round(meas, 2)
        figures[f"{key}_ratio"] = round(est / meas, 3)
    t0 = time.perf_counter()
    recipe, _ = load_recipe("qlora-8b", check_files=False)
    plan = plan_memory(recipe).to_dict()
    figures["qlora_8b_32f_estimated_peak_gib"] = plan["estimated_peak_gib"]
    figures["qlora_8b_32f_full_logits_gib"] = plan["alternatives_gib"]["full_logits"]
    figures["qlora_8b_dry_run_s"] = round(time.perf_counter() - t0, 2)
    return figures
