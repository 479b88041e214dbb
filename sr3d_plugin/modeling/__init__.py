"""SR-3D modules (core: torch only) and the transformers model classes (transformers ≥ 5), loaded lazily.

Core names — ``PositionEncoder3D``, ``sinusoidal_encoding``, the projectors, ``RegionExtractor``,
``mask_weights``, ``Region``, ``VisualInput`` — need torch only and work beside any transformers
(VILA's 4.46 included). The model classes — ``SR3DConfig``, ``SR3DForConditionalGeneration``,
``SR3DPreTrainedModel``, ``SR3DProcessor`` — need transformers ≥ 5; on an older one, asking for them
raises :class:`~sr3d_plugin.errors.SR3DDependencyError` naming the installed version. Every name is
imported on first access (PEP 562), so ``import sr3d_plugin.modeling`` itself imports neither torch nor
transformers.

Auto classes: ``AutoConfig`` / ``AutoModel`` / ``AutoModelForImageTextToText`` / ``AutoProcessor`` load
our folders without ``trust_remote_code`` once ``sr3d_plugin`` is imported; see :mod:`sr3d_plugin._compat`
for when the registration happens, and :func:`register_auto_classes` to do it explicitly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sr3d_plugin._compat import require_model_classes

if TYPE_CHECKING:  # pragma: no cover
    from sr3d_plugin.modeling.configuration_sr3d import SR3DConfig
    from sr3d_plugin.modeling.inputs import Region, VisualInput
    from sr3d_plugin.modeling.modeling_sr3d import (
        SR3DForConditionalGeneration,
        SR3DPreTrainedModel,
        SR3DVisualFeatures,
    )
    from sr3d_plugin.modeling.position_encoding import PositionEncoder3D, sinusoidal_encoding
    from sr3d_plugin.modeling.processing_sr3d import SR3DProcessor
    from sr3d_plugin.modeling.projectors import PROJECTOR_KINDS, Projector, SpatialDownsample, build_projector
    from sr3d_plugin.modeling.region_extractor import RegionExtractor, mask_weights
    from sr3d_plugin.modeling.registration import register_auto_classes

#: public name → submodule; the core ones need torch only
_CORE: dict[str, str] = {
    "PROJECTOR_KINDS": "projectors",
    "PositionEncoder3D": "position_encoding",
    "Projector": "projectors",
    "Region": "inputs",
    "RegionExtractor": "region_extractor",
    "SpatialDownsample": "projectors",
    "VisualInput": "inputs",
    "build_projector": "projectors",
    "mask_weights": "region_extractor",
    "sinusoidal_encoding": "position_encoding",
}
#: the model classes: transformers ≥ 5
_MODEL: dict[str, str] = {
    "SR3DConfig": "configuration_sr3d",
    "SR3DForConditionalGeneration": "modeling_sr3d",
    "SR3DPreTrainedModel": "modeling_sr3d",
    "SR3DProcessor": "processing_sr3d",
    "SR3DVisualFeatures": "modeling_sr3d",
    "register_auto_classes": "registration",
}

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
    "SR3DVisualFeatures",
    "SpatialDownsample",
    "VisualInput",
    "build_projector",
    "mask_weights",
    "register_auto_classes",
    "sinusoidal_encoding",
]


def __getattr__(name: str) -> Any:
    module = _CORE.get(name) or _MODEL.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _MODEL:
        require_model_classes(f"sr3d_plugin.modeling.{name}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
