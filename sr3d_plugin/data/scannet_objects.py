"""Object boxes of a ScanNet scene from ScanNet's own release files (no third-party preprocessing).

Files of one scene (ScanNet v2 ``scans/<scene_id>/``):

* ``<scene_id>_vh_clean_2.ply`` — the cleaned mesh; its ``vertex`` element carries ``x, y, z``
  (metres, raw scanner frame) plus colour properties. Read here without extra dependencies
  (:func:`read_ply_vertices`: ``binary_little_endian``, ``binary_big_endian`` or ``ascii``).
* ``<scene_id>_vh_clean_2.0.010000.segs.json`` — ``segIndices``: one over-segment id per mesh vertex.
* ``<scene_id>.aggregation.json`` — ``segGroups``: objects ``{objectId, label, segments}``, each a
  list of over-segment ids.
* ``<scene_id>.txt`` — meta file; ``axisAlignment`` (16 numbers, row-major 4×4) maps raw → aligned
  (``p_aligned = A @ [x, y, z, 1]``); a file without it means identity.

Box of an object (:func:`scannet_object_boxes`), as ScanRefer / Scan2Cap's ScanNet preprocessing
computes ``<scene_id>_aligned_bbox.npy``: every vertex gets the ``objectId`` of the group that lists
its segment (a later group wins a segment listed twice), the vertices are axis-aligned in float64,
and the box is the axis-aligned min/max hull of the object's vertices: ``(cx, cy, cz, dx, dy, dz)``
in the aligned frame, keyed by ``str(objectId)`` — the ``object_id`` of ScanRefer. An object whose
segments hold no vertex has no box (left out, as in the reference).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sr3d_plugin.errors import SR3DInputError

__all__ = ["SCANNET_OBJECT_FILES", "read_ply_vertices", "scannet_object_boxes", "scannet_scene_files"]

Box = tuple[float, float, float, float, float, float]

#: the official files an object-box computation reads, ``{scene}`` standing for the scene id
SCANNET_OBJECT_FILES: dict[str, str] = {
    "aggregation": "{scene}.aggregation.json",
    "segs": "{scene}_vh_clean_2.0.010000.segs.json",
    "mesh": "{scene}_vh_clean_2.ply",
    "meta": "{scene}.txt",
}

_PLY_TYPES = {
    "char": "i1",
    "int8": "i1",
    "uchar": "u1",
    "uint8": "u1",
    "short": "i2",
    "int16": "i2",
    "ushort": "u2",
    "uint16": "u2",
    "int": "i4",
    "int32": "i4",
    "uint": "u4",
    "uint32": "u4",
    "float": "f4",
    "float32": "f4",
    "double": "f8",
    "float64": "f8",
}
_MAX_PLY_HEADER = 1 << 16


def _parse_ply_header(fh: Any, where: str) -> tuple[str, list[tuple[str, int, list[tuple[str, str | None, str]]]]]:
    first = fh.readline()
    if first.rstrip(b"\r\n") != b"ply":
        raise SR3DInputError(f"{where}: not a PLY file (first line {first[:20]!r}, expected b'ply')")
    fmt = None
    elements: list[tuple[str, int, list[tuple[str, str | None, str]]]] = []
    read = len(first)
    while True:
        line = fh.readline()
        read += len(line)
        if not line or read > _MAX_PLY_HEADER:
            raise SR3DInputError(f"{where}: PLY header has no 'end_header' within {_MAX_PLY_HEADER} bytes")
        words = line.decode("ascii", errors="replace").split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "end_header":
            break
        if words[0] == "format" and len(words) >= 2:
            fmt = words[1]
        elif words[0] == "element" and len(words) == 3 and words[2].isdigit():
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements:
            if words[1] == "list" and len(words) == 5:
                elements[-1][2].append((words[4], words[2], words[3]))
            elif len(words) == 3:
                elements[-1][2].append((words[2], None, words[1]))
            else:
                raise SR3DInputError(f"{where}: bad PLY property line {line.strip()!r}")
        else:
            raise SR3DInputError(f"{where}: unexpected PLY header line {line.strip()!r}")
    if fmt not in ("binary_little_endian", "binary_big_endian", "ascii"):
        raise SR3DInputError(
            f"{where}: PLY format {fmt!r} not supported; expected binary_little_endian, binary_big_endian or ascii"
        )
    for name, _, props in elements:
        for prop, count_type, value_type in props:
            for t in (count_type, value_type):
                if t is not None and t not in _PLY_TYPES:
                    raise SR3DInputError(f"{where}: PLY element {name!r} property {prop!r} has unknown type {t!r}")
    return fmt, elements


def read_ply_vertices(path: str | os.PathLike) -> np.ndarray:
    """``[N, 3]`` float32 ``x, y, z`` of the ``vertex`` element of a PLY file (its other properties are skipped).

    Elements before ``vertex`` may only have fixed-size properties (true of ScanNet meshes, whose
    ``vertex`` comes first). Raises :class:`SR3DInputError` naming the file for anything else.
    """
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            return _read_vertex_element(fh, str(p))
    except OSError as exc:
        raise SR3DInputError(f"cannot read mesh {str(p)!r}: {exc}") from exc


def _read_vertex_element(fh: Any, where: str) -> np.ndarray:
    fmt, elements = _parse_ply_header(fh, where)
    names = [e[0] for e in elements]
    if "vertex" not in names:
        raise SR3DInputError(f"{where}: PLY file has no 'vertex' element (elements {names})")
    order = "<" if fmt == "binary_little_endian" else ">"
    for name, count, props in elements:
        fields = [prop for prop, _, _ in props]
        if name == "vertex" and not {"x", "y", "z"} <= set(fields):
            raise SR3DInputError(f"{where}: PLY vertex element lacks x, y, z (properties {fields})")
        if any(ct is not None for _, ct, _ in props):
            if name == "vertex":
                raise SR3DInputError(f"{where}: PLY vertex element has list properties; not supported")
            raise SR3DInputError(
                f"{where}: PLY element {name!r} with list properties comes before 'vertex'; not supported"
            )
        if fmt == "ascii":
            rows = []
            for i in range(count):
                line = fh.readline()
                parts = line.split()
                if len(parts) != len(props):
                    raise SR3DInputError(f"{where}: PLY {name} row {i} has {len(parts)} values, expected {len(props)}")
                rows.append(parts)
            if name != "vertex":
                continue
            try:
                table = np.asarray(rows, dtype=np.float64).reshape(count, len(props))
            except ValueError as exc:
                raise SR3DInputError(f"{where}: PLY vertex values are not numbers: {exc}") from None
            cols = [fields.index(k) for k in ("x", "y", "z")]
            out = table[:, cols].astype(np.float32)
        else:
            dtype = np.dtype([(prop, order + _PLY_TYPES[vt]) for prop, _, vt in props])
            raw = fh.read(dtype.itemsize * count)
            if len(raw) != dtype.itemsize * count:
                raise SR3DInputError(
                    f"{where}: PLY file ends inside the {name!r} element ({len(raw)} of {dtype.itemsize * count} bytes)"
                )
            if name != "vertex":
                continue
            data = np.frombuffer(raw, dtype=dtype, count=count)
            out = np.stack([data[k].astype(np.float32) for k in ("x", "y", "z")], axis=1)
        if not np.isfinite(out).all():
            raise SR3DInputError(f"{where}: PLY vertex coordinates are not all finite")
        return out
    raise AssertionError("unreachable")  # pragma: no cover


def scannet_scene_files(folder: str | os.PathLike, scene_id: str) -> dict[str, Path]:
    """The official files of ``scene_id`` in ``folder`` (``folder/<scene_id>/`` or ``folder`` itself).

    Raises :class:`SR3DInputError` listing the files that are missing.
    """
    root = Path(folder)
    for base in (root / scene_id, root):
        files = {k: base / v.format(scene=scene_id) for k, v in SCANNET_OBJECT_FILES.items()}
        if files["aggregation"].is_file():
            break
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise SR3DInputError(
            f"scene {scene_id}: ScanNet file(s) not found: {', '.join(missing)} (expected ScanNet's scans/<scene_id>/ "
            f"with {', '.join(v.format(scene=scene_id) for v in SCANNET_OBJECT_FILES.values())})"
        )
    return files


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SR3DInputError(f"cannot read {what} {str(path)!r}: {exc}") from None


def _int_list(values: Any, where: str) -> list[int]:
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise SR3DInputError(f"{where}: expected a list of integers")
    return values


def scannet_object_boxes(
    files: Mapping[str, str | os.PathLike], axis_align: np.ndarray | None = None
) -> dict[str, Box]:
    """Axis-aligned boxes ``{object_id: (cx, cy, cz, dx, dy, dz)}`` from the official files (module docstring).

    Args:
        files: ``{"aggregation", "segs", "mesh"}`` paths (``"meta"`` too unless ``axis_align`` is given),
            e.g. from :func:`scannet_scene_files`.
        axis_align: ``[4, 4]`` raw → aligned map; default: ``axisAlignment`` of ``files["meta"]``
            (identity when the file has none).

    Returns:
        boxes in metres in the aligned frame, keyed by ``str(objectId)``, in aggregation order.
    """
    for key in ("aggregation", "segs", "mesh"):
        if key not in files:
            raise SR3DInputError(f"scannet_object_boxes: files has no {key!r} path (keys {sorted(files)})")
    if axis_align is None:
        if "meta" not in files:
            raise SR3DInputError("scannet_object_boxes: give files['meta'] (<scene_id>.txt) or axis_align")
        from sr3d_plugin.sources.scannet import read_axis_alignment

        axis_align = read_axis_alignment(files["meta"])
    align = np.eye(4) if axis_align is None else np.asarray(axis_align, dtype=np.float64)
    if align.shape != (4, 4) or not np.isfinite(align).all():
        raise SR3DInputError(f"axis_align must be a finite [4, 4] matrix, got shape {align.shape}")

    agg_path, segs_path, mesh_path = (Path(files[k]) for k in ("aggregation", "segs", "mesh"))
    segs = _load_json(segs_path, "ScanNet segmentation")
    if not isinstance(segs, Mapping) or "segIndices" not in segs:
        raise SR3DInputError(f"{segs_path}: expected an object with 'segIndices'")
    seg_of_vertex = np.asarray(_int_list(segs["segIndices"], f"{segs_path} segIndices"), dtype=np.int64)
    agg = _load_json(agg_path, "ScanNet aggregation")
    if not isinstance(agg, Mapping) or not isinstance(agg.get("segGroups"), list):
        raise SR3DInputError(f"{agg_path}: expected an object with a 'segGroups' list")

    vertices = read_ply_vertices(mesh_path)
    if len(vertices) != len(seg_of_vertex):
        raise SR3DInputError(
            f"{segs_path} has {len(seg_of_vertex)} segIndices but {mesh_path} has {len(vertices)} vertices; "
            "they must be the files of the same mesh"
        )
    # object of each segment: later groups win, as per-vertex assignment in group order does
    known = set(np.unique(seg_of_vertex).tolist())
    seg_object: dict[int, int] = {}
    order: list[int] = []
    for i, group in enumerate(agg["segGroups"]):
        where = f"{agg_path} segGroups[{i}]"
        if not isinstance(group, Mapping) or "objectId" not in group or "segments" not in group:
            raise SR3DInputError(f"{where}: expected an object with 'objectId' and 'segments'")
        oid = group["objectId"]
        if isinstance(oid, bool) or not isinstance(oid, int) or oid < 0:
            raise SR3DInputError(f"{where}: objectId must be a non-negative integer, got {oid!r}")
        if oid in order:
            raise SR3DInputError(f"{where}: objectId {oid} appears twice")
        order.append(oid)
        for seg in _int_list(group["segments"], f"{where} segments"):
            if seg not in known:
                raise SR3DInputError(f"{where}: segment {seg} is not in {segs_path.name}")
            seg_object[seg] = oid
    lookup = {s: seg_object.get(s, -1) for s in known}
    uniq, inverse = np.unique(seg_of_vertex, return_inverse=True)
    object_of_vertex = np.asarray([lookup[int(s)] for s in uniq], dtype=np.int64)[inverse]

    homo = np.ones((len(vertices), 4), dtype=np.float64)
    homo[:, :3] = vertices
    aligned = homo @ align.T
    boxes: dict[str, Box] = {}
    for oid in order:
        pts = aligned[object_of_vertex == oid, :3]
        if len(pts) == 0:
            continue
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        c, d = (lo + hi) / 2, hi - lo
        boxes[str(oid)] = (float(c[0]), float(c[1]), float(c[2]), float(d[0]), float(d[1]), float(d[2]))
    return boxes
