"""``sr3d prepare scan2cap``: ScanRefer descriptions + 3D boxes → ``<out>/scan2cap/<split>.jsonl``.

Inputs
------
``--raw``: ``ScanRefer_filtered_<split>.json`` (or its folder): a list of ``{scene_id, object_id,
object_name, ann_id, description, …}``. One record is written per annotated object, with every
description of that object as the references (ordered by ``ann_id``).

Ground-truth boxes (axis-aligned, in the scene's axis-aligned frame, metres), first that applies:

* ``--boxes DIR``: ``<scene_id>_aligned_bbox.npy`` files as written by ScanRefer's / Scan2Cap's
  ScanNet preprocessing: ``[N, ≥7]`` rows ``cx, cy, cz, dx, dy, dz, label[, object_id]``; column 7
  is the object id when present, else the row index is;
* ``--boxes FILE.json``: ``{scene_id: {object_id: [cx, cy, cz, dx, dy, dz]}}`` (a box may also be
  ``{"center": [3], "size": [3]}``) or ``{scene_id: [{"object_id": …, "box": […]}]}``;
* ``--scans DIR`` (the default way): computed from ScanNet's own release files in
  ``DIR/<scene_id>/`` — ``<scene_id>.aggregation.json``, ``<scene_id>_vh_clean_2.0.010000.segs.json``,
  ``<scene_id>_vh_clean_2.ply`` and ``<scene_id>.txt`` (axis alignment) — exactly as the ScanRefer
  preprocessing computes its aligned boxes (:mod:`sr3d_plugin.data.scannet_objects`). The axis
  alignment must be the one the prepared scene folder uses (its ``<scene_id>.txt``), else the
  boxes would not sit in the frames' world; a mismatch is an error;
* otherwise the same official files in the prepared scene folder ``scenes/<scene_id>/`` when they
  are there, else ``scenes/<scene_id>/objects.json`` (synthetic scenes; the axis-aligned hull of
  each box).

Optional detector proposals (Mask3D-style boxes) with ``--proposals``: a folder of
``<scene_id>.npy`` (``[K, ≥6]`` boxes ``cx, cy, cz, dx, dy, dz[, score…]``) or ``<scene_id>.npz``
(key ``boxes``), or a JSON ``{scene_id: [[cx, cy, cz, dx, dy, dz, …], …]}``. Each object then gets
the proposal with the highest 3D IoU as its input box; ``iou`` is stored and the @0.5IoU scores use
it (official Scan2Cap protocol). Objects with no proposal in their scene are captioned from the
ground-truth box and count as misses (``iou`` 0). Without proposals the input box is the
ground-truth box (``iou`` 1).

Region prompts
--------------
The scene is read with the ``scannet`` frame reader, ``--num-frames`` (default 32) frames sampled
uniformly exactly as the model samples them; the input box is projected onto every sampled frame
with the depth test (:func:`sr3d_plugin.regions.box3d_masks`) and stored as COCO RLE per frame where
it is visible. Objects visible in none of the sampled frames are left out, counted, and listed in
``<split>.skipped.jsonl``. Per-scene results are cached under ``scan2cap/.work/`` so that an
interrupted run resumes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sr3d_plugin.data.common import (
    Converter,
    as_bool,
    as_int,
    find_file,
    load_json,
    missing_scene_error,
    progress_bar,
    require_fields,
    scene_ref,
    write_jsonl,
)
from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.io_utils import atomic_write_json, stable_hash, warn_cache_write_failed

__all__ = ["Scan2CapConverter", "load_gt_boxes", "load_proposals"]

Box = tuple[float, float, float, float, float, float]


def _box(values: Any, where: str) -> Box:
    from sr3d_plugin.evaluation.schema import box_from_record

    try:
        if isinstance(values, Mapping) or (isinstance(values, (list, tuple)) and len(values) == 6):
            return box_from_record(values if isinstance(values, Mapping) else list(values))
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
        if arr.size < 6:
            raise SR3DInputError(f"a box needs 6 numbers, got {arr.size}")
        return box_from_record([float(x) for x in arr[:6]])
    except (SR3DInputError, ValueError, TypeError) as exc:
        raise SR3DInputError(f"{where}: bad box {values!r}: {exc}") from None


class _BoxSource:
    """Ground-truth boxes per scene from one of the accepted sources (module docstring)."""

    def __init__(self, boxes: str | None, out: Path, scans: str | None = None) -> None:
        self.path = None if boxes is None else Path(boxes).expanduser()
        self.scans = None if scans is None else Path(scans).expanduser()
        self.out = out
        self.table: dict[str, dict[str, Box]] | None = None
        if self.path is not None and self.scans is not None:
            raise SR3DInputError(
                "scan2cap: give boxes= (precomputed boxes) or scans= (ScanNet's scans/ folder), not both"
            )
        if self.scans is not None and not self.scans.is_dir():
            raise SR3DInputError(f"scan2cap: scans={str(self.scans)!r} is not a folder (expected ScanNet's scans/)")
        if self.path is not None:
            if not self.path.exists():
                raise SR3DInputError(f"scan2cap: boxes={str(self.path)!r} does not exist")
            if self.path.is_file():
                self.table = load_gt_boxes(self.path)

    def describe(self) -> str:
        if self.scans is not None:
            return f"ScanNet files (aggregation + segs + ply + axis alignment) in {self.scans}"
        if self.path is None:
            return "ScanNet files or objects.json of the scene folders"
        return str(self.path)

    def _official(self, folder: Path, scene_id: str) -> dict[str, Box]:
        from sr3d_plugin.data.scannet_objects import scannet_object_boxes, scannet_scene_files
        from sr3d_plugin.sources.scannet import read_axis_alignment

        files = scannet_scene_files(folder, scene_id)
        align = read_axis_alignment(files["meta"])
        # the frames are read with the prepared folder's meta file: the boxes must use the same frame
        prepared_meta = self.out / "scenes" / scene_id / f"{scene_id}.txt"
        frames_align = read_axis_alignment(prepared_meta) if prepared_meta.is_file() else None
        a = np.eye(4) if align is None else align
        b = np.eye(4) if frames_align is None else frames_align
        if not np.allclose(a, b, atol=1e-6):
            raise SR3DInputError(
                f"scan2cap: the axis alignment of {files['meta']} differs from the one the prepared scene uses "
                f"({prepared_meta if prepared_meta.is_file() else 'none: ' + str(prepared_meta) + ' is missing'}); "
                "prepare the scene with that meta file (scannet converter, meta=)"
            )
        return scannet_object_boxes(files, axis_align=a)

    def scene(self, scene_id: str) -> dict[str, Box]:
        if self.scans is not None:
            return self._official(self.scans, scene_id)
        if self.table is not None:
            if scene_id not in self.table:
                raise SR3DInputError(f"scan2cap: {self.path} has no boxes for scene {scene_id}")
            return self.table[scene_id]
        if self.path is not None:
            f = self.path / f"{scene_id}_aligned_bbox.npy"
            if not f.is_file():
                raise SR3DInputError(f"scan2cap: box file {str(f)!r} not found (expected <scene_id>_aligned_bbox.npy)")
            arr = np.load(f, allow_pickle=False)
            if arr.ndim != 2 or arr.shape[1] < 7:
                raise SR3DInputError(
                    f"{f}: expected an [N, >=7] array (cx, cy, cz, dx, dy, dz, label[, object_id]), got {arr.shape}"
                )
            out: dict[str, Box] = {}
            for row_index, row in enumerate(arr):
                oid = str(int(row[7])) if arr.shape[1] >= 8 else str(row_index)
                out[oid] = _box(row[:6], f"{f} row {row_index}")
            return out
        from sr3d_plugin.data.scannet_objects import SCANNET_OBJECT_FILES
        from sr3d_plugin.synthetic import read_objects

        folder = self.out / "scenes" / scene_id
        if (folder / SCANNET_OBJECT_FILES["aggregation"].format(scene=scene_id)).is_file():
            return self._official(self.out / "scenes", scene_id)
        if not (folder / "objects.json").is_file():
            raise SR3DInputError(
                f"scan2cap: no ground-truth boxes for scene {scene_id}: give scans= (ScanNet's scans/ folder with "
                "<scene>.aggregation.json, <scene>_vh_clean_2.0.010000.segs.json, <scene>_vh_clean_2.ply, "
                f"<scene>.txt) or boxes= (<scene>_aligned_bbox.npy folder or JSON); {folder} has neither those "
                "files nor objects.json"
            )
        objs = read_objects(folder)
        result: dict[str, Box] = {}
        for o in objs:
            corners = np.asarray(o.box.corners(), dtype=np.float64)
            lo, hi = corners.min(axis=0), corners.max(axis=0)
            result[str(o.id)] = tuple(float(x) for x in [*((lo + hi) / 2), *(hi - lo)])  # type: ignore[assignment]
        return result


def load_gt_boxes(path: Path) -> dict[str, dict[str, Box]]:
    """A ground-truth box JSON (``{scene: {object_id: box}}`` or ``{scene: [{object_id, box}]}``)."""
    data = load_json(path, "box file")
    if not isinstance(data, Mapping):
        raise SR3DInputError(f"{path}: expected an object scene_id -> boxes")
    out: dict[str, dict[str, Box]] = {}
    for scene_id, entries in data.items():
        table: dict[str, Box] = {}
        if isinstance(entries, Mapping):
            for oid, b in entries.items():
                table[str(oid)] = _box(b, f"{path} scene {scene_id} object {oid}")
        elif isinstance(entries, list):
            for i, e in enumerate(entries):
                where = f"{path} scene {scene_id} entry {i}"
                require_fields(e, ("object_id",), where)
                table[str(e["object_id"])] = _box(e.get("box", e), where)
        else:
            raise SR3DInputError(f"{path} scene {scene_id}: expected an object or a list of boxes")
        out[str(scene_id)] = table
    return out


def load_proposals(path: Path, scene_id: str, cache: dict[str, Any]) -> list[Box]:
    """Proposal boxes of one scene (see the module docstring); an empty list when the scene has none."""
    if path.is_file():
        if "table" not in cache:
            data = load_json(path, "proposal file")
            if not isinstance(data, Mapping):
                raise SR3DInputError(f"{path}: expected an object scene_id -> list of boxes")
            cache["table"] = data
        entries = cache["table"].get(scene_id) or []
        return [
            _box(e.get("box", e) if isinstance(e, Mapping) else e, f"{path} scene {scene_id} proposal {i}")
            for i, e in enumerate(entries)
        ]
    for suffix in (".npy", ".npz"):
        f = path / f"{scene_id}{suffix}"
        if f.is_file():
            if suffix == ".npy":
                arr = np.load(f, allow_pickle=False)
            else:
                with np.load(f, allow_pickle=False) as z:
                    if "boxes" not in z:
                        raise SR3DInputError(f"{f}: expected a 'boxes' array, found keys {sorted(z.keys())}")
                    arr = z["boxes"]
            if arr.ndim != 2 or arr.shape[1] < 6:
                raise SR3DInputError(f"{f}: expected [K, >=6] boxes, got shape {arr.shape}")
            return [_box(row[:6], f"{f} row {i}") for i, row in enumerate(arr)]
    return []


class Scan2CapConverter(Converter):
    """ScanRefer + boxes (+ proposals) → Scan2Cap records with region masks (module docstring)."""

    name = "scan2cap"
    description = "ScanRefer_filtered_<split>.json + GT boxes (+ proposals) → region-prompted captioning"
    default_split = "val"
    options = {
        "scans": "ScanNet's scans/ folder: GT boxes from <scene>.aggregation.json + _vh_clean_2.0.010000.segs.json "
        "+ _vh_clean_2.ply + <scene>.txt (the default way)",
        "boxes": "alternative GT boxes: folder of <scene_id>_aligned_bbox.npy or a JSON file",
        "proposals": "detector proposals: folder of <scene_id>.npy/.npz or a JSON file (default: the GT boxes)",
        "num_frames": "frames sampled per scene, as the model samples them (default 32)",
        "skip_missing": "leave out objects whose scene or box is missing (counted) instead of stopping",
    }

    def convert(
        self,
        raw: Any,
        out: Any,
        split: str | None = None,
        *,
        overwrite: bool = False,
        progress: bool = True,
        **options: Any,
    ) -> dict[str, Any]:
        split, out, dest, done = self.start(out, split, overwrite, options)
        if done is not None:
            return done
        num_frames = as_int(options.get("num_frames", 32), "num_frames")
        skip = as_bool(options.get("skip_missing", False), "skip_missing")
        boxes = _BoxSource(options.get("boxes"), out, options.get("scans"))
        proposals = Path(options["proposals"]).expanduser() if options.get("proposals") else None
        if proposals is not None and not proposals.exists():
            raise SR3DInputError(f"scan2cap: proposals={str(proposals)!r} does not exist")
        source = find_file(raw, [f"ScanRefer_filtered_{split}.json"], "scan2cap")
        data = load_json(source, "ScanRefer file")
        if not isinstance(data, list):
            raise SR3DInputError(f"{source}: expected a JSON list of descriptions, got {type(data).__name__}")

        # objects in order of first appearance, with all their descriptions
        objects: dict[tuple[str, str], dict[str, Any]] = {}
        for i, e in enumerate(data):
            where = f"{source.name} entry #{i}"
            require_fields(e, ("scene_id", "object_id", "object_name", "description"), where)
            key = (str(e["scene_id"]), str(e["object_id"]))
            obj = objects.setdefault(key, {"name": str(e["object_name"]), "refs": []})
            ann = e.get("ann_id", len(obj["refs"]))
            obj["refs"].append((int(ann) if str(ann).isdigit() else len(obj["refs"]), str(e["description"])))
        by_scene: dict[str, list[str]] = {}
        for scene_id, oid in objects:
            by_scene.setdefault(scene_id, []).append(oid)

        missing_scenes = {s: len(o) for s, o in by_scene.items() if not scene_ref(out, s)[1]}
        if missing_scenes and not skip:
            raise missing_scene_error(self.name, missing_scenes, out)

        work = out / self.name / ".work" / f"{split}-n{num_frames}"
        per_scene: dict[str, dict[str, Any]] = {}
        skipped: list[dict[str, Any]] = []
        prop_cache: dict[str, Any] = {}
        scenes = [s for s in by_scene if s not in missing_scenes]
        for scene_id in progress_bar(scenes, f"scan2cap {split} scenes", len(scenes), progress):
            try:
                gt = boxes.scene(scene_id)
            except SR3DInputError:
                if not skip:
                    raise
                gt = {}
            inputs: dict[str, dict[str, Any]] = {}
            for oid in by_scene[scene_id]:
                if oid not in gt:
                    if not skip:
                        raise SR3DInputError(
                            f"scan2cap: no ground-truth box for object {oid} of {scene_id} in {boxes.describe()}"
                        )
                    skipped.append({"scene_id": scene_id, "object_id": oid, "reason": "no ground-truth box"})
                    continue
                gt_box = gt[oid]
                if proposals is None:
                    inputs[oid] = {"gt_box": list(gt_box), "pred_box": list(gt_box), "iou": 1.0}
                    continue
                from sr3d_plugin.evaluation.metrics import box_iou_3d

                props = load_proposals(proposals, scene_id, prop_cache)
                if not props:
                    inputs[oid] = {"gt_box": list(gt_box), "pred_box": None, "iou": 0.0}
                    continue
                ious = [box_iou_3d(p, gt_box) for p in props]
                best = int(np.argmax(ious))
                inputs[oid] = {"gt_box": list(gt_box), "pred_box": list(props[best]), "iou": float(ious[best])}
            per_scene[scene_id] = self._scene_masks(out, scene_id, inputs, num_frames, work, overwrite)

        records: list[dict[str, Any]] = []
        for (scene_id, oid), obj in objects.items():
            if scene_id in missing_scenes:
                skipped.append({"scene_id": scene_id, "object_id": oid, "reason": "scene folder not prepared"})
                continue
            res = per_scene.get(scene_id, {}).get("objects", {}).get(oid)
            if res is None:
                continue  # no box (already listed)
            if not res["masks"]:
                skipped.append({"scene_id": scene_id, "object_id": oid, "reason": "not visible in any sampled frame"})
                continue
            name = obj["name"]
            refs = [t for _, t in sorted(obj["refs"], key=lambda x: x[0])]
            rec: dict[str, Any] = {
                "question_id": f"{scene_id}|{oid}|{name}",
                "scene_id": scene_id,
                "object_id": oid,
                "object_name": name,
                "references": refs,
                "gt_box": res["gt_box"],
                "iou": res["iou"],
                "regions": [{"box3d": res["input_box"], "masks": res["masks"], "label": name.replace("_", " ")}],
                "frame_ids": per_scene[scene_id]["frame_ids"],
                "num_frames": num_frames,
                "scene": scene_ref(out, scene_id)[0],
            }
            if res["pred_box"] is not None:
                rec["pred_box"] = res["pred_box"]
            records.append(rec)
        if not records:
            raise SR3DInputError(f"scan2cap: no object left to write for split {split!r} ({len(objects)} objects read)")
        write_jsonl(dest, records)
        skipped_path = out / self.name / f"{split}.skipped.jsonl"
        write_jsonl(skipped_path, skipped)
        reasons: dict[str, int] = {}
        for s in skipped:
            reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
        return {
            "dataset": self.name,
            "split": split,
            "source": str(source),
            "written": str(dest),
            "records": len(records),
            "objects": len(objects),
            "skipped": len(skipped),
            "skipped_by_reason": reasons,
            "skipped_file": str(skipped_path),
            "boxes": boxes.describe(),
            "proposals": None if proposals is None else str(proposals),
            "num_frames": num_frames,
        }

    @staticmethod
    def _scene_masks(
        out: Path, scene_id: str, inputs: dict[str, dict[str, Any]], num_frames: int, work: Path, overwrite: bool
    ) -> dict[str, Any]:
        """Region masks of every object of one scene (cached in ``work``)."""
        from sr3d_plugin.regions import box3d_masks, encode_coco_rle
        from sr3d_plugin.sources.scannet import ScanNetReader

        key = stable_hash({"inputs": inputs, "num_frames": num_frames, "version": 1})
        cache_file = work / f"{scene_id}.json"
        if cache_file.is_file() and not overwrite:
            try:
                cached = json.loads(cache_file.read_text(encoding="utf-8"))
                if cached.get("key") == key:
                    return cached
            except (OSError, json.JSONDecodeError):
                pass
        frames = ScanNetReader(num_frames=num_frames).read(out / "scenes" / scene_id)
        result: dict[str, Any] = {"key": key, "frame_ids": [str(f) for f in frames.frame_ids], "objects": {}}
        for oid, inp in inputs.items():
            box = inp["pred_box"] if inp["pred_box"] is not None else inp["gt_box"]
            masks, _ = box3d_masks(box, frames)
            result["objects"][oid] = {
                **inp,
                "input_box": list(box),
                "masks": [
                    {"frame": f"@{frames.frame_ids[k]}", "rle": encode_coco_rle(m)} for k, m in sorted(masks.items())
                ],
            }
        try:
            atomic_write_json(cache_file, result, indent=None)
        except OSError as exc:  # SR3DDiskError included: the masks are computed, keep going uncached
            warn_cache_write_failed(work, exc)
        return result
