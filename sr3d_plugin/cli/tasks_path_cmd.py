"""``sr3d tasks-path``: print the folder of the sr3d lmms-eval tasks (for ``--include_path``).

.. code-block:: bash

    python -m lmms_eval --model sr3d --include_path "$(sr3d tasks-path)" --tasks sr3d_3d ...
"""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tasks-path",
        help="print the lmms-eval task folder of sr3d (pass it to lmms-eval --include_path)",
        description="Print the folder holding the sr3d lmms-eval tasks (sr3d_scanqa, sr3d_sqa3d, sr3d_scan2cap, "
        "sr3d_vsibench, group sr3d_3d).",
    )
    p.add_argument("--json", action="store_true", help="also list the task names, as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sr3d_plugin.evaluation.schema import TASKS
    from sr3d_plugin.resources import eval_tasks_dir

    path = eval_tasks_dir()
    if args.json:
        print(json.dumps({"path": str(path), "tasks": [f"sr3d_{t}" for t in TASKS], "group": "sr3d_3d"}))
    else:
        print(path)
    return 0
