"""Point-map pipeline (32 ScanNet-sized frames → canonical → tiles → token grid) vs a per-frame NumPy loop,
and the 3D PE's cost against a SigLIP-so400m-sized vision tower forward on one tile."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks._timing import best_of

DESCRIPTION = __doc__.replace("\n", " ")

ROT = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def _inputs(frames: int, height: int = 480, width: int = 640, seed: int = 0):
    rng = np.random.default_rng(seed)
    depth = rng.uniform(0.5, 5.0, size=(frames, height, width)).astype(np.float32)
    depth[:, :5] = 0.0  # a band of invalid pixels, as real sensors have
    k = np.array([[577.6, 0, 319.5], [0, 578.7, 239.5], [0, 0, 1]])
    poses = np.repeat(np.eye(4)[None], frames, axis=0)
    for v in range(frames):
        a = 2 * np.pi * v / frames
        poses[v, :3, :3] = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        poses[v, :3, 3] = [np.cos(a), np.sin(a), 1.5]
    return depth, k, poses


def _area_resize_numpy(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Adaptive average pooling (torch's "area" resize) with NumPy, one channel-last image."""
    h, w = img.shape[:2]
    rows = [(int(np.floor(i * h / out_h)), int(np.ceil((i + 1) * h / out_h))) for i in range(out_h)]
    cols = [(int(np.floor(j * w / out_w)), int(np.ceil((j + 1) * w / out_w))) for j in range(out_w)]
    # integral image for O(1) window sums
    integral = np.zeros((h + 1, w + 1, *img.shape[2:]), dtype=np.float64)
    integral[1:, 1:] = img.cumsum(0).cumsum(1)
    r0 = np.array([r[0] for r in rows])
    r1 = np.array([r[1] for r in rows])
    c0 = np.array([c[0] for c in cols])
    c1 = np.array([c[1] for c in cols])
    s = integral[r1][:, c1] - integral[r0][:, c1] - integral[r1][:, c0] + integral[r0][:, c0]
    area = ((r1 - r0)[:, None] * (c1 - c0)[None, :]).astype(np.float64)
    return s / area[..., None]


def numpy_loop(depth: np.ndarray, k: np.ndarray, poses: np.ndarray, tile: int = 448, grid: int = 32) -> np.ndarray:
    """The plain reference: one frame at a time with NumPy."""
    world = []
    for v in range(depth.shape[0]):
        h, w = depth[v].shape
        u, vv = np.meshgrid(np.arange(w), np.arange(h))
        z = depth[v].astype(np.float64)
        x = (u - k[0, 2]) * z / k[0, 0]
        y = (vv - k[1, 2]) * z / k[1, 1]
        cam = np.stack([x, y, z], axis=-1).reshape(-1, 3)
        pts = cam @ poses[v, :3, :3].T + poses[v, :3, 3]
        world.append((pts @ ROT).reshape(h, w, 3))
    lo = np.min([p.reshape(-1, 3).min(0) for p in world], axis=0)
    hi = np.max([p.reshape(-1, 3).max(0) for p in world], axis=0)
    out = []
    for p in world:
        can = 2 * (p - lo) / (hi - lo) - 1
        tiled = _area_resize_numpy(can, tile, tile)
        out.append(tiled.reshape(grid, tile // grid, grid, tile // grid, 3).mean(axis=(1, 3)))
    return np.stack(out)


def torch_pipeline(
    depth: np.ndarray, k: np.ndarray, poses: np.ndarray, tile: int = 448, grid: int = 32
) -> torch.Tensor:
    from sr3d_plugin.geometry import backproject, canonicalize
    from sr3d_plugin.pointmap import frame_token_positions

    pts = backproject(torch.from_numpy(depth), torch.from_numpy(k).float(), torch.from_numpy(poses).float())
    can = canonicalize(pts)
    return frame_token_positions(can, grid=grid, tile_size=tile)


def run(quick: bool = False) -> dict:
    frames = 8 if quick else 32
    depth, k, poses = _inputs(frames)
    ref = numpy_loop(depth, k, poses)
    ours = torch_pipeline(depth, k, poses).numpy()
    max_diff = float(np.abs(ref - ours).max())
    t_np = best_of(lambda: numpy_loop(depth, k, poses), 1 if quick else 2)
    t_torch = best_of(lambda: torch_pipeline(depth, k, poses), 2 if quick else 5)

    # PE vs a SigLIP-so400m-sized tower on one 448 tile (random weights)
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from sr3d_plugin.modeling import PositionEncoder3D

    cfg = SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27 if not quick else 4,
        num_attention_heads=16,
        image_size=448,
        patch_size=14,
    )
    tower = SiglipVisionModel(cfg).eval()
    pe = PositionEncoder3D(1152).eval()
    pixels = torch.randn(1, 3, 448, 448)
    xyz = torch.rand(1, 1024, 3) * 2 - 1
    with torch.no_grad():
        t_tower = best_of(lambda: tower(pixels, output_hidden_states=True), 1 if quick else 2)
        t_pe = best_of(lambda: pe(xyz), 5)
    return {
        "frames": frames,
        "numpy_loop_s": round(t_np, 3),
        "torch_pipeline_s": round(t_torch, 3),
        "speedup_vs_numpy": round(t_np / t_torch, 1),
        "max_abs_diff_vs_numpy": max_diff,
        "siglip_layers": cfg.num_hidden_layers,
        "vision_tower_one_tile_s": round(t_tower, 3),
        "pe_one_tile_ms": round(t_pe * 1000, 2),
        "pe_over_tower_ratio": round(t_pe / t_tower, 5),
        "threads": torch.get_num_threads(),
    }
