"""Constants shared by the core and the model classes (no torch, no transformers: ``sr3d plugins`` and a
VILA environment read them without importing either)."""

from __future__ import annotations

__all__ = ["PROJECTOR_KINDS", "SR3D_SPECIAL_TOKENS"]

#: the built-in projector kinds
PROJECTOR_KINDS = (
    "mlp_downsample_3x3_fix",
    "mlp_downsample_2x2_fix",
    "mlp_downsample",
    "linear",
    "mlp2x_gelu",
    "identity",
)

#: placeholder tokens the processor, the model and the VILA integration agree on
SR3D_SPECIAL_TOKENS = {"image": "<image>", "mask": "<mask>", "video": "<vila/video>", "sentinel": "<vila/sentinel>"}
