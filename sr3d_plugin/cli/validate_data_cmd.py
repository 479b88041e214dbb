"""``sr3d validate-data FILE...``: check training records before training on them (every bad record at once)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    from sr3d_plugin.limits import MAX_RECORD_BYTES

    p = sub.add_parser(
        "validate-data",
        help="check JSON/JSONL training records: files decode, regions lie in their images, <mask> counts match",
        description=(
            "Check every record of FILE... the way `sr3d train` will read it (header-level where cheap): files "
            "exist and decode, regions lie in their images, frame references name sampled frames, <mask> counts "
            "match the regions. Every bad record is listed with file:line and id. Exit status 0 when all pass, "
            "1 when some record is bad, 2 on a usage error. `sr3d train` runs the same check before the model "
            "loads (data.skip_invalid=true skips bad records instead)."
        ),
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="JSON or JSONL record files (docs/data-format.md)")
    p.add_argument(
        "--num-frames", type=int, default=32, help="frames sampled when a record names none (data.num_frames; 32)"
    )
    p.add_argument(
        "--max-record-bytes",
        type=int,
        default=MAX_RECORD_BYTES,
        help=f"largest record in bytes (data.max_record_bytes; default {MAX_RECORD_BYTES})",
    )
    p.add_argument("--no-files", action="store_true", help="skip opening files (structure, regions and <mask> only)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sr3d_plugin.data_check import check_records

    report = check_records(
        args.files,
        num_frames=args.num_frames,
        max_record_bytes=args.max_record_bytes,
        check_files=not args.no_files,
    )
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        # record fields keep their own names (a record's num_frames= is not --num-frames): no flag wording
        print(report.message(shown=len(report.problems)))
        if any("max_record_bytes=" in p.message for p in report.problems):
            print("(records above the size limit: raise it with --max-record-bytes if they are genuine)")
    return 0 if report.ok else 1
