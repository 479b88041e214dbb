"""The slice-then-stitch region extractor (``region_extractor/``, type ``regiongpt``).

A region mask is tiled exactly like its image (or split over the frames that carry it). Each
tile's mask is bilinearly resized to the token grid (``align_corners=False``); the weights of all
tiles are concatenated, normalised to sum 1 (+1e-8), and used to average the PE-augmented vision
tokens; one ``Linear(C→H)`` (key ``projector``) turns the pooled vector into one LLM embedding —
the embedding that replaces one ``<mask>`` token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sr3d_plugin.errors import SR3DInputError

__all__ = ["RegionExtractor", "mask_weights"]


def mask_weights(masks: torch.Tensor, grid: int | tuple[int, int], fallback_area: bool = True) -> torch.Tensor:
    """Per-token pooling weights of region masks.

    Args:
        masks: ``[T, M, S, S]`` tile masks (bool or float) of ``M`` regions over ``T`` tiles/frames.
        grid: token grid ``g`` (or ``(gh, gw)``), e.g. 32.
        fallback_area: a region that is non-empty but vanishes under bilinear sampling (smaller
            than the sampling stride) falls back to area weights instead of pooling nothing; the
            reference would return a zero vector there. Regions that survive are unaffected.

    Returns:
        ``[M, T·gh·gw]`` weights, each row summing to 1 (or 0 for an empty region).
    """
    if masks.dim() != 4:
        raise SR3DInputError(f"masks must be [T, M, S, S], got shape {tuple(masks.shape)}")
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    t, m = masks.shape[:2]
    x = masks.to(torch.float32).reshape(t * m, 1, *masks.shape[-2:])
    w = F.interpolate(x, size=(gh, gw), mode="bilinear", align_corners=False).reshape(t, m, gh * gw)
    w = w.permute(1, 0, 2).reshape(m, t * gh * gw)
    if fallback_area:
        lost = (w.sum(-1) <= 0) & (masks.reshape(t, m, -1).any(-1).any(0))
        if bool(lost.any()):
            area = F.adaptive_avg_pool2d(x, (gh, gw)).reshape(t, m, gh * gw).permute(1, 0, 2).reshape(m, -1)
            w = torch.where(lost.unsqueeze(-1), area, w)
    return w / (w.sum(-1, keepdim=True) + 1e-8)


class RegionExtractor(nn.Module):
    """Mask-pool PE-augmented vision tokens into one LLM embedding per region.

    Args:
        vision_hidden_size: ``C``.
        llm_hidden_size: ``H``.

    Shapes:
        ``forward(features [T, L, C], masks [T, M, S, S]) → [M, H]`` — ``T`` tiles of one image
        (thumbnail included) or the frames of one region, ``L = g²`` tokens per tile.
    """

    def __init__(self, vision_hidden_size: int, llm_hidden_size: int, fallback_area: bool = True) -> None:
        super().__init__()
        self.vision_hidden_size = vision_hidden_size
        self.llm_hidden_size = llm_hidden_size
        self.fallback_area = fallback_area
        self.projector = nn.Linear(vision_hidden_size, llm_hidden_size)

    def pool(self, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Weighted average of tokens: ``[T, L, C]``, ``[T, M, S, S]`` → ``[M, C]``."""
        if features.dim() != 3:
            raise SR3DInputError(f"features must be [T, L, C], got shape {tuple(features.shape)}")
        if masks.shape[0] != features.shape[0]:
            raise SR3DInputError(
                f"masks cover {masks.shape[0]} tiles but features have {features.shape[0]}; expected the same tiling"
            )
        t, length, c = features.shape
        side = math.isqrt(length)
        if side * side != length:
            raise SR3DInputError(f"features have {length} tokens per tile; expected a square grid")
        w = mask_weights(masks, side, self.fallback_area).to(features.dtype)
        return w @ features.reshape(t * length, c)

    def forward(self, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(features, masks)
        return self.projector(pooled.to(self.projector.weight.dtype))

    def dummy(self, features: torch.Tensor) -> torch.Tensor:
        """``0 · region embedding`` — add to the output when a batch has no region so every parameter
        gets a gradient (needed by DDP/ZeRO). Returns a zero scalar connected to the graph."""
        pooled = features.reshape(-1, features.shape[-1])[:1].to(self.projector.weight.dtype)
        return self.projector(pooled).sum() * 0.0
