"""Fixture writers for tests: tiny random models and tiny checkpoint folders in foreign layouts.

Production code never imports this module: the tiny configs, the tiny tokenizer and the chat template
live in :mod:`sr3d_plugin.presets` (re-exported here for the tests). Nothing here touches the
network; weights are random.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sr3d_plugin.modeling._names import SR3D_SPECIAL_TOKENS
from sr3d_plugin.presets import (
    CHATML_TEMPLATE,
    SPECIAL_TOKENS,
    build_tiny_tokenizer,
    tiny_image_processor,
    tiny_sr3d_config,
    tiny_text_config,
    tiny_vision_config,
)

__all__ = [
    "CHATML_TEMPLATE",
    "SPECIAL_TOKENS",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "tiny_image_processor",
    "tiny_sr3d_config",
    "write_tiny_clip_vision",
    "write_tiny_depth_anything",
    "write_tiny_llava_hf",
    "write_tiny_llava_original",
    "write_tiny_vila_checkpoint",
]


def build_tiny_model(seed: int = 0, **config_overrides: Any) -> tuple[Any, Any]:
    """``(model, processor)``: a random tiny SR-3D with a local tokenizer, ready for CPU tests."""
    import torch

    from sr3d_plugin.modeling.modeling_sr3d import SR3DForConditionalGeneration
    from sr3d_plugin.modeling.processing_sr3d import SR3DProcessor

    tokenizer = build_tiny_tokenizer()
    config = tiny_sr3d_config(tokenizer, **config_overrides)
    torch.manual_seed(seed)
    model = SR3DForConditionalGeneration(config).eval()
    processor = SR3DProcessor.from_model_config(config, tiny_image_processor(config.tile_size), tokenizer)
    return model, processor


#: former private names of the tiny sub-configs (now public in :mod:`sr3d_plugin.presets`)
_tiny_text_config = tiny_text_config
_tiny_vision_config = tiny_vision_config


# ----------------------------------------------------------------------------------------------
# Tiny checkpoint folders in foreign layouts (stand-ins of released checkpoints, random weights)
# ----------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")


def _save_tensors(path: Path, tensors: dict[str, Any], dtype: Any = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    out = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in tensors.items()
    }
    save_file(out, str(path), metadata={"format": "pt"})


def write_tiny_vila_checkpoint(
    root: str | Path,
    with_sr3d_parts: bool = True,
    dtype: str = "bfloat16",
    seed: int = 0,
    legacy_vision_keys: bool = True,
    tile_size: int = 56,
    max_tiles: int = 6,
) -> Path:
    """Write a tiny STAND-IN of a released VILA-layout checkpoint (SR-3D, or NVILA-Lite without SR-3D parts).

    The layout, file names, config keys and tensor names follow SR3D-FACTS §1 exactly; only the sizes
    are tiny (SigLIP 32 wide, 56 px tiles; Qwen2 64 wide) and the weights random. ``vision_tower/``
    uses transformers-4.x key names (``vision_model.…``) when ``legacy_vision_keys``, as in the release.
    With ``with_sr3d_parts=False`` (NVILA-Lite) there is no ``perception_encoder/`` or
    ``region_extractor/`` and the tokenizer has no ``<mask>``.

    Returns:
        ``root``.
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    from sr3d_plugin.modeling.configuration_sr3d import parse_dtype
    from sr3d_plugin.modeling.position_encoding import PositionEncoder3D
    from sr3d_plugin.modeling.projectors import build_projector
    from sr3d_plugin.modeling.region_extractor import RegionExtractor

    root = Path(root)
    torch_dtype = parse_dtype(dtype)
    tokenizer = build_tiny_tokenizer(without=() if with_sr3d_parts else (SR3D_SPECIAL_TOKENS["mask"],))
    text_config = tiny_text_config("qwen2", tokenizer)
    vision_config = tiny_vision_config("siglip_vision_model", tile_size)
    c, h = vision_config.hidden_size, text_config.hidden_size
    projector_type = "mlp_downsample_3x3_fix"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        llm = AutoModelForCausalLM.from_config(text_config)
        tower = AutoModel.from_config(vision_config)
        projector = build_projector(projector_type, c, h)
        pe = PositionEncoder3D(c, num_freqs=8, init_gain=1.0)  # trained-looking (not near zero) weights
        region = RegionExtractor(c, h)

    llm.to(torch_dtype).save_pretrained(str(root / "llm"))
    tokenizer.save_pretrained(str(root / "llm"))
    vision_state = tower.state_dict()
    if legacy_vision_keys:
        vision_state = {f"vision_model.{k}": v for k, v in vision_state.items()}
    vt_config = {**vision_config.to_dict(), "architectures": ["SiglipVisionModel"]}
    _write_json(root / "vision_tower" / "config.json", vt_config)
    _save_tensors(root / "vision_tower" / "model.safetensors", vision_state, torch_dtype)
    tiny_image_processor(tile_size).save_pretrained(str(root / "vision_tower"))
    mm_cfg = {
        "model_type": "v2l_projector",
        "architectures": ["MultimodalProjector"],
        "mm_projector_type": projector_type,
    }
    _write_json(root / "mm_projector" / "config.json", mm_cfg)
    _save_tensors(root / "mm_projector" / "model.safetensors", projector.state_dict(), torch_dtype)
    if with_sr3d_parts:
        _write_json(root / "perception_encoder" / "config.json", {"pe_type": "abs_mlp", "hidden_size": c})
        _save_tensors(root / "perception_encoder" / "model.safetensors", pe.state_dict(), torch_dtype)
        _write_json(root / "region_extractor" / "config.json", {"region_extractor_type": "regiongpt"})
        _save_tensors(root / "region_extractor" / "model.safetensors", region.state_dict(), torch_dtype)

    top: dict[str, Any] = {
        "model_type": "vila",
        "architectures": ["VILAForCausalLM"],
        "hidden_size": h,
        "mm_hidden_size": c,
        "image_aspect_ratio": "dynamic",
        "min_tiles": 1,
        "max_tiles": max_tiles,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "cls_patch",
        "mm_projector": projector_type,
        "model_dtype": f"torch.{str(torch_dtype).replace('torch.', '')}",
        "num_video_frames": 8,
        "llm_cfg": text_config.to_dict(),
        "vision_tower_cfg": vt_config,
        "mm_projector_cfg": mm_cfg,
        "image_encoder": '{"_target_": "llava.model.encoders.BasicImageEncoder"}',
        "video_encoder": '{"_target_": "llava.model.encoders.BasicVideoEncoder"}',
    }
    if with_sr3d_parts:
        top["perception_encoder"] = "abs_mlp"
        top["region_extractor"] = "regiongpt"
    _write_json(root / "config.json", top)
    return root


