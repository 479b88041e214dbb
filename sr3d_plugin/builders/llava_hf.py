"""Builder for transformers LLaVA-family folders (``llava``, ``llava_next``, ``llava_onevision``).

The source model is loaded with transformers' own class (which applies its checkpoint-key
conversions; peak memory is about twice the model while both exist), then its parts are moved
under our module paths:

=============================================  ============================================
LLaVA (transformers 5 module path)             SR-3D
=============================================  ============================================
``model.vision_tower.*``                       ``vision_tower.*``
``model.multi_modal_projector.linear_1.*``     ``mm_projector.layers.0.*`` (``mlp2x_gelu``)
``model.multi_modal_projector.linear_2.*``     ``mm_projector.layers.2.*``
``model.language_model.*``                     ``llm.model.*``
``lm_head.*``                                  ``llm.lm_head.*``
=============================================  ============================================

Config: ``vision_feature_layer`` → ``vision_feature_layer`` (one layer only), ``vision_feature_select_strategy``
``"default"`` (drop CLS) → ``"patch"``, ``"full"`` → ``"full"``, ``image_token_index`` → ``image_token_id``,
one tile of the vision tower's ``image_size``, ``image_end_text`` None and ``tile_separator`` ``""``
(LLaVA prompts carry their own newline). The 3D position encoder and region extractor are created
fresh and ``<mask>`` is added to the tokenizer.

The folder's own conventions are reproduced (``docs/conformance.md``, section "Original LLaVA and transformers' LLaVA family"):

* images go through the folder's own image processor (``image_aspect_ratio="native"``):
  ``CLIPImageProcessor``'s shortest-edge resize + centre crop for ``llava``; the any-resolution
  patches of ``LlavaNextImageProcessor`` / ``LlavaOnevisionImageProcessor`` (base image + patches of
  the best ``image_grid_pinpoints`` resolution) for ``llava_next`` / ``llava_onevision``, whose patch
  features are unpadded (``int(round(x, 7))``), shrunk past ``anyres_max_N`` (OneVision) and followed
  by the learned ``image_newline`` after every row (``model.image_newline`` → ``image_newline``);
  ``image_grid_pinpoints`` are stored as ``[width, height]`` (transformers writes ``[height, width]``);
* prompts: the folder's chat template with transformers' content lists (``{"type": "image"}`` first),
  no default system message, and the tokenizer's own special tokens, as ``LlavaProcessor`` calls it.

Point maps and region masks follow each tile's geometry (:mod:`sr3d_plugin.modeling.llava_conventions`).
Named deviation: ``image_aspect_ratio="dynamic"`` (SR-3D tiles + thumbnail; drops ``image_newline``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sr3d_plugin.builders._common import add_special_tokens, instantiate, pad_vocabulary, split_config_overrides
from sr3d_plugin.errors import SR3DConfigError, SR3DInputError
from sr3d_plugin.modeling.configuration_sr3d import SR3D_SPECIAL_TOKENS

__all__ = ["SUPPORTED_MODEL_TYPES", "LlavaHFBuilder", "llava_state_to_sr3d"]

#: transformers model types this builder reads
SUPPORTED_MODEL_TYPES = ("llava", "llava_next", "llava_onevision")
#: LLaVA-family types it recognises but cannot map (with the reason)
UNSUPPORTED_MODEL_TYPES = {
    "vipllava": "its projector pools several vision layers through a LayerNorm (no single-layer equivalent)",
    "video_llava": "it has separate image and video towers",
    "llava_next_video": "its video pooling path has no SR-3D equivalent; load the image model (llava_next)",
}

_SELECT = {"default": "patch", "full": "full"}


def _first_attr(obj: Any, *names: str) -> Any:
    for name in names:
        cur = obj
        for part in name.split("."):
            cur = getattr(cur, part, None)
            if cur is None:
                break
        if cur is not None:
            return cur
    raise SR3DInputError(f"{type(obj).__name__} has none of the modules {names}; not a LLaVA-family model")


def llava_state_to_sr3d(source: Any) -> dict[str, torch.Tensor]:
    """Tensors of a loaded transformers LLaVA-family model under SR-3D module paths (see the module table)."""
    tower = _first_attr(source, "model.vision_tower", "vision_tower")
    projector = _first_attr(source, "model.multi_modal_projector", "multi_modal_projector")
    decoder = _first_attr(source, "model.language_model", "language_model")
    head = source.get_output_embeddings()
    state: dict[str, torch.Tensor] = {}
    state.update({f"vision_tower.{k}": v for k, v in tower.state_dict().items()})
    for src, dst in (("linear_1", "layers.0"), ("linear_2", "layers.2")):
        layer = getattr(projector, src)
        state[f"mm_projector.{dst}.weight"] = layer.weight.detach()
        bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_features, dtype=layer.weight.dtype)
        state[f"mm_projector.{dst}.bias"] = bias.detach()
    state.update({f"llm.model.{k}": v for k, v in decoder.state_dict().items()})
    newline = getattr(getattr(source, "model", source), "image_newline", None)
    if newline is not None:
        state["image_newline"] = newline.detach()
    state["llm.lm_head.weight"] = head.weight.detach()
    if getattr(head, "bias", None) is not None:
        state["llm.lm_head.bias"] = head.bias.detach()
    return state


def tile_image_processor(image_processor: Any, tile_size: int) -> Any:
    """A plain per-tile processor (resize to ``tile_size`` + normalise) with the source's mean and std.

    LLaVA-NeXT / OneVision processors cut images into their own anyres patches; our processor hands
    them ready tiles, so it needs one that only normalises.
    """
    from transformers import SiglipImageProcessor

    mean = getattr(image_processor, "image_mean", None) or [0.5, 0.5, 0.5]
    std = getattr(image_processor, "image_std", None) or [0.5, 0.5, 0.5]
    return SiglipImageProcessor(
        size={"height": tile_size, "width": tile_size},
        image_mean=list(mean),
        image_std=list(std),
        rescale_factor=getattr(image_processor, "rescale_factor", 1 / 255),
    )


class LlavaHFBuilder:
    """transformers LLaVA-family folders → SR-3D (fresh PE + region extractor; ``<mask>`` added)."""

    name = "llava_hf"

    def can_load(self, path: Path, config: dict[str, Any]) -> bool:
        return config.get("model_type") in (*SUPPORTED_MODEL_TYPES, *UNSUPPORTED_MODEL_TYPES)

    def _plan(self, path: Path, kwargs: dict[str, Any]) -> tuple[Any, Any, Any, str, list[str], int, bool]:
        """``(config, tokenizer, image processor, image token, notes, stored vocabulary size, drop
        image_newline)`` from the folder's configs, tokenizer and image processor (no weights); SR3DConfig
        overrides are popped from ``kwargs``. ``config.text_config.vocab_size`` is the loaded size (grown
        for ``<mask>``)."""
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        from sr3d_plugin.modeling.configuration_sr3d import SR3DConfig

        overrides = split_config_overrides(kwargs)
        src_config = AutoConfig.from_pretrained(str(path))
        kind = src_config.model_type
        if kind in UNSUPPORTED_MODEL_TYPES:
            raise SR3DConfigError(
                f"{path}: model_type {kind!r} is not supported because {UNSUPPORTED_MODEL_TYPES[kind]}"
            )
        if kind not in SUPPORTED_MODEL_TYPES:
            raise SR3DConfigError(f"{path}: model_type {kind!r}; expected one of {SUPPORTED_MODEL_TYPES}")
        act = getattr(src_config, "projector_hidden_act", "gelu")
        if act != "gelu":
            raise SR3DConfigError(
                f"{path}: projector_hidden_act={act!r} is not supported; expected 'gelu' (our mlp2x_gelu projector)"
            )
        layer = src_config.vision_feature_layer
        if not isinstance(layer, int):
            raise SR3DConfigError(
                f"{path}: vision_feature_layer={layer!r} concatenates several layers; expected a single int"
            )
        strategy = src_config.vision_feature_select_strategy
        if strategy not in _SELECT:
            raise SR3DConfigError(f"{path}: vision_feature_select_strategy={strategy!r}; expected 'default' or 'full'")

        if strategy == "full" and getattr(src_config.vision_config, "model_type", "") == "clip_vision_model":
            raise SR3DConfigError(
                f"{path}: vision_feature_select_strategy='full' keeps CLIP's CLS token (grid² + 1 tokens per tile); "
                "the plugin lays vision tokens on a grid (3D PE, regions), so this is not supported; expected 'default'"
            )
        notes: list[str] = []
        drop_newline = False
        vision_config, text_config = src_config.vision_config, src_config.text_config
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        image_token = tokenizer.convert_ids_to_tokens(int(src_config.image_token_index))
        added = add_special_tokens(tokenizer, [SR3D_SPECIAL_TOKENS["mask"]])
        if added:
            notes.append(f"added {added} to the tokenizer")
        if not getattr(tokenizer, "chat_template", None):
            try:
                from transformers import AutoProcessor

                tokenizer.chat_template = getattr(AutoProcessor.from_pretrained(str(path)), "chat_template", None)
            except (OSError, ValueError, TypeError):
                pass
        tile = int(vision_config.image_size)
        image_processor = AutoImageProcessor.from_pretrained(str(path))  # as AutoProcessor loads it
        kwargs_config: dict[str, Any] = {
            "vision_config": vision_config.to_dict(),
            "text_config": text_config.to_dict(),
            "projector_type": "mlp2x_gelu",
            "tile_size": tile,
            "image_aspect_ratio": "native",
            "use_thumbnail": False,
            "vision_feature_layer": layer,
            "vision_feature_select": _SELECT[strategy],
            "image_end_text": None,
            "tile_separator": "",
            "image_token_id": int(src_config.image_token_index),
            "mask_token_id": tokenizer.convert_tokens_to_ids(SR3D_SPECIAL_TOKENS["mask"]),
        }
        if kind in ("llava_next", "llava_onevision"):
            pinpoints = getattr(src_config, "image_grid_pinpoints", None) or [[tile, tile]]
            ip_pinpoints = getattr(image_processor, "image_grid_pinpoints", None)
            wants_native = overrides.get("image_aspect_ratio", "native") == "native"
            if ip_pinpoints is None and wants_native:
                raise SR3DConfigError(
                    f"{path}: a {kind} model cuts images into any-resolution patches, but the folder's image "
                    f"processor {type(image_processor).__name__} has no image_grid_pinpoints; expected the "
                    f"{kind} image processor (or pass image_aspect_ratio='dynamic' for SR-3D tiling)"
                )
            if ip_pinpoints is not None and [list(map(int, p)) for p in ip_pinpoints] != [
                list(map(int, p)) for p in pinpoints
            ]:
                raise SR3DConfigError(
                    f"{path}: the image processor's image_grid_pinpoints {ip_pinpoints} differ from the model's "
                    f"{pinpoints}; the folder is inconsistent"
                )
            max_patches = None
            if kind == "llava_onevision":
                ratio = str(getattr(src_config, "vision_aspect_ratio", "anyres_max_9"))
                if not ratio.startswith("anyres_max_") or not ratio[len("anyres_max_") :].isdigit():
                    raise SR3DConfigError(f"{path}: vision_aspect_ratio={ratio!r}; expected 'anyres_max_N'")
                max_patches = int(ratio[len("anyres_max_") :])
            kwargs_config.update(
                image_grid_pinpoints=[[int(w), int(h)] for h, w in pinpoints], mm_patch_merge_type="spatial_unpad",
                unpad_rounding="round", anyres_max_patches=max_patches, use_image_newline=True,
            )  # fmt: skip
        kwargs_config.update(overrides)
        if kwargs_config["image_aspect_ratio"] in ("dynamic", "resize"):  # a named deviation from the folder
            if kwargs_config.get("mm_patch_merge_type", "flat") != "flat":
                kwargs_config.update(mm_patch_merge_type="flat", use_image_newline=False)
                drop_newline = True
                notes.append(f"image_aspect_ratio={kwargs_config['image_aspect_ratio']!r}: image_newline is not used")
            image_processor = tile_image_processor(image_processor, tile)
        config = SR3DConfig(**kwargs_config)
        vocab = int(config.text_config.vocab_size)
        if len(tokenizer) > vocab:
            config.text_config.vocab_size = len(tokenizer)
            notes.append(f"LLM embeddings grown from {vocab} to {len(tokenizer)} rows for <mask> (mean-initialised)")
        return config, tokenizer, image_processor, image_token, notes, vocab, drop_newline

    def config(self, path: Path, **kwargs: Any) -> Any:
        """The :class:`SR3DConfig` :meth:`load` builds (same options), without reading the model weights."""
        return self._plan(Path(path), dict(kwargs))[0]

    def load(
        self,
        path: Path,
        dtype: Any = None,
        device_map: Any = None,
        quantization_config: Any = None,
        **kwargs: Any,
    ) -> tuple[Any, Any]:
        """Load the folder (``dtype`` default: the checkpoint's; SR3DConfig overrides in ``kwargs``)."""
        from transformers import AutoModelForImageTextToText

        from sr3d_plugin.modeling.processing_sr3d import SR3DProcessor

        path = Path(path)
        config, tokenizer, image_processor, image_token, notes, vocab, drop_newline = self._plan(path, kwargs)
        source_dtype = dtype if isinstance(dtype, torch.dtype) else "auto"
        source = AutoModelForImageTextToText.from_pretrained(str(path), dtype=source_dtype)
        state = llava_state_to_sr3d(source)
        if dtype is None or dtype == "auto":
            dtype = next(source.parameters()).dtype
        del source
        if drop_newline:
            state.pop("image_newline", None)
        size = int(config.text_config.vocab_size)
        if size > vocab:
            pad_vocabulary(state, ["llm.model.embed_tokens.weight", "llm.lm_head.weight"], size)
        model = instantiate(
            config, state, dtype=dtype, quantization_config=quantization_config, notes=notes,
            device_map=device_map, **kwargs,
        )  # fmt: skip
        template = getattr(tokenizer, "chat_template", None) or ""
        structured = "content'] |" in template or "['type']" in template or "selectattr" in template
        processor = SR3DProcessor.from_model_config(
            config, image_processor, tokenizer, image_token=image_token, default_system=None,
            structured_chat_content=structured, call_adds_special_tokens=True,
        )  # fmt: skip
        return model, processor
