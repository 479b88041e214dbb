"""The point-map pipeline: frames → point maps (any registered source) → canonical space → token grid.

SR3D-FACTS §2–3: every frame (multi-view) or tile (single image) gets a ``448×448×3`` point map that
is area-averaged onto the ``32×32`` token grid of the vision tower; multi-view frames share one
canonical ``[−1, 1]³`` space (min/max over all frames). Point maps are expensive for long scans and
estimated depth, so :class:`PointMapCache` keeps them on disk as ``.npz`` under a key derived from
the input files (paths, sizes, modification times), the source and its options, the canonical mode
and :data:`PIPELINE_VERSION`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sr3d_plugin import _checks
from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.geometry import pool_to_grid
from sr3d_plugin.io_utils import atomic_path, stable_hash, warn_cache_write_failed
from sr3d_plugin.sources.base import FrameSet, PointMaps
from sr3d_plugin.tiling import TileLayout, tile_pointmap

__all__ = [
    "PIPELINE_VERSION",
    "PointMapCache",
    "PointMapResult",
    "canonical_pointmaps",
    "centre_token_positions",
    "choose_source",
    "colour_pointmap",
    "compute_pointmaps",
    "default_cache_root",
    "frame_token_positions",
    "image_token_positions",
    "input_identity",
    "make_source",
    "pointmaps_with_cache",
]

#: bump when the numbers a source or the canonicalisation produce change (invalidates caches)
PIPELINE_VERSION = 1


def colour_pointmap(canonical: Any, valid: Any = None) -> np.ndarray:
    """``[H, W, 3]`` canonical coordinates (in [-1, 1]) → ``[H, W, 3]`` uint8 RGB, ``(c + 1) / 2``.

    ``valid`` (``[H, W]`` bool, optional) paints invalid pixels black. Accepts tensors or arrays.
    """
    c = _checks.as_array(canonical, "canonical", ndim=3)
    if c.shape[-1] != 3:
        raise SR3DInputError(f"canonical must be [H, W, 3], got shape {c.shape}")
    rgb = np.clip((c + 1.0) / 2.0, 0.0, 1.0) * 255.0
    if valid is not None:
        v = _checks.as_mask(valid, "valid", c.shape[:2]).numpy()
        rgb = np.where(v[..., None], rgb, 0.0)
    return rgb.round().astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------


def choose_source(frames: FrameSet) -> str:
    """The point-map source that suits what the frames carry.

    ``gt_depth`` with depth + intrinsics (+ poses, or a single frame: its camera frame, i.e. the
    identity pose); ``relative_depth`` with depth only; ``depth_anything`` (monocular estimate)
    without depth. Several frames with metric depth and intrinsics but no poses are refused: their
    back-projections cannot share one world frame, and reading them as single-view relative depth
    would silently drop the metric geometry that was given.
    """
    if not isinstance(frames, FrameSet):
        raise SR3DInputError(f"frames must be a FrameSet, got {_checks.describe(frames)}")
    if frames.depth is not None and frames.intrinsics is not None and frames.cam_to_world is None and len(frames) > 1:
        raise SR3DInputError(
            f"{len(frames)} frames have metric depth and intrinsics but no camera poses; back-projecting them "
            "into one world frame needs poses= (one camera-to-world 4×4 per frame), or a point-map source "
            "(points=, a reconstruction); for single-view relative depth pass source='relative_depth'"
        )
    if (
        frames.depth is not None
        and frames.intrinsics is not None
        and (frames.cam_to_world is not None or len(frames) == 1)
    ):
        return "gt_depth"
    if frames.depth is not None:
        return "relative_depth"
    return "depth_anything"


def make_source(source_name: str, **options: Any) -> Any:
    """Instantiate a registered point-map source (``"auto"`` is not resolved here)."""
    from sr3d_plugin import plugins

    return plugins.create("pointmap_sources", source_name, **options)


def compute_pointmaps(frames: FrameSet, source_name: str = "auto", **options: Any) -> PointMaps:
    """Point maps of ``frames`` from the registered source ``source_name`` (``"auto"``: :func:`choose_source`).

    Returns:
        :class:`PointMaps` — ``xyz [V, H, W, 3]`` (metres or file units in ``space="world"``;
        ``[−1, 1]³`` in ``space="single_view"``), ``valid [V, H, W]``.
    """
    if not isinstance(frames, FrameSet):
        raise SR3DInputError(f"compute_pointmaps expects a FrameSet, got {type(frames).__name__}")
    name = choose_source(frames) if source_name in (None, "auto") else source_name
    pm = make_source(name, **options).pointmaps(frames)
    if not isinstance(pm, PointMaps):
        raise SR3DInputError(f"point-map source {name!r} returned {type(pm).__name__}; expected PointMaps")
    if len(pm) != len(frames):
        raise SR3DInputError(f"point-map source {name!r} returned {len(pm)} point maps for {len(frames)} frames")
    return pm


def canonical_pointmaps(pm: PointMaps, mode: str | None = None) -> torch.Tensor:
    """``[V, H, W, 3]`` canonical coordinates shared by all frames (SR3D-FACTS §3).

    ``mode``: ``"sr3d"`` (released convention: min/max over all pixels, invalid ones included) or
    ``"robust"`` (valid pixels only; invalid pixels set to 0); default the source's suggestion.
    Single-view point maps are already canonical and are returned unchanged.
    """
    if mode is not None and mode not in ("sr3d", "robust"):
        raise SR3DInputError(f"unknown canonical mode {mode!r}; expected 'sr3d' or 'robust'")
    return pm.canonical(mode).to(torch.float32)


# ----------------------------------------------------------------------------------------------
# token grids
# ----------------------------------------------------------------------------------------------


def _as_tensor(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    return _checks.as_tensor(x, name)


def _area_matrix(in_size: int, out_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[out, in]`` matrix of torch's ``area`` (adaptive average) resize along one axis."""
    i = torch.arange(out_size, dtype=torch.float64)
    start = torch.floor(i * in_size / out_size).to(torch.int64)
    end = torch.ceil((i + 1) * in_size / out_size).to(torch.int64)
    cols = torch.arange(in_size).view(1, -1)
    inside = (cols >= start.view(-1, 1)) & (cols < end.view(-1, 1))
    mat = inside.to(torch.float64) / (end - start).view(-1, 1).to(torch.float64)
    return mat.to(device=device, dtype=dtype)


