"""Batched asking: 16 questions over two 8-frame scenes, one ``ask`` per question vs ``ask_many``, same run.

The model is :func:`benchmarks.bench_eval_reuse.build_model` (real token counts, narrow widths, one CPU
thread). Both ways use the scene cache, warmed first with one question per scene, so the figures
compare generation alone: 16 single greedy calls (8 new tokens) against
:meth:`SR3DPipeline.ask_many <sr3d_plugin.inference.SR3DPipeline.ask_many>` with ``batch_size`` 8 and
16 (the questions of a scene share one prefix prefill and decode together). Figures: questions/s of
each, the batched/single ratios, whether every answer is identical (it must be) and how many distinct
answers there are. No speed target (the gain depends on how idle one question leaves the device; on
the 2 shared CPU cores of the development machine it measured 1.4–1.7×, noisily). ``--quick``: 4
questions.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

DESCRIPTION = "batched asking: 16 questions over two scenes, ask per question vs ask_many (answers identical)"


def run(quick: bool = False) -> dict[str, Any]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(4 if quick else 16, frames=8, new_tokens=8)
    finally:
        torch.set_num_threads(threads)


def _run(n_questions: int, frames: int, new_tokens: int) -> dict[str, Any]:
    from benchmarks.bench_eval_reuse import _questions, build_model
    from sr3d_plugin.inference import SR3DPipeline
    from sr3d_plugin.synthetic import generate_scene, write_scannet_layout

    model, processor = build_model()
    with tempfile.TemporaryDirectory() as tmp:
        scenes = [
            write_scannet_layout(
                generate_scene(seed, num_frames=frames, width=320, height=240, num_objects=4), Path(tmp) / f"s{seed}"
            )
            for seed in (7, 8)
        ]
        items = [
            {"question": q, "regions": r, "scene": str(scenes[i % 2])}
            for i, (q, r) in enumerate(_questions(n_questions))
        ]
        common = {"num_frames": frames, "max_new_tokens": new_tokens}

        def warmed() -> SR3DPipeline:
            pipe = SR3DPipeline(model, processor, device="cpu")
            pipe.ask_many(items[:2], **{**common, "max_new_tokens": 1})  # frames, features and prefixes cached
            return pipe

        pipe = warmed()
        start = time.perf_counter()
        single = [
            pipe.ask(it["question"], **{k: v for k, v in it.items() if k != "question"}, **common) for it in items
        ]
        single_s = time.perf_counter() - start
        figures: dict[str, Any] = {"single_questions_per_s": round(n_questions / single_s, 3)}
        identical = True
        for size in (8, 16):
            pipe = warmed()
            start = time.perf_counter()
            got = pipe.ask_many(items, batch_size=size, **common)
            seconds = time.perf_counter() - start
            figures[f"batch{size}_questions_per_s"] = round(n_questions / seconds, 3)
            figures[f"batch{size}_vs_single"] = round(single_s / seconds, 2)
            identical = identical and [g["answer"] for g in got] == [s["answer"] for s in single]
        figures["answers_identical"] = identical
        figures["distinct_answers"] = len({s["answer"] for s in single})
    return figures
