"""Dynamic-resolution tiling shared by images, region masks and point maps.

An image is resized to the closest aspect-ratio grid of ``tile_size`` tiles (InternVL/VILA
"dynamic" rule, SR3D-FACTS §4) and cut row-major; a ``tile_size`` thumbnail of the whole image is
appended when there is more than one tile. Multi-view input is not tiled: every frame becomes one
tile. The *same* :class:`TileLayout` is applied to the image (bicubic, as PIL's ``resize``), to
region masks (nearest) and to point maps (area), so that token ``i`` of every tile, its 3D position
and its mask weight all come from the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sr3d_plugin.errors import SR3DInputError

__all__ = [
    "TileLayout",
    "candidate_grids",
    "frame_layout",
    "plan_tiles",
    "tile_array",
    "tile_grid",
    "tile_image",
    "tile_mask",
    "tile_pointmap",
]


def _check_size(width: int, height: int) -> None:
    if not (isinstance(width, (int, np.integer)) and isinstance(height, (int, np.integer))):
        raise SR3DInputError(f"image size must be integers, got width={width!r} height={height!r}")
    if width <= 0 or height <= 0:
        raise SR3DInputError(f"image size must be positive, got width={width} height={height}")


def candidate_grids(min_tiles: int = 1, max_tiles: int = 12) -> list[tuple[int, int]]:
    """All ``(cols, rows)`` with ``min_tiles ≤ cols·rows ≤ max_tiles``, ordered as the reference orders them.

    The reference builds a Python ``set`` and sorts it by ``cols·rows``; ties in tile count keep
    the set's iteration order, which we reproduce by building the same set.
    """
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
    return TileLayout(cols, rows, tile_size, thumbnail=use_thumbnail and cols * rows > 1)


def frame_layout(tile_size: int = 448) -> TileLayout:
    """The layout of one frame of multi-view / video input: a single tile, no thumbnail."""
    return TileLayout(1, 1, tile_size, thumbnail=False)


# ----------------------------------------------------------------------------------------------
# applying a layout
# ----------------------------------------------------------------------------------------------


def tile_image(image: Image.Image, layout: TileLayout) -> list[Image.Image]:
    """Cut a PIL image into the layout's tiles (PIL bicubic resize, as the reference)."""
    if not isinstance(image, Image.Image):
        raise SR3DInputError(f"tile_image expects a PIL image, got {type(image).__name__}")
    _check_size(*image.size)
    resized = image.resize(layout.resized_size, Image.Resampling.BICUBIC)
    tiles = [resized.crop(box) for box in layout.tile_boxes()]
    if layout.thumbnail:
        tiles.append(image.resize((layout.tile_size, layout.tile_size), Image.Resampling.BICUBIC))
    return tiles


def _as_channels_first(x: torch.Tensor) -> torch.Tensor:
    """``[H, W]`` → ``[1, H, W]``; ``[C, H, W]`` unchanged."""
    return x.unsqueeze(0) if x.dim() == 2 else x


def _resize_and_cut(x: torch.Tensor, layout: TileLayout, mode: str) -> torch.Tensor:
    """``x`` ``[C, H, W]`` → ``[T, C, S, S]`` following ``layout``."""
    s = layout.tile_size
    width, height = layout.resized_size
    kwargs = {} if mode in ("area", "nearest-exact") else {"align_corners": False}
    big = F.interpolate(x.unsqueeze(0), size=(height, width), mode=mode, **kwargs)[0]
    c = big.shape[0]
    tiles = big.reshape(c, layout.rows, s, layout.cols, s).permute(1, 3, 0, 2, 4).reshape(-1, c, s, s)
    if layout.thumbnail:
        thumb = F.interpolate(x.unsqueeze(0), size=(s, s), mode=mode, **kwargs)
        tiles = torch.cat([tiles, thumb], dim=0)
    return tiles


def tile_array(x: torch.Tensor, layout: TileLayout, mode: str = "area") -> torch.Tensor:
    """Cut a ``[C, H, W]`` float array into ``[T, C, S, S]`` tiles (``mode``: ``area``, ``nearest-exact``, ``bilinear``)."""
    if x.dim() != 3:
        raise SR3DInputError(f"tile_array expects [C, H, W], got shape {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        x = x.to(torch.float32)
    return _resize_and_cut(x, layout, mode)


def tile_mask(mask: torch.Tensor | np.ndarray, layout: TileLayout) -> torch.Tensor:
    """Cut binary masks into the layout's tiles with nearest-neighbour resizing.

    Args:
        mask: ``[H, W]`` or ``[M, H, W]`` boolean (or 0/1) masks on the original image.

    Returns:
        ``[T, S, S]`` or ``[T, M, S, S]`` bool tiles (``T = layout.num_tiles``).
    """
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    single = m.dim() == 2
    if m.dim() not in (2, 3):
        raise SR3DInputError(f"mask must be [H, W] or [M, H, W], got shape {tuple(m.shape)}")
    x = _as_channels_first(m).to(torch.float32)
    tiles = _resize_and_cut(x, layout, "nearest-exact") > 0.5
    return tiles[:, 0] if single else tiles


def tile_pointmap(
    points: torch.Tensor | np.ndarray,
    layout: TileLayout,
    valid: torch.Tensor | np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cut a point map into the layout's tiles with area interpolation.

    Args:
        points: ``[H, W, 3]`` point map aligned with the image (any units).
        valid: optional ``[H, W]`` bool mask; returned tiled (area fraction) for valid-aware pooling.

    Returns:
        ``(tiles [T, S, S, 3], valid_fraction [T, S, S] or None)``.
    """
    p = torch.as_tensor(np.asarray(points) if not isinstance(points, torch.Tensor) else points)
    if p.dim() != 3 or p.shape[-1] != 3:
        raise SR3DInputError(f"point map must be [H, W, 3], got shape {tuple(p.shape)}")
    if not torch.is_floating_point(p):
        p = p.to(torch.float32)
    tiles = _resize_and_cut(p.permute(2, 0, 1), layout, "area").permute(0, 2, 3, 1)
    frac = None
    if valid is not None:
        v = torch.as_tensor(np.asarray(valid) if not isinstance(valid, torch.Tensor) else valid)
        if tuple(v.shape) != tuple(p.shape[:2]):
            raise SR3DInputError(f"valid mask shape {tuple(v.shape)} does not match point map {tuple(p.shape[:2])}")
        w = v.to(p.dtype).unsqueeze(0)
        num = _resize_and_cut(p.permute(2, 0, 1) * w, layout, "area").permute(0, 2, 3, 1)
        frac = _resize_and_cut(w, layout, "area")[:, 0]
        tiles = torch.where(frac.unsqueeze(-1) > 0, num / frac.clamp_min(1e-12).unsqueeze(-1), torch.zeros_like(num))
    return tiles, frac
