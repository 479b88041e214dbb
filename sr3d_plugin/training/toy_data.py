"""Small region-QA training sets on synthetic scenes, written as JSONL records (docs/data-format.md).

Used by the tiny CPU recipe and the training tests; for a full spatial-QA generator see
:mod:`sr3d_plugin.synthetic.qa`. Every record kind of the data format appears: ScanNet-style
``scene`` folders, ``frames`` lists with depth/poses/intrinsics, single ``image`` records with depth,
and regions as boxes (on a sampled frame index or an ``@ID`` frame id), mask images, inline COCO
RLE, polygons and 3D boxes. Questions: "What is <mask>?" (the object's label) and "Which is closer
to the camera, Region [0] <mask> or Region [1] <mask>?" (answered from the rendered depth).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sr3d_plugin.io_utils import atomic_write_text

__all__ = ["region_qa"]


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _what(label: str) -> str:
    return f"A {label}."


def region_qa(
    out_dir: str | Path,
    num_scenes: int = 4,
    num_frames: int = 6,
    sampled_frames: int = 4,
    width: int = 64,
    height: int = 48,
    seed: int = 0,
    questions_per_scene: int = 8,
) -> Path:
    """Render ``num_scenes`` synthetic rooms and write region questions about them.

    Args:
        out_dir: folder for ``scenes/<id>/`` (ScanNet layout), ``masks/`` and ``train.jsonl``.
        num_scenes: rooms to render (seeds ``seed … seed + num_scenes − 1``).
        num_frames: frames rendered per room.
        sampled_frames: ``num_frames`` of the multi-view records (uniform sampling).
        width, height: frame size in pixels.
        seed: first scene seed.
        questions_per_scene: records per room.

    Returns:
        The JSONL file (``out_dir/train.jsonl``); written atomically and reused when it exists with
        the same arguments.
    """
    from sr3d_plugin.regions import encode_coco_rle
    from sr3d_plugin.sources.base import uniform_frame_indices
    from sr3d_plugin.synthetic import generate_scene, write_scannet_layout

    out = Path(out_dir)
    jsonl = out / "train.jsonl"
    args = {
        "num_scenes": num_scenes,
        "num_frames": num_frames,
        "sampled_frames": sampled_frames,
        "width": width,
        "height": height,
        "seed": seed,
        "questions_per_scene": questions_per_scene,
    }
    stamp = out / "toy_data.json"
    if jsonl.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == args:
        return jsonl
    (out / "masks").mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    sampled = uniform_frame_indices(num_frames, sampled_frames)
    for s in range(num_scenes):
        scene = generate_scene(seed + s, num_frames=num_frames, width=width, height=height, num_objects=(3, 4))
        folder = write_scannet_layout(scene, out / "scenes")
        rel = folder.relative_to(out).as_posix()
        rng = np.random.default_rng([seed, s])
        labels = {o.id: o.label for o in scene.objects}
        boxes = {o.id: o.box for o in scene.objects}

        def visible(frame: int, min_pixels: int = 12, instance: np.ndarray = scene.instance) -> list[int]:
            ids, counts = np.unique(instance[frame], return_counts=True)
            return [int(i) for i, c in zip(ids, counts) if i != 0 and c >= min_pixels]

        for q in range(questions_per_scene):
            kind = q % 6
            rid = f"{scene.scene_id}-q{q}"
            if kind in (0, 1):  # multi-view scene, box on a sampled frame (index or @id)
                j = int(rng.integers(len(sampled)))
                f = sampled[j]
                objs = visible(f)
                if not objs:
                    continue
                oid = int(rng.choice(objs))
                frame_ref: Any = j if kind == 0 else f"@{f}"
                records.append(
                    {
                        "id": rid,
                        "scene": rel,
                        "num_frames": sampled_frames,
                        "regions": [{"frame": frame_ref, "box": _bbox(scene.instance[f] == oid)}],
                        "conversations": [
                            {"from": "human", "value": "What is <mask>?"},
                            {"from": "gpt", "value": _what(labels[oid])},
                        ],
                    }
                )
            elif kind == 2:  # two regions on one frame: which is closer?
                j = int(rng.integers(len(sampled)))
                f = sampled[j]
                objs = visible(f)
                if len(objs) < 2:
                    continue
                a, b = (int(x) for x in rng.choice(objs, size=2, replace=False))
                da = float(np.median(scene.depth[f][scene.instance[f] == a]))
                db = float(np.median(scene.depth[f][scene.instance[f] == b]))
                rle = encode_coco_rle(scene.instance[f] == b)
                records.append(
                    {
                        "id": rid,
                        "scene": rel,
                        "num_frames": sampled_frames,
                        "regions": [
                            {"frame": j, "box": _bbox(scene.instance[f] == a)},
                            {"frame": j, "rle": rle},
                        ],
                        "conversations": [
                            {
                                "from": "human",
                                "value": "Which is closer to the camera, Region [0] <mask> or Region [1] <mask>?",
                            },
                            {"from": "gpt", "value": "Region [0]." if da < db else "Region [1]."},
                        ],
                    }
                )
            elif kind == 3:  # 3D box on the scene
                oid = int(rng.choice(list(labels)))
                box = boxes[oid]
                rot = np.asarray(box.rotation, dtype=np.float64)
                yaw = float(np.arctan2(rot[1, 0], rot[0, 0]))
                records.append(
                    {
                        "id": rid,
                        "scene": rel,
                        "num_frames": sampled_frames,
                        "regions": [
                            {
                                "box3d": [
                                    *np.asarray(box.center, float).tolist(),
                                    *np.asarray(box.size, float).tolist(),
                                    yaw,
                                ]
                            }
                        ],
                        "conversations": [
                            {"from": "human", "value": "<video>\nWhat is <mask>?"},
                            {"from": "gpt", "value": _what(labels[oid])},
                        ],
                    }
                )
            elif kind == 4:  # single image with metric depth, mask-image region
                f = int(rng.integers(num_frames))
                objs = visible(f)
                if not objs:
                    continue
                oid = int(rng.choice(objs))
                mask_file = out / "masks" / f"{rid}.png"
                Image.fromarray((scene.instance[f] == oid).astype(np.uint8) * 255).save(mask_file)
                records.append(
                    {
                        "id": rid,
                        "image": f"{rel}/color/{f}.png",
                        "depth": f"{rel}/depth/{f}.png",
                        "intrinsics": f"{rel}/intrinsic/intrinsic_depth.txt",
                        "regions": [{"mask": f"masks/{rid}.png"}],
                        "conversations": [
                            {"from": "human", "value": "<image>\nWhat is <mask>?"},
                            {"from": "gpt", "value": _what(labels[oid])},
                        ],
                    }
                )
            else:  # frame list with depth, poses and intrinsics; polygon region via <region0>
                picks = sampled
                j = int(rng.integers(len(picks)))
                f = picks[j]
                objs = visible(f)
                if not objs:
                    continue
                oid = int(rng.choice(objs))
                x0, y0, x1, y1 = _bbox(scene.instance[f] == oid)
                records.append(
                    {
                        "id": rid,
                        "frames": [f"{rel}/color/{i}.png" for i in picks],
                        "depth": [f"{rel}/depth/{i}.png" for i in picks],
                        "poses": [f"{rel}/pose/{i}.txt" for i in picks],
                        "intrinsics": f"{rel}/intrinsic/intrinsic_depth.txt",
                        "axis_align": f"{rel}/{scene.scene_id}.txt",
                        "regions": [{"frame": j, "polygon": [x0, y0, x1, y0, x1, y1, x0, y1]}],
                        "conversations": [
                            {"from": "human", "value": "What is <region0>?"},
                            {"from": "gpt", "value": _what(labels[oid])},
                        ],
                    }
                )
    atomic_write_text(jsonl, "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_text(stamp, json.dumps(args))
    return jsonl
