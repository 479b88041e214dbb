"""The demo's rows and their summary: accuracy overall, per family, single-view vs cross-frame, depth families.

Counted from the answered rows only (:func:`demo_rows`), so every figure agrees with the ✓/✗ shown
beside it. Used by :mod:`sr3d_plugin.experiments.demo` and its picture
(:mod:`sr3d_plugin.experiments.demo_figure`); re-exported from the former.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sr3d_plugin.errors import SR3DInputError

__all__ = ["demo_rows", "summarise_rows", "summary_lines"]


def _view_of(sample: Any) -> str:
    """``"multi"`` for the cross-frame families, ``"single"`` for the single-view ones; a family in
    neither list (a new one) is placed by its visual input."""
    from sr3d_plugin.synthetic.qa import MULTI_VIEW_FAMILIES, SINGLE_VIEW_FAMILIES

    if sample.family in MULTI_VIEW_FAMILIES:
        return "multi"
    if sample.family in SINGLE_VIEW_FAMILIES:
        return "single"
    return "multi" if sample.visual.multi_view else "single"


def demo_rows(samples: Sequence[Any], answers: Sequence[str]) -> list[dict[str, Any]]:
    """One JSON-ready row per question: ``family``, ``view`` (``"single"`` / ``"multi"``),
    ``question``, ``answer``, ``ground_truth``, ``correct`` (exact match after
    :func:`~sr3d_plugin.experiments.evaluate.normalise_answer`) and ``region_frames`` (the frames
    each ``<regionK>`` is drawn on).

    Args:
        samples: :class:`~sr3d_plugin.synthetic.qa.QASample` questions.
        answers: the model's answer to each, in the same order.
    """
    from sr3d_plugin import _checks
    from sr3d_plugin.experiments.evaluate import normalise_answer

    if len(samples) != len(answers):
        raise SR3DInputError(f"got {len(samples)} samples but {len(answers)} answers; expected one answer each")
    rows = []
    for s, a in zip(samples, answers, strict=True):
        if not isinstance(a, str):
            raise SR3DInputError(f"answer to {s.id!r} is {_checks.describe(a)}; expected a str")
        rows.append(
            {
                "family": s.family,
                "view": _view_of(s),
                "question": s.question,
                "answer": a,
                "ground_truth": s.answer,
                "correct": normalise_answer(a) == normalise_answer(s.answer),
                "region_frames": [r.frames for r in s.visual.regions],
            }
        )
    return rows


def _tally(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    right = sum(1 for r in rows if r["correct"])
    return {"correct": right, "total": len(rows), "accuracy": right / len(rows) if rows else None}


def summarise_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy figures counted from answered rows (:func:`demo_rows`).

    Returns ``correct`` / ``total`` / ``accuracy`` over all rows; ``per_family`` (family →
    ``correct``, ``total``, ``accuracy``, ``view``, ``depth``; families in order of appearance,
    whatever they are); ``per_view`` (``"single"`` and ``"multi"`` → ``correct``, ``total``,
    ``accuracy``, ``families``); ``single_view_accuracy`` and ``cross_frame_accuracy`` (the same
    accuracies); ``depth`` and ``depth_accuracy`` over the depth-dependent families
    (:data:`~sr3d_plugin.synthetic.qa.DEPTH_FAMILIES`). An accuracy over no rows is ``None``.
    """
    import numpy as np

    from sr3d_plugin import _checks
    from sr3d_plugin.synthetic.qa import DEPTH_FAMILIES

    if not rows:
        raise SR3DInputError("rows is empty; expected at least one answered question (see demo_rows)")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not {"family", "view", "correct"} <= set(r):
            raise SR3DInputError(f"rows[{i}] is {_checks.describe(r)}; expected a dict with family, view and correct")
        if r["view"] not in ("single", "multi"):
            raise SR3DInputError(f"rows[{i}]['view'] is {r['view']!r}; expected 'single' or 'multi'")
        if not isinstance(r["correct"], (bool, np.bool_)):
            raise SR3DInputError(f"rows[{i}]['correct'] is {_checks.describe(r['correct'])}; expected a bool")
    families = list(dict.fromkeys(r["family"] for r in rows))
    per_family = {}
    for fam in families:
        fam_rows = [r for r in rows if r["family"] == fam]
        per_family[fam] = {**_tally(fam_rows), "view": fam_rows[0]["view"], "depth": fam in DEPTH_FAMILIES}
    per_view = {}
    for view in ("single", "multi"):
        view_rows = [r for r in rows if r["view"] == view]
        per_view[view] = {**_tally(view_rows), "families": list(dict.fromkeys(r["family"] for r in view_rows))}
    depth = _tally([r for r in rows if r["family"] in DEPTH_FAMILIES])
    return {
        **_tally(rows),
        "single_view_accuracy": per_view["single"]["accuracy"],
        "cross_frame_accuracy": per_view["multi"]["accuracy"],
        "depth_accuracy": depth["accuracy"],
        "per_family": per_family,
        "per_view": per_view,
        "depth": depth,
    }


def _fraction(t: dict[str, Any]) -> str:
    return f"{t['correct']}/{t['total']} ({100 * t['accuracy']:.0f} %)" if t["total"] else "no questions"


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The figures of :func:`summarise_rows` as text lines (console and picture)."""
    lines = [f"all questions: {_fraction(summary)} right"]
    for view, name in (("single", "single view"), ("multi", "cross-frame (multi-view)")):
        t = summary["per_view"][view]
        fams = ", ".join(
            f"{f} {summary['per_family'][f]['correct']}/{summary['per_family'][f]['total']}" for f in t["families"]
        )
        lines.append(f"{name}: {_fraction(t)}" + (f" — {fams}" if fams else ""))
    lines.append(f"depth-dependent families: {_fraction(summary['depth'])}")
    return lines
