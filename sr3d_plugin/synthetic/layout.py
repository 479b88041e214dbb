"""Write synthetic scenes as ScanNet-style posed RGB-D folders, and read their ground-truth objects.

The folder layout is the one of CONTRIBUTING.md ("ScanNet-style posed RGB-D scene folder")::

    <root>/<scene_id>/
      color/<i>.png | <i>.jpg       RGB frames
      depth/<i>.png                 uint16 depth in millimetres (0 = invalid)
      pose/<i>.txt                  4×4 RAW camera-to-world (the axis alignment is NOT applied)
      intrinsic/intrinsic_color.txt 4×4 (top-left 3×3 is K)
      intrinsic/intrinsic_depth.txt 4×4
      <scene_id>.txt                ScanNet meta file with "axisAlignment = m00 … m33" (row-major)
      instance-filt/<i>.png         per-pixel object ids (0 = none), 8-bit when ids fit, else 16-bit
      objects.json                  aligned-frame boxes: id, label, center, size, rotation, color

The whole folder is written into a temporary sibling and moved into place at the end
(:func:`sr3d_plugin.io_utils.atomic_dir`), so an interrupted write never leaves a partial scene.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.io_utils import atomic_dir
from sr3d_plugin.synthetic.scene import SceneObject, SyntheticScene

__all__ = ["depth_to_millimetres", "read_objects", "write_scannet_layout"]

_MAX_MM = np.iinfo(np.uint16).max


def depth_to_millimetres(depth: np.ndarray) -> np.ndarray:
    """``[..., H, W]`` metres → uint16 millimetres, rounded to the nearest millimetre (0 stays 0).

    Raises if a depth exceeds 65.535 m (it would not fit in uint16).
    """
    d = np.asarray(depth, dtype=np.float64)
    if not np.isfinite(d).all() or (d < 0).any():
        raise SR3DInputError("depth must be finite and >= 0 (metres) to be stored as millimetres")
    mm = np.round(d * 1000.0)
    if mm.max(initial=0) > _MAX_MM:
        raise SR3DInputError(f"depth {d.max():.3f} m does not fit in uint16 millimetres (max {_MAX_MM / 1000} m)")
    return mm.astype(np.uint16)


def _matrix_text(m: np.ndarray) -> str:
    return "\n".join(" ".join(f"{float(x):.9f}" for x in row) for row in np.asarray(m, dtype=np.float64)) + "\n"


def _k4(k: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = np.asarray(k, dtype=np.float64)
    return out


def _save_image(img: Image.Image, path: Path, **kwargs) -> None:
    img.save(path, **kwargs)


def write_scannet_layout(
    scene: SyntheticScene,
    root: str | os.PathLike,
    scene_id: str | None = None,
    color_format: str = "png",
) -> Path:
    """Write ``scene`` as ``<root>/<scene_id>/`` in the ScanNet-style layout, atomically.

    An existing folder of the same name is replaced only once the new one is complete.

    Args:
        scene: the scene to write (frames ``[V, H, W, …]``).
        root: parent folder (like ScanNet's ``scans/``).
        scene_id: folder name; default ``scene.scene_id``.
        color_format: ``"png"`` (lossless) or ``"jpg"`` (quality 95, like ScanNet's exports).

    Returns:
        Path of the scene folder.
    """
    sid = scene.scene_id if scene_id is None else str(scene_id)
    if not sid or sid in (".", "..") or "/" in sid or "\\" in sid or sid.startswith("."):
        raise SR3DInputError(f"scene id must be a plain folder name, got {sid!r}")
    fmt = color_format.lower().lstrip(".")
    if fmt == "jpeg":
        fmt = "jpg"
    if fmt not in ("png", "jpg"):
        raise SR3DInputError(f"color_format must be 'png' or 'jpg', got {color_format!r}")
    v = scene.num_frames
    if scene.depth.shape[0] != v or scene.instance.shape[0] != v or scene.raw_cam_to_world.shape[0] != v:
        raise SR3DInputError(
            f"scene {sid} is inconsistent: {v} colour frames, {scene.depth.shape[0]} depth maps, "
            f"{scene.instance.shape[0]} instance maps, {scene.raw_cam_to_world.shape[0]} poses"
        )
    depth_mm = depth_to_millimetres(scene.depth)
    max_id = int(scene.instance.max(initial=0))
    if max_id > _MAX_MM or int(scene.instance.min(initial=0)) < 0:
        raise SR3DInputError(f"instance ids must be in 0..65535 to be stored as PNG, got max {max_id}")
    inst_dtype = np.uint8 if max_id <= 255 else np.uint16

    dest = Path(root) / sid
    with atomic_dir(dest) as tmp:
        for sub in ("color", "depth", "pose", "intrinsic", "instance-filt"):
            (tmp / sub).mkdir()
        for i in range(v):
            color = Image.fromarray(np.ascontiguousarray(scene.rgb[i], dtype=np.uint8))
            if fmt == "png":
                _save_image(color, tmp / "color" / f"{i}.png")
            else:
                _save_image(color, tmp / "color" / f"{i}.jpg", quality=95)
            _save_image(Image.fromarray(depth_mm[i]), tmp / "depth" / f"{i}.png")
            _save_image(Image.fromarray(scene.instance[i].astype(inst_dtype)), tmp / "instance-filt" / f"{i}.png")
            (tmp / "pose" / f"{i}.txt").write_text(_matrix_text(scene.raw_cam_to_world[i]))
        k_text = _matrix_text(_k4(scene.intrinsics))
        (tmp / "intrinsic" / "intrinsic_color.txt").write_text(k_text)
        (tmp / "intrinsic" / "intrinsic_depth.txt").write_text(k_text)
        k = scene.intrinsics
        align = " ".join(f"{float(x):.9f}" for x in np.asarray(scene.axis_align, dtype=np.float64).reshape(-1))
        meta = [
            f"axisAlignment = {align}",
            f"colorHeight = {scene.height}",
            f"colorWidth = {scene.width}",
            f"depthHeight = {scene.height}",
            f"depthWidth = {scene.width}",
            f"fx_color = {k[0, 0]:.6f}",
            f"fx_depth = {k[0, 0]:.6f}",
            f"fy_color = {k[1, 1]:.6f}",
            f"fy_depth = {k[1, 1]:.6f}",
            f"mx_color = {k[0, 2]:.6f}",
            f"mx_depth = {k[0, 2]:.6f}",
            f"my_color = {k[1, 2]:.6f}",
            f"my_depth = {k[1, 2]:.6f}",
            f"numColorFrames = {v}",
            f"numDepthFrames = {v}",
            "sceneType = Living room / Lounge",
        ]
        (tmp / f"{sid}.txt").write_text("\n".join(meta) + "\n")
        records = [obj.to_dict() for obj in scene.objects]
        (tmp / "objects.json").write_text(json.dumps(records, indent=1) + "\n")
    return dest


def read_objects(scene_dir: str | os.PathLike) -> list[SceneObject]:
    """Ground-truth objects of a scene folder (``objects.json``, aligned world frame).

    Raises :class:`~sr3d_plugin.errors.SR3DInputError` when the file is missing or malformed.
    """
    path = Path(scene_dir) / "objects.json"
    if not path.is_file():
        raise SR3DInputError(f"{path} does not exist; expected the objects.json of a synthetic scene folder")
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SR3DInputError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise SR3DInputError(f"{path} must hold a JSON list of objects, got {type(records).__name__}")
    return [SceneObject.from_dict(r) for r in records]