def _cv2_then_pool_matrices(
    in_hw: tuple[int, int], tile: int, grid: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([grid, H], [grid, W])``: OpenCV INTER_AREA resize ``H×W → tile²`` (SR-REAL's ``process_xyz``)
    followed by area pooling ``tile → grid`` (its ``encode_images``), one matrix per axis."""
    from sr3d_plugin.tiling import cv2_area_matrices

    m_h, m_w = cv2_area_matrices(in_hw, (tile, tile))
    pool = _area_matrix(tile, grid, torch.float64, torch.device("cpu"))
    return (pool @ m_h).to(device=device, dtype=dtype), (pool @ m_w).to(device=device, dtype=dtype)


def frame_token_positions(
    canonical: torch.Tensor | np.ndarray,
    valid: torch.Tensor | np.ndarray | None = None,
    grid: int = 32,
    tile_size: int = 448,
    return_coverage: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """3D positions of the vision tokens of multi-view frames (one tile per frame, SR3D-FACTS §2).

    Each frame's map is resized to ``tile_size²`` with OpenCV's INTER_AREA weights (as SR-REAL's
    ``process_xyz`` does) and then area-pooled to the ``grid²`` token grid, row-major, for all frames at once. Without
    ``valid`` every pixel counts (the reference); with ``valid`` each token averages only valid
    pixels (tokens without any valid pixel get 0).

    Args:
        canonical: ``[V, H, W, 3]`` canonical point maps (any resolution and aspect ratio).
        valid: optional ``[V, H, W]`` bool mask.
        grid: token grid side (32 for SigLIP-so400m at 448 px).
        tile_size: tile side in pixels.
        return_coverage: also return the fraction of valid pixels per token.

    Returns:
        ``[V, grid, grid, 3]`` float (and ``[V, grid, grid]`` coverage).
    """
    c = _as_tensor(canonical, "canonical")
    if c.dim() != 4 or c.shape[-1] != 3:
        raise SR3DInputError(f"canonical point maps must be [V, H, W, 3], got shape {tuple(c.shape)}")
    grid = _checks.integer(grid, "grid", minimum=1)
    tile_size = _checks.integer(tile_size, "tile_size", minimum=1, maximum=4096)
    if grid <= 0 or tile_size < grid:
        raise SR3DInputError(f"need 0 < grid <= tile_size, got grid={grid} tile_size={tile_size}")
    # the resize to the tile followed by area pooling to the grid is separable and linear:
    # tokens = M_h · X · M_wᵀ with M = pool(tile→grid) · cv2_area(in→tile); two small matmuls per map
    out_dtype = c.dtype
    c = c.to(torch.float64)  # the reference resizes float64 point maps; keep that precision until the end
    x = c.permute(0, 3, 1, 2)
    m_h, m_w = _cv2_then_pool_matrices((c.shape[1], c.shape[2]), tile_size, grid, c.dtype, c.device)
    if valid is None:
        out = m_h @ (x @ m_w.T)
        cover = torch.ones((c.shape[0], grid, grid), dtype=c.dtype, device=c.device)
    else:
        m = _checks.as_mask(valid, "valid", tuple(c.shape[:3])).to(device=c.device, dtype=c.dtype)
        w = m.unsqueeze(1)
        num = m_h @ ((x * w) @ m_w.T)
        den = m_h @ (w @ m_w.T)
        out = torch.where(den > 0, num / den.clamp_min(torch.finfo(c.dtype).tiny), torch.zeros_like(num))
        cover = den[:, 0]
    pos = out.permute(0, 2, 3, 1).contiguous().to(out_dtype)
    cover = cover.to(out_dtype)
    return (pos, cover) if return_coverage else pos


def centre_token_positions(
    points: torch.Tensor | np.ndarray,
    layout: TileLayout,
    grid: int,
    valid: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """3D positions of the vision tokens of one image, sampled at the token centres (``token_point_sampling="center"``).

    The point map goes through exactly the operations a region mask goes through in the processor:
    nearest-neighbour tiling (OpenCV INTER_NEAREST, :func:`sr3d_plugin.tiling.tile_mask`'s resize),
    then a bilinear resize to the token grid (:func:`sr3d_plugin.modeling.region_extractor.mask_weights`),
    which reads each token at its patch's centre. A token that a region's mask selects therefore gets
    a position on that region's surface, where area pooling (:func:`image_token_positions`, the
    released convention) would average it with the background sharing its patch: for an object
    covering a patch or two, a point in mid-air metres behind it.

    Args:
        points: ``[H, W, 3]`` point map aligned with the image.
        layout: the image's :class:`~sr3d_plugin.tiling.TileLayout` (one tile for a multi-view frame).
        grid: token grid side.
        valid: optional ``[H, W]`` bool mask; invalid points get no weight (tokens with none: 0).

    Returns:
        ``[T, grid, grid, 3]`` with ``T = layout.num_tiles``.
    """
    from sr3d_plugin.tiling import tile_array

    p = _as_tensor(points, "points")
    if p.dim() != 3 or p.shape[-1] != 3:
        raise SR3DInputError(f"point map must be [H, W, 3], got shape {tuple(p.shape)}")
    grid = _checks.integer(grid, "grid", minimum=1, maximum=4096)
    x = p.to(torch.float32).permute(2, 0, 1)
    if valid is None:
        tiles = tile_array(x, layout, "cv2_nearest")
        out = F.interpolate(tiles, size=(grid, grid), mode="bilinear", align_corners=False)
    else:
        w = _checks.as_mask(valid, "valid", tuple(p.shape[:2])).to(torch.float32).unsqueeze(0)
        num = F.interpolate(
            tile_array(x * w, layout, "cv2_nearest"), size=(grid, grid), mode="bilinear", align_corners=False
        )
        den = F.interpolate(
            tile_array(w, layout, "cv2_nearest"), size=(grid, grid), mode="bilinear", align_corners=False
        )
        out = torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))
    return out.permute(0, 2, 3, 1).contiguous().to(p.dtype)


def image_token_positions(
    points: torch.Tensor | np.ndarray,
    layout: TileLayout,
    grid: int = 32,
    valid: torch.Tensor | np.ndarray | None = None,
    return_coverage: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """3D positions of the vision tokens of one tiled image (SR3D-FACTS §2–4).

    The point map is tiled exactly like the image (:func:`sr3d_plugin.tiling.tile_pointmap`, area
    interpolation, thumbnail last) and each tile area-pooled to the token grid
    (:func:`sr3d_plugin.geometry.pool_to_grid`).

    Args:
        points: ``[H, W, 3]`` (single-view or canonical) point map aligned with the image.
        layout: the image's :class:`~sr3d_plugin.tiling.TileLayout`.
        grid: token grid side.
        valid: optional ``[H, W]`` bool mask (valid-weighted averages).

    Returns:
        ``[T, grid, grid, 3]`` with ``T = layout.num_tiles`` (and ``[T, grid, grid]`` coverage).
    """
    p = _as_tensor(points, "points")
    if p.dim() != 3 or p.shape[-1] != 3:
        raise SR3DInputError(f"point map must be [H, W, 3], got shape {tuple(p.shape)}")
    grid = _checks.integer(grid, "grid", minimum=1, maximum=4096)
    tiles, frac = tile_pointmap(p, layout, valid)
    if frac is None:
        pos, cover = pool_to_grid(tiles, grid)
    else:
        w = frac.to(tiles.dtype).unsqueeze(1)
        x = tiles.permute(0, 3, 1, 2)
        num = F.adaptive_avg_pool2d(x * w, grid)
        den = F.adaptive_avg_pool2d(w, grid)
        pooled = torch.where(den > 0, num / den.clamp_min(torch.finfo(tiles.dtype).tiny), torch.zeros_like(num))
        pos, cover = pooled.permute(0, 2, 3, 1).contiguous(), den[:, 0]
    return (pos, cover) if return_coverage else pos


# ----------------------------------------------------------------------------------------------
# cache
# ----------------------------------------------------------------------------------------------


def default_cache_root() -> Path:
    """``$SR3D_CACHE/pointmaps`` when ``SR3D_CACHE`` is set, else ``~/.cache/sr3d/pointmaps``."""
    base = os.environ.get("SR3D_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "sr3d"
    return root / "pointmaps"


def input_identity(frames: FrameSet) -> dict[str, Any]:
    """What identifies the input of a frame set for caching.

    Frames read from files (``meta["input_files"]``) are identified by each file's resolved path,
    size and modification time, plus the frame ids and the reader's options; in-memory frames by a
    SHA-256 of their pixels and geometry.
    """
    files = frames.meta.get("input_files")
    ident: dict[str, Any] = {"frame_ids": list(frames.frame_ids), "reader": frames.meta.get("reader")}
    if files:
        try:
            ident["files"] = [
                [str(Path(f).resolve()), Path(f).stat().st_size, Path(f).stat().st_mtime_ns] for f in files
            ]
        except OSError as exc:
            raise SR3DInputError(f"input file vanished while computing its cache key: {exc}") from exc
        return ident
    h = hashlib.sha256()
    for im in frames.images:
        h.update(f"{im.mode}{im.size}".encode())
        h.update(im.tobytes())
    for name in ("depth", "intrinsics", "cam_to_world"):
        arr = getattr(frames, name)
        h.update(name.encode())
        if arr is not None:
            a = np.ascontiguousarray(arr)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
    ident["content_sha256"] = h.hexdigest()
    return ident


@dataclass
class PointMapResult:
    """Point maps with their canonical coordinates and where they came from.

    Attributes:
        pointmaps: the source's :class:`PointMaps`.
        canonical: ``[V, H, W, 3]`` float32 canonical coordinates.
        canonical_mode: mode actually used (``"single_view"`` for single-view maps).
        source: the point-map source name.
        cache_hit: whether the result was read from the cache.
        cache_path: the cache file (None without a cache).
        key: the cache key.
        timings: seconds per stage.
    """

    pointmaps: PointMaps
    canonical: torch.Tensor
    canonical_mode: str
    source: str
    cache_hit: bool = False
    cache_path: Path | None = None
    key: str = ""
    timings: dict[str, float] = field(default_factory=dict)


class PointMapCache:
    """On-disk cache of point maps and their canonical coordinates (one ``.npz`` per key).

    Args:
        root: cache folder (default :func:`default_cache_root`).

    Files are written atomically; a file that cannot be read back (truncated, corrupt, wrong
    layout) is reported with a warning, removed and recomputed — never an error.
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_root()

    def key(self, frames: FrameSet, source_name: str, options: dict[str, Any], canonical_mode: str | None) -> str:
        """Cache key of (input identity, source, options, canonical mode, pipeline version)."""
        return stable_hash(
            {
                "input": input_identity(frames),
                "source": source_name,
                "options": options,
                "canonical_mode": canonical_mode or "default",
                "version": PIPELINE_VERSION,
            },
            length=32,
        )

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def load(self, key: str) -> tuple[PointMaps, torch.Tensor, str] | None:
        """``(pointmaps, canonical, canonical_mode)`` for ``key``, or None on a miss or a corrupt file."""
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            with np.load(p, allow_pickle=False) as data:
                info = json.loads(str(data["info"]))
                xyz = torch.from_numpy(np.ascontiguousarray(data["xyz"], dtype=np.float32))
                valid = torch.from_numpy(np.ascontiguousarray(data["valid"]).astype(bool))
                conf = (
                    torch.from_numpy(np.ascontiguousarray(data["confidence"], dtype=np.float32))
                    if "confidence" in data.files
                    else None
                )
                canonical = torch.from_numpy(np.ascontiguousarray(data["canonical"], dtype=np.float32))
            if info.get("key") != key or info.get("version") != PIPELINE_VERSION:
                raise ValueError(f"file holds key {info.get('key')!r} version {info.get('version')!r}")
            pm = PointMaps(
                xyz=xyz, valid=valid, confidence=conf, space=info["space"], canonical_mode=info["source_mode"]
            )
            if tuple(canonical.shape) != tuple(xyz.shape):
                raise ValueError(f"canonical shape {tuple(canonical.shape)} != xyz shape {tuple(xyz.shape)}")
            return pm, canonical, str(info["canonical_mode"])
        except Exception as exc:  # a corrupt cache entry must never break a run
            warnings.warn(f"point-map cache file {p} is unreadable ({exc}); recomputing", RuntimeWarning, stacklevel=2)
            try:
                p.unlink()
            except OSError:
                pass
            return None

    def save(
        self, key: str, pm: PointMaps, canonical: torch.Tensor, canonical_mode: str, extra: dict | None = None
    ) -> Path:
        """Write one entry atomically; returns its path."""
        p = self.path(key)
        info = {
            "key": key,
            "version": PIPELINE_VERSION,
            "space": pm.space,
            "source_mode": pm.canonical_mode,
            "canonical_mode": canonical_mode,
            **(extra or {}),
        }
        arrays: dict[str, np.ndarray] = {
            "xyz": pm.xyz.detach().cpu().numpy().astype(np.float32),
            "valid": pm.valid.detach().cpu().numpy().astype(bool),
            "canonical": canonical.detach().cpu().numpy().astype(np.float32),
            "info": np.asarray(json.dumps(info, default=str)),
        }
        if pm.confidence is not None:
            arrays["confidence"] = pm.confidence.detach().cpu().numpy().astype(np.float32)
        with atomic_path(p, suffix=".npz") as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        return p

    def clear(self) -> int:
        """Remove every cache file; returns how many were removed."""
        n = 0
        if self.root.is_dir():
            for f in self.root.glob("*/*.npz"):
                f.unlink(missing_ok=True)
                n += 1
        return n


def pointmaps_with_cache(
    frames: FrameSet,
    source_name: str = "auto",
    canonical_mode: str | None = None,
    cache: PointMapCache | str | os.PathLike | bool | None = True,
    **options: Any,
) -> PointMapResult:
    """Point maps + canonical coordinates of ``frames``, read from / written to the cache.

    Args:
        frames: the frame set.
        source_name: a registered point-map source or ``"auto"`` (:func:`choose_source`).
        canonical_mode: ``"sr3d"``, ``"robust"`` or None (the source's suggestion).
        cache: a :class:`PointMapCache`, a cache folder, ``True`` (default folder) or ``False`` / None (off).
        **options: passed to the source factory.
    """
    if canonical_mode is not None and canonical_mode not in ("sr3d", "robust"):
        raise SR3DInputError(f"unknown canonical mode {canonical_mode!r}; expected 'sr3d' or 'robust'")
    name = choose_source(frames) if source_name in (None, "auto") else source_name
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    source = make_source(name, **options)
    key_options = source.options() if hasattr(source, "options") else options
    store: PointMapCache | None
    if cache is True:
        store = PointMapCache()
    elif cache is False or cache is None:
        store = None
    elif isinstance(cache, PointMapCache):
        store = cache
    else:
        store = PointMapCache(cache)
    key = store.key(frames, name, key_options, canonical_mode) if store is not None else ""
    if store is not None:
        hit = store.load(key)
        timings["cache_lookup"] = time.perf_counter() - t0
        if hit is not None:
            pm, canonical, mode = hit
            if len(pm) == len(frames):
                return PointMapResult(pm, canonical, mode, name, True, store.path(key), key, timings)
    t1 = time.perf_counter()
    pm = source.pointmaps(frames)
    if not isinstance(pm, PointMaps) or len(pm) != len(frames):
        raise SR3DInputError(f"point-map source {name!r} did not return one point map per frame")
    timings["pointmaps"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    mode = "single_view" if pm.space == "single_view" else (canonical_mode or pm.canonical_mode)
    canonical = canonical_pointmaps(pm, None if mode == "single_view" else mode)
    timings["canonical"] = time.perf_counter() - t2
    path = None
    if store is not None:
        t3 = time.perf_counter()
        try:
            path = store.save(key, pm, canonical, mode, {"source": name, "frame_ids": list(frames.frame_ids)})
        except OSError as exc:  # SR3DDiskError included: the result is computed, a cache must not lose it
            warn_cache_write_failed(store.root, exc)
        timings["cache_write"] = time.perf_counter() - t3
    return PointMapResult(pm, canonical, mode, name, False, path, key, timings)
