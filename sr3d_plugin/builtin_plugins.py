"""The package's own components, registered through the public hooks like any third-party plugin.

Factories are imported lazily (inside small wrapper functions) so that listing plugins does not
import heavy optional dependencies.
"""

from __future__ import annotations

from typing import Any

from sr3d_plugin.hookspecs import Register, hookimpl


def _lazy(module: str, attr: str) -> Any:
    """A factory that imports ``module.attr`` on first call and forwards the arguments to it."""

    def factory(*args: Any, **kwargs: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(module), attr)(*args, **kwargs)

    factory.__qualname__ = attr
    factory.__module__ = module
    factory.__doc__ = f"Lazily imported {module}.{attr}."
    return factory


@hookimpl
def register_position_encoders(register: Register) -> None:
    register("abs_mlp", _lazy("sr3d_plugin.modeling.position_encoding", "PositionEncoder3D"))


@hookimpl
def register_projectors(register: Register) -> None:
    from sr3d_plugin.modeling._names import PROJECTOR_KINDS  # names only: no torch

    for kind in PROJECTOR_KINDS:

        def factory(vision_hidden_size: int, llm_hidden_size: int, _kind: str = kind) -> Any:
            from sr3d_plugin.modeling.projectors import build_projector

            return build_projector(_kind, vision_hidden_size, llm_hidden_size)

        factory.__qualname__ = f"build_projector[{kind}]"
        factory.__module__ = "sr3d_plugin.modeling.projectors"
        register(kind, factory)


@hookimpl
def register_region_extractors(register: Register) -> None:
    register("regiongpt", _lazy("sr3d_plugin.modeling.region_extractor", "RegionExtractor"))


@hookimpl
def register_frame_readers(register: Register) -> None:
    register("scannet", _lazy("sr3d_plugin.sources.scannet", "ScanNetReader"))
    register("image", _lazy("sr3d_plugin.sources.images", "ImageReader"))
    register("frames", _lazy("sr3d_plugin.sources.images", "FramesReader"))
    register("video", _lazy("sr3d_plugin.sources.video", "VideoReader"))


@hookimpl
def register_depth_estimators(register: Register) -> None:
    register("depth_anything_v2", _lazy("sr3d_plugin.sources.depth_anything", "DepthAnythingV2Estimator"))


@hookimpl
def register_pointmap_sources(register: Register) -> None:
    register("gt_depth", _lazy("sr3d_plugin.sources.pointmap_sources", "GTDepthSource"))
    register("relative_depth", _lazy("sr3d_plugin.sources.pointmap_sources", "RelativeDepthSource"))
    register("depth_anything", _lazy("sr3d_plugin.sources.pointmap_sources", "DepthAnythingSource"))
    register("reconstruction", _lazy("sr3d_plugin.sources.reconstruction", "ReconstructionSource"))


@hookimpl
def register_model_builders(register: Register) -> None:
    register("sr3d", _lazy("sr3d_plugin.builders.sr3d_native", "NativeBuilder"))
    register("vila", _lazy("sr3d_plugin.builders.vila", "VilaBuilder"))
    register("llava_hf", _lazy("sr3d_plugin.builders.llava_hf", "LlavaHFBuilder"))
    register("llava_original", _lazy("sr3d_plugin.builders.llava_original", "LlavaOriginalBuilder"))
    register("scratch", _lazy("sr3d_plugin.builders.scratch", "ScratchBuilder"))


@hookimpl
def register_dataset_converters(register: Register) -> None:
    register("scannet", _lazy("sr3d_plugin.data.scannet", "ScanNetConverter"))
    register("scanqa", _lazy("sr3d_plugin.data.qa", "ScanQAConverter"))
    register("sqa3d", _lazy("sr3d_plugin.data.qa", "SQA3DConverter"))
    register("scan2cap", _lazy("sr3d_plugin.data.scan2cap", "Scan2CapConverter"))
    register("vsibench", _lazy("sr3d_plugin.data.vsibench", "VSIBenchConverter"))