def write_tiny_llava_hf(root: str | Path, model_type: str = "llava", seed: int = 0, tile_size: int = 56) -> Path:
    """Write a tiny transformers LLaVA-family folder (``llava``, ``llava_next`` or ``llava_onevision``).

    ``llava``/``llava_next``: CLIP tower + Llama; ``llava_onevision``: SigLIP tower + Qwen2. The
    tokenizer has ``<image>`` (and ``<vila/video>``) but no ``<mask>``. Random weights.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    root = Path(root)
    tokenizer = build_tiny_tokenizer(without=(SR3D_SPECIAL_TOKENS["mask"],))
    image_id = tokenizer.convert_tokens_to_ids(SR3D_SPECIAL_TOKENS["image"])
    pinpoints = [[tile_size, tile_size], [tile_size, 2 * tile_size], [2 * tile_size, tile_size]]
    if model_type == "llava":
        config = AutoConfig.for_model(
            "llava",
            vision_config=tiny_vision_config("clip_vision_model", tile_size).to_dict(),
            text_config=tiny_text_config("llama", tokenizer).to_dict(),
            image_token_index=image_id,
            image_seq_length=(tile_size // 14) ** 2,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    elif model_type == "llava_next":
        config = AutoConfig.for_model(
            "llava_next",
            vision_config=tiny_vision_config("clip_vision_model", tile_size).to_dict(),
            text_config=tiny_text_config("llama", tokenizer).to_dict(),
            image_token_index=image_id,
            image_grid_pinpoints=pinpoints,
            image_seq_length=(tile_size // 14) ** 2,
        )
    elif model_type == "llava_onevision":
        config = AutoConfig.for_model(
            "llava_onevision",
            vision_config=tiny_vision_config("siglip_vision_model", tile_size).to_dict(),
            text_config=tiny_text_config("qwen2", tokenizer).to_dict(),
            image_token_index=image_id,
            video_token_index=tokenizer.convert_tokens_to_ids(SR3D_SPECIAL_TOKENS["video"]),
            image_grid_pinpoints=pinpoints,
        )
    else:
        raise ValueError(f"model_type={model_type!r}; expected 'llava', 'llava_next' or 'llava_onevision'")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config)
    model.save_pretrained(str(root))
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(str(root))
    if model_type == "llava":
        _save_clip_processor(root, tile_size)
    else:  # the family's own any-resolution image processor, as transformers saves it
        from transformers import LlavaNextImageProcessor, LlavaOnevisionImageProcessor

        common = {"image_grid_pinpoints": pinpoints, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
        if model_type == "llava_next":
            ip = LlavaNextImageProcessor(
                size={"shortest_edge": tile_size}, crop_size={"height": tile_size, "width": tile_size}, **common
            )
        else:
            ip = LlavaOnevisionImageProcessor(size={"height": tile_size, "width": tile_size}, **common)
        ip.save_pretrained(str(root))
    return root


def _save_clip_processor(root: Path, tile_size: int) -> None:
    """A CLIP image processor (resize + centre crop to ``tile_size``, mean/std 0.5) saved into ``root``."""
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(
        size={"shortest_edge": tile_size},
        crop_size={"height": tile_size, "width": tile_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(str(root))


def write_tiny_clip_vision(root: str | Path, seed: int = 0, tile_size: int = 56) -> Path:
    """Write a tiny CLIP vision tower folder with transformers-4.x key names (``vision_model.…``)."""
    import torch
    from transformers import AutoModel

    root = Path(root)
    config = tiny_vision_config("clip_vision_model", tile_size)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tower = AutoModel.from_config(config)
    _write_json(root / "config.json", {**config.to_dict(), "architectures": ["CLIPVisionModel"]})
    _save_tensors(root / "model.safetensors", {f"vision_model.{k}": v for k, v in tower.state_dict().items()})
    _save_clip_processor(root, tile_size)
    return root


def write_tiny_llava_original(
    root: str | Path, clip_dir: str | Path, seed: int = 0, weights: str = "bin", tile_size: int = 56
) -> Path:
    """Write a tiny STAND-IN of an original-LLaVA (haotian-liu/LLaVA, v1.5) checkpoint folder.

    ``config.json`` is a Llama config plus the LLaVA keys (``mm_vision_tower`` = ``clip_dir``,
    ``mm_projector_type: mlp2x_gelu``, ``mm_hidden_size``, ``mm_vision_select_layer: -2``,
    ``mm_vision_select_feature: patch``, ``image_aspect_ratio: pad``); weights are stored as in the
    release (``pytorch_model.bin`` by default, or ``model.safetensors``) with keys ``model.embed_tokens``,
    ``model.layers.*``, ``model.norm``, ``lm_head`` and ``model.mm_projector.{0,2}.*``. The tokenizer
    has neither ``<image>`` nor ``<mask>`` (the original code uses the placeholder id -200) and no chat
    template. The CLIP tower is a separate folder (see :func:`write_tiny_clip_vision`).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from sr3d_plugin.modeling.projectors import build_projector

    root = Path(root)
    clip_config = _read_tiny_json(Path(clip_dir) / "config.json")
    tokenizer = build_tiny_tokenizer(
        without=tuple(SR3D_SPECIAL_TOKENS[k] for k in ("image", "mask", "video", "sentinel"))
    )
    tokenizer.chat_template = None
    text_config = tiny_text_config("llama", tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        llm = AutoModelForCausalLM.from_config(text_config)
        projector = build_projector("mlp2x_gelu", int(clip_config["hidden_size"]), text_config.hidden_size)
    state = dict(llm.state_dict())
    state.update({f"model.mm_projector.{k[len('layers.') :]}": v for k, v in projector.state_dict().items()})
    root.mkdir(parents=True, exist_ok=True)
    if weights == "bin":
        torch.save({k: v.contiguous() for k, v in state.items()}, str(root / "pytorch_model.bin"))
    else:
        _save_tensors(root / "model.safetensors", state)
    cfg = {
        **text_config.to_dict(),
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "mm_vision_tower": str(clip_dir),
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": int(clip_config["hidden_size"]),
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
        "tokenizer_padding_side": "right",
    }
    _write_json(root / "config.json", cfg)
    tokenizer.save_pretrained(str(root))
    return root


def _read_tiny_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def write_tiny_depth_anything(root: str | Path, seed: int = 0) -> Path:
    """A tiny random Depth Anything V2 folder (DINOv2 backbone, width 32, 28-px input) built from a config.

    Its head is scaled so the random prediction varies over the image (a random head outputs ~0 after its
    ReLU). Saved with its ``DPTImageProcessor``; loads with ``AutoModelForDepthEstimation``.
    """
    import torch
    from transformers import AutoModelForDepthEstimation, DepthAnythingConfig, Dinov2Config, DPTImageProcessor

    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=28,
        patch_size=14,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
        patch_size=14,
    )
    torch.manual_seed(seed)
    model = AutoModelForDepthEstimation.from_config(config)
    with torch.no_grad():
        model.head.conv3.weight.mul_(300.0)
        model.head.conv3.bias.fill_(1.0)
    folder = Path(root)
    model.save_pretrained(folder)
    DPTImageProcessor(
        size={"height": 28, "width": 28},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    return folder
