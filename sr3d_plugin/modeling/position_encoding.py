"""The SR-3D 3D positional encoder (``perception_encoder``, ``pe_type: abs_mlp``).

Canonical xyz → per-coordinate sinusoidal features ``[c, sin(f·c)…, cos(f·c)…]`` with
``f = 1, 2, 4, …, 2^(num_freqs−1)`` (no π factor), grouped coordinate by coordinate
(x block, then y, then z) → ``Linear(51→C) → LayerNorm(C) → GELU → Linear(C→C)``.
State-dict keys equal the released ``perception_encoder/`` folder:
``layers.position_embedding_head.{0,1,3}.{weight,bias}``.
"""

from __future__ import annotations

import torch
from torch import nn

from sr3d_plugin.errors import SR3DInputError

__all__ = ["PositionEncoder3D", "sinusoidal_encoding"]


def sinusoidal_encoding(xyz: torch.Tensor, num_freqs: int = 8, include_input: bool = True) -> torch.Tensor:
    """Encode ``[..., 3]`` coordinates as ``[..., 3·(include_input + 2·num_freqs)]`` features.

    For each coordinate ``c`` (x, then y, then z) the block is
    ``[c, sin(1·c), sin(2·c), …, sin(2^(F−1)·c), cos(1·c), …, cos(2^(F−1)·c)]``.
    """
    if xyz.shape[-1] != 3:
        raise SR3DInputError(f"xyz must have a last dimension of 3, got shape {tuple(xyz.shape)}")
    freqs = 2.0 ** torch.arange(num_freqs, dtype=xyz.dtype, device=xyz.device)
    scaled = xyz.unsqueeze(-1) * freqs  # [..., 3, F]
    parts = [torch.sin(scaled), torch.cos(scaled)]
    if include_input:
        parts.insert(0, xyz.unsqueeze(-1))
    return torch.cat(parts, dim=-1).flatten(-2)


class _Layers(nn.Module):
    """Holder that reproduces the released key prefix ``layers.position_embedding_head``."""

    def __init__(self, in_features: int, hidden_size: int) -> None:
        super().__init__()
        self.position_embedding_head = nn.Sequential(
            nn.Linear(in_features, hidden_size),
            nn.LayerNorm(hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, hidden_size),
        )


class PositionEncoder3D(nn.Module):
    """Sinusoidal encoding + MLP of canonical 3D positions, added to vision tokens.

    Args:
        hidden_size: vision-token width ``C`` (1152 for SigLIP-so400m).
        num_freqs: number of octave frequencies ``F`` (8 → 1…128, 51 input features).
        init_gain: xavier-uniform gain of every weight matrix; 0.001 makes a fresh encoder a
            near no-op on a pretrained VLM.

    Shapes:
        ``forward(xyz [..., 3]) → [..., C]``.
    """

    def __init__(self, hidden_size: int, num_freqs: int = 8, init_gain: float = 0.001) -> None:
        super().__init__()
        if hidden_size <= 0 or num_freqs < 0:
            raise SR3DInputError(f"hidden_size must be > 0 and num_freqs >= 0, got {hidden_size}, {num_freqs}")
        self.hidden_size = hidden_size
        self.num_freqs = num_freqs
        self.in_features = 3 * (1 + 2 * num_freqs)
        self.layers = _Layers(self.in_features, hidden_size)
        self.init_gain = init_gain
        for module in self.layers.position_embedding_head:
            if isinstance(module, nn.Linear):
                # read by SR3DPreTrainedModel._init_weights, which transformers runs leaf-first
                module._sr3d_xavier_gain = init_gain
        self.reset_parameters(init_gain)

    def reset_parameters(self, gain: float = 0.001) -> None:
        for module in self.layers.position_embedding_head:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, gain=gain)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def encode(self, xyz: torch.Tensor) -> torch.Tensor:
        """The ``[..., 51]`` sinusoidal features (before the MLP)."""
        return sinusoidal_encoding(xyz, self.num_freqs)

    def forward(self, xyz: torch.Tensor) -> torch.Tensor:
        weight = self.layers.position_embedding_head[0].weight
        feats = self.encode(xyz.to(weight.dtype))
        return self.layers.position_embedding_head(feats)
