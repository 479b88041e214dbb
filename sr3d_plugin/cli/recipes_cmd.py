"""``sr3d recipes``: list the bundled training recipes (or print one, resolved)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipes", help="list the bundled finetuning recipes with a one-line description")
    p.add_argument("--show", metavar="NAME", help="print one recipe with every default filled in (YAML)")
    p.add_argument("--keys", action="store_true", help="print every recipe key with its type, default, range and help")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sr3d_plugin.resources import recipes_dir
    from sr3d_plugin.training.recipe import bundled_recipes, field_help, load_recipe

    if args.keys:
        print("recipe keys (type, default, range):\n" + field_help())
        return 0
    if args.show:
        import yaml

        recipe, warnings = load_recipe(args.show, check_files=False)
        if args.json:
            print(json.dumps({"recipe": recipe.source, "warnings": warnings, **recipe.to_dict()}))
        else:
            print(f"# {recipe.source}")
            for w in warnings:
                print(f"# warning: {w}")
            print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
        return 0
    from sr3d_plugin.training.recipe import execution_status

    rows = bundled_recipes()
    status = {}
    for name, _, path in rows:
        try:
            status[name] = execution_status(load_recipe(str(path), check_files=False)[0])
        except Exception as exc:  # an unreadable recipe is still listed (its description says why)
            status[name] = ("?", f"(cannot load: {exc})")
    if args.json:
        print(
            json.dumps(
                [
                    {"name": n, "description": d, "path": str(p), "sharding": status[n][0], "executed": status[n][1]}
                    for n, d, p in rows
                ]
            )
        )
        return 0
    width = max((len(n) for n, _, _ in rows), default=4)
    for name, desc, _ in rows:
        print(f"{name:<{width}}  {desc}")
        print(f"{'':<{width}}  [{status[name][0]}] {status[name][1]}")
    print(f"\n(folder: {recipes_dir()}; accelerate configs in accelerate/, DeepSpeed configs in deepspeed/)")
    return 0
