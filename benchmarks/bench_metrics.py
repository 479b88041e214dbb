"""ScanQA-val-sized scoring: ``score_task`` (all metrics, METEOR included) vs bare pycocoevalcap.

The corpus is synthetic but shaped like ScanQA val: 4,675 questions, 1–3 short reference answers
each (objects, colours, places, counts), predictions that are exact, near or wrong, from a fixed
seed. ``score_task`` cleans the answers, computes EM@1 / EM-R and the seven caption metrics; the
baseline calls pycocoevalcap's Bleu, Meteor (Java start-up included), Rouge and Cider on the same
cleaned strings. Target: ratio ≤ 1.5.
"""

from __future__ import annotations

import random
import time
from typing import Any

DESCRIPTION = "ScanQA-sized scoring by score_task (EM, EM-R, BLEU, METEOR, ROUGE-L, CIDEr) vs bare pycocoevalcap"

_COLORS = ["white", "black", "brown", "gray", "blue", "red", "beige", "green", "wooden", "silver"]
_OBJECTS = [
    "chair",
    "table",
    "desk",
    "bed",
    "cabinet",
    "door",
    "window",
    "couch",
    "lamp",
    "trash can",
    "bookshelf",
    "monitor",
    "tv",
    "sink",
    "toilet",
    "nightstand",
    "pillow",
    "office chair",
    "kitchen counter",
    "radiator",
]
_PLACES = [
    "next to {o}",
    "on {o}",
    "under {o}",
    "in front of {o}",
    "behind {o}",
    "to left of {o}",
    "to right of {o}",
    "in corner",
    "against wall",
    "between {o} and {p}",
]
_SHAPES = ["rectangular", "round", "square", "l-shaped", "circular"]


def _answer(rng: random.Random, kind: str) -> str:
    o, p = rng.choice(_OBJECTS), rng.choice(_OBJECTS)
    if kind == "object":
        return rng.choice([o, f"{rng.choice(_COLORS)} {o}", f"the {o}"])
    if kind == "color":
        return rng.choice(_COLORS)
    if kind == "place":
        return rng.choice(_PLACES).format(o=rng.choice(["the ", ""]) + o, p=p)
    if kind == "count":
        return str(rng.choice([1, 2, 2, 3, 4, 5, 6]))
    return rng.choice(_SHAPES)


def make_scanqa(n: int, seed: int = 0) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """``n`` ScanQA-like records (1–3 references) and one prediction per record."""
    rng = random.Random(seed)
    kinds = ["object"] * 4 + ["color"] * 2 + ["place"] * 3 + ["count", "shape"]
    records, preds = [], {}
    for i in range(n):
        kind = rng.choice(kinds)
        answers = [_answer(rng, kind) for _ in range(rng.choice([1, 1, 2, 2, 3]))]
        qid = f"val-scene{i // 8:04d}_00-{i}"
        records.append(
            {
                "question_id": qid,
                "scene_id": f"scene{i // 8:04d}_00",
                "question": f"What is {kind}?",
                "answers": answers,
            }
        )
        r = rng.random()
        if r < 0.3:  # exact, with model-style casing / punctuation
            pred = rng.choice(answers)
            pred = rng.choice([pred, pred.capitalize(), pred + "."])
        elif r < 0.5:  # near: a word added or dropped
            words = rng.choice(answers).split()
            if len(words) > 1 and rng.random() < 0.5:
                words.pop(rng.randrange(len(words)))
            else:
                words.insert(0, rng.choice(_COLORS))
            pred = " ".join(words)
        else:
            pred = _answer(rng, rng.choice(kinds))
        preds[qid] = pred
    return records, preds


def _bare(gts: dict[int, list[str]], res: dict[int, list[str]], meteor: bool = True) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU-{i + 1}": 100 * bleu[i] for i in range(4)}
    if meteor:
        scorer = Meteor()
        try:
            out["METEOR"] = 100 * scorer.compute_score(gts, res)[0]
        finally:
            scorer.meteor_p.kill()
            scorer.meteor_p.wait()
    out["ROUGE-L"] = 100 * Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = 100 * Cider().compute_score(gts, res)[0]
    return out


def _warm_up_java() -> None:
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        meteor.compute_score({0: ["a chair"]}, {0: ["chair"]})
    finally:
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()


def run(quick: bool = False) -> dict[str, Any]:
    from sr3d_plugin.evaluation import metrics
    from sr3d_plugin.evaluation.metrics import clean_answer
    from sr3d_plugin.evaluation.scoring import score_task

    n = 600 if quick else 4675
    repeats = 1 if quick else 3
    records, preds = make_scanqa(n)
    # the same strings the scorer builds: cleaned references and cleaned predictions
    gts = {i: [clean_answer(a) for a in rec["answers"]] for i, rec in enumerate(records)}
    res = {i: [clean_answer(preds[rec["question_id"]])] for i, rec in enumerate(records)}

    _warm_up_java()  # the first JVM start of a session reads the jar and paraphrase tables cold
    bare_times, ours_times = [], []
    bare_scores: dict[str, float] = {}
    ours: dict[str, Any] = {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        bare_scores = _bare(gts, res)
        bare_times.append(time.perf_counter() - t0)
        metrics._clean.cache_clear()  # empty the memo: score_task must do its own cleaning
        t0 = time.perf_counter()
        ours = score_task("scanqa", preds, records, cache=False)
        ours_times.append(time.perf_counter() - t0)

    # the Python side alone (no METEOR on either side)
    t0 = time.perf_counter()
    _bare(gts, res, meteor=False)
    bare_py_s = time.perf_counter() - t0
    metrics._clean.cache_clear()
    t0 = time.perf_counter()
    score_task("scanqa", preds, records, cache=False, meteor=False)
    ours_py_s = time.perf_counter() - t0

    bare_s, ours_s = min(bare_times), min(ours_times)
    match = all(abs(ours["scores"][k] - v) < 1e-9 for k, v in bare_scores.items())
    print(
        f"   score_task {ours_s:.2f} s vs bare pycocoevalcap {bare_s:.2f} s: ratio {ours_s / bare_s:.2f} (target <= 1.5)"
    )
    return {
        "questions": n,
        "score_task_s": round(ours_s, 2),
        "bare_pycocoevalcap_s": round(bare_s, 2),
        "ratio": round(ours_s / bare_s, 3),
        "target_ratio": 1.5,
        "runs_each": repeats,
        "score_task_no_meteor_s": round(ours_py_s, 2),
        "bare_no_meteor_s": round(bare_py_s, 2),
        "caption_scores_match_bare": match,
        "EM@1": round(ours["scores"]["EM@1"], 2),
        "EM-R": round(ours["scores"]["EM-R"], 2),
        "CIDEr": round(ours["scores"]["CIDEr"], 2),
        "METEOR": None if ours["scores"]["METEOR"] is None else round(ours["scores"]["METEOR"], 2),
    }
