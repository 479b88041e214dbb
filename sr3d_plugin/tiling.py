"""Dynamic-resolution tiling shared by images, region masks and point maps.

An image is resized to the closest aspect-ratio grid of ``tile_size`` tiles (InternVL/VILA
"dynamic" rule, SR3D-FACTS §4) and cut row-major; a ``tile_size`` thumbnail of the whole image is
appended when there is more than one tile. Multi-view input is not tiled: every frame becomes one
tile. The *same* :class:`TileLayout` is applied to the image (bicubic, as PIL's ``resize``), to
region masks (nearest) and to point maps (area), so that token ``i`` of every tile, its 3D position
and its mask weight all come from the same pixels.

Masks and point maps are resized exactly as SR-REAL's ``mm_utils.dynamic_preprocess`` /
``process_xyz`` / ``process_mask`` do it with OpenCV: ``cv2.resize(..., INTER_AREA)`` for float
point maps (fractional area weights when both axes shrink; OpenCV's "area-mode" linear weights when
either axis grows) and ``cv2.INTER_NEAREST`` (``src = floor(dst · in/out)``) for uint8 masks. Both
are separable linear maps, reproduced here as small ``[out, in]`` matrices
(:func:`cv2_area_matrices`, :func:`cv2_nearest_indices`), so no OpenCV is needed at run time.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sr3d_plugin import _checks
from sr3d_plugin.errors import SR3DInputError

__all__ = [
    "TileLayout",
    "candidate_grids",
    "cv2_area_matrices",
    "cv2_nearest_indices",
    "frame_layout",
    "plan_tiles",
    "resize_area_cv2",
    "tile_array",
    "tile_grid",
    "tile_image",
    "tile_mask",
    "tile_pointmap",
]


#: most tiles per image :func:`candidate_grids` enumerates (VILA uses 12; the candidate set grows
#: with the cube of the limit)
MAX_TILES = 128
#: largest tile side in pixels (SigLIP uses 448)
MAX_TILE_SIZE = 4096
#: the interpolation modes :func:`tile_array` knows
TILE_MODES = ("cv2_area", "cv2_nearest", "area", "nearest", "nearest-exact", "bilinear", "bicubic")


def _check_size(width: int, height: int) -> None:
    bad = [v for v in (width, height) if isinstance(v, bool) or not isinstance(v, (int, np.integer))]
    if bad:
        raise SR3DInputError(f"image size must be integers, got width={width!r} height={height!r}")
    if width <= 0 or height <= 0:
        raise SR3DInputError(f"image size must be positive, got width={width} height={height}")


def _tile_size(tile_size: int) -> int:
    return _checks.integer(tile_size, "tile_size", minimum=1, maximum=MAX_TILE_SIZE)


def candidate_grids(min_tiles: int = 1, max_tiles: int = 12) -> list[tuple[int, int]]:
    """All ``(cols, rows)`` with ``min_tiles ≤ cols·rows ≤ max_tiles``, ordered as the reference orders them.

    The reference builds a Python ``set`` and sorts it by ``cols·rows``; ties in tile count keep
    the set's iteration order, which we reproduce by building the same set.
    """
    _checks.integer(min_tiles, "min_tiles", minimum=1)
    _checks.integer(max_tiles, "max_tiles", minimum=1, maximum=MAX_TILES)
    if min_tiles < 1 or max_tiles < min_tiles:
        raise SR3DInputError(f"tile limits must satisfy 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
    grids = {
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def tile_grid(
    width: int, height: int, min_tiles: int = 1, max_tiles: int = 12, tile_size: int = 448
) -> tuple[int, int]:
    """The ``(cols, rows)`` tile grid for an image of ``width × height`` pixels.

    Picks the candidate whose aspect ratio ``cols/rows`` is closest to ``width/height``; on an
    exact tie it moves to the later (larger) candidate when
    ``width·height > 0.5·tile_size²·cols·rows``.
    """
    _check_size(width, height)
    tile_size = _tile_size(tile_size)
    aspect = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


@dataclass(frozen=True)
class TileLayout:
    """How one image (or one frame) is cut into tiles.

    Attributes:
        cols, rows: grid of full-resolution tiles.
        tile_size: tile side in pixels (448 for SigLIP-so400m-448).
        thumbnail: whether a whole-image thumbnail tile is appended (only when ``cols·rows > 1``).
    """

    cols: int
    rows: int
    tile_size: int = 448
    thumbnail: bool = False

    def __post_init__(self) -> None:
        _checks.integer(self.cols, "cols", minimum=1, maximum=MAX_TILES)
        _checks.integer(self.rows, "rows", minimum=1, maximum=MAX_TILES)
        _tile_size(self.tile_size)
        if not isinstance(self.thumbnail, (bool, np.bool_)):
            raise SR3DInputError(f"thumbnail must be True or False, got {self.thumbnail!r}")

    @property
    def num_grid_tiles(self) -> int:
        return self.cols * self.rows

    @property
    def num_tiles(self) -> int:
        """Tiles fed to the vision tower, thumbnail included."""
        return self.cols * self.rows + int(self.thumbnail)

    @property
    def resized_size(self) -> tuple[int, int]:
        """``(width, height)`` the image is resized to before cutting."""
        return self.cols * self.tile_size, self.rows * self.tile_size

    def tile_boxes(self) -> list[tuple[int, int, int, int]]:
        """Row-major ``(x0, y0, x1, y1)`` crop boxes in the resized image (thumbnail excluded)."""
        s = self.tile_size
        return [
            ((i % self.cols) * s, (i // self.cols) * s, (i % self.cols + 1) * s, (i // self.cols + 1) * s)
            for i in range(self.cols * self.rows)
        ]

    def to_dict(self) -> dict:
        return {"cols": self.cols, "rows": self.rows, "tile_size": self.tile_size, "thumbnail": self.thumbnail}


def plan_tiles(
    width: int,
    height: int,
    min_tiles: int = 1,
    max_tiles: int = 12,
    tile_size: int = 448,
    use_thumbnail: bool = True,
) -> TileLayout:
    """The :class:`TileLayout` of a single image under the dynamic rule."""
    cols, rows = tile_grid(width, height, min_tiles, max_tiles, tile_size)
    if not isinstance(use_thumbnail, (bool, np.bool_)):
        raise SR3DInputError(f"use_thumbnail must be True or False, got {use_thumbnail!r}")
    return TileLayout(cols, rows, tile_size, thumbnail=use_thumbnail and cols * rows > 1)


def frame_layout(tile_size: int = 448) -> TileLayout:
    """The layout of one frame of multi-view / video input: a single tile, no thumbnail."""
    return TileLayout(1, 1, _tile_size(tile_size), thumbnail=False)


# ----------------------------------------------------------------------------------------------
# OpenCV-exact resizing (INTER_AREA for point maps, INTER_NEAREST for masks)
# ----------------------------------------------------------------------------------------------


_Taps = tuple[np.ndarray, np.ndarray]  # (source index [out, K] int64, weight [out, K] float64)


def _taps(rows: list[list[tuple[int, float]]]) -> _Taps:
    """Pack per-output ``[(source, weight), …]`` lists into ``[out, K]`` arrays (zero-weight padding)."""
    k = max(len(r) for r in rows)
    idx = np.zeros((len(rows), k), dtype=np.int64)
    wgt = np.zeros((len(rows), k), dtype=np.float64)
    for d, r in enumerate(rows):
        for j, (i, w) in enumerate(r):
            idx[d, j], wgt[d, j] = i, w
    return idx, wgt


def _area_axis(in_size: int, out_size: int) -> _Taps:
    """OpenCV's INTER_AREA decimation weights along one axis (``computeResizeAreaTab``; float32 weights)."""
    scale = in_size / out_size
    rows: list[list[tuple[int, float]]] = []
    for d in range(out_size):
        f1 = d * scale
        f2 = f1 + scale
        cell = min(scale, in_size - f1)
        s1, s2 = math.ceil(f1), math.floor(f2)
        s2 = min(s2, in_size - 1)
        s1 = min(s1, s2)
        r: list[tuple[int, float]] = []
        if s1 - f1 > 1e-3:
            r.append((s1 - 1, float(np.float32((s1 - f1) / cell))))
        r.extend((k, float(np.float32(1.0 / cell))) for k in range(s1, s2))
        if f2 - s2 > 1e-3:
            r.append((s2, float(np.float32(min(min(f2 - s2, 1.0), cell) / cell))))
        rows.append(r)
    return _taps(rows)


