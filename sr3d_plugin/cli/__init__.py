"""The ``sr3d`` command. Each sub-command lives in its own module with ``add_parser(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from sr3d_plugin import __version__
from sr3d_plugin.errors import SR3DError

#: sub-command modules, in the order ``sr3d --help`` lists them
COMMAND_MODULES: list[str] = [
    "sr3d_plugin.cli.demo_cmd",
    "sr3d_plugin.cli.ablation_cmd",
    "sr3d_plugin.cli.plugins_cmd",
    "sr3d_plugin.cli.ask_cmd",
    "sr3d_plugin.cli.pointmap_cmd",
    "sr3d_plugin.cli.metrics_cmd",
    "sr3d_plugin.cli.prepare_cmd",
    "sr3d_plugin.cli.eval_cmd",
    "sr3d_plugin.cli.tasks_path_cmd",
    "sr3d_plugin.cli.convert_cmd",
    "sr3d_plugin.cli.train_cmd",
    "sr3d_plugin.cli.merge_cmd",
    "sr3d_plugin.cli.recipes_cmd",
    "sr3d_plugin.cli.conformance_cmd",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sr3d",
        description="SR-3D: 3D-aware region-prompted vision-language models, as a plugin.",
    )
    parser.add_argument("--version", action="version", version=f"sr3d-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except SR3DError as exc:
        print(f"sr3d {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
