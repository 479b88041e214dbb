"""``sr3d convert-vila SRC DST`` and ``sr3d convert SRC DST``: write a standard SR-3D folder.

``convert-vila`` reads a VILA-layout folder (SR-3D or NVILA-Lite release); ``convert`` reads any
folder a registered builder understands (detected, or ``--builder``). The output holds
``config.json``, ``model.safetensors`` and the processor files, is written atomically, and loads with
``AutoModelForImageTextToText.from_pretrained(DST)`` / ``AutoProcessor.from_pretrained(DST)``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="checkpoint folder to read (download hub ids first)")
    p.add_argument("destination", help="folder to write (must not exist unless --overwrite)")
    p.add_argument(
        "--dtype",
        default=None,
        help="dtype of the written weights: float32, bfloat16, float16 (default: the checkpoint's)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination folder")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert-vila",
        help="convert a VILA / NVILA-Lite / SR-3D release folder into a standard SR-3D (transformers) folder",
    )
    _add_common(p)
    p.set_defaults(func=run, builder="vila")
    q = sub.add_parser("convert", help="convert any checkpoint folder a model builder reads into an SR-3D folder")
    _add_common(q)
    q.add_argument("--builder", default=None, help="builder name (default: detected; see `sr3d plugins`)")
    q.add_argument(
        "--vision-tower", default=None, help="local CLIP folder for original-LLaVA checkpoints (llava_original)"
    )
    q.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sr3d_plugin.builders import convert_checkpoint

    kwargs: dict[str, Any] = {}
    if args.dtype:
        kwargs["dtype"] = args.dtype
    if getattr(args, "vision_tower", None):
        kwargs["vision_tower"] = args.vision_tower
    summary = convert_checkpoint(
        args.source, args.destination, builder=args.builder, overwrite=args.overwrite, **kwargs
    )
    if args.json:
        print(json.dumps(summary))
        return 0
    print(
        f"wrote {summary['destination']} ({summary['parameters']:,} parameters, {summary['dtype']}) "
        f"from {summary['source']} [builder {summary['builder']}]"
    )
    for note in summary["notes"]:
        print(f"note: {note}")
    return 0
