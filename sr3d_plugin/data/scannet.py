"""``sr3d prepare scannet``: ScanNet posed RGB-D exports → ``<out>/scenes/<scene_id>/`` (ScanNet-style layout).

Reading ScanNet's raw ``.sens`` streams is not supported: export them first (ScanNet's ``SensReader``
writes colour, depth, pose and intrinsics). Two exported layouts are accepted, per scene folder:

``exported`` (the layout of CONTRIBUTING.md, "ScanNet-style posed RGB-D scene folder")
    ``color/<i>.jpg``, ``depth/<i>.png`` (uint16 mm), ``pose/<i>.txt`` (4×4 camera-to-world),
    ``intrinsic/intrinsic_color.txt`` and ``intrinsic/intrinsic_depth.txt`` (4×4), optional
    ``instance-filt/<i>.png`` and ``<scene_id>.txt`` (ScanNet meta file with ``axisAlignment``).
``posed_images`` (flat, as distributed by 3D-LLM / LEO style pipelines)
    ``<i>.jpg`` colour, ``<i>.png`` depth (uint16 mm), ``<i>.txt`` pose, and ``intrinsic.txt`` (colour K;
    the depth K is scaled to the depth size) or ``intrinsic_color.txt`` + ``intrinsic_depth.txt``.

Instance and label masks may also come as the official release ships them, zipped:
``<scene_id>_2d-instance-filt.zip`` (members ``instance-filt/<i>.png``) and
``<scene_id>_2d-label-filt.zip`` (``label-filt/<i>.png``), in the scene folder or in ``--meta DIR``
(``DIR/<scene_id>/``, as in ScanNet's ``scans/``). When the scene has no ``instance-filt/`` (or
``label-filt/``) folder, the members of the kept frames are read from the zip into the prepared
scene (:mod:`sr3d_plugin.archives`: the archive is checked first and refused as a whole — with an
error naming the member — for paths leaving the target, absolute paths, links, encrypted or
oversized members, too many members or a compression ratio of a zip bomb; files are written under
names built from the frame number, never from the member path).

``--raw`` is one scene folder or a folder of scene folders. The ScanNet meta file
``<scene_id>.txt`` (axis alignment) is taken from the scene folder or from ``--meta DIR``
(``DIR/<scene_id>/<scene_id>.txt`` or ``DIR/<scene_id>.txt``, e.g. the ``scans/`` of the ScanNet
release). With ``--frame-step 1`` (default) and the exported layout, the frame folders are linked
(symbolic links: nothing is copied); otherwise frames are hard-linked or copied (``--copy``).
Every prepared scene is checked with the ``scannet`` frame reader before it is moved into place.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from sr3d_plugin.data.common import (
    SCENES_DIR,
    Converter,
    as_bool,
    as_int,
    check_options,
    link_or_copy,
    progress_bar,
    symlink,
)
from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.io_utils import atomic_dir

#: the zipped mask folders of the official ScanNet release: folder name → archive name suffix
MASK_ARCHIVES = {"instance-filt": "_2d-instance-filt.zip", "label-filt": "_2d-label-filt.zip"}
_MEMBER_RE = re.compile(r"^(?:.*/)?(?P<folder>instance-filt|label-filt)/(?P<frame>\d+)\.png$")

__all__ = ["MASK_ARCHIVES", "ScanNetConverter", "detect_layout", "extract_mask_archives"]

_SCENE_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_COLOR_SUFFIXES = (".jpg", ".jpeg")


def _numbered(folder: Path, suffixes: tuple[str, ...]) -> dict[int, Path]:
    out: dict[int, Path] = {}
    for p in folder.iterdir():
        if p.is_file() and p.suffix.lower() in suffixes and p.stem.isdigit() and not p.name.startswith("."):
            out[int(p.stem)] = p
    return out


def detect_layout(folder: Path) -> str | None:
    """``"exported"``, ``"posed_images"`` or None (not a scene folder)."""
    if (folder / "color").is_dir() and (folder / "pose").is_dir():
        return "exported"
    try:
        has_jpg = any(p.suffix.lower() in _COLOR_SUFFIXES and p.stem.isdigit() for p in folder.iterdir())
    except OSError:
        return None
    return "posed_images" if has_jpg else None


def _meta_file(scene_dir: Path, scene_id: str, meta_root: Path | None) -> Path | None:
    cands = [scene_dir / f"{scene_id}.txt"]
    if meta_root is not None:
        cands += [meta_root / scene_id / f"{scene_id}.txt", meta_root / f"{scene_id}.txt"]
    return next((c for c in cands if c.is_file()), None)


def _mask_archive(src: Path, scene_id: str, meta_root: Path | None, folder: str) -> Path | None:
    name = f"{scene_id}{MASK_ARCHIVES[folder]}"
    cands = [src / name]
    if meta_root is not None:
        cands += [meta_root / scene_id / name, meta_root / name]
    return next((c for c in cands if c.is_file()), None)


def extract_mask_archives(
    src: Path, dest: Path, scene_id: str, meta_root: Path | None = None, frames: set[int] | None = None
) -> dict[str, int]:
    """Read ``<scene_id>_2d-instance-filt.zip`` / ``_2d-label-filt.zip`` into ``dest/<folder>/<i>.png``.

    Only folders ``src`` does not already have are read, and only the frames in ``frames`` (all
    when None). Returns the number of files written per folder. Hostile or corrupt archives raise
    :class:`~sr3d_plugin.errors.SR3DInputError` naming the archive and the member.
    """
    from sr3d_plugin.archives import extract_members

    counts: dict[str, int] = {}
    for folder in MASK_ARCHIVES:
        if (src / folder).is_dir():
            continue
        archive = _mask_archive(src, scene_id, meta_root, folder)
        if archive is None:
            continue

        def name_for(member: str, folder: str = folder) -> str | None:
            m = _MEMBER_RE.match(member)
            if m is None or m["folder"] != folder:
                return None
            i = int(m["frame"])
            return f"{folder}/{i}.png" if frames is None or i in frames else None

        written = extract_members(archive, dest, name_for)
        if not written:
            raise SR3DInputError(
                f"{archive}: no member {folder}/<frame>.png for the kept frames; expected the official layout "
                f"(members {folder}/<i>.png)"
            )
        counts[folder] = len(written)
    return counts


def _k4(k3: np.ndarray) -> str:
    m = np.eye(4)
    m[:3, :3] = k3
    return "\n".join(" ".join(f"{x:.9f}" for x in row) for row in m) + "\n"


class ScanNetConverter(Converter):
    """Prepare ScanNet-style scene folders (module docstring)."""

    name = "scannet"
    description = "ScanNet exported posed RGB-D scenes (colour, depth, pose, intrinsics, axis alignment)"
    default_split = None
    options = {
        "meta": "folder with the ScanNet meta files <scene_id>.txt (axis alignment), e.g. ScanNet's scans/",
        "frame_step": "keep every N-th frame (default 1: all frames, linked without copying)",
        "copy": "copy frame files instead of linking them",
        "scenes": "comma-separated scene ids to prepare (default: every scene folder found)",
    }

    def scene_folders(self, raw: Path, wanted: set[str] | None) -> list[Path]:
        """Scene folders under ``raw`` (``raw`` itself when it is one)."""
        if not raw.is_dir():
            raise SR3DInputError(f"scannet: raw={str(raw)!r} is not a folder (expected scene folders)")
        if detect_layout(raw) is not None:
            found = [raw]
        else:
            found = sorted(p for p in raw.iterdir() if p.is_dir() and not p.name.startswith(".") and detect_layout(p))
        if wanted is not None:
            missing = sorted(wanted - {p.name for p in found})
            if missing:
                raise SR3DInputError(f"scannet: scene(s) {missing[:10]} not found under {str(raw)!r}")
            found = [p for p in found if p.name in wanted]
        if not found:
            raise SR3DInputError(
                f"scannet: no scene folder under {str(raw)!r}; expected color/ + depth/ + pose/ + intrinsic/ folders "
                "or flat <i>.jpg / <i>.png / <i>.txt posed images"
            )
        return found

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
        """Prepare every scene folder found under ``raw`` into ``out/scenes/``."""
        check_options(self, options)
        if split is not None:
            raise SR3DInputError("scannet: scenes have no split; leave out split=")
        raw, out = Path(raw).expanduser(), Path(out).expanduser()
        meta_root = Path(options["meta"]).expanduser() if options.get("meta") else None
        if meta_root is not None and not meta_root.is_dir():
            raise SR3DInputError(f"scannet: meta={str(meta_root)!r} is not a folder")
        step = as_int(options.get("frame_step", 1), "frame_step")
        copy = as_bool(options.get("copy", False), "copy")
        wanted = None
        if options.get("scenes"):
            wanted = {s.strip() for s in str(options["scenes"]).split(",") if s.strip()}
        folders = self.scene_folders(raw, wanted)
        done, existing, failed = [], [], {}
        for folder in progress_bar(folders, "scannet scenes", len(folders), progress):
            scene_id = folder.name
            if not _SCENE_RE.match(scene_id):
                failed[scene_id] = "scene folder name must be a plain id such as scene0000_00"
                continue
            dest = out / SCENES_DIR / scene_id
            if dest.exists() and not overwrite:
                existing.append(scene_id)
                continue
            try:
                self.prepare_scene(folder, dest, meta_root, step, copy)
                done.append(scene_id)
            except SR3DInputError as exc:
                failed[scene_id] = str(exc)
        summary = {
            "dataset": self.name,
            "out": str(out / SCENES_DIR),
            "prepared": len(done),
            "already_prepared": len(existing),
            "failed": failed,
        }
        if failed:
            first = next(iter(failed.items()))
            raise SR3DInputError(
                f"scannet: {len(failed)} scene(s) could not be prepared ({len(done)} prepared, {len(existing)} "
                f"already there; those are kept): {first[0]}: {first[1]}"
                + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else "")
            )
        return summary

    def prepare_scene(self, src: Path, dest: Path, meta_root: Path | None, step: int, copy: bool) -> None:
        """Write one scene folder atomically (checked with the ``scannet`` reader before it is moved in place)."""
        from sr3d_plugin.sources.scannet import ScanNetReader

        layout = detect_layout(src)
        scene_id = src.name
        with atomic_dir(dest) as tmp:
            if layout == "exported":
                self._exported(src, tmp, step, copy)
                frames = _numbered(src / "color", (*_COLOR_SUFFIXES, ".png"))
            else:
                self._posed_images(src, tmp, step, copy)
                frames = _numbered(src, _COLOR_SUFFIXES)
            extract_mask_archives(src, tmp, scene_id, meta_root, set(sorted(frames)[::step]))
            meta = _meta_file(src, scene_id, meta_root)
            if meta is not None:
                shutil.copy2(meta, tmp / f"{scene_id}.txt")
            for extra in ("objects.json",):
                if (src / extra).is_file():
                    shutil.copy2(src / extra, tmp / extra)
            try:
                ScanNetReader(num_frames=2).read(tmp)
            except SR3DInputError as exc:
                raise SR3DInputError(f"{src}: {exc}") from None

    @staticmethod
    def _exported(src: Path, tmp: Path, step: int, copy: bool) -> None:
        for sub in ("color", "depth", "pose", "intrinsic"):
            if not (src / sub).is_dir():
                raise SR3DInputError(f"{src}: missing the {sub}/ folder of the exported layout")
        subs = ["color", "depth", "pose"] + [f for f in MASK_ARCHIVES if (src / f).is_dir()]
        if step == 1 and not copy:
            for sub in subs:
                symlink(src / sub, tmp / sub)
        else:
            colors = _numbered(src / "color", (*_COLOR_SUFFIXES, ".png"))
            keep = sorted(colors)[::step]
            for sub in subs:
                files = _numbered(src / sub, (".jpg", ".jpeg", ".png", ".txt", ".npy"))
                for i in keep:
                    if i in files:
                        link_or_copy(files[i], tmp / sub / files[i].name, copy)
        (tmp / "intrinsic").mkdir()
        for f in (src / "intrinsic").iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / "intrinsic" / f.name)

    @staticmethod
    def _posed_images(src: Path, tmp: Path, step: int, copy: bool) -> None:
        from PIL import Image

        from sr3d_plugin.sources.files import load_intrinsics_file

        colors = _numbered(src, _COLOR_SUFFIXES)
        depths = _numbered(src, (".png",))
        poses = _numbered(src, (".txt",))
        if not colors:
            raise SR3DInputError(f"{src}: no numbered colour frames <i>.jpg")
        keep = sorted(colors)[::step]
        missing = [i for i in keep if i not in depths or i not in poses]
        if missing:
            raise SR3DInputError(f"{src}: frame(s) {missing[:5]} lack a depth <i>.png or a pose <i>.txt")
        for i in keep:
            link_or_copy(colors[i], tmp / "color" / f"{i}{colors[i].suffix.lower()}", copy)
            link_or_copy(depths[i], tmp / "depth" / f"{i}.png", copy)
            link_or_copy(poses[i], tmp / "pose" / f"{i}.txt", copy)
        (tmp / "intrinsic").mkdir()
        k_color_file = next(
            (src / n for n in ("intrinsic_color.txt", "intrinsic.txt", "intrinsics.txt") if (src / n).is_file()), None
        )
        if k_color_file is None:
            raise SR3DInputError(f"{src}: no intrinsics (intrinsic.txt, or intrinsic_color.txt + intrinsic_depth.txt)")
        k_color = load_intrinsics_file(k_color_file)
        shutil.copy2(k_color_file, tmp / "intrinsic" / "intrinsic_color.txt")
        if (src / "intrinsic_depth.txt").is_file():
            shutil.copy2(src / "intrinsic_depth.txt", tmp / "intrinsic" / "intrinsic_depth.txt")
        else:
            first = keep[0]
            with Image.open(colors[first]) as c, Image.open(depths[first]) as d:
                sx, sy = d.size[0] / c.size[0], d.size[1] / c.size[1]
            k_depth = np.array(k_color, dtype=np.float64)
            k_depth[0] *= sx
            k_depth[1] *= sy
            (tmp / "intrinsic" / "intrinsic_depth.txt").write_text(_k4(k_depth))
