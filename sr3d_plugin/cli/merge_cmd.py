"""``sr3d merge``: fold a trained LoRA adapter into its base model and write a standard sr3d folder."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge a LoRA adapter (and its trained SR-3D modules) into the base model -> sr3d model folder",
        description=(
            "ADAPTER is an adapter folder (adapter_config.json), a checkpoint folder or a run folder (its adapter/ "
            "is used). The base model is the adapter's base_model_name_or_path unless --base is given; it is "
            "loaded unquantised. OUT receives safetensors + config + processor, loadable with "
            "SR3DForConditionalGeneration.from_pretrained or sr3d_plugin.builders.load_model."
        ),
    )
    p.add_argument("adapter", help="adapter, checkpoint or run folder")
    p.add_argument("out", help="output folder (replaced atomically)")
    p.add_argument("--base", help="base model folder (default: recorded in the adapter)")
    p.add_argument("--dtype", default=None, help="dtype of the merged weights (default: the base checkpoint's)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sr3d_plugin.training.merge import merge_adapter

    info = merge_adapter(args.adapter, args.out, base=args.base, dtype=args.dtype)
    if args.json:
        print(json.dumps(info))
    else:
        print(f"merged {info['adapter']} into {info['base']} -> {info['output']} ({info['parameters']:,} parameters)")
        if info.get("trained_modules"):
            print(f"trained modules (from the adapter): {', '.join(info['trained_modules'])}")
    return 0