def _area_linear_axis(in_size: int, out_size: int) -> _Taps:
    """OpenCV's INTER_AREA weights when an axis is enlarged: linear with "area-mode" offsets."""
    inv_scale = out_size / in_size
    scale = 1.0 / inv_scale
    rows: list[list[tuple[int, float]]] = []
    for d in range(out_size):
        sx = math.floor(d * scale)
        fx = float(np.float32((d + 1) - (sx + 1) * inv_scale))
        fx = 0.0 if fx <= 0 else fx - math.floor(fx)
        if sx >= in_size - 1:
            sx, fx = in_size - 1, 0.0
        rows.append([(sx, float(np.float32(1.0 - fx))), (min(sx + 1, in_size - 1), float(np.float32(fx)))])
    return _taps(rows)


@functools.lru_cache(maxsize=64)
def _cv2_area_cached(in_h: int, in_w: int, out_h: int, out_w: int) -> tuple[_Taps, _Taps]:
    if in_h >= out_h and in_w >= out_w:  # OpenCV decimates by area only when no axis grows
        return _area_axis(in_h, out_h), _area_axis(in_w, out_w)
    return _area_linear_axis(in_h, out_h), _area_linear_axis(in_w, out_w)


def _hw(value: object, name: str) -> tuple[int, int]:
    if not isinstance(value, (tuple, list, torch.Size)) or len(value) != 2:
        raise SR3DInputError(f"{name} must be (height, width), got {_checks.describe(value)}")
    return _checks.integer(value[0], name, minimum=1), _checks.integer(value[1], name, minimum=1)


