"""PositionEncoder3D, projectors and RegionExtractor: numerics and released key layout (SR3D-FACTS §1, §2, §5, §6)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sr3d_plugin.errors import SR3DConfigError, SR3DInputError
from sr3d_plugin.modeling import PositionEncoder3D, RegionExtractor, build_projector

RELEASED_PE_KEYS = {
    "layers.position_embedding_head.0.weight": (32, 51),
    "layers.position_embedding_head.0.bias": (32,),
    "layers.position_embedding_head.1.weight": (32,),
    "layers.position_embedding_head.1.bias": (32,),
    "layers.position_embedding_head.3.weight": (32, 32),
    "layers.position_embedding_head.3.bias": (32,),
}


def released_projector_keys(c: int, h: int) -> dict[str, tuple[int, ...]]:
    return {
        "layers.1.weight": (9 * c,),
        "layers.1.bias": (9 * c,),
        "layers.2.weight": (3 * c, 9 * c),
        "layers.2.bias": (3 * c,),
        "layers.4.weight": (3 * c,),
        "layers.4.bias": (3 * c,),
        "layers.5.weight": (h, 3 * c),
        "layers.5.bias": (h,),
        "layers.7.weight": (h, h),
        "layers.7.bias": (h,),
    }


def test_pe_encoding_order_and_values() -> None:
    pe = PositionEncoder3D(32)
    xyz = torch.rand(5, 3) * 2 - 1
    feats = pe.encode(xyz)
    assert feats.shape == (5, 51)
    for n in range(5):
        expected = []
        for c in xyz[n]:  # x block, then y, then z
            expected.append(float(c))
            expected += [math.sin(2.0**k * float(c)) for k in range(8)]
            expected += [math.cos(2.0**k * float(c)) for k in range(8)]
        assert torch.allclose(feats[n], torch.tensor(expected), atol=1e-5)


def test_pe_forward_is_the_mlp_on_the_encoding() -> None:
    pe = PositionEncoder3D(32)
    for p in pe.parameters():  # move away from the near-zero init so the check is meaningful
        torch.nn.init.normal_(p)
    xyz = torch.rand(2, 4, 3) * 2 - 1
    sd = pe.state_dict()
    x = pe.encode(xyz)
    h = x @ sd["layers.position_embedding_head.0.weight"].T + sd["layers.position_embedding_head.0.bias"]
    h = F.layer_norm(
        h, (32,), sd["layers.position_embedding_head.1.weight"], sd["layers.position_embedding_head.1.bias"]
    )
    h = F.gelu(h)
    h = h @ sd["layers.position_embedding_head.3.weight"].T + sd["layers.position_embedding_head.3.bias"]
    assert torch.allclose(pe(xyz), h, atol=1e-5)


def test_pe_keys_load_released_layout_and_init_is_tiny() -> None:
    pe = PositionEncoder3D(32)
    assert {k: tuple(v.shape) for k, v in pe.state_dict().items()} == RELEASED_PE_KEYS
    released = {k: torch.randn(shape) for k, shape in RELEASED_PE_KEYS.items()}
    pe.load_state_dict(released, strict=True)
    fresh = PositionEncoder3D(1152)
    w = fresh.layers.position_embedding_head[0].weight.detach()
    bound = 0.001 * math.sqrt(6 / (51 + 1152))  # xavier-uniform with gain 0.001
    assert float(w.abs().max()) <= bound + 1e-12 and float(w.abs().max()) > bound / 2
    out = fresh(torch.rand(10, 3) * 2 - 1).detach()
    assert float(out.abs().max()) < 1e-3


def reference_3x3(tokens: torch.Tensor) -> torch.Tensor:
    """Loop-by-loop statement of the 3×3 block concatenation with bottom/right zero padding."""
    n, length, c = tokens.shape
    side = math.isqrt(length)
    grid = tokens.reshape(n, side, side, c)
    out_side = -(-side // 3)
    out = torch.zeros(n, out_side * out_side, 9 * c)
    for i in range(out_side):
        for j in range(out_side):
            parts = []
            for dr in range(3):  # row offset outer
                for dc in range(3):  # column offset inner
                    r, cc = 3 * i + dr, 3 * j + dc
                    parts.append(grid[:, r, cc] if r < side and cc < side else torch.zeros(n, c))
            out[:, i * out_side + j] = torch.cat(parts, dim=-1)
    return out


@pytest.mark.parametrize("side", [32, 27, 10, 9])
def test_3x3_downsample_token_and_channel_order(side: int) -> None:
    proj = build_projector("mlp_downsample_3x3_fix", 8, 16)
    tokens = torch.randn(2, side * side, 8)
    down = proj.layers[0](tokens)
    assert torch.allclose(down, reference_3x3(tokens), atol=1e-6)
    out = proj(tokens)
    assert out.shape == (2, (-(-side // 3)) ** 2, 16)
    assert proj.tokens_out(side * side) == out.shape[1]


def test_3x3_projector_keys_equal_released_and_load_strict() -> None:
    proj = build_projector("mlp_downsample_3x3_fix", 8, 16)
    shapes = {k: tuple(v.shape) for k, v in proj.state_dict().items()}
    assert shapes == released_projector_keys(8, 16)
    proj.load_state_dict({k: torch.randn(s) for k, s in shapes.items()}, strict=True)
    assert proj.tokens_out(1024) == 121


def test_2x2_and_other_projectors() -> None:
    tokens = torch.randn(1, 25, 4)
    for kind in ("mlp_downsample_2x2_fix", "mlp_downsample"):
        proj = build_projector(kind, 4, 6)
        down = proj.layers[0](tokens)
        grid = torch.nn.functional.pad(tokens.reshape(1, 5, 5, 4), (0, 0, 0, 1, 0, 1))
        expected0 = torch.cat([grid[0, 0, 0], grid[0, 0, 1], grid[0, 1, 0], grid[0, 1, 1]])
        assert torch.allclose(down[0, 0], expected0)
        assert down.shape == (1, 9, 16)
        assert set(proj.state_dict()) == {f"layers.{i}.{p}" for i in (1, 2, 4) for p in ("weight", "bias")}
    lin = build_projector("linear", 4, 6)
    assert set(lin.state_dict()) == {"layers.weight", "layers.bias"}
    mlp = build_projector("mlp2x_gelu", 4, 6)
    assert set(mlp.state_dict()) == {"layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"}
    assert mlp(tokens).shape == (1, 25, 6)
    with pytest.raises(SR3DConfigError, match="unknown projector kind 'mlp_fancy'"):
        build_projector("mlp_fancy", 4, 6)
    with pytest.raises(SR3DInputError, match="square grid"):
        build_projector("mlp_downsample_3x3_fix", 4, 6)(torch.randn(1, 10, 4))


def test_region_extractor_keys_and_block_aligned_pooling_across_tiles() -> None:
    ext = RegionExtractor(8, 16)
    assert {k: tuple(v.shape) for k, v in ext.state_dict().items()} == {
        "projector.weight": (16, 8),
        "projector.bias": (16,),
    }
    ext.load_state_dict({"projector.weight": torch.randn(16, 8), "projector.bias": torch.randn(16)}, strict=True)
    feats = torch.randn(2, 1024, 8)  # two tiles of a 32×32 grid
    masks = torch.zeros(2, 1, 448, 448, dtype=torch.bool)
    # token-aligned blocks: tile 0 tokens (2,3) and (2,4); tile 1 token (10,10)
    masks[0, 0, 28:42, 42:70] = True
    masks[1, 0, 140:154, 140:154] = True
    pooled = ext.pool(feats, masks)
    expected = (feats[0, 2 * 32 + 3] + feats[0, 2 * 32 + 4] + feats[1, 10 * 32 + 10]) / 3
    assert torch.allclose(pooled[0], expected, atol=1e-5)
    out = ext(feats, masks)
    assert torch.allclose(out[0], ext.projector(expected), atol=1e-5)


def test_region_extractor_bilinear_weights_and_multiple_regions() -> None:
    ext = RegionExtractor(4, 4)
    feats = torch.randn(1, 1024, 4)
    masks = torch.zeros(1, 2, 448, 448)
    masks[0, 0, 100:300, 50:200] = 1
    masks[0, 1, 0:448, 0:448] = 1
    w = F.interpolate(masks[0, 0][None, None], size=(32, 32), mode="bilinear", align_corners=False).reshape(-1)
    w = w / (w.sum() + 1e-8)
    pooled = ext.pool(feats, masks)
    assert torch.allclose(pooled[0], w @ feats[0], atol=1e-5)
    assert torch.allclose(pooled[1], feats[0].mean(0), atol=1e-5)


def test_tiny_region_falls_back_to_area_weights() -> None:
    ext = RegionExtractor(4, 4)
    feats = torch.randn(1, 1024, 4)
    masks = torch.zeros(1, 1, 448, 448)
    masks[0, 0, 0:2, 0:2] = 1  # vanishes under bilinear sampling at stride 14
    pooled = ext.pool(feats, masks)
    assert torch.allclose(pooled[0], feats[0, 0], atol=1e-5)
    strict = RegionExtractor(4, 4, fallback_area=False)
    assert torch.allclose(strict.pool(feats, masks)[0], torch.zeros(4))  # the reference's zero vector


def test_region_extractor_dummy_gives_gradients() -> None:
    ext = RegionExtractor(4, 6)
    feats = torch.randn(1, 16, 4, requires_grad=True)
    loss = ext.dummy(feats)
    assert float(loss) == 0.0
    loss.backward()
    assert ext.projector.weight.grad is not None


def test_region_extractor_bad_shapes() -> None:
    ext = RegionExtractor(4, 4)
    with pytest.raises(SR3DInputError, match="same tiling"):
        ext(torch.randn(2, 16, 4), torch.zeros(3, 1, 8, 8))
    with pytest.raises(SR3DInputError, match=r"\[T, M, S, S\]"):
        ext(torch.randn(2, 16, 4), torch.zeros(2, 8, 8))
