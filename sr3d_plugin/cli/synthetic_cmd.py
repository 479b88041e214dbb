"""``sr3d synthetic DIR``: write a rendered synthetic scan folder to try the other commands on."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synthetic",
        help="write a synthetic ScanNet-style scan folder (frames, depth, poses, intrinsics, boxes)",
        description=(
            "Render a furnished synthetic room and write it as DIR/<scene-id>/ in the ScanNet-style layout that "
            "`sr3d ask --scene` and `sr3d pointmap --scene` read: color/, depth/ (uint16 mm), pose/ (4x4 "
            "camera-to-world), intrinsic/, instance-filt/, objects.json (3D boxes) and boxes.json (per-frame 2D "
            'boxes, x0,y0,x1,y1 in pixels, ready for --region "frame=I box=…").'
        ),
    )
    p.add_argument("dir", help="parent folder of the scene folder (created when missing)")
    p.add_argument("--seed", type=int, default=0, help="scene seed (default 0)")
    p.add_argument("--frames", type=int, default=8, help="number of views (default 8)")
    p.add_argument("--width", type=int, default=320, help="image width in pixels (default 320)")
    p.add_argument("--height", type=int, default=240, help="image height in pixels (default 240)")
    p.add_argument("--scene-id", default=None, help="scene folder name (default scene<seed>_00)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=run)


def frame_boxes(instance: Any, labels: dict[int, str]) -> list[dict[str, Any]]:
    """Per-frame 2D boxes of every visible object from instance maps ``[V, H, W]`` (ids, 0 = none).

    Returns:
        rows ``{"frame", "id", "label", "box": [x0, y0, x1, y1]}`` (pixels, x1/y1 exclusive).
    """
    import numpy as np

    rows: list[dict[str, Any]] = []
    for v, ids in enumerate(np.asarray(instance)):
        for oid in sorted(int(i) for i in np.unique(ids) if i != 0):
            ys, xs = np.nonzero(ids == oid)
            box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
            rows.append({"frame": v, "id": oid, "label": labels.get(oid, "object"), "box": box})
    return rows


def run(args: argparse.Namespace) -> int:
    from sr3d_plugin.errors import SR3DConfigError
    from sr3d_plugin.io_utils import atomic_write_text
    from sr3d_plugin.synthetic.layout import write_scannet_layout
    from sr3d_plugin.synthetic.scene import generate_scene

    for flag, value, low in (("--frames", args.frames, 1), ("--width", args.width, 32), ("--height", args.height, 32)):
        if value < low:
            raise SR3DConfigError(f"{flag} {value}: expected an integer >= {low}")
    sid = args.scene_id or f"scene{args.seed:04d}_00"
    scene = generate_scene(args.seed, num_frames=args.frames, width=args.width, height=args.height, scene_id=sid)
    folder = write_scannet_layout(scene, Path(args.dir))
    labels = {int(o.id): str(o.label) for o in scene.objects}
    boxes = frame_boxes(scene.instance, labels)
    atomic_write_text(folder / "boxes.json", json.dumps(boxes, indent=1) + "\n")
    info = {
        "scene": str(folder),
        "frames": scene.num_frames,
        "size": [args.width, args.height],
        "objects": len(scene.objects),
        "boxes": len(boxes),
    }
    if args.json:
        print(json.dumps(info))
    else:
        print(f"wrote {folder}: {scene.num_frames} frames {args.width}x{args.height}, {len(scene.objects)} objects")
        if boxes:
            b = boxes[0]
            print(
                f"try: sr3d ask --model tiny --scene {folder} "
                f'--region "frame={b["frame"]} box={",".join(map(str, b["box"]))}" --question "What is <region0>?"'
            )
    return 0
