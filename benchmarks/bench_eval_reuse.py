"""Scene-level reuse in evaluation: 16 questions on one 32-frame scene, reuse off vs on, same run.

The model: a random SR-3D at the real token counts (448-px tiles → 32×32 SigLIP tokens per frame,
121 LLM tokens per frame after the 3×3 projector, a ~4k-token prompt for 32 frames) but narrow:
SigLIP 128 wide × 2 layers, Qwen2 256 wide × 2 layers (:data:`VISION`, :data:`LLM`; at the real
widths, 1152 and ≥ 896, one uncached question takes minutes on 2 shared CPU cores), the LLM's weight
matrices drawn with std 0.3 (:data:`LLM_INIT_STD`) so that the questions change the answers; one CPU
thread.

It answers 16 questions (every fourth with a box region) about one synthetic posed RGB-D scene of 32
frames through :meth:`SR3DPipeline.ask <sr3d_plugin.inference.SR3DPipeline.ask>`, greedy, 8 new
tokens: once with ``reuse=False`` (every question reads the frames, computes the geometry, encodes the
32 frames and prefills the ~4k-token prompt) and once with reuse (all that once; each question
prefills only its own tokens). Figures: questions/s of both, their ratio (target ≥ 8 on this
machine), whether the answers are identical (they must be) and how many distinct answers there are,
the first question's and the later questions' mean seconds with reuse. ``--quick``: 8 frames, 4
questions.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

DESCRIPTION = "scene-level reuse: 16 questions on one 32-frame scene, questions/s reuse off vs on (ratio, target >= 8)"

_SUBJECTS = ["the chair", "the table", "the lamp", "the door", "the sofa", "the window", "the bed", "the shelf"]


#: (width, layers) of the benchmark's SigLIP and Qwen2
VISION = (128, 2)
LLM = (256, 2)
#: std of the LLM's random weight matrices (0.02 makes the 16 answers one string: a weak comparison)
LLM_INIT_STD = 0.3


def _questions(n: int) -> list[tuple[str, list[str]]]:
    out = []
    for i in range(n):
        if i % 4 == 3:
            out.append((f"What is <mask> next to? ({i})", [f"frame={i % 8} box={10 + i},{20 + i},{120 + i},{110 + i}"]))
        else:
            out.append((f"Where is {_SUBJECTS[i % len(_SUBJECTS)]} relative to the camera? Question {i}.", []))
    return out


def build_model(
    tile_size: int = 448, vision: tuple[int, int] = VISION, llm: tuple[int, int] = LLM, seed: int = 0
) -> tuple[Any, Any]:
    """A random SR-3D with a SigLIP of ``vision = (width, layers)`` and a Qwen2 of ``llm = (width, layers)``
    (64-wide heads; the LLM with 2 KV heads and a 4× MLP), and its processor."""
    import torch

    from sr3d_plugin.modeling.configuration_sr3d import SR3DConfig
    from sr3d_plugin.modeling.modeling_sr3d import SR3DForConditionalGeneration
    from sr3d_plugin.modeling.processing_sr3d import SR3DProcessor
    from sr3d_plugin.presets import build_tiny_tokenizer, tiny_config_fields, tiny_image_processor

    tokenizer = build_tiny_tokenizer()
    fields = tiny_config_fields(
        tokenizer, tile_size=tile_size, vision_hidden=vision[0], vision_layers=vision[1], llm_hidden=llm[0],
        llm_layers=llm[1],
    )  # fmt: skip
    fields["vision_config"].update(num_attention_heads=max(1, vision[0] // 64), intermediate_size=4 * vision[0])
    fields["text_config"].update(
        num_attention_heads=max(2, llm[0] // 64), num_key_value_heads=2, intermediate_size=4 * llm[0],
        max_position_embeddings=8192,
    )  # fmt: skip
    config = SR3DConfig(**fields)
    torch.manual_seed(seed)
    model = SR3DForConditionalGeneration(config).eval()
    with torch.no_grad():  # a "sharper" random LLM: with std 0.02 every question gets the same answer
        for param in model.llm.parameters():
            if param.dim() == 2:
                param.normal_(0.0, LLM_INIT_STD)
    processor = SR3DProcessor.from_model_config(config, tiny_image_processor(config.tile_size), tokenizer)
    return model, processor


def run(quick: bool = False) -> dict[str, Any]:
    import torch

    frames, n_questions, new_tokens = (8, 4, 8) if quick else (32, 16, 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread beats two contended ones
    try:
        return _run(frames, n_questions, new_tokens)
    finally:
        torch.set_num_threads(threads)


def _run(frames: int, n_questions: int, new_tokens: int) -> dict[str, Any]:
    from sr3d_plugin.inference import SR3DPipeline
    from sr3d_plugin.synthetic import generate_scene, write_scannet_layout

    model, processor = build_model()
    questions = _questions(n_questions)
    with tempfile.TemporaryDirectory() as tmp:
        scene = write_scannet_layout(
            generate_scene(7, num_frames=frames, width=320, height=240, num_objects=4), Path(tmp) / "scans"
        )
        figures: dict[str, Any] = {}
        answers: dict[str, list[str]] = {}
        for name, reuse in (("off", False), ("on", True)):
            pipe = SR3DPipeline(model, processor, device="cpu", reuse=reuse)
            per_question = []
            got = []
            start = time.perf_counter()
            for q, regions in questions:
                t = time.perf_counter()
                out = pipe.ask(q, scene=scene, regions=regions, num_frames=frames, max_new_tokens=new_tokens)
                per_question.append(time.perf_counter() - t)
                got.append(out["answer"])
            wall = time.perf_counter() - start
            answers[name] = got
            figures[f"reuse_{name}_questions_per_s"] = round(n_questions / wall, 3)
            figures[f"reuse_{name}_wall_s"] = round(wall, 2)
            if reuse:
                figures["reuse_on_first_question_s"] = round(per_question[0], 2)
                figures["reuse_on_later_question_mean_s"] = round(sum(per_question[1:]) / max(1, n_questions - 1), 3)
                figures["prompt_tokens"] = out["prompt_tokens"]
                figures["cache_entries"] = pipe.scene_cache.kinds()
                figures["cache_mib"] = round(pipe.scene_cache.nbytes / 2**20, 1)
    figures["ratio_on_over_off"] = round(figures["reuse_on_questions_per_s"] / figures["reuse_off_questions_per_s"], 2)
    figures["answers_identical"] = answers["on"] == answers["off"]
    figures["distinct_answers"] = len(set(answers["on"]))
    figures["setup"] = (
        f"{n_questions} questions, {frames} frames 320x240, tile 448, SigLIP {VISION[0]}x{VISION[1]} layers, "
        f"Qwen2 {LLM[0]}x{LLM[1]} layers, greedy {new_tokens} tokens, fp32 CPU, 1 thread"
    )
    return figures
