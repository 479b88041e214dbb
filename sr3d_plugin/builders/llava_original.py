"""Builder for folders of the original LLaVA code base (haotian-liu/LLaVA; LLaVA-1.5 style).

Such a folder is a causal-LM folder (``architectures: ["LlavaLlamaForCausalLM"]``, model_type
``llava_llama``; Mistral variants likewise) whose config adds ``mm_vision_tower`` (a CLIP id or folder),
``mm_projector_type`` (``mlp2x_gelu`` or ``linear``), ``mm_hidden_size``, ``mm_vision_select_layer`` and
``mm_vision_select_feature``. The vision tower is NOT inside the folder: it is read from the folder
named by ``mm_vision_tower`` or by the ``vision_tower=PATH`` option (hub ids must be downloaded first).

Key mapping — the same renaming as transformers' ``convert_llava_weights_to_hf.py``
(``model.mm_projector`` → projector, ``model.*`` → language model, ``lm_head`` → head), with our
module names:

========================================================  ==========================================
original key                                              SR-3D key
========================================================  ==========================================
``model.mm_projector.{0,2}.*`` (``mlp2x_gelu``)             ``mm_projector.layers.{0,2}.*``
``model.mm_projector.*`` (``linear``)                       ``mm_projector.layers.*``
``model.vision_tower.vision_tower.vision_model.*``        ``vision_tower.*`` (only if the tower was saved)
``model.*`` (embed_tokens, layers, norm)                  ``llm.model.*``
``lm_head.*``                                             ``llm.lm_head.*`` (cloned from the embeddings
                                                          when a tied head is not stored)
``*.inv_freq``, ``model.image_newline``,                   dropped (rotary buffers; unused by the flat
``model.vision_resampler.*``                                single-tile path, as in the conversion script)
========================================================  ==========================================

The original code marks images with the placeholder id −200 instead of a vocabulary token; like
transformers' conversion we add ``<image>`` (and ``<mask>``) as special tokens and pad the
embedding matrices to a multiple of 64 (new rows = mean of the old ones). ``image_aspect_ratio: pad``
(pad to a square with the mean colour) is replaced by a squash to one tile and noted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sr3d_plugin.builders._common import (
    add_special_tokens,
    instantiate,
    pad_vocabulary,
    read_json,
    read_weights,
    split_config_overrides,
)
from sr3d_plugin.errors import SR3DConfigError, SR3DInputError
from sr3d_plugin.modeling.configuration_sr3d import SR3D_SPECIAL_TOKENS, parse_dtype

__all__ = ["LLM_TYPES", "VICUNA_TEMPLATE", "LlavaOriginalBuilder", "map_original_keys"]

#: original-LLaVA architecture → transformers model type of its language model
LLM_TYPES = {
    "LlavaLlamaForCausalLM": "llama",
    "LlavaMistralForCausalLM": "mistral",
    "LlavaQwen2ForCausalLM": "qwen2",
    "LlavaQwenForCausalLM": "qwen2",
}

#: LLaVA-1.5's "vicuna_v1" conversation format as a chat template (used when the tokenizer has none)
VICUNA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + ' ' }}"
    "{% elif message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_PROJECTORS = ("mlp2x_gelu", "linear")
_TOWER_PREFIX = "model.vision_tower.vision_tower."
#: stored tensors that the flat (single-tile) LLaVA path never uses
_DROPPED_PREFIXES = ("model.image_newline", "model.vision_resampler.")


def map_original_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split original-LLaVA tensors into ``(ours, tower)``: ours keyed by SR-3D paths, tower as stored.

    Raises :class:`SR3DInputError` for a key outside the documented layout.
    """
    ours: dict[str, torch.Tensor] = {}
    tower: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(".inv_freq") or key.startswith(_DROPPED_PREFIXES):
            continue  # rotary buffers of old checkpoints; unused parts (see the module docstring)
        if key.startswith(_TOWER_PREFIX):
            tower[key[len(_TOWER_PREFIX) :]] = value
        elif key.startswith("model.mm_projector."):
            ours["mm_projector.layers." + key[len("model.mm_projector.") :]] = value
        elif key.startswith(("model.", "lm_head.")):
            ours["llm." + key] = value
        else:
            raise SR3DInputError(
                f"unexpected tensor {key!r} in an original-LLaVA checkpoint; expected model.*, lm_head.* "
                "or model.mm_projector.*"
            )
    if "llm.lm_head.weight" not in ours and "llm.model.embed_tokens.weight" in ours:
        ours["llm.lm_head.weight"] = ours["llm.model.embed_tokens.weight"].clone()  # tied LM head not stored
    return ours, tower


