"""Synthetic stand-ins of the official raw releases, for the evaluation tests.

:func:`write_raw_releases` writes, from a few procedural scenes, files in the official formats:
ScanNet-style scan folders, ``ScanQA_v1.0_val.json``, the SQA3D balanced question/annotation files,
``ScanRefer_filtered_val.json`` + ``<scene>_aligned_bbox.npy`` (ScanRefer preprocessing) +
proposal boxes, and VSI-Bench (``test-00000-of-00001.parquet`` + ``<dataset>/<scene>.mp4`` videos
written with PyAV) with reconstruction point maps for the videos. :func:`tiny_model_dir` saves a
tiny random SR-3D model. Both cache their output under pytest's base temp folder, so test modules
of one session (one xdist worker) share them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

SCENE_SEEDS = (11, 12)
NUM_FRAMES = 8
WIDTH, HEIGHT = 96, 72


def _aabb(obj: Any) -> list[float]:
    corners = np.asarray(obj.box.corners(), dtype=np.float64)
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    return [float(x) for x in [*((lo + hi) / 2), *(hi - lo)]]


def _write_video(path: Path, frames: np.ndarray, fps: int = 4) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_raw_releases(root: Path) -> dict[str, Any]:
    """Write every raw release under ``root`` (once; later calls reuse it). Returns paths and scenes."""
    from sr3d_plugin.geometry import backproject
    from sr3d_plugin.synthetic import generate_scene, write_scannet_layout

    done = root / "DONE"
    scenes = [
        generate_scene(
            seed, num_frames=NUM_FRAMES, width=WIDTH, height=HEIGHT, num_objects=3, scene_id=f"scene{seed:04d}_00"
        )
        for seed in SCENE_SEEDS
    ]
    info = {
        "root": root,
        "scans": root / "scans",
        "scanqa": root / "ScanQA" / "data" / "qa",
        "sqa3d": root / "SQA3D" / "sqa_task" / "balanced",
        "scanrefer": root / "ScanRefer",
        "boxes": root / "scannet_data",
        "proposals": root / "proposals",
        "vsibench": root / "VSI-Bench",
        "pointmaps": root / "pointmaps",
        "scenes": scenes,
    }
    if done.is_file():
        return info
    for sc in scenes:
        write_scannet_layout(sc, info["scans"])

    # ScanQA v1.0 (val): list of {question_id, scene_id, question, answers, object_ids, object_names}
    scanqa = []
    for sc in scenes:
        objs = sc.objects
        for j, o in enumerate(objs):
            other = objs[(j + 1) % len(objs)]
            scanqa.append(
                {
                    "answers": [o.label, f"the {o.label}"],
                    "object_ids": [o.id],
                    "object_names": [o.label],
                    "question": f"What is placed near the {other.label}?",
                    "question_id": f"val-{sc.scene_id[:9]}-{j}",
                    "scene_id": sc.scene_id,
                }
            )
    info["scanqa"].mkdir(parents=True)
    (info["scanqa"] / "ScanQA_v1.0_val.json").write_text(json.dumps(scanqa, indent=1))
    (info["scanqa"] / "ScanQA_v1.0_test_w_obj.json").write_text(
        json.dumps([{k: v for k, v in q.items() if k != "answers"} for q in scanqa])
    )

    # SQA3D balanced test files
    templates = [
        ("What is in front of me?", "{a}"),
        ("Is the {a} on my left?", "yes"),
        ("How many objects can I see?", "3"),
        ("Can I reach the {a}?", "no"),
        ("Which object is closest to me?", "{a}"),
        ("Where should I go to sit?", "{a}"),
    ]
    questions, annotations = [], []
    qid = 220602000000
    for si, sc in enumerate(scenes):
        for ti, (tq, ta) in enumerate(templates):
            a = sc.objects[(si + ti) % len(sc.objects)].label
            qid += 1
            questions.append(
                {
                    "alternative_situation": ["I am standing in the room."],
                    "question": tq.format(a=a),
                    "question_id": qid,
                    "scene_id": sc.scene_id,
                    "situation": f"I am facing the {sc.objects[0].label}.",
                    "position": {"x": 0.0, "y": 0.0, "z": 0.0},
                }
            )
            annotations.append(
                {
                    "answer_type": "other",
                    "answers": [{"answer": ta.format(a=a), "answer_confidence": "yes", "answer_id": 1}],
                    "question_id": qid,
                    "question_type": "N/A",
                    "scene_id": sc.scene_id,
                }
            )
    info["sqa3d"].mkdir(parents=True)
    (info["sqa3d"] / "v1_balanced_questions_test_scannetv2.json").write_text(json.dumps({"questions": questions}))
    (info["sqa3d"] / "v1_balanced_sqa_annotations_test_scannetv2.json").write_text(
        json.dumps({"annotations": annotations})
    )

    # ScanRefer (val) + ScanRefer-style aligned boxes + proposals
    refer = []
    info["boxes"].mkdir(parents=True)
    info["proposals"].mkdir(parents=True)
    rng = np.random.default_rng(0)
    for sc in scenes:
        rows, props = [], []
        for o in sc.objects:
            box = _aabb(o)
            rows.append([*box, 3.0, float(o.id)])
            for k in range(2):
                refer.append(
                    {
                        "scene_id": sc.scene_id,
                        "object_id": str(o.id),
                        "object_name": o.label.replace(" ", "_"),
                        "ann_id": str(k),
                        "description": f"this is a {o.label}. it is in the room number {k}.",
                        "token": ["this", "is"],
                    }
                )
            jitter = np.array(box, dtype=np.float64)
            jitter[:3] += rng.uniform(-0.05, 0.05, 3) * jitter[3:]
            props.append([*jitter, 0.9])
        props.append([0.0, 0.0, 5.0, 0.2, 0.2, 0.2, 0.1])  # a proposal matching nothing
        np.save(info["boxes"] / f"{sc.scene_id}_aligned_bbox.npy", np.asarray(rows, dtype=np.float64))
        np.save(info["proposals"] / f"{sc.scene_id}.npy", np.asarray(props, dtype=np.float64))
    info["scanrefer"].mkdir(parents=True)
    (info["scanrefer"] / "ScanRefer_filtered_val.json").write_text(json.dumps(refer))

    # VSI-Bench: parquet + videos + reconstruction point maps of the videos
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    rows_v = []
    vid = 0
    for sc in scenes:
        _write_video(info["vsibench"] / "scannet" / f"{sc.scene_id}.mp4", sc.rgb)
        xyz = (
            backproject(
                torch.from_numpy(sc.depth.astype(np.float64)),
                torch.from_numpy(np.repeat(sc.intrinsics[None], sc.num_frames, 0)),
                torch.from_numpy(sc.cam_to_world),
            )
            .numpy()
            .astype(np.float32)
        )
        valid = sc.depth > 0
        dest = info["pointmaps"] / "scannet" / f"{sc.scene_id}.npz"
        dest.parent.mkdir(parents=True, exist_ok=True)
        np.savez(dest, xyz=xyz, valid=valid, frame_ids=np.array([str(i) for i in range(sc.num_frames)]))
        labels = [o.label for o in sc.objects]
        items = [
            ("object_counting", f"How many {labels[0]}(s) are in this room?", None, "1"),
            (
                "room_size_estimation",
                "What is the size of this room (in square meters)?",
                None,
                f"{float(np.prod(sc.room.size[:2])):.1f}",
            ),
            (
                "object_abs_distance",
                f"What is the distance between the {labels[0]} and the {labels[1]} (in meters)?",
                None,
                "1.5",
            ),
            (
                "object_size_estimation",
                f"What is the length of the longest dimension of the {labels[0]} (in cm)?",
                None,
                "80",
            ),
            (
                "object_rel_distance",
                f"Which is closest to the {labels[0]}?",
                ["A. " + labels[1], "B. " + labels[2]],
                "A",
            ),
            (
                "object_rel_direction_easy",
                f"Is the {labels[1]} left or right of the {labels[0]}?",
                ["A. left", "B. right"],
                "B",
            ),
            ("route_planning", "Which turn should I take?", ["A. Turn Left", "B. Turn Right", "C. Go forward"], "C"),
            ("obj_appearance_order", "What is the first-time appearance order?", ["A. x, y", "B. y, x"], "A"),
        ]
        for qtype, question, options, gt in items:
            rows_v.append(
                {
                    "id": vid,
                    "dataset": "scannet",
                    "scene_name": sc.scene_id,
                    "question_type": qtype,
                    "question": question,
                    "options": options,
                    "ground_truth": gt,
                }
            )
            vid += 1
    table = pa.Table.from_pylist(rows_v)
    pq.write_table(table, info["vsibench"] / "test-00000-of-00001.parquet")
    done.write_text("ok\n")
    return info


def shared_dir(tmp_path_factory: Any, name: str) -> Path:
    """A folder under the session's base temp folder (shared by the test modules of one worker)."""
    return Path(tmp_path_factory.getbasetemp()) / name


