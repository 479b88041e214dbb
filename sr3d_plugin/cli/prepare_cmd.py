"""``sr3d prepare``: convert an official raw release into the data layout the evaluation tasks read.

Examples::

    sr3d prepare scannet  --raw scannet/posed_images --meta scannet/scans --out data/sr3d
    sr3d prepare scanqa   --raw ScanQA/data/qa --out data/sr3d                       # val
    sr3d prepare sqa3d    --raw SQA3D/sqa_task/balanced --out data/sr3d              # test
    sr3d prepare scan2cap --raw ScanRefer --scans scannet/scans --out data/sr3d      # val
    sr3d prepare vsibench --raw VSI-Bench --out data/sr3d                            # test
    sr3d prepare --list

Prepare ``scannet`` first: the QA and captioning converters point their records at
``<out>/scenes/<scene_id>``. Nothing is downloaded. Finished work is skipped on a rerun (``--overwrite``
redoes it); every file is written atomically. Converters come from the ``dataset_converters``
plugin kind, so a plugin can add data sets.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from sr3d_plugin.errors import SR3DConfigError

#: CLI flags passed to converters as options when given (converters reject those that do not apply)
_OPTION_FLAGS = ("scans", "boxes", "proposals", "videos", "meta", "num_frames", "frame_step", "scenes")
_BOOL_FLAGS = ("copy", "skip_missing")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="convert official raw data sets (ScanNet, ScanQA, SQA3D, ScanRefer/Scan2Cap, VSI-Bench) for evaluation",
        description=(
            "Convert an official raw release into <OUT>/<task>/<split>.jsonl (+ <OUT>/scenes, <OUT>/videos) for the "
            "sr3d lmms-eval tasks. Run `sr3d prepare scannet` first. See docs/evaluation.md for accepted files."
        ),
    )
    p.add_argument("dataset", nargs="?", help="converter name (see --list)")
    p.add_argument("--list", action="store_true", help="list the registered converters and their options")
    p.add_argument("--raw", metavar="PATH", help="the raw release: a file or the folder holding it")
    p.add_argument("--out", metavar="DIR", help="prepared data folder (the tasks read it through SR3D_DATA)")
    p.add_argument("--split", help="split to convert (default: the benchmark's evaluation split)")
    p.add_argument("--overwrite", action="store_true", help="redo work that is already written")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    g = p.add_argument_group("converter options (each applies to some converters)")
    g.add_argument(
        "--scans",
        metavar="DIR",
        help="scan2cap: ScanNet's scans/ folder; GT boxes from <scene>.aggregation.json, "
        "<scene>_vh_clean_2.0.010000.segs.json, <scene>_vh_clean_2.ply and <scene>.txt",
    )
    g.add_argument(
        "--boxes", metavar="PATH", help="scan2cap: alternative GT boxes (<scene>_aligned_bbox.npy folder or JSON)"
    )
    g.add_argument("--proposals", metavar="PATH", help="scan2cap: detector proposals (<scene>.npy folder or JSON)")
    g.add_argument("--num-frames", type=int, help="scan2cap: frames sampled per scene, as the model does (32)")
    g.add_argument("--videos", metavar="DIR", help="vsibench: folder of <dataset>/<scene_name>.mp4")
    g.add_argument("--meta", metavar="DIR", help="scannet: ScanNet meta files <scene>.txt (axis alignment)")
    g.add_argument("--frame-step", type=int, help="scannet: keep every N-th frame (default 1)")
    g.add_argument("--scenes", help="scannet: comma-separated scene ids to prepare")
    g.add_argument("--copy", action="store_true", help="scannet/vsibench: copy files instead of linking")
    g.add_argument("--skip-missing", action="store_true", help="leave out items whose scene/video/box is missing")
    g.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="extra converter option (plugins)"
    )
    p.set_defaults(func=run)


def _converters() -> dict[str, Any]:
    from sr3d_plugin import plugins

    return {name: reg.factory() for name, reg in sorted(plugins.registry("dataset_converters").items())}


def _listing(converters: dict[str, Any]) -> str:
    lines = []
    for name, conv in converters.items():
        split = getattr(conv, "default_split", None)
        lines.append(f"{name}: {getattr(conv, 'description', '')}" + (f" [default split: {split}]" if split else ""))
        for opt, text in (getattr(conv, "options", {}) or {}).items():
            lines.append(f"    --{opt.replace('_', '-')}: {text}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    converters = _converters()
    if args.list:
        if args.json:
            print(
                json.dumps(
                    {
                        n: {"description": c.description, "default_split": c.default_split, "options": c.options}
                        for n, c in converters.items()
                    }
                )
            )
        else:
            print(_listing(converters))
        return 0
    if not args.dataset:
        raise SR3DConfigError(f"name a data set to prepare: {', '.join(converters)} (or --list)")
    if args.dataset not in converters:
        raise SR3DConfigError(f"no dataset converter named {args.dataset!r}; registered: {', '.join(converters)}")
    if not args.raw or not args.out:
        raise SR3DConfigError("give --raw PATH (the official release) and --out DIR (the prepared data folder)")
    options: dict[str, Any] = {}
    for name in _OPTION_FLAGS:
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    for name in _BOOL_FLAGS:
        if getattr(args, name):
            options[name] = True
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SR3DConfigError(f"--option {item!r} must be KEY=VALUE")
        options[key.strip().replace("-", "_")] = value
    conv = converters[args.dataset]
    summary = conv.convert(
        args.raw, args.out, args.split, overwrite=args.overwrite, progress=not args.no_progress, **options
    )
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key}: {value}")
    return 0
