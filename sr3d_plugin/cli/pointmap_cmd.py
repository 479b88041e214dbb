"""``sr3d pointmap``: compute (and cache) the canonical point maps of a scene, image, frames or video.

Examples::

    sr3d pointmap --synthetic --preview preview.png --json       # no input files needed
    sr3d pointmap --scene scans/scene0000_00 --out scene0000_00.npz
    sr3d pointmap --image photo.jpg --depth-model depth-anything/Depth-Anything-V2-Small-hf
    sr3d pointmap --video clip.mp4 --points cut3r.npz --num-frames 32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sr3d_plugin.errors import SR3DInputError

if TYPE_CHECKING:  # numpy is imported where it is used: `sr3d --help` stays light
    import numpy as np


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pointmap",
        help="compute the canonical 3D point maps of a scene, image, frames or video (cached)",
        description="Read frames, compute their point maps with a point-map source, map them into the shared "
        "canonical space and write them (.npz), a preview (.png) and/or a JSON summary.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--scene", metavar="DIR", help="ScanNet-style posed RGB-D scene folder")
    src.add_argument("--image", metavar="F", help="a single image (optionally with --depth / --intrinsics)")
    src.add_argument("--frames", metavar="F", nargs="+", help="image files of one scene, in order")
    src.add_argument("--video", metavar="F", help="a video file (frames sampled uniformly)")
    src.add_argument(
        "--synthetic",
        metavar="SEED",
        nargs="?",
        const=0,
        type=int,
        help="the bundled procedural scene (seed 0 unless given); needs no input files",
    )
    p.add_argument(
        "--depth", metavar="F", nargs="+", help="depth file(s) for --image / --frames (16-bit PNG mm, .npy m)"
    )
    p.add_argument("--intrinsics", metavar="F", help="3×3 / 4×4 intrinsics (.txt / .npy) of the depth maps")
    p.add_argument("--poses", metavar="F", nargs="+", help="4×4 camera-to-world file(s) for --image / --frames")
    p.add_argument("--depth-scale", type=float, default=1000.0, help="raw depth units per metre (default 1000 = mm)")
    p.add_argument(
        "--source", default="auto", help="point-map source (default: chosen from the input; see `sr3d plugins`)"
    )
    p.add_argument("--points", metavar="FILE", help="reconstruction point maps (.npz / .npy from CUT3R, MASt3R, VGGT)")
    p.add_argument("--min-confidence", type=float, help="drop reconstruction points below this confidence")
    p.add_argument("--depth-model", metavar="ID_OR_PATH", help="depth model for the depth_anything source")
    p.add_argument("--device", default="auto", help="device of the depth model (auto, cpu, cuda, cuda:1)")
    p.add_argument(
        "--num-frames",
        type=int,
        default=32,
        help="frames sampled uniformly from scenes, videos and --frames lists (32)",
    )
    p.add_argument("--canonical", choices=("sr3d", "robust"), help="canonical mode (default: the source's)")
    p.add_argument("--grid", type=int, default=32, help="token grid side of the stored token positions (32)")
    p.add_argument("--out", metavar="OUT.npz", help="write xyz, valid, canonical, token positions")
    p.add_argument("--cache-dir", metavar="D", help="point-map cache folder (default $SR3D_CACHE/pointmaps)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--preview", metavar="PNG", help="write frames beside their canonical point maps coloured by xyz")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _synthetic_scene(seed: int, root: Path | None) -> Iterator[Path]:
    """The folder of the synthetic scene ``seed``: generated once into ``root`` (a temp folder if None)."""
    try:
        from sr3d_plugin.synthetic import generate_scene, write_scannet_layout
    except ImportError as exc:  # pragma: no cover - ships with the package
        raise SR3DInputError(f"the synthetic scene generator is not available: {exc}") from exc
    if seed < 0:
        raise SR3DInputError(f"--synthetic seed must be a non-negative integer, got {seed}")
    from sr3d_plugin.io_utils import warn_cache_write_failed

    with contextlib.ExitStack() as stack:
        scene = None
        if root is not None and not (root / f"synth{seed:04d}_00" / "objects.json").is_file():
            scene = generate_scene(seed)
            try:
                write_scannet_layout(scene, root)
            except OSError as exc:  # the cache folder is not writable: generate into a temporary folder
                warn_cache_write_failed(root, exc)
                root = None
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sr3d-synthetic-")))
            write_scannet_layout(scene if scene is not None else generate_scene(seed), root)
        yield root / f"synth{seed:04d}_00"


def _read_frames(args: argparse.Namespace, scene_dir: Path | None) -> Any:
    from sr3d_plugin import plugins

    geometry_args = args.depth or args.intrinsics or args.poses
    if (args.scene or args.video or scene_dir is not None) and geometry_args:
        raise SR3DInputError(
            "--depth / --intrinsics / --poses go with --image or --frames, not a scene folder or video"
        )
    if args.num_frames is not None and args.num_frames <= 0:
        raise SR3DInputError(f"--num-frames must be positive, got {args.num_frames}")
    if scene_dir is not None or args.scene:
        reader = plugins.create("frame_readers", "scannet", num_frames=args.num_frames, depth_scale=args.depth_scale)
        return reader.read(scene_dir if scene_dir is not None else args.scene)
    if args.video:
        return plugins.create("frame_readers", "video", num_frames=args.num_frames).read(args.video)
    if args.image:
        if (args.depth and len(args.depth) > 1) or (args.poses and len(args.poses) > 1):
            raise SR3DInputError("--image takes one --depth file and one --poses file")
        reader = plugins.create("frame_readers", "image", depth_scale=args.depth_scale)
        return reader.read(
            args.image,
            depth=args.depth[0] if args.depth else None,
            intrinsics=args.intrinsics,
            pose=args.poses[0] if args.poses else None,
        )
    reader = plugins.create("frame_readers", "frames", num_frames=args.num_frames, depth_scale=args.depth_scale)
    return reader.read(args.frames, depth=args.depth, intrinsics=args.intrinsics, poses=args.poses)


def _source_and_options(args: argparse.Namespace, frames: Any) -> tuple[str, dict[str, Any]]:
    from sr3d_plugin.pointmap import choose_source

    name = args.source or "auto"
    if args.points:
        if name not in ("auto", "reconstruction"):
            raise SR3DInputError(f"--points goes with --source reconstruction, not --source {name}")
        name = "reconstruction"
    elif name == "auto" and args.depth_model:
        name = "depth_anything"
    elif name == "auto":
        name = choose_source(frames)
    options: dict[str, Any] = {}
    if name == "reconstruction":
        if not args.points:
            raise SR3DInputError("--source reconstruction needs --points FILE (.npz / .npy point maps)")
        options["path"] = args.points
        if args.min_confidence is not None:
            options["min_confidence"] = args.min_confidence
    elif args.min_confidence is not None:
        raise SR3DInputError("--min-confidence only applies to --source reconstruction")
    if name == "depth_anything":
        if args.depth_model:
            options["model"] = args.depth_model
        options["device"] = args.device
    elif args.depth_model:
        raise SR3DInputError(f"--depth-model only applies to --source depth_anything, not {name}")
    return name, options


def write_preview(path: str | Path, images: list, canonical: np.ndarray, valid: np.ndarray) -> tuple[int, int]:
    """Save a PNG of each frame beside its canonical point map (coloured by xyz), frames in a grid.

    Returns the ``(width, height)`` of the written image.
    """
    from PIL import Image

    from sr3d_plugin.io_utils import atomic_path
    from sr3d_plugin.pointmap import colour_pointmap

    v = len(images)
    cell_h = 240 if v == 1 else (160 if v <= 8 else 120)
    cols = max(1, math.ceil(math.sqrt(v)))
    rows = math.ceil(v / cols)
    w0, h0 = images[0].size
    cell_w = max(1, round(cell_h * w0 / h0))
    gap = 4
    sheet = Image.new("RGB", (cols * (2 * cell_w + 3 * gap), rows * (cell_h + gap) + gap), (32, 32, 32))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        x0 = c * (2 * cell_w + 3 * gap) + gap
        y0 = r * (cell_h + gap) + gap
        sheet.paste(im.convert("RGB").resize((cell_w, cell_h), Image.Resampling.BILINEAR), (x0, y0))
        pm = Image.fromarray(colour_pointmap(canonical[i], valid[i])).resize((cell_w, cell_h), Image.Resampling.NEAREST)
        sheet.paste(pm, (x0 + cell_w + gap, y0))
    out = Path(path)
    with atomic_path(out, suffix=".png") as tmp:
        sheet.save(tmp, format="PNG")
    return sheet.size


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from sr3d_plugin.io_utils import atomic_path
    from sr3d_plugin.pointmap import PointMapCache, default_cache_root, frame_token_positions, pointmaps_with_cache

    if args.grid <= 0:
        raise SR3DInputError(f"--grid must be positive, got {args.grid}")
    for flag, value in (("--out", args.out), ("--preview", args.preview)):
        if value and Path(value).is_dir():
            raise SR3DInputError(f"{flag} must be a file path, got a folder: {value!r}")
    cache_root = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_root()
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    stages = 3 + bool(args.out) + bool(args.preview)
    bar = tqdm(total=stages, file=sys.stderr, disable=args.quiet, desc="sr3d pointmap", unit="step", leave=False)
    try:
        with contextlib.ExitStack() as stack:
            scene_dir = None
            if args.synthetic is not None:
                bar.set_postfix_str("synthetic scene")
                t = time.perf_counter()
                synth_root = None if args.no_cache else cache_root.parent / "synthetic"
                scene_dir = stack.enter_context(_synthetic_scene(args.synthetic, synth_root))
                timings["synthetic"] = time.perf_counter() - t
            bar.set_postfix_str("read frames")
            t = time.perf_counter()
            frames = _read_frames(args, scene_dir)
            timings["read"] = time.perf_counter() - t
            bar.update()

            name, options = _source_and_options(args, frames)
            bar.set_postfix_str(f"point maps ({name})")
            cache = False if args.no_cache else PointMapCache(cache_root)
            result = pointmaps_with_cache(frames, name, canonical_mode=args.canonical, cache=cache, **options)
            timings.update(result.timings)
            bar.update()

            bar.set_postfix_str("token positions")
            t = time.perf_counter()
            pm = result.pointmaps
            canonical = result.canonical
            valid = pm.valid
            tokens = frame_token_positions(canonical, grid=args.grid)
            timings["tokens"] = time.perf_counter() - t
            bar.update()

            canon_np = canonical.numpy()
            valid_np = valid.numpy()
            if args.out:
                bar.set_postfix_str("write")
                t = time.perf_counter()
                arrays = {
                    "xyz": pm.xyz.numpy(),
                    "valid": valid_np,
                    "canonical": canon_np,
                    "token_positions": tokens.numpy(),
                    "frame_ids": np.asarray(frames.frame_ids, dtype=str),
                    "space": np.asarray(pm.space),
                    "canonical_mode": np.asarray(result.canonical_mode),
                    "source": np.asarray(name),
                }
                if pm.confidence is not None:
                    arrays["confidence"] = pm.confidence.numpy()
                if frames.cam_to_world is not None:
                    arrays["cam_to_world"] = np.asarray(frames.cam_to_world)
                out = Path(args.out).expanduser()
                with atomic_path(out, suffix=".npz") as tmp, open(tmp, "wb") as fh:
                    np.savez(fh, **arrays)
                timings["write"] = time.perf_counter() - t
                bar.update()
            if args.preview:
                bar.set_postfix_str("preview")
                t = time.perf_counter()
                write_preview(Path(args.preview).expanduser(), frames.images, canon_np, valid_np)
                timings["preview"] = time.perf_counter() - t
                bar.update()
    finally:
        bar.close()
    timings["total"] = time.perf_counter() - t_start

    sel = canon_np[valid_np] if valid_np.any() else canon_np.reshape(-1, 3)
    summary = {
        "input": {
            "kind": next(k for k in ("scene", "image", "frames", "video", "synthetic") if getattr(args, k) is not None),
            "source_path": frames.source if args.synthetic is None else str(scene_dir),
        },
        "frames": len(frames),
        "frame_ids": list(frames.frame_ids),
        "image_size": list(frames.images[0].size),
        "source": name,
        "space": pm.space,
        "canonical_mode": result.canonical_mode,
        "shapes": {
            "xyz": list(pm.xyz.shape),
            "canonical": list(canonical.shape),
            "token_positions": list(tokens.shape),
        },
        "valid_fraction": float(valid_np.mean()),
        "canonical_bounds": {"min": sel.min(axis=0).tolist(), "max": sel.max(axis=0).tolist()},
        "cache": {
            "enabled": not args.no_cache,
            "hit": result.cache_hit,
            "path": None if result.cache_path is None else str(result.cache_path),
            "key": result.key or None,
        },
        "outputs": {
            "out": str(Path(args.out).expanduser()) if args.out else None,
            "preview": str(Path(args.preview).expanduser()) if args.preview else None,
        },
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }
    if args.json:
        print(json.dumps(summary))
    else:
        lo = ", ".join(f"{x:+.3f}" for x in summary["canonical_bounds"]["min"])
        hi = ", ".join(f"{x:+.3f}" for x in summary["canonical_bounds"]["max"])
        print(f"{len(frames)} frame(s) from {summary['input']['source_path']} via {name} ({pm.space})")
        print(
            f"point maps {tuple(pm.xyz.shape)}, valid {summary['valid_fraction']:.1%}, canonical mode {result.canonical_mode}"
        )
        print(f"canonical bounds min [{lo}] max [{hi}]")
        print(
            f"cache: {'hit' if result.cache_hit else ('off' if args.no_cache else 'miss')} ({result.cache_path or '-'})"
        )
        for label, value in summary["outputs"].items():
            if value:
                print(f"wrote {label}: {value}")
        print(f"done in {timings['total']:.2f} s")
    return 0