def raw_releases(tmp_path_factory: Any) -> dict[str, Any]:
    """:func:`write_raw_releases` in the shared folder."""
    root = shared_dir(tmp_path_factory, "sr3d-eval-raw")
    root.mkdir(parents=True, exist_ok=True)
    return write_raw_releases(root)


def tiny_model_dir(tmp_path_factory: Any) -> Path:
    """A tiny random SR-3D model folder (saved once per worker)."""
    from sr3d_plugin.io_utils import atomic_dir
    from sr3d_plugin.testing import build_tiny_model

    dest = shared_dir(tmp_path_factory, "sr3d-eval-model")
    if not (dest / "config.json").is_file():
        model, processor = build_tiny_model(seed=0)
        with atomic_dir(dest) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
    return dest


def prepare_all(raw: dict[str, Any], out: Path, progress: bool = False) -> dict[str, Any]:
    """Run every converter on the raw releases into ``out`` (skips what is already there)."""
    from sr3d_plugin import plugins

    def conv(name: str) -> Any:
        return plugins.create("dataset_converters", name)

    summaries = {
        "scannet": conv("scannet").convert(raw["scans"], out, progress=progress),
        "scanqa": conv("scanqa").convert(raw["scanqa"], out, progress=progress),
        "sqa3d": conv("sqa3d").convert(raw["sqa3d"], out, progress=progress),
        "scan2cap": conv("scan2cap").convert(
            raw["scanrefer"],
            out,
            progress=progress,
            boxes=str(raw["boxes"]),
            proposals=str(raw["proposals"]),
            num_frames=4,
        ),
        "vsibench": conv("vsibench").convert(raw["vsibench"], out, progress=progress),
    }
    return summaries


