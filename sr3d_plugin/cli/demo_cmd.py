"""``sr3d demo``: the tiny bundled SR-3D answers region questions about a fresh synthetic scene."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="ask the bundled tiny SR-3D region questions about a fresh synthetic scene (CPU, no download)",
        description=(
            "Renders one single-view and one multi-view synthetic scene, asks region questions (boxes drawn on one "
            "frame), prints question, answer and ground truth with the accuracy per family, single-view and "
            "cross-frame, and writes a PNG with the frames, every asked region, the coloured point maps and the answers."
        ),
    )
    p.add_argument("--model", help="model folder (default: the bundled tiny model)")
    p.add_argument(
        "--seed", type=int, default=0, help="scene seed >= 0: picks the scenes (demo scenes are never used in training)"
    )
    p.add_argument("--out", default="sr3d-demo.png", help="PNG to write (default: sr3d-demo.png)")
    p.add_argument("--no-png", action="store_true", help="do not write the PNG")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sr3d_plugin.experiments.demo import run_demo, summary_lines

    result = run_demo(args.model, seed=args.seed, png=None if args.no_png else args.out)
    if args.json:
        print(json.dumps(result))
        return 0
    for i, r in enumerate(result["questions"], 1):
        mark = "right" if r["correct"] else "wrong"
        print(f"Q{i} [{r['view']}-view, {r['family']}] {r['question']}")
        print(f"   answer: {r['answer']!r}   truth: {r['ground_truth']!r}   ({mark})")
    for line in summary_lines(result):
        print(line)
    t = result["timings"]
    print(f"{t['total']:.1f} s (model {t['load']:.1f} s, answers {t['answer']:.1f} s, picture {t['png']:.1f} s)")
    if "png" in result:
        print(f"wrote {result['png']}")
    return 0
