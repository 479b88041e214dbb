"""Names of the built-in projector kinds (no torch here: ``sr3d plugins`` lists them without importing it)."""

from __future__ import annotations

__all__ = ["PROJECTOR_KINDS"]

PROJECTOR_KINDS = (
    "mlp_downsample_3x3_fix",
    "mlp_downsample_2x2_fix",
    "mlp_downsample",
    "linear",
    "mlp2x_gelu",
    "identity",
)
