"""SR-3D modules and the transformers model (configuration / modeling / processing)."""

from sr3d_plugin.modeling.position_encoding import PositionEncoder3D, sinusoidal_encoding
from sr3d_plugin.modeling.projectors import PROJECTOR_KINDS, Projector, SpatialDownsample, build_projector
from sr3d_plugin.modeling.region_extractor import RegionExtractor, mask_weights

__all__ = [
    "PROJECTOR_KINDS",
    "PositionEncoder3D",
    "Projector",
    "RegionExtractor",
    "SpatialDownsample",
    "build_projector",
    "mask_weights",
    "sinusoidal_encoding",
]
