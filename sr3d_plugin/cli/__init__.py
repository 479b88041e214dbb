"""The ``sr3d`` command. Each sub-command lives in its own module with ``add_parser(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import re
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
    "sr3d_plugin.cli.app_cmd",
    "sr3d_plugin.cli.pointmap_cmd",
    "sr3d_plugin.cli.metrics_cmd",
    "sr3d_plugin.cli.prepare_cmd",
    "sr3d_plugin.cli.eval_cmd",
    "sr3d_plugin.cli.tasks_path_cmd",
    "sr3d_plugin.cli.convert_cmd",
    "sr3d_plugin.cli.train_cmd",
    "sr3d_plugin.cli.merge_cmd",
    "sr3d_plugin.cli.recipes_cmd",
    "sr3d_plugin.cli.validate_data_cmd",
    "sr3d_plugin.cli.conformance_cmd",
    "sr3d_plugin.cli.synthetic_cmd",
]


#: Python parameter → flag, per sub-command (``"*"``: every sub-command), where the flag is not the
#: parameter's own option destination (``--num-frames`` needs no entry: its destination is ``num_frames``)
PARAMETER_FLAGS: dict[str, dict[str, str]] = {
    "*": {},
    "merge": {"base": "--base"},
}

#: ``name=`` (not part of a dotted recipe key, a longer word, a path or a quoted value such as a user's
#: ``'num_frames=8'`` model argument), then an optional value: a quoted
#: string, a bracketed list, or a run of characters up to a space or a sentence sign
_PARAMETER = re.compile(
    r"(?<![\w.\-'\"/=])(?P<name>[A-Za-z_]\w*)=(?P<value>'[^']*'|\"[^\"]*\"|\[[^\]]*\]|[^\s,;:)]*[^\s,;:).])?"
)


def _flags_of(parser: argparse.ArgumentParser | None, command: str | None) -> dict[str, tuple[str, bool]]:
    """Python parameter → ``(long flag, may stand alone)`` for ``sr3d COMMAND``: the parser's option
    destinations, then :data:`PARAMETER_FLAGS`."""
    by_dest: dict[str, tuple[str, bool]] = {}
    by_flag: dict[str, bool] = {}
    for action in getattr(parser, "_actions", []):
        longs = [o for o in action.option_strings if o.startswith("--")]
        for flag in longs:
            by_flag[flag] = action.nargs in (0, "?")
        if longs and action.dest not in by_dest:
            by_dest[action.dest] = (longs[0], action.nargs in (0, "?"))
    for name, flag in {**PARAMETER_FLAGS.get("*", {}), **PARAMETER_FLAGS.get(command or "", {})}.items():
        by_dest[name] = (flag, by_flag.get(flag, False))
    return by_dest


def flag_wording(message: str, command: str | None = None, parser: argparse.ArgumentParser | None = None) -> str:
    """A library message (Python parameters written ``name=``) in the flag wording of ``sr3d COMMAND``.

    See :class:`~sr3d_plugin.errors.SR3DError` for the convention. ``parser`` is the sub-command's
    parser (its option destinations give the flags; built from :func:`build_parser` when None);
    :data:`PARAMETER_FLAGS` adds the others. Example: ``flag_wording("pass depth= with intrinsics='K.txt'", "ask", p)`` →
    ``"pass --depth with --intrinsics K.txt"``.
    """
    if parser is None and command:
        parser = _subparser(build_parser(), command)
    flags = _flags_of(parser, command)

    def replace(match: re.Match[str]) -> str:
        name, value = match.group("name"), match.group("value")
        if name not in flags:
            return match.group(0)
        flag, no_value = flags[name]
        if not value or (no_value and value in ("True", "true")):
            return flag
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        return f"{flag} {value}"

    return _PARAMETER.sub(replace, message)


def _subparser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(command or "")
    return None


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
    from sr3d_plugin import _quiet

    _quiet.install()  # known third-party noise only (see sr3d_plugin/_quiet.py)
    try:
        result = args.func(args)
    except SR3DError as exc:
        message = flag_wording(str(exc), args.command, _subparser(parser, args.command))
        print(f"sr3d {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
