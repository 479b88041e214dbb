"""Vision→LLM projectors with the VILA key layout (``mm_projector/`` → ``layers.*``).

Kinds: ``mlp_downsample_3x3_fix`` (NVILA / SR-3D), ``mlp_downsample_2x2_fix``, ``mlp_downsample``,
``linear``, ``mlpNx_gelu`` (e.g. ``mlp2x_gelu``, LLaVA-1.5) and ``identity``.

The k×k downsample pads the token grid with zeros at the bottom and right to a multiple of k,
then concatenates every k×k block into one vector, row offset outer and column offset inner:
``[t(r, c), t(r, c+1), …, t(r+1, c), …]``.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from sr3d_plugin.errors import SR3DConfigError, SR3DInputError
from sr3d_plugin.modeling._names import PROJECTOR_KINDS

__all__ = ["PROJECTOR_KINDS", "Projector", "SpatialDownsample", "build_projector", "downsample_rate"]


class SpatialDownsample(nn.Module):
    """Concatenate each ``k×k`` block of a square token grid: ``[N, s², C] → [N, ⌈s/k⌉², k²·C]``."""

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 3:
            raise SR3DInputError(f"projector input must be [N, L, C], got shape {tuple(tokens.shape)}")
        n, length, c = tokens.shape
        side = math.isqrt(length)
        if side * side != length:
            raise SR3DInputError(f"projector input has {length} tokens per tile; expected a square grid")
        k = self.factor
        grid = tokens.reshape(n, side, side, c)
        padded = -(-side // k) * k
        if padded != side:
            grid = nn.functional.pad(grid, (0, 0, 0, padded - side, 0, padded - side))
        out = padded // k
        # [N, out, k(row offset), out, k(col offset), C] → [N, out, out, k, k, C]
        blocks = grid.reshape(n, out, k, out, k, c).permute(0, 1, 3, 2, 4, 5)
        return blocks.reshape(n, out * out, k * k * c)


def downsample_rate(kind: str) -> int:
    """Spatial downsample factor of a projector kind (1 when it keeps every token)."""
    if kind == "mlp_downsample_3x3_fix":
        return 3
    if kind in ("mlp_downsample_2x2_fix", "mlp_downsample"):
        return 2
    return 1


class Projector(nn.Module):
    """Container whose ``layers`` attribute reproduces VILA's ``mm_projector`` key names.

    Shapes: ``forward(tokens [N, L, C]) → [N, L', H]`` with ``L' = ⌈√L/k⌉²``.
    """

    def __init__(self, kind: str, vision_hidden_size: int, llm_hidden_size: int) -> None:
        super().__init__()
        c, h = vision_hidden_size, llm_hidden_size
        self.kind = kind
        self.vision_hidden_size = c
        self.llm_hidden_size = h
        self.downsample_rate = downsample_rate(kind)
        if kind == "identity":
            if c != h:
                raise SR3DConfigError(f"identity projector needs equal widths, got vision {c} and llm {h}")
            self.layers: nn.Module = nn.Identity()
        elif kind == "linear":
            self.layers = nn.Linear(c, h)
        elif kind in ("mlp_downsample", "mlp_downsample_2x2_fix"):
            self.layers = nn.Sequential(
                SpatialDownsample(2), nn.LayerNorm(4 * c), nn.Linear(4 * c, h), nn.GELU(), nn.Linear(h, h)
            )
        elif kind == "mlp_downsample_3x3_fix":
            self.layers = nn.Sequential(
                SpatialDownsample(3),
                nn.LayerNorm(9 * c),
                nn.Linear(9 * c, 3 * c),
                nn.GELU(),
                nn.LayerNorm(3 * c),
                nn.Linear(3 * c, h),
                nn.GELU(),
                nn.Linear(h, h),
            )
        else:
            match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
            if not match or int(match.group(1)) < 1:
                raise SR3DConfigError(
                    f"unknown projector kind {kind!r}; expected one of {', '.join(PROJECTOR_KINDS)} or mlpNx_gelu"
                )
            modules: list[nn.Module] = [nn.Linear(c, h)]
            for _ in range(1, int(match.group(1))):
                modules += [nn.GELU(), nn.Linear(h, h)]
            self.layers = nn.Sequential(*modules)

    def tokens_out(self, tokens_in: int) -> int:
        """Output tokens per tile for ``tokens_in`` input tokens (e.g. 1024 → 121 for 3×3)."""
        side = math.isqrt(tokens_in)
        if side * side != tokens_in:
            raise SR3DInputError(f"{tokens_in} tokens per tile is not a square grid")
        k = self.downsample_rate
        return (-(-side // k)) ** 2

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.layers(tokens)


def build_projector(kind: str, vision_hidden_size: int, llm_hidden_size: int) -> Projector:
    """Build a projector of ``kind`` mapping width ``vision_hidden_size`` to ``llm_hidden_size``."""
    return Projector(kind, vision_hidden_size, llm_hidden_size)
