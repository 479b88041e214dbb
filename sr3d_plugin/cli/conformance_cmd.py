"""``sr3d conformance``: replay the cases recorded from the original implementations and print a table."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "conformance",
        help="replay the recorded original-code cases (SR-3D/VILA, LLaVA, transformers LLaVA) and compare",
        description="Feed each recorded case's raw inputs through this package's default paths and compare "
        "greedy tokens and last-position logits with what the original code produced.",
    )
    p.add_argument("--data", metavar="DIR", help="folder of recorded cases (default: conformance/data of the checkout)")
    p.add_argument("--case", action="append", metavar="NAME", help="run only this case (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object per line instead of the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sr3d_plugin.conformance import format_table, run_all

    results = run_all(args.data, args.case)
    if args.json:
        for r in results:
            print(json.dumps(r.to_dict()))
    else:
        print(format_table(results))
    return 0 if results and all(r.passed for r in results) else 1