def write_scannet_object_files(sc: Any, folder: Path, seed: int = 0) -> dict[str, Any]:
    """ScanNet's own object files of a synthetic scene in ``folder/<scene_id>/`` (official formats).

    Writes ``<scene>_vh_clean_2.ply`` (binary little-endian; vertex ``x y z red green blue alpha``
    float32/uchar in the *raw* frame, then a ``face`` element), ``<scene>_vh_clean_2.0.010000.segs.json``
    (``segIndices`` per vertex), ``<scene>.aggregation.json`` (``segGroups`` with ``objectId``,
    ``label``, ``segments``) and ``<scene>.txt`` (``axisAlignment``). Each object's vertices are its
    box corners plus random points inside its axis-aligned hull, split over three segments; the room
    gets unlabelled floor vertices. Returns the raw vertices and each object's vertex indices (for an
    independent vertex-level box computation).
    """
    rng = np.random.default_rng(seed)
    dest = folder / sc.scene_id
    dest.mkdir(parents=True, exist_ok=True)
    a_inv = np.linalg.inv(np.asarray(sc.axis_align, dtype=np.float64))
    points: list[np.ndarray] = []
    seg_ids: list[np.ndarray] = []
    object_vertices: dict[int, np.ndarray] = {}
    groups = []
    start = 0
    next_seg = 7
    for o in sc.objects:
        corners = np.asarray(o.box.corners(), dtype=np.float64)
        lo, hi = corners.min(axis=0), corners.max(axis=0)
        inside = lo + rng.uniform(0.0, 1.0, (40, 3)) * (hi - lo)
        pts = np.concatenate([corners, inside])
        segs = np.asarray([next_seg, next_seg + 5, next_seg + 11])  # sparse segment ids, as in ScanNet
        next_seg += 23
        seg_ids.append(segs[rng.integers(0, 3, len(pts))])
        seg_ids[-1][:3] = segs  # every segment has at least one vertex
        points.append(pts)
        object_vertices[o.id] = np.arange(start, start + len(pts))
        start += len(pts)
        groups.append({"id": len(groups), "objectId": o.id, "segments": [int(s) for s in segs], "label": o.label})
    floor = np.column_stack(
        [
            rng.uniform(sc.room.lower[0], sc.room.upper[0], 60),
            rng.uniform(sc.room.lower[1], sc.room.upper[1], 60),
            np.zeros(60),
        ]
    )
    points.append(floor)
    seg_ids.append(np.full(60, 3))  # an unlabelled segment
    aligned = np.concatenate(points)
    homo = np.concatenate([aligned, np.ones((len(aligned), 1))], axis=1)
    raw = (homo @ a_inv.T)[:, :3].astype(np.float32)
    seg_of_vertex = np.concatenate(seg_ids)

    n = len(raw)
    vertex = np.zeros(n, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"),
                                ("blue", "u1"), ("alpha", "u1")])  # fmt: skip
    vertex["x"], vertex["y"], vertex["z"] = raw[:, 0], raw[:, 1], raw[:, 2]
    vertex["red"], vertex["alpha"] = 200, 255
    faces = np.zeros(n // 3, dtype=[("n", "u1"), ("i", "<i4", (3,))])
    faces["n"] = 3
    faces["i"] = np.arange(3 * (n // 3)).reshape(-1, 3)
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment VCGLIB generated\n"
        f"element vertex {n}\nproperty float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nproperty uchar alpha\n"
        f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    sid = sc.scene_id
    (dest / f"{sid}_vh_clean_2.ply").write_bytes(header.encode("ascii") + vertex.tobytes() + faces.tobytes())
    segs_doc = {"params": {"kThresh": "0.0001"}, "sceneId": f"{sid}_vh_clean_2", "segIndices": seg_of_vertex.tolist()}
    (dest / f"{sid}_vh_clean_2.0.010000.segs.json").write_text(json.dumps(segs_doc))
    agg = {"sceneId": f"scannet.{sid}", "appId": "Aggregator.v2", "segGroups": groups,
           "segmentsFile": f"scannet.{sid}_vh_clean_2.0.010000.segs.json"}  # fmt: skip
    (dest / f"{sid}.aggregation.json").write_text(json.dumps(agg))
    align = " ".join(f"{float(x):.9f}" for x in np.asarray(sc.axis_align, dtype=np.float64).reshape(-1))
    (dest / f"{sid}.txt").write_text(f"axisAlignment = {align}\nsceneType = Bedroom / Hotel\n")
    return {"raw_vertices": raw, "object_vertices": object_vertices, "folder": dest}