def _vision_tower_state(folder: Path, vision_config: Any, dtype: Any) -> dict[str, torch.Tensor]:
    """The CLIP (or SigLIP) tower's tensors under transformers 5 names, via its own ``from_pretrained``."""
    from transformers import AutoModel

    tower, info = AutoModel.from_pretrained(str(folder), config=vision_config, dtype=dtype, output_loading_info=True)
    if info.get("missing_keys"):
        raise SR3DInputError(
            f"the vision tower folder {folder} lacks {len(info['missing_keys'])} tensor(s), e.g. "
            f"{sorted(info['missing_keys'])[:3]}; expected a complete CLIP/SigLIP vision checkpoint"
        )
    return {f"vision_tower.{k}": v for k, v in tower.state_dict().items()}


class LlavaOriginalBuilder:
    """Original-LLaVA folders (+ a separate CLIP tower folder) → SR-3D with fresh PE and region extractor."""

    name = "llava_original"

    def can_load(self, path: Path, config: dict[str, Any]) -> bool:
        if (path / "llm").is_dir():  # VILA-1.5 folders also say llava_llama, but keep parts in sub-folders
            return False
        archs = [str(a) for a in config.get("architectures") or []]
        return "mm_vision_tower" in config or any(a in LLM_TYPES for a in archs)

    def load(
        self,
        path: Path,
        dtype: Any = None,
        device_map: Any = None,
        quantization_config: Any = None,
        vision_tower: str | Path | None = None,
        **kwargs: Any,
    ) -> tuple[Any, Any]:
        """Load the folder.

        Args:
            path: original-LLaVA folder.
            dtype: default the folder's ``torch_dtype`` / ``dtype`` (else float16, LLaVA's own default).
            vision_tower: local folder of the CLIP tower; overrides ``mm_vision_tower``.
            **kwargs: SR3DConfig overrides, ``attn_implementation``.
        """
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        from sr3d_plugin.modeling.configuration_sr3d import SR3DConfig
        from sr3d_plugin.modeling.processing_sr3d import SR3DProcessor

        path = Path(path)
        overrides = split_config_overrides(kwargs)
        raw = read_json(path / "config.json")
        archs = [str(a) for a in raw.get("architectures") or []]
        llm_type = next((LLM_TYPES[a] for a in archs if a in LLM_TYPES), None)
        if llm_type is None:
            raise SR3DConfigError(f"{path}: architectures={archs}; expected one of {sorted(LLM_TYPES)}")
        projector = str(raw.get("mm_projector_type", "linear"))
        if projector not in _PROJECTORS:
            raise SR3DConfigError(f"{path}: mm_projector_type={projector!r}; expected one of {_PROJECTORS}")
        select = str(raw.get("mm_vision_select_feature", "patch"))
        if select not in ("patch", "cls_patch"):
            raise SR3DConfigError(f"{path}: mm_vision_select_feature={select!r}; expected 'patch' or 'cls_patch'")
        if raw.get("mm_use_im_start_end"):
            raise SR3DConfigError(f"{path}: mm_use_im_start_end=true (image start/end tokens) is not supported")
        tower_dir = Path(str(vision_tower or raw.get("mm_vision_tower") or ""))
        if not str(tower_dir) or not tower_dir.is_dir():
            raise SR3DInputError(
                f"{path}: the vision tower {str(vision_tower or raw.get('mm_vision_tower'))!r} is not a local folder; "
                "download it (e.g. `hf download openai/clip-vit-large-patch14-336 --local-dir DIR`) and pass "
                "vision_tower=DIR"
            )
        notes: list[str] = []
        if dtype is None or dtype == "auto":
            dtype = parse_dtype(raw.get("dtype") or raw.get("torch_dtype") or "float16")

        text_keys = {k: v for k, v in raw.items() if not k.startswith(("mm_", "tune_", "freeze_")) and k not in (
            "architectures", "model_type", "image_aspect_ratio", "tokenizer_padding_side", "tokenizer_model_max_length",
            "_name_or_path", "transformers_version", "use_mm_proj", "mm_patch_merge_type", "image_grid_pinpoints",
            "torch_dtype", "dtype",
        )}  # fmt: skip
        text_config = AutoConfig.for_model(llm_type, **text_keys)
        vision_config = AutoConfig.from_pretrained(str(tower_dir))
        vision_config = getattr(vision_config, "vision_config", None) or vision_config
        mm_hidden = raw.get("mm_hidden_size")
        if mm_hidden is not None and int(mm_hidden) != int(vision_config.hidden_size):
            raise SR3DConfigError(
                f"{path}: mm_hidden_size={mm_hidden} but the vision tower in {tower_dir} is "
                f"{vision_config.hidden_size} wide; expected equal"
            )

        ours, saved_tower = map_original_keys(read_weights(path, allow_pickle=True))
        if saved_tower:
            notes.append("the checkpoint carries its own vision tower weights; they replace the tower folder's")
            tower_state = {}
            for key, value in saved_tower.items():
                tower_state["vision_tower." + key.removeprefix("vision_model.")] = value
        else:
            tower_state = _vision_tower_state(tower_dir, vision_config, dtype)
        ours.update(tower_state)

        # the LLM config is passed so that the tokenizer does not try to read the llava_llama config.json
        tokenizer = AutoTokenizer.from_pretrained(str(path), config=text_config)
        added = add_special_tokens(tokenizer, [SR3D_SPECIAL_TOKENS["image"], SR3D_SPECIAL_TOKENS["mask"]])
        if added:
            notes.append(f"added {added} to the tokenizer (the original code uses the placeholder id -200)")
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = VICUNA_TEMPLATE
            notes.append("no chat template in the folder: using LLaVA-1.5's vicuna_v1 format")
        vocab = int(text_config.vocab_size)
        if len(tokenizer) > vocab:
            size = pad_vocabulary(
                ours, ["llm.model.embed_tokens.weight", "llm.lm_head.weight"], len(tokenizer), pad_to_multiple_of=64
            )
            text_config.vocab_size = size
            notes.append(f"LLM embeddings padded from {vocab} to {size} rows (multiple of 64, mean-initialised)")
        aspect = str(raw.get("image_aspect_ratio", "pad"))
        if aspect in ("pad", "square"):
            notes.append(f"image_aspect_ratio {aspect!r} (pad to a square) is replaced by a squash to one tile")
        elif aspect != "resize":
            raise SR3DConfigError(f"{path}: image_aspect_ratio={aspect!r}; expected 'pad', 'square' or 'resize'")

        kwargs_config: dict[str, Any] = {
            "vision_config": vision_config.to_dict(),
            "text_config": text_config.to_dict(),
            "projector_type": projector,
            "tile_size": int(vision_config.image_size),
            "image_aspect_ratio": "resize",
            "use_thumbnail": False,
            "vision_feature_layer": int(raw.get("mm_vision_select_layer", -2)),
            "vision_feature_select": select,
            "image_end_text": None,
            "tile_separator": "",
            "image_token_id": tokenizer.convert_tokens_to_ids(SR3D_SPECIAL_TOKENS["image"]),
            "mask_token_id": tokenizer.convert_tokens_to_ids(SR3D_SPECIAL_TOKENS["mask"]),
        }
        kwargs_config.update(overrides)
        config = SR3DConfig(**kwargs_config)
        model = instantiate(
            config, ours, dtype=dtype, quantization_config=quantization_config, notes=notes,
            device_map=device_map, **kwargs,
        )  # fmt: skip
        image_processor = AutoImageProcessor.from_pretrained(str(tower_dir))
        processor = SR3DProcessor.from_model_config(config, image_processor, tokenizer)
        return model, processor
