"""The ``scannet`` frame reader: ScanNet-style posed RGB-D scene folders.

Layout (CONTRIBUTING.md, "ScanNet-style posed RGB-D scene folder")::

    <scene_dir>/color/<i>.jpg|png   depth/<i>.png (uint16 mm)   pose/<i>.txt (4×4 camera-to-world)
    <scene_dir>/intrinsic/intrinsic_color.txt, intrinsic_depth.txt (4×4)
    <scene_dir>/<scene_id>.txt      optional; "axisAlignment = m00 … m33"

Frames are ordered numerically by ``<i>``; frames whose pose holds -inf/NaN (ScanNet's mark of a
lost track) are dropped *before* the uniform sampling of SR3D-FACTS §3
(``floor(linspace(0, N−1, n))``), and the axis-alignment matrix is left-multiplied onto every pose.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from sr3d_plugin import _checks
from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.sources.base import FrameSet, uniform_frame_indices
from sr3d_plugin.sources.files import (
    IMAGE_SUFFIXES,
    load_depth_file,
    load_intrinsics_file,
    load_pose_file,
    load_rgb,
)

__all__ = ["ScanNetReader", "numbered_files", "read_axis_alignment"]

_AXIS_RE = re.compile(r"^\s*axisAlignment\s*=\s*(.*)$")


def numbered_files(folder: Path, suffixes: tuple[str, ...], what: str) -> dict[int, Path]:
    """``{i: path}`` for the files ``<i><suffix>`` in ``folder`` (hidden files and other names ignored)."""
    if not folder.is_dir():
        raise SR3DInputError(f"{what} folder not found: {str(folder)!r}")
    found: dict[int, Path] = {}
    for entry in folder.iterdir():
        if entry.name.startswith(".") or entry.suffix.lower() not in suffixes or not entry.stem.isdigit():
            continue
        idx = int(entry.stem)
        if idx in found:
            raise SR3DInputError(
                f"{what} folder {str(folder)!r} has two files for frame {idx}: {found[idx].name} and {entry.name}"
            )
        found[idx] = entry
    return found


def read_axis_alignment(meta_file: str | os.PathLike) -> np.ndarray | None:
    """The ``[4, 4]`` ``axisAlignment`` matrix of a ScanNet ``<scene_id>.txt`` file, or None if it has none."""
    p = Path(meta_file)
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise SR3DInputError(f"cannot read scene meta file {str(p)!r}: {exc}") from exc
    for line in text.splitlines():
        m = _AXIS_RE.match(line)
        if not m:
            continue
        parts = m.group(1).split()
        try:
            values = [float(x) for x in parts]
        except ValueError as exc:
            raise SR3DInputError(
                f"axisAlignment in {str(p)!r} has a value that is not a number: {m.group(1).strip()!r}"
            ) from exc
        if len(values) != 16:
            raise SR3DInputError(
                f"axisAlignment in {str(p)!r} has {len(values)} numbers; expected 16 (a row-major 4×4 matrix)"
            )
        mat = np.asarray(values, dtype=np.float64).reshape(4, 4)
        if not np.isfinite(mat).all() or not np.allclose(mat[3], [0, 0, 0, 1], atol=1e-6):
            raise SR3DInputError(
                f"axisAlignment in {str(p)!r} is not a rigid 4×4 transform (last row {mat[3].tolist()}, "
                "expected [0, 0, 0, 1])"
            )
        return mat
    return None


class ScanNetReader:
    """Read a ScanNet-style scene folder into a :class:`FrameSet`.

    Args:
        num_frames: frames to sample uniformly among the frames with a valid pose (all if fewer).
            ``None`` or ``0`` keeps every valid frame.
        depth_scale: raw depth units per metre (1000 for ScanNet millimetres, 4000 for Matterport).
        axis_align: apply ``axisAlignment`` from ``<scene_id>.txt`` when that file exists.
    """

    name = "scannet"

    def __init__(self, num_frames: int | None = 32, depth_scale: float = 1000.0, axis_align: bool = True) -> None:
        if num_frames is not None:
            num_frames = _checks.integer(num_frames, "num_frames", minimum=0)
        self.num_frames = int(num_frames) if num_frames else None
        self.depth_scale = _checks.finite_number(depth_scale, "depth_scale", positive=True)
        self.axis_align = bool(axis_align)

    def options(self) -> dict:
        return {"num_frames": self.num_frames, "depth_scale": self.depth_scale, "axis_align": self.axis_align}

    def _meta_file(self, scene: Path) -> Path | None:
        named = scene / f"{scene.name}.txt"
        if named.is_file():
            return named
        # Fall back to a single top-level .txt that carries an axisAlignment line.
        candidates = []
        for p in sorted(scene.glob("*.txt")):
            try:
                with open(p, encoding="utf-8", errors="replace") as fh:
                    if any(_AXIS_RE.match(line) for line in fh):
                        candidates.append(p)
            except OSError:
                continue
        return candidates[0] if len(candidates) == 1 else None

    def read(self, scene_dir: str | os.PathLike) -> FrameSet:
        """Read the scene.

        Returns:
            FrameSet with ``images`` (V RGB), ``depth`` ``[V, Hd, Wd]`` float32 metres,
            ``intrinsics`` ``[V, 3, 3]`` (depth camera), ``color_intrinsics`` ``[V, 3, 3]`` (if the file
            exists), ``cam_to_world`` ``[V, 4, 4]`` (axis-aligned), ``frame_ids`` the frame numbers;
            ``meta`` adds ``scene_id``, frame counts, ``input_files`` (for cache keys) and, when present,
            ``instance_files`` (per selected frame) and ``objects_file``.
        """
        scene = Path(scene_dir).expanduser()
        if not scene.exists():
            raise SR3DInputError(f"scene folder not found: {str(scene)!r}")
        if not scene.is_dir():
            raise SR3DInputError(f"scene path must be a folder (ScanNet layout), got a file: {str(scene)!r}")
        colors = numbered_files(scene / "color", IMAGE_SUFFIXES, "colour")
        depths = numbered_files(scene / "depth", (".png", ".npy"), "depth")
        poses = numbered_files(scene / "pose", (".txt",), "pose")
        if not colors:
            raise SR3DInputError(f"no numbered colour frames (<i>.jpg / <i>.png) in {str(scene / 'color')!r}")
        for what, files in (("depth", depths), ("pose", poses)):
            missing = sorted(set(colors) - set(files))
            extra = sorted(set(files) - set(colors))
            if missing or extra:
                detail = []
                if missing:
                    detail.append(f"missing for colour frame(s) {missing[:5]}{' …' if len(missing) > 5 else ''}")
                if extra:
                    detail.append(f"without a colour frame: {extra[:5]}{' …' if len(extra) > 5 else ''}")
                raise SR3DInputError(
                    f"{len(colors)} colour frames but {len(files)} {what} files in {str(scene)!r} "
                    f"({'; '.join(detail)}); expected one {what} file per colour frame"
                )
        order = sorted(colors)
        all_poses = np.stack([load_pose_file(poses[i]) for i in order])
        finite = np.isfinite(all_poses.reshape(len(order), -1)).all(axis=1)
        valid_ids = [i for i, ok in zip(order, finite) if ok]
        if not valid_ids:
            raise SR3DInputError(f"all {len(order)} poses in {str(scene / 'pose')!r} are invalid (-inf / NaN)")
        count = self.num_frames or len(valid_ids)
        picked = [valid_ids[j] for j in uniform_frame_indices(len(valid_ids), count)]
        pos = {i: n for n, i in enumerate(order)}
        cam_to_world = all_poses[[pos[i] for i in picked]]

        intr_dir = scene / "intrinsic"
        depth_k_file = intr_dir / "intrinsic_depth.txt"
        color_k_file = intr_dir / "intrinsic_color.txt"
        if not depth_k_file.is_file():
            raise SR3DInputError(f"depth intrinsics not found: {str(depth_k_file)!r} (4×4 matrix of the depth camera)")
        k_depth = load_intrinsics_file(depth_k_file)
        k_color = load_intrinsics_file(color_k_file) if color_k_file.is_file() else None

        axis = None
        meta_file = self._meta_file(scene)
        if self.axis_align and meta_file is not None:
            axis = read_axis_alignment(meta_file)
            if axis is not None:
                cam_to_world = np.einsum("ij,vjk->vik", axis, cam_to_world)

        images = [load_rgb(colors[i], f"colour frame {i}") for i in picked]
        depth_list = [load_depth_file(depths[i], self.depth_scale) for i in picked]
        sizes = {im.size for im in images}
        if len(sizes) != 1:
            raise SR3DInputError(
                f"colour frames of {str(scene)!r} have different sizes {sorted(sizes)}; expected one size"
            )
        dshapes = {d.shape for d in depth_list}
        if len(dshapes) != 1:
            raise SR3DInputError(
                f"depth maps of {str(scene)!r} have different shapes {sorted(dshapes)}; expected one size"
            )
        depth = np.stack(depth_list).astype(np.float32)
        v = len(picked)
        extras: dict[str, object] = {}
        inst_dir = scene / "instance-filt"
        if inst_dir.is_dir():
            inst = numbered_files(inst_dir, (".png",), "instance")
            extras["instance_files"] = [str(inst[i]) if i in inst else None for i in picked]
        if (scene / "objects.json").is_file():
            extras["objects_file"] = str(scene / "objects.json")
        files = [colors[i] for i in picked] + [depths[i] for i in picked] + [poses[i] for i in picked]
        files += [depth_k_file] + ([color_k_file] if k_color is not None else [])
        files += [meta_file] if (meta_file is not None and axis is not None) else []
        return FrameSet(
            images=images,
            depth=depth,
            intrinsics=np.repeat(k_depth[None], v, axis=0).astype(np.float64),
            cam_to_world=cam_to_world.astype(np.float64),
            color_intrinsics=None if k_color is None else np.repeat(k_color[None], v, axis=0).astype(np.float64),
            axis_align=axis,
            frame_ids=[str(i) for i in picked],
            source=str(scene),
            meta={
                "reader": {"name": self.name, "options": self.options()},
                "scene_id": scene.name,
                "total_frames": len(order),
                "valid_frames": len(valid_ids),
                "invalid_pose_frames": [i for i, ok in zip(order, finite) if not ok],
                "input_files": [str(f) for f in files],
                **extras,
            },
        )
