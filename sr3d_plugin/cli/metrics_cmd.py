"""``sr3d metrics``: score a predictions file against prepared annotations (SR3D-FACTS §8)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    from sr3d_plugin.evaluation.schema import TASKS

    p = sub.add_parser(
        "metrics",
        help="score predictions (JSONL or an lmms-eval --log_samples file) for scanqa/sqa3d/scan2cap/vsibench",
        description=(
            "Score PREDICTIONS against <DATA>/<TASK>/<SPLIT>.jsonl with the reference metrics. Each predictions "
            "line holds 'question_id' and 'prediction' (or 'text'/'answer'/'pred'); lmms-eval --log_samples "
            "lines (doc_id + filtered_resps) are accepted too. All scores are percentages."
        ),
    )
    p.add_argument("task", choices=TASKS, help="evaluation task")
    p.add_argument("predictions", help="predictions JSONL file")
    p.add_argument("--data", required=True, metavar="DIR", help="prepared data folder holding <task>/<split>.jsonl")
    p.add_argument(
        "--split",
        default=None,
        help="annotation split (default: the task's evaluation split: val for scanqa/scan2cap, test for sqa3d/vsibench)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", metavar="FILE", help="also write the JSON result to FILE")
    p.add_argument(
        "--only-predicted",
        action="store_true",
        help="score only the questions that have a prediction (default: missing ones count as wrong)",
    )
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (no Java needed)")
    p.add_argument("--iou-threshold", type=float, default=0.5, help="Scan2Cap @IoU threshold (default 0.5)")
    p.add_argument(
        "--vsibench-number-parser",
        choices=("lmms_eval", "first_token"),
        default="lmms_eval",
        help="how numeric VSI-Bench answers are read (default: lmms_eval, as lmms-eval 0.7.3)",
    )
    p.set_defaults(func=run)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _table(result: dict[str, Any]) -> str:
    lines = []
    src = result.get("source", {})
    lines.append(f"{result['task']} ({src.get('split', '?')}): {src.get('annotations', '')}")
    scores = result["scores"]
    counts = result["counts"]
    width = max(len(k) for k in scores)
    for name, value in scores.items():
        line = f"  {name:<{width}}  {_fmt(value):>7}"
        if name == "EM-R" and "empty_after_cleaning" in counts:
            # LEO's rule counts an empty answer as a hit: say how many beside the number
            line += f"   (LEO's rule; {counts['empty_after_cleaning']} empty prediction(s) counted as hits)"
        lines.append(line)
    flat = ", ".join(f"{k} {_fmt(v)}" for k, v in counts.items() if not isinstance(v, dict))
    lines.append(f"counts: {flat}")
    for k, v in counts.items():
        if isinstance(v, dict):
            lines.append(f"{k}: " + ", ".join(f"{t} {n}" for t, n in v.items()))
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from sr3d_plugin.evaluation.schema import default_split, load_records, records_path
    from sr3d_plugin.evaluation.scoring import load_predictions, score_task
    from sr3d_plugin.io_utils import atomic_write_json

    split = args.split or default_split(args.task)
    ann_path = records_path(args.data, args.task, split)
    records = load_records(ann_path, args.task)
    predictions = load_predictions(args.predictions, records)
    result = score_task(
        args.task,
        predictions,
        records,
        only_predicted=args.only_predicted,
        iou_threshold=args.iou_threshold,
        vsibench_number_parser=args.vsibench_number_parser,
        meteor=not args.no_meteor,
        cache=False,
    )
    result["source"] = {"annotations": str(ann_path), "predictions": str(args.predictions), "split": split}
    if args.out:
        atomic_write_json(args.out, result)
    if args.json:
        print(json.dumps(result))
    else:
        print(_table(result))
    return 0
