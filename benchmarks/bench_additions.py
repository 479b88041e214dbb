"""SR-3D additions (point-map pooling + PE + region pooling) as a fraction of vision tower + projector
time on one tile at SigLIP-so400m / Qwen2-7B sizes (random weights, CPU), and Depth Anything V2
Small / Large forward times (the real cost for single images)."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks._timing import best_of

DESCRIPTION = __doc__.replace("\n", " ")


def _depth_anything(hidden: int, layers: int, heads: int, neck: list[int], features: int, out_idx: list[int]):
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        image_size=518,
        patch_size=14,
        out_indices=out_idx,
        reshape_hidden_states=False,
        apply_layernorm=True,
    )
    cfg = DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=hidden, neck_hidden_sizes=neck, fusion_hidden_size=features
    )
    return DepthAnythingForDepthEstimation(cfg).eval()


def run(quick: bool = False) -> dict:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from sr3d_plugin.geometry import canonicalize
    from sr3d_plugin.modeling import PositionEncoder3D, RegionExtractor, build_projector
    from sr3d_plugin.pointmap import image_token_positions
    from sr3d_plugin.tiling import plan_tiles

    c, h = 1152, 3584
    layers = 4 if quick else 27
    tower = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=c,
            intermediate_size=4304,
            num_hidden_layers=layers,
            num_attention_heads=16,
            image_size=448,
            patch_size=14,
        )
    ).eval()
    projector = build_projector("mlp_downsample_3x3_fix", c, h).eval()
    pe = PositionEncoder3D(c).eval()
    extractor = RegionExtractor(c, h).eval()
    pixels = torch.randn(1, 3, 448, 448)
    points = torch.rand(448, 448, 3) * 4
    layout = plan_tiles(448, 448)
    mask = torch.zeros(1, 1, 448, 448, dtype=torch.bool)
    mask[0, 0, 100:300, 150:260] = True
    with torch.no_grad():
        feats = tower(pixels, output_hidden_states=True).hidden_states[-2]

        def additions() -> None:
            xyz = image_token_positions(canonicalize(points), layout, grid=32).reshape(1, -1, 3)
            f = feats + pe(xyz)
            extractor(f, mask)

        reps = 3 if quick else 5
        t_tower = best_of(lambda: tower(pixels, output_hidden_states=True), 1 if quick else 2)
        t_proj = best_of(lambda: projector(feats), reps)
        t_points = best_of(lambda: image_token_positions(canonicalize(points), layout, grid=32), reps)
        xyz = torch.rand(1, 1024, 3)
        t_pe = best_of(lambda: pe(xyz), reps)
        t_region = best_of(lambda: extractor(feats, mask), reps)
        t_add = best_of(additions, reps)

        image = torch.randn(1, 3, 518, 518)
        small = _depth_anything(384, 12, 6, [48, 96, 192, 384], 64, [3, 6, 9, 12])
        t_small = best_of(lambda: small(image), 1 if quick else 2)
        if quick:
            t_large = float("nan")
        else:
            large = _depth_anything(1024, 24, 16, [256, 512, 1024, 1024], 256, [5, 12, 18, 24])
            t_large = best_of(lambda: large(image), 1)
    base = t_tower + t_proj
    return {
        "siglip_layers": layers,
        "vision_tower_s": round(t_tower, 3),
        "projector_s": round(t_proj, 4),
        "pointmap_pooling_ms": round(t_points * 1000, 2),
        "pe_ms": round(t_pe * 1000, 2),
        "region_pooling_ms": round(t_region * 1000, 2),
        "additions_total_ms": round(t_add * 1000, 2),
        "additions_fraction_of_tower_plus_projector": round(t_add / base, 5),
        "depth_anything_v2_small_518px_s": round(t_small, 3),
        "depth_anything_v2_large_518px_s": round(t_large, 3) if np.isfinite(t_large) else None,
        "threads": torch.get_num_threads(),
    }
