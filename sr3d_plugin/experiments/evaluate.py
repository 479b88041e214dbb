"""Scoring a model on synthetic spatial QA: greedy text answers, exact match per question family."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from sr3d_plugin.synthetic.qa import ANSWER_CHOICES, DEPTH_FAMILIES, QASample

__all__ = ["answer_questions", "normalise_answer", "score_answers"]

#: chance level of each family (uniform over its answer choices; counting is 1/5)
CHANCE = {family: 1.0 / len(choices) for family, choices in ANSWER_CHOICES.items()}


def normalise_answer(text: str) -> str:
    """Lower-case, strip punctuation at the ends and collapse spaces (``"Region [1]."`` → ``"region [1]"``)."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.strip(" .,!;:")


@torch.no_grad()
def answer_questions(
    model: Any, processor: Any, samples: Sequence[QASample], batch_size: int = 16, max_new_tokens: int = 8
) -> list[str]:
    """Greedy answers of ``model`` to every sample (batched, left padding)."""
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            prompts = [processor.build_prompt(s.question, s.visual) for s in chunk]
            batch = processor(prompts, [s.visual for s in chunk], padding_side="left")
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
            answers.extend(t.strip() for t in processor.decode_answer(out, batch["input_ids"].shape[1]))
    finally:
        model.train(was_training)
    return answers


def score_answers(samples: Sequence[QASample], answers: Sequence[str]) -> dict[str, Any]:
    """Exact-match accuracy per family, overall, and over the depth-dependent families."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for sample, answer in zip(samples, answers, strict=True):
        hits[sample.family].append(normalise_answer(answer) == normalise_answer(sample.answer))
    per_family = {f: sum(v) / len(v) for f, v in sorted(hits.items())}
    all_hits = [h for v in hits.values() for h in v]
    depth_hits = [h for f, v in hits.items() if f in DEPTH_FAMILIES for h in v]
    return {
        "per_family": per_family,
        "counts": {f: len(v) for f, v in sorted(hits.items())},
        "chance": {f: CHANCE[f] for f in per_family},
        "accuracy": sum(all_hits) / len(all_hits) if all_hits else None,
        "depth_accuracy": sum(depth_hits) / len(depth_hits) if depth_hits else None,
    }
