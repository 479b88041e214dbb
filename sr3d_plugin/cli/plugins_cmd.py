"""``sr3d plugins``: list registered components and where they come from."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plugins", help="list registered components (depth estimators, projectors, …) and their plugins")
    p.add_argument("--kind", help="only this kind (e.g. projectors)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sr3d_plugin import plugins

    rows = [r for r in plugins.list_components() if args.kind is None or r.kind == args.kind]
    if args.kind is not None and args.kind not in plugins.KINDS:
        from sr3d_plugin.errors import SR3DPluginError

        raise SR3DPluginError(f"unknown kind {args.kind!r}; expected one of {', '.join(plugins.KINDS)}")
    errors = plugins.load_errors()
    if args.json:
        out = {
            "components": [
                {"kind": r.kind, "name": r.name, "plugin": r.plugin, "source": r.source, "target": r.describe()}
                for r in rows
            ],
            "load_errors": errors,
        }
        print(json.dumps(out))
        return 0
    width = max((len(r.name) for r in rows), default=4)
    current = None
    for r in rows:
        if r.kind != current:
            current = r.kind
            print(f"{current}:")
        print(f"  {r.name:<{width}}  {r.plugin}  [{r.source}]")
    for name, err in errors.items():
        print(f"failed to load plugin {name}: {err}")
    return 0
