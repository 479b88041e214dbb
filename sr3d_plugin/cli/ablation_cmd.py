"""``sr3d ablation``: 3D PE off/on × single-view pre-training off/on on synthetic spatial QA."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ablation",
        help="train 4 tiny SR-3D models per seed (3D PE × single-view pre-training) on the CPU; write the table + plot",
        description=(
            "The paper's Table 8 in miniature. Trains from scratch with the tiny-synthetic recipes (resumable: "
            "finished runs in --work are reused), scores every model on held-out synthetic scenes per question "
            "family, and writes results.json, README.md (table) and ablation.png to --out."
        ),
    )
    p.add_argument("--out", default="docs/ablation", help="report folder (default: docs/ablation)")
    p.add_argument("--work", default="runs/ablation", help="run folders (default: runs/ablation)")
    p.add_argument("--stage1-steps", type=int, default=3500, help="single-view pre-training steps (default 3500)")
    p.add_argument("--stage2-steps", type=int, default=8000, help="multi-view steps (default 8000)")
    p.add_argument(
        "--scratch-steps", type=int, help="steps of the cells without pre-training (default: the stage-2 steps)"
    )
    p.add_argument("--score-only", action="store_true", help="train nothing; score the models that exist in --work")
    p.add_argument("--per-family", type=int, default=100, help="test questions per family (default 100)")
    p.add_argument("--parallel", type=int, default=2, help="training jobs at once (default 2)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (default: 0 1)")
    p.add_argument("--export-demo", metavar="DIR", help="copy the 3D PE + PT model here (the bundled demo model)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sr3d_plugin.experiments.ablation import run_ablation

    results = run_ablation(
        out_dir=args.out,
        work_dir=args.work,
        stage1_steps=args.stage1_steps,
        stage2_steps=args.stage2_steps,
        per_family=args.per_family,
        parallel=args.parallel,
        seeds=args.seeds,
        scratch_steps=args.scratch_steps,
        score_only=args.score_only,
        export_demo=args.export_demo,
    )
    if args.json:
        print(json.dumps(results))
    else:
        from pathlib import Path

        print(Path(args.out, "README.md").read_text())
    return 0
