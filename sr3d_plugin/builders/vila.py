"""Builder for VILA-layout folders: NVILA-Lite, SR-3D releases and other VILA checkpoints.

Layout (SR3D-FACTS §1): a top-level ``config.json`` (``model_type: "vila"``, ``architectures:
["VILAForCausalLM"]``; VILA-1.5 folders say ``llava_llama``) and one Hugging Face folder per part::

    llm/                 causal LM (Qwen2ForCausalLM) + tokenizer (+ chat template)
    vision_tower/        SiglipVisionModel + image processor
    mm_projector/        config.json {mm_projector_type} + model.safetensors (``layers.*``)
    perception_encoder/  SR-3D only: ``layers.position_embedding_head.{0,1,3}.*``
    region_extractor/    SR-3D only: ``projector.{weight,bias}``

Key mapping (every tensor of the folder lands unchanged in the model; nothing is renamed except
one documented legacy prefix):

================================  =============================================================
folder / stored key               model key
================================  =============================================================
``llm/K``                         ``llm.K`` (Qwen2 names are identical in transformers 4.x and 5.x)
``vision_tower/vision_model.K``   ``vision_tower.K`` — transformers 4.x wrapped SigLIP/CLIP vision
                                  towers in ``vision_model``; transformers 5 does not. The prefix is
                                  stripped only when the unprefixed key is a tensor of the tower.
``vision_tower/K``                ``vision_tower.K`` (folders saved with transformers 5)
``mm_projector/K``                ``mm_projector.K``
``perception_encoder/K``          ``perception_encoder.K``
``region_extractor/K``            ``region_extractor.K``
================================  =============================================================

Config mapping: ``mm_vision_select_layer`` → ``vision_feature_layer`` (−2), ``mm_vision_select_feature``
(``cls_patch`` keeps all SigLIP tokens, ``patch`` drops the first) → ``vision_feature_select``,
``image_aspect_ratio`` / ``min_tiles`` / ``max_tiles`` → tiling, the image encoder's ``end_tokens``
(``"\\n"``) → ``image_end_text`` with ``tile_separator`` ``"\\n"``, ``mm_projector`` /
``perception_encoder`` / ``region_extractor`` → registered component names, ``model_dtype``
(a string such as ``"torch.bfloat16"``, read through an allow-list, never ``eval``) → default dtype.

NVILA-Lite (no ``perception_encoder/`` or ``region_extractor/``): both parts are created fresh (PE with
xavier gain 0.001), ``<mask>`` is added to the tokenizer when missing (embeddings grow only when its id
does not fit the existing matrix), and the model's ``load_notes`` say so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sr3d_plugin.builders._common import (
    FRESH_PARTS,
    UNUSED_PARTS,
    add_special_tokens,
    instantiate,
    pad_vocabulary,
    read_json,
    read_weights,
    split_config_overrides,
    tensor_shape,
    truncate_vocabulary,
)
from sr3d_plugin.errors import SR3DConfigError, SR3DInputError
from sr3d_plugin.modeling.configuration_sr3d import SR3D_SPECIAL_TOKENS, parse_dtype

__all__ = [
    "PARTS",
    "VILA_MODEL_TYPES",
    "VilaBuilder",
    "chat_stop_token_ids",
    "read_vila_state_dict",
    "vila_config_to_sr3d",
]

#: sub-folders of a VILA checkpoint, in the order they are read
PARTS = ("llm", "vision_tower", "mm_projector", "perception_encoder", "region_extractor")
REQUIRED_PARTS = ("llm", "vision_tower", "mm_projector")

#: top-level ``model_type`` values of VILA-family folders
VILA_MODEL_TYPES = ("vila", "llava_llama")

#: stored-key prefixes that transformers 4.x put around vision towers (stripped when needed)
LEGACY_VISION_PREFIXES = ("vision_model.",)

_SELECT_FEATURE = {"cls_patch": "cls_patch", "patch": "patch", "full": "full", "default": "default"}


def _image_encoder_settings(top: dict[str, Any]) -> dict[str, Any]:
    """The ``image_encoder`` entry of a VILA config (a dict or a JSON string), or {}."""
    raw = top.get("image_encoder")
    if raw is None:
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SR3DConfigError(f"image_encoder={raw!r} in the VILA config is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise SR3DConfigError(f"image_encoder in the VILA config is a {type(raw).__name__}; expected an object")
    return raw


def _component_name(value: Any, key: str) -> str | None:
    """A registered component name from a config value that may be a string or a dict."""
    if value is None or value is False:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        for field in (key, "type", "pe_type", "region_extractor_type", "mm_projector_type"):
            if isinstance(value.get(field), str):
                return value[field]
    raise SR3DConfigError(f"cannot read a component name from {key}={value!r}; expected a string")


def vila_config_to_sr3d(
    path: Path, top: dict[str, Any], tokenizer: Any, overrides: dict[str, Any] | None = None
) -> tuple[Any, list[str]]:
    """Map a VILA top-level config (plus the sub-folder configs) onto an :class:`SR3DConfig`.

    Args:
        path: the checkpoint folder.
        top: its parsed ``config.json``.
        tokenizer: the LLM tokenizer, already holding ``<image>`` and ``<mask>``.
        overrides: SR3DConfig fields that win over the mapped values.

    Returns:
        ``(config, notes)``; notes describe settings that could not be reproduced exactly.
    """
    from transformers import AutoConfig

    from sr3d_plugin.modeling.configuration_sr3d import SR3DConfig

    notes: list[str] = []
    text_config = AutoConfig.from_pretrained(str(path / "llm"))
    vision_config = AutoConfig.from_pretrained(str(path / "vision_tower"))
    vision_config = getattr(vision_config, "vision_config", None) or vision_config

    for key, actual, where in (
        ("hidden_size", text_config.hidden_size, "llm/config.json"),
        ("mm_hidden_size", vision_config.hidden_size, "vision_tower/config.json"),
    ):
        if top.get(key) is not None and int(top[key]) != int(actual):
            raise SR3DConfigError(f"{path}: config.json says {key}={top[key]} but {where} has {actual}; expected equal")

    proj_cfg = path / "mm_projector" / "config.json"
    projector = read_json(proj_cfg).get("mm_projector_type") if proj_cfg.is_file() else None
    projector = projector or _component_name(top.get("mm_projector"), "mm_projector")
    if projector is None:
        cfg = top.get("mm_projector_cfg")
        projector = cfg.get("mm_projector_type") if isinstance(cfg, dict) else None
    if projector is None:
        raise SR3DConfigError(f"{path}: no projector type in mm_projector/config.json or config.json (mm_projector)")

    pe_cfg_file = path / "perception_encoder" / "config.json"
    pe_type = _component_name(read_json(pe_cfg_file), "pe_type") if pe_cfg_file.is_file() else None
    pe_type = pe_type or _component_name(top.get("perception_encoder"), "pe_type") or "abs_mlp"
    re_cfg_file = path / "region_extractor" / "config.json"
    re_type = _component_name(read_json(re_cfg_file), "region_extractor_type") if re_cfg_file.is_file() else None
    re_type = re_type or _component_name(top.get("region_extractor"), "region_extractor_type") or "regiongpt"

    aspect = str((overrides or {}).get("image_aspect_ratio", top.get("image_aspect_ratio", "dynamic")))
    if aspect == "pad":
        # no silent approximation: VILA pads to a square with the processor's mean colour
        # (mm_utils.process_image), and SR-REAL's process_xyz has no point-map counterpart for it
        raise SR3DConfigError(
            f"{path}: image_aspect_ratio='pad' (pad to a square with the image mean, VILA mm_utils.process_image) "
            "is not reproduced for VILA folders; pass image_aspect_ratio='resize' to squash each image to one tile "
            "instead (answers will differ from the original)"
        )
    if aspect not in ("dynamic", "resize"):
        raise SR3DConfigError(f"{path}: image_aspect_ratio={aspect!r} is not supported; expected 'dynamic' or 'resize'")
    select = str(top.get("mm_vision_select_feature", "cls_patch"))
    if select not in _SELECT_FEATURE:
        raise SR3DConfigError(f"{path}: mm_vision_select_feature={select!r}; expected one of {sorted(_SELECT_FEATURE)}")
    encoder = _image_encoder_settings(top)
    if encoder.get("start_tokens"):
        raise SR3DConfigError(
            f"{path}: image_encoder.start_tokens={encoder['start_tokens']!r} is not supported; expected none"
        )
    end_text = encoder.get("end_tokens", "\n")

    kwargs: dict[str, Any] = {
        "vision_config": vision_config.to_dict(),
        "text_config": text_config.to_dict(),
        "projector_type": projector,
        "position_encoder_type": pe_type,
        "region_extractor_type": re_type,
        "tile_size": int(vision_config.image_size),
        "min_tiles": int(top.get("min_tiles", 1)),
        "max_tiles": int(top.get("max_tiles", 12)),
        "image_aspect_ratio": aspect,
        "vision_feature_layer": int(top.get("mm_vision_select_layer", -2)),
        "vision_feature_select": _SELECT_FEATURE[select],
        "image_end_text": end_text,
        "tile_separator": "\n",
        "num_video_frames": int(top.get("num_video_frames", 32) or 32),
        "image_token_id": tokenizer.convert_tokens_to_ids(SR3D_SPECIAL_TOKENS["image"]),
        "mask_token_id": tokenizer.convert_tokens_to_ids(SR3D_SPECIAL_TOKENS["mask"]),
    }
    pe_weights = path / "perception_encoder"
    if pe_weights.is_dir():
        head = tensor_shape(pe_weights, "layers.position_embedding_head.0.weight")  # header only
        if head is not None:
            in_features = int(head[1])
            if in_features % 3 or (in_features // 3 - 1) % 2:
                raise SR3DConfigError(
                    f"{pe_weights}: the first PE layer takes {in_features} features; expected 3·(1 + 2·F)"
                )
            kwargs["pe_num_freqs"] = (in_features // 3 - 1) // 2
    kwargs.update(overrides or {})
    return SR3DConfig(**kwargs), notes


def chat_stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids generation stops at, as VILA's ``utils/tokenizer.py`` ``infer_stop_tokens``: the
    tokenizer's EOS plus every token that follows an assistant turn in the chat template (found by
    rendering a dummy conversation whose answers are ``<vila/sentinel>``). Sorted, without duplicates."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    sentinel = SR3D_SPECIAL_TOKENS["sentinel"]
    sentinel_id = tokenizer.convert_tokens_to_ids(sentinel)
    if getattr(tokenizer, "chat_template", None) and sentinel_id is not None:
        turns = [{"role": "user", "content": "question"}, {"role": "assistant", "content": sentinel}] * 3
        try:
            text = tokenizer.apply_chat_template(turns, tokenize=False)
        except Exception:  # a template that cannot render a plain conversation: EOS only
            return sorted(ids)
        seq = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.update(int(seq[k + 1]) for k in range(len(seq) - 1) if seq[k] == sentinel_id)
    return sorted(ids)


def _expected_vision_keys(vision_config: Any) -> set[str]:
    from transformers import AutoModel

    with torch.device("meta"):
        tower = AutoModel.from_config(vision_config)
    return set(tower.state_dict())


def read_vila_state_dict(path: Path, vision_config: Any) -> dict[str, torch.Tensor]:
    """All tensors of the VILA folder under our module paths (see the module docstring for the map)."""
    state: dict[str, torch.Tensor] = {}
    vision_keys: set[str] | None = None
    for part in PARTS:
        folder = path / part
        if not folder.is_dir():
            continue
        tensors = read_weights(folder)
        if part == "vision_tower":
            vision_keys = vision_keys or _expected_vision_keys(vision_config)
        for key, value in tensors.items():
            target = key
            if part == "vision_tower" and key not in vision_keys:  # type: ignore[operator]
                for prefix in LEGACY_VISION_PREFIXES:
                    if key.startswith(prefix) and key[len(prefix) :] in vision_keys:  # type: ignore[operator]
                        target = key[len(prefix) :]
                        break
            state[f"{part}.{target}"] = value
    return state


class VilaBuilder:
    """VILA / NVILA-Lite / SR-3D folders → :class:`SR3DForConditionalGeneration` + :class:`SR3DProcessor`."""

    name = "vila"

    def can_load(self, path: Path, config: dict[str, Any]) -> bool:
        archs = [str(a) for a in config.get("architectures") or []]
        vila_like = config.get("model_type") in VILA_MODEL_TYPES or any("VILA" in a for a in archs)
        return vila_like and all((path / part).is_dir() for part in REQUIRED_PARTS)

    def _plan(self, path: Path, kwargs: dict[str, Any]) -> tuple[Any, Any, dict[str, Any], list[str], int]:
        """``(config, tokenizer, top-level config, notes, stored vocabulary size)``; reads configs and the
        tokenizer (and the PE's first weight for its frequency count), never the model weights.

        ``config.text_config.vocab_size`` is already the loaded size: ``len(tokenizer)`` (the stored
        matrices are cut, as the original loader does, unless ``keep_padded_vocab``, or grown for
        added tokens). SR3DConfig overrides and ``keep_padded_vocab`` are popped from ``kwargs``.
        """
        from transformers import AutoTokenizer

        from sr3d_plugin.presets import CHATML_TEMPLATE

        missing = [p for p in REQUIRED_PARTS if not (path / p).is_dir()]
        if missing:
            raise SR3DInputError(f"{path} lacks the VILA sub-folder(s) {missing}; expected {list(REQUIRED_PARTS)}")
        top = read_json(path / "config.json")
        overrides = split_config_overrides(kwargs)
        notes: list[str] = []

        keep_padded_vocab = bool(kwargs.pop("keep_padded_vocab", False))
        tokenizer = AutoTokenizer.from_pretrained(str(path / "llm"))
        # VILA adds its tokens at load time in this order: <vila/sentinel> (utils/tokenizer.py
        # infer_stop_tokens), then the media tokens of llava/constants.py MEDIA_TOKENS (image, video, mask)
        added = add_special_tokens(
            tokenizer,
            [
                SR3D_SPECIAL_TOKENS["sentinel"],
                SR3D_SPECIAL_TOKENS["image"],
                SR3D_SPECIAL_TOKENS["video"],
                SR3D_SPECIAL_TOKENS["mask"],
            ],
        )
        if added:
            notes.append(f"added {added} to the tokenizer")
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = CHATML_TEMPLATE
            notes.append("llm/ has no chat template: using ChatML (the Qwen2 / NVILA template)")
        config, config_notes = vila_config_to_sr3d(path, top, tokenizer, overrides)
        notes.extend(config_notes)
        vocab = int(config.text_config.vocab_size)
        if len(tokenizer) < vocab and not keep_padded_vocab:
            # the original loader (llava/model/builder.py load_pretrained_model) calls
            # resize_token_embeddings(len(tokenizer)): Qwen2's padded, never-trained rows are cut off
            config.text_config.vocab_size = len(tokenizer)
        elif len(tokenizer) > vocab:
            config.text_config.vocab_size = len(tokenizer)
        return config, tokenizer, top, notes, vocab

    @staticmethod
    def _vocab_notes(stored: int, size: int) -> list[str]:
        if size < stored:
            return [
                f"LLM embeddings and lm_head cut from {stored} to len(tokenizer)={size} rows, as the original "
                "loader does (keep_padded_vocab=True keeps the padded rows)"
            ]
        if size > stored:
            return [f"LLM embeddings grown from {stored} to {size} rows for the added tokens (mean-initialised)"]
        return []

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
        """Load the folder.

        Args:
            path: VILA-layout folder.
            dtype: torch dtype or name; default (None or ``"auto"``) is the folder's ``model_dtype``.
            device_map, quantization_config: as for ``from_pretrained`` (see ``load_model``).
            **kwargs: SR3DConfig overrides (e.g. ``max_tiles=6``), ``attn_implementation`` and
                ``keep_padded_vocab`` (default False: like the original loader, cut the LLM's
                embeddings and ``lm_head`` to ``len(tokenizer)`` rows; True keeps Qwen2's padded rows,
                which greedy decoding may then emit although they were never trained).
        """
        from transformers import AutoImageProcessor

        from sr3d_plugin.modeling.processing_sr3d import SR3DProcessor

        path = Path(path)
        config, tokenizer, top, notes, vocab = self._plan(path, kwargs)
        image_processor = AutoImageProcessor.from_pretrained(str(path / "vision_tower"))
        state = read_vila_state_dict(path, config.vision_config)
        for flag, part in (
            ("use_position_encoding", "perception_encoder"),
            ("use_region_extractor", "region_extractor"),
        ):
            if not getattr(config, flag, True):  # switched off: the part's tensors stay unused (PE-off identity)
                unused = [k for k in state if k.startswith(part + ".")]
                for k in unused:
                    del state[k]
                if unused:
                    notes.append(f"{flag}=False: the {len(unused)} tensor(s) of {part}/ are not loaded")
        size = int(config.text_config.vocab_size)
        keys = ["llm.model.embed_tokens.weight", "llm.lm_head.weight"]
        if size < vocab:
            truncate_vocabulary(state, keys, size)
        elif size > vocab:
            pad_vocabulary(state, keys, size)
        notes.extend(self._vocab_notes(vocab, size))

        if dtype is None or dtype == "auto":
            dtype = parse_dtype(top.get("model_dtype", "torch.float16"))
        model = instantiate(
            config, state, dtype=dtype, quantization_config=quantization_config, notes=notes,
            allowed_missing=FRESH_PARTS + UNUSED_PARTS, device_map=device_map, **kwargs,
        )  # fmt: skip
        # SR-REAL's tokenize_conversation passes no system message: the chat template's default applies
        # (VILA's own qwen2 template, saved into llm/ by its save_pretrained, says "You are a helpful assistant")
        processor = SR3DProcessor.from_model_config(config, image_processor, tokenizer, default_system=None)
        stops = chat_stop_token_ids(tokenizer)
        if stops:  # VILA's default_generation_config: eos = the chat template's stop tokens
            gen = model.generation_config
            gen.eos_token_id = stops if len(stops) > 1 else stops[0]
            if gen.pad_token_id is None:
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
                gen.pad_token_id = int(pad)
        return model, processor