def _cv2_area_taps(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> tuple[_Taps, _Taps]:
    (ih, iw), (oh, ow) = _hw(in_hw, "in_hw"), _hw(out_hw, "size")
    if min(ih, iw, oh, ow) <= 0:
        raise SR3DInputError(f"cannot resize {tuple(in_hw)} to {tuple(out_hw)}; expected positive sizes")
    return _cv2_area_cached(ih, iw, oh, ow)


def _dense(taps: _Taps, in_size: int) -> torch.Tensor:
    idx, wgt = taps
    m = np.zeros((idx.shape[0], in_size), dtype=np.float64)
    np.add.at(m, (np.repeat(np.arange(idx.shape[0]), idx.shape[1]), idx.reshape(-1)), wgt.reshape(-1))
    return torch.from_numpy(m)


def cv2_area_matrices(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M_h [out_h, in_h], M_w [out_w, in_w])`` float64 with ``resized = M_h · X · M_wᵀ`` equal to
    ``cv2.resize(X, (out_w, out_h), interpolation=cv2.INTER_AREA)`` (SR-REAL resizes point maps so)."""
    th, tw = _cv2_area_taps(in_hw, out_hw)
    return _dense(th, int(in_hw[0])), _dense(tw, int(in_hw[1]))


def _sparse(taps: _Taps, in_size: int) -> torch.Tensor:
    """The ``[out, in]`` resize matrix of ``taps`` as a sparse COO tensor (float64)."""
    idx, wgt = taps
    rows = np.repeat(np.arange(idx.shape[0]), idx.shape[1])
    keep = wgt.reshape(-1) != 0
    ind = torch.from_numpy(np.stack([rows[keep], idx.reshape(-1)[keep]]))
    values = torch.from_numpy(wgt.reshape(-1)[keep])
    return torch.sparse_coo_tensor(ind, values, (idx.shape[0], in_size), check_invariants=True).coalesce()


def resize_area_cv2(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[C, H, W]`` → ``[C, h, w]`` exactly as OpenCV INTER_AREA (computed in float64, returned in x's dtype).

    Separable and sparse (a few source pixels per output pixel), so large images stay cheap.
    """
    x = _checks.as_tensor(x, "x", ndim=3)
    c, h, w = x.shape
    (oh, ow) = _hw(size, "size")
    th, tw = _cv2_area_taps((h, w), (oh, ow))
    s_h, s_w = _sparse(th, h).to(x.device), _sparse(tw, w).to(x.device)
    xd = x.to(torch.float64)
    y = torch.sparse.mm(s_h, xd.permute(1, 0, 2).reshape(h, c * w))  # [oh, C·W]
    y = y.reshape(oh, c, w).permute(2, 1, 0).reshape(w, c * oh)  # [W, C·oh]
    z = torch.sparse.mm(s_w, y)  # [ow, C·oh]
    return z.reshape(ow, c, oh).permute(1, 2, 0).contiguous().to(x.dtype)


def cv2_nearest_indices(in_size: int, out_size: int) -> torch.Tensor:
    """Source index of every output pixel under ``cv2.INTER_NEAREST``: ``min(floor(d · (1 / (out/in))), in − 1)``."""
    in_size = _checks.integer(in_size, "in_size", minimum=1)
    out_size = _checks.integer(out_size, "out_size", minimum=1)
    ifx = 1.0 / (out_size / in_size)
    idx = [min(math.floor(d * ifx), in_size - 1) for d in range(out_size)]
    return torch.tensor(idx, dtype=torch.long)


def _resize_cv2(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """``[C, H, W]`` resized to ``size = (h, w)`` with ``mode`` ``"cv2_area"`` or ``"cv2_nearest"``."""
    if mode == "cv2_area":
        return resize_area_cv2(x, size)
    rows = cv2_nearest_indices(x.shape[-2], size[0]).to(x.device)
    cols = cv2_nearest_indices(x.shape[-1], size[1]).to(x.device)
    return x[:, rows][:, :, cols]


# ----------------------------------------------------------------------------------------------
# applying a layout
# ----------------------------------------------------------------------------------------------


def tile_image(image: Image.Image, layout: TileLayout) -> list[Image.Image]:
    """Cut a PIL image into the layout's tiles (PIL bicubic resize, as the reference)."""
    if not isinstance(image, Image.Image):
        raise SR3DInputError(f"tile_image expects a PIL image, got {type(image).__name__}")
    _check_layout(layout)
    _check_size(*image.size)
    resized = image.resize(layout.resized_size, Image.Resampling.BICUBIC)
    tiles = [resized.crop(box) for box in layout.tile_boxes()]
    if layout.thumbnail:
        tiles.append(image.resize((layout.tile_size, layout.tile_size), Image.Resampling.BICUBIC))
    return tiles


def _check_layout(layout: object) -> None:
    if not isinstance(layout, TileLayout):
        raise SR3DInputError(f"layout must be a TileLayout (see plan_tiles), got {_checks.describe(layout)}")


def _as_channels_first(x: torch.Tensor) -> torch.Tensor:
    """``[H, W]`` → ``[1, H, W]``; ``[C, H, W]`` unchanged."""
    return x.unsqueeze(0) if x.dim() == 2 else x


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if mode in ("cv2_area", "cv2_nearest"):
        return _resize_cv2(x, size, mode)
    kwargs = {} if mode in ("area", "nearest", "nearest-exact") else {"align_corners": False}
    out = F.interpolate(x.unsqueeze(0), size=size, mode=mode, **kwargs)[0]
    if x.dtype != torch.float64 and not bool(torch.isfinite(out).all()) and bool(torch.isfinite(x).all()):
        # weighted sums of values near the dtype's maximum overflow it: interpolate in float64
        out = F.interpolate(x.to(torch.float64).unsqueeze(0), size=size, mode=mode, **kwargs)[0]
        out = out.clamp(float(x.min()), float(x.max())).to(x.dtype)
    return out


def _resize_and_cut(x: torch.Tensor, layout: TileLayout, mode: str) -> torch.Tensor:
    """``x`` ``[C, H, W]`` → ``[T, C, S, S]`` following ``layout``."""
    s = layout.tile_size
    width, height = layout.resized_size
    big = _resize(x, (height, width), mode)
    c = big.shape[0]
    tiles = big.reshape(c, layout.rows, s, layout.cols, s).permute(1, 3, 0, 2, 4).reshape(-1, c, s, s)
    if layout.thumbnail:
        thumb = _resize(x, (s, s), mode).unsqueeze(0)
        tiles = torch.cat([tiles, thumb], dim=0)
    return tiles


def tile_array(x: torch.Tensor, layout: TileLayout, mode: str = "cv2_area") -> torch.Tensor:
    """Cut a ``[C, H, W]`` float array into ``[T, C, S, S]`` tiles.

    ``mode``: ``cv2_area`` (OpenCV INTER_AREA, the reference's point-map resize), ``cv2_nearest``
    (OpenCV INTER_NEAREST, its mask resize), or a torch ``interpolate`` mode (``area``, ``nearest``,
    ``nearest-exact``, ``bilinear``).
    """
    x = _checks.as_tensor(x, "x", ndim=3)
    _check_layout(layout)
    if mode not in TILE_MODES:
        raise SR3DInputError(f"unknown mode {mode!r}; expected one of {', '.join(TILE_MODES)}")
    return _resize_and_cut(x, layout, mode)


def tile_mask(mask: torch.Tensor | np.ndarray, layout: TileLayout) -> torch.Tensor:
    """Cut binary masks into the layout's tiles with OpenCV INTER_NEAREST resizing (as the reference).

    Args:
        mask: ``[H, W]`` or ``[M, H, W]`` boolean (or 0/1) masks on the original image.

    Returns:
        ``[T, S, S]`` or ``[T, M, S, S]`` bool tiles (``T = layout.num_tiles``).
    """
    m = _checks.as_mask(mask, "mask")
    single = m.dim() == 2
    if m.dim() not in (2, 3) or 0 in tuple(m.shape):
        raise SR3DInputError(f"mask must be [H, W] or [M, H, W] with H, W >= 1, got shape {tuple(m.shape)}")
    _check_layout(layout)
    x = _as_channels_first(m).to(torch.float32)
    tiles = _resize_and_cut(x, layout, "cv2_nearest") > 0.5
    return tiles[:, 0] if single else tiles


def tile_pointmap(
    points: torch.Tensor | np.ndarray,
    layout: TileLayout,
    valid: torch.Tensor | np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cut a point map into the layout's tiles with OpenCV INTER_AREA resizing (as the reference).

    Args:
        points: ``[H, W, 3]`` point map aligned with the image (any units).
        valid: optional ``[H, W]`` bool mask; returned tiled (area fraction) for valid-aware pooling.

    Returns:
        ``(tiles [T, S, S, 3], valid_fraction [T, S, S] or None)``.
    """
    p = _checks.as_tensor(points, "points", shape=(None, None, 3))
    _check_layout(layout)
    tiles = _resize_and_cut(p.permute(2, 0, 1), layout, "cv2_area").permute(0, 2, 3, 1)
    frac = None
    if valid is not None:
        v = _checks.as_mask(valid, "valid", tuple(p.shape[:2]))
        w = v.to(p.dtype).unsqueeze(0)
        num = _resize_and_cut(p.permute(2, 0, 1) * w, layout, "cv2_area").permute(0, 2, 3, 1)
        frac = _resize_and_cut(w, layout, "cv2_area")[:, 0]
        tiles = torch.where(frac.unsqueeze(-1) > 0, num / frac.clamp_min(1e-12).unsqueeze(-1), torch.zeros_like(num))
    return tiles, frac
