"""Tile-grid rule (SR3D-FACTS §4) and identical tiling of images, masks and point maps."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.geometry import pool_to_grid
from sr3d_plugin.tiling import (
    TileLayout,
    frame_layout,
    plan_tiles,
    tile_grid,
    tile_image,
    tile_mask,
    tile_pointmap,
)


def brute_force_grid(width: int, height: int, lo: int, hi: int, tile: int = 448) -> tuple[int, int]:
    """Independent statement of the rule: collect every candidate, find all with the minimal ratio
    distance, then walk them in tile-count order applying the tie-break."""
    cands = [(c, r) for c in range(1, hi + 1) for r in range(1, hi + 1) if lo <= c * r <= hi]
    cands.sort(key=lambda g: g[0] * g[1])
    aspect = width / height
    diffs = [abs(aspect - c / r) for c, r in cands]
    best = min(diffs)
    tied = [g for g, d in zip(cands, diffs) if d == best]
    choice = tied[0]
    for c, r in tied[1:]:
        if width * height > 0.5 * tile * tile * c * r:
            choice = (c, r)
    return choice


def test_tile_grid_matches_brute_force_on_thousands_of_sizes() -> None:
    rng = random.Random(1234)
    sizes = [(rng.randint(1, 5000), rng.randint(1, 5000)) for _ in range(3000)]
    # exact ties: aspect exactly between two candidate ratios, at areas on both sides of the threshold
    for k in (1, 50, 100, 149, 150, 200, 300, 600):
        sizes += [(3 * k, 4 * k), (4 * k, 3 * k), (3 * k, 2 * k), (5 * k, 4 * k), (5 * k, 2 * k)]
    sizes += [(448, 448), (640, 480), (1296, 968), (1920, 1080), (1080, 1920), (1, 4000), (4000, 1)]
    for limits in ((1, 12), (1, 6), (2, 12), (1, 1)):
        for w, h in sizes:
            assert tile_grid(w, h, *limits) == brute_force_grid(w, h, *limits), (w, h, limits)


def test_tie_break_depends_on_area() -> None:
    # With at most 2 tiles, 3:4 lies exactly between 1:1 (diff 0.25) and 1:2 (diff 0.25); the later
    # candidate (1, 2) wins only when W·H > 0.5·448²·2 = 200704.
    assert tile_grid(300, 400, 1, 2) == (1, 1)  # area 120000
    assert tile_grid(600, 800, 1, 2) == (1, 2)  # area 480000
    assert tile_grid(400, 300, 1, 2) == (1, 1)  # 4:3 is not a tie (1.333 vs 1 and 2)


def test_plan_tiles_thumbnail_rule() -> None:
    one = plan_tiles(448, 448)
    assert (one.cols, one.rows, one.thumbnail, one.num_tiles) == (1, 1, False, 1)
    wide = plan_tiles(1920, 1080, max_tiles=12)
    assert wide.thumbnail and wide.num_tiles == wide.cols * wide.rows + 1
    assert frame_layout().num_tiles == 1 and not frame_layout().thumbnail


def test_tile_image_row_major_crops_and_thumbnail() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (500, 1100, 3), dtype=np.uint8))
    layout = plan_tiles(*img.size, max_tiles=6)
    tiles = tile_image(img, layout)
    assert len(tiles) == layout.num_tiles
    assert all(t.size == (448, 448) for t in tiles)
    resized = np.asarray(img.resize(layout.resized_size, Image.Resampling.BICUBIC))
    for i, tile in enumerate(tiles[: layout.num_grid_tiles]):
        r, c = divmod(i, layout.cols)
        np.testing.assert_array_equal(np.asarray(tile), resized[r * 448 : (r + 1) * 448, c * 448 : (c + 1) * 448])
    np.testing.assert_array_equal(np.asarray(tiles[-1]), np.asarray(img.resize((448, 448), Image.Resampling.BICUBIC)))


def _pixel_coordinate_map(height: int, width: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
    )
    return torch.stack([xs, ys, torch.zeros_like(xs)], dim=-1)


@pytest.mark.parametrize(
    "size,layout",
    [
        ((448, 448), TileLayout(1, 1, 448, False)),
        ((1000, 520), None),  # non-square grid with thumbnail
        ((640, 480), frame_layout()),  # a multi-view frame
    ],
)
def test_position_of_token_comes_from_pixels_under_it(size: tuple[int, int], layout: TileLayout | None) -> None:
    """PE alignment: a point map that stores pixel coordinates, tiled and pooled like the image, must
    give every token the coordinates of the pixels beneath it."""
    width, height = size
    layout = layout or plan_tiles(width, height, max_tiles=6)
    if size == (1000, 520):
        assert layout.num_grid_tiles > 1 and layout.thumbnail
    pts = _pixel_coordinate_map(height, width)
    tiles, _ = tile_pointmap(pts, layout)
    grid, _ = pool_to_grid(tiles, 32)
    assert grid.shape == (layout.num_tiles, 32, 32, 3)
    s = layout.tile_size
    for t in range(layout.num_tiles):
        thumb = layout.thumbnail and t == layout.num_tiles - 1
        if thumb:
            sx, sy, ox, oy = width / s, height / s, 0.0, 0.0
        else:
            r, c = divmod(t, layout.cols)
            sx, sy = width / (s * layout.cols), height / (s * layout.rows)
            ox, oy = c * s, r * s
        centers = torch.arange(32, dtype=torch.float64) * 14 + 7  # token centre in tile pixels
        exp_x = (ox + centers) * sx - 0.5
        exp_y = (oy + centers) * sy - 0.5
        tol = max(sx, sy) + 1e-6  # at most one resized pixel of slack, far below a token (14 px)
        assert torch.allclose(grid[t, 0, :, 0], exp_x, atol=tol), t
        assert torch.allclose(grid[t, :, 0, 1], exp_y, atol=tol), t


def test_mask_tiles_follow_image_tiles() -> None:
    width, height = 1000, 520
    layout = plan_tiles(width, height, max_tiles=6)
    mask = np.zeros((height, width), dtype=bool)
    mask[100:300, 600:900] = True
    img = Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB")
    img_tiles = tile_image(img, layout)
    mask_tiles = tile_mask(mask, layout)
    assert mask_tiles.shape == (layout.num_tiles, 448, 448) and mask_tiles.dtype == torch.bool
    for t in range(layout.num_tiles):
        bright = np.asarray(img_tiles[t])[..., 0] > 127
        agree = (bright == mask_tiles[t].numpy()).mean()
        assert agree > 0.99, (t, agree)  # only the resampled border may differ
    multi = tile_mask(np.stack([mask, ~mask]), layout)
    assert multi.shape == (layout.num_tiles, 2, 448, 448)
    assert torch.equal(multi[:, 0], mask_tiles)


def test_valid_aware_point_tiling_ignores_invalid_pixels() -> None:
    pts = torch.ones(64, 64, 3) * 5.0
    valid = torch.ones(64, 64, dtype=torch.bool)
    pts[:, :32] = 1000.0
    valid[:, :32] = False
    tiles, frac = tile_pointmap(pts, TileLayout(1, 1, 32), valid)
    assert frac is not None
    covered = frac > 0.999
    assert torch.allclose(tiles[covered], torch.full_like(tiles[covered], 5.0))
    assert float(tiles.max()) <= 5.0 + 1e-5


def test_bad_sizes_raise() -> None:
    with pytest.raises(SR3DInputError, match="positive"):
        tile_grid(0, 10)
    with pytest.raises(SR3DInputError, match="min_tiles"):
        tile_grid(10, 10, min_tiles=5, max_tiles=2)
    with pytest.raises(SR3DInputError, match="points must have shape"):
        tile_pointmap(torch.zeros(10, 10), frame_layout())
    with pytest.raises(SR3DInputError, match="valid has shape"):
        tile_pointmap(torch.zeros(10, 10, 3), frame_layout(), torch.ones(5, 5, dtype=torch.bool))
