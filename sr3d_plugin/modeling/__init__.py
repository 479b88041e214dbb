"""SR-3D modules and the transformers model (configuration / modeling / processing).

Importing this package registers ``sr3d`` with transformers' Auto classes, so
``AutoConfig`` / ``AutoModel`` / ``AutoModelForImageTextToText`` / ``AutoProcessor`` load our
folders without ``trust_remote_code``.
"""

from sr3d_plugin.modeling.configuration_sr3d import SR3DConfig
from sr3d_plugin.modeling.inputs import Region, VisualInput
from sr3d_plugin.modeling.modeling_sr3d import SR3DForConditionalGeneration, SR3DPreTrainedModel
from sr3d_plugin.modeling.position_encoding import PositionEncoder3D, sinusoidal_encoding
from sr3d_plugin.modeling.processing_sr3d import SR3DProcessor
from sr3d_plugin.modeling.projectors import PROJECTOR_KINDS, Projector, SpatialDownsample, build_projector
from sr3d_plugin.modeling.region_extractor import RegionExtractor, mask_weights

__all__ = [
    "PROJECTOR_KINDS",
    "PositionEncoder3D",
    "Projector",
    "Region",
    "RegionExtractor",
    "SR3DConfig",
    "SR3DForConditionalGeneration",
    "SR3DPreTrainedModel",
    "SR3DProcessor",
    "SpatialDownsample",
    "VisualInput",
    "build_projector",
    "mask_weights",
    "register_auto_classes",
    "sinusoidal_encoding",
]


def register_auto_classes() -> None:
    """Register the ``sr3d`` model type with transformers' Auto classes (idempotent)."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
    )

    try:
        AutoConfig.register("sr3d", SR3DConfig)
    except ValueError:  # already registered
        pass
    for auto in (AutoModel, AutoModelForImageTextToText, AutoModelForCausalLM):
        try:
            auto.register(SR3DConfig, SR3DForConditionalGeneration)
        except ValueError:
            pass
    try:
        AutoProcessor.register(SR3DConfig, SR3DProcessor)
    except ValueError:
        pass


register_auto_classes()
