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
embedding matrices to a multiple of 64 (new rows = mean of the old ones, so they never win a greedy
step; compare logits over the original vocabulary).

The folder's own conventions are reproduced (``docs/conformance.md``, section "Original LLaVA and transformers' LLaVA family" lists where each comes from):

* the vision tower is read from the ``mm_vision_tower`` folder, as ``build_vision_tower(delay_load=True)``
  + ``load_model()`` do; tower tensors stored in the checkpoint are ignored unless the config says
  ``unfreeze_mm_vision_tower`` (then the original builds the tower first and the stored tensors win).
  A relative ``mm_vision_tower`` is resolved against the working directory (as the original), then
  against the model folder and its parent;
* ``image_aspect_ratio``: ``pad`` → pad to a square with the mean colour; ``anyres`` → LLaVA-1.6
  patches from ``image_grid_pinpoints`` with ``mm_patch_merge_type`` (``spatial_unpad``: unpadding +
  ``image_newline``); anything else → the CLIP processor's own resize + centre crop (``native``);
  the CLIP processor is transformers' PIL one (the original's ``CLIPImageProcessor``);
* prompts: the conversation template LLaVA infers from the folder name (``conv_mode`` option to choose
  another), ``<image>\n`` before the question, and ``tokenizer_image_token``'s chunked tokenisation;
* the vocabulary is resized to the tokenizer's length, as ``load_pretrained_model`` does.

Named deviations: ``image_aspect_ratio="resize"`` (squash) or ``"dynamic"`` (SR-3D tiles), ``conv_mode``,
``vision_tower=PATH``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sr3d_plugin.builders._common import (
    FRESH_PARTS,
    add_special_tokens,
    instantiate,
    pad_vocabulary,
    read_json,
    read_weights,
    split_config_overrides,
)
from sr3d_plugin.errors import SR3DConfigError, SR3DInputError
from sr3d_plugin.modeling.configuration_sr3d import SR3D_SPECIAL_TOKENS, parse_dtype

__all__ = ["LLM_TYPES", "LlavaOriginalBuilder", "load_sentencepiece_tokenizer", "map_original_keys"]

#: original-LLaVA architecture → transformers model type of its language model
LLM_TYPES = {
    "LlavaLlamaForCausalLM": "llama",
    "LlavaMistralForCausalLM": "mistral",
    "LlavaQwen2ForCausalLM": "qwen2",
    "LlavaQwenForCausalLM": "qwen2",
}

_PROJECTORS = ("mlp2x_gelu", "linear")
_TOWER_PREFIX = "model.vision_tower.vision_tower."
#: stored tensors that no LLaVA path uses
_DROPPED_PREFIXES = ("model.vision_resampler.",)


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
        elif key == "model.image_newline":
            ours["image_newline"] = value
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


def load_sentencepiece_tokenizer(path: Path, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(path)`` with a clear error when a SentencePiece ``tokenizer.model``
    (LLaVA-1.5 / Vicuna folders ship no ``tokenizer.json``) cannot be converted.

    transformers needs ``sentencepiece`` and a ``protobuf`` its model description loads with; without
    them it falls back to a tiktoken reader whose error ("tiktoken is required" / "Error parsing line")
    says nothing about the cause.
    """
    from transformers import AutoTokenizer

    if (path / "tokenizer.json").is_file() or not (path / "tokenizer.model").is_file():
        return AutoTokenizer.from_pretrained(str(path), **kwargs)
    hint = 'install the LLaVA extra: pip install "sr3d-plugin[llava]"'
    try:
        import sentencepiece  # noqa: F401
    except ImportError as exc:
        raise SR3DInputError(
            f"{path} has only a SentencePiece tokenizer.model (no tokenizer.json); reading it needs the "
            f"sentencepiece package: {hint}"
        ) from exc
    try:
        from sentencepiece import sentencepiece_model_pb2  # noqa: F401
    except Exception as exc:  # protobuf missing, or too old for this sentencepiece's generated code
        import importlib.metadata as md

        def version(name: str) -> str:
            try:
                return md.version(name)
            except md.PackageNotFoundError:
                return "not installed"

        raise SR3DInputError(
            f"{path} has only a SentencePiece tokenizer.model; converting it needs sentencepiece's model "
            f"description, which does not load with the installed protobuf ({exc}); sentencepiece "
            f"{version('sentencepiece')}, protobuf {version('protobuf')}: {hint} (sentencepiece 0.2.3 needs "
            "protobuf >= 7.36; with an older protobuf use sentencepiece < 0.2.3)"
        ) from exc
    return AutoTokenizer.from_pretrained(str(path), **kwargs)


def _resolve_tower(path: Path, given: str | Path | None, stored: Any) -> Path:
    """The vision tower folder: ``vision_tower=`` option, else ``mm_vision_tower`` (cwd, model folder, parent)."""
    name = str(given if given is not None else (stored or ""))
    if name:
        candidates = [Path(name)] if given is not None or Path(name).is_absolute() else [
            Path(name), path / name, path.parent / name,
        ]  # fmt: skip
        for c in candidates:
            if c.is_dir():
                return c
    raise SR3DInputError(
        f"{path}: the vision tower {name!r} (mm_vision_tower) is not a local folder; download it (e.g. "
        "`hf download openai/clip-vit-large-patch14-336 --local-dir DIR`) and pass vision_tower=DIR"
    )


def _pinpoints(path: Path, value: Any) -> list[list[int]]:
    import ast

    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as exc:
            raise SR3DConfigError(f"{path}: image_grid_pinpoints={value!r} is not a list of [width, height]") from exc
    if not isinstance(value, (list, tuple)) or not value:
        raise SR3DConfigError(f"{path}: image_aspect_ratio 'anyres' needs image_grid_pinpoints, got {value!r}")
    return [[int(a), int(b)] for a, b in value]


class LlavaOriginalBuilder:
    """Original-LLaVA folders (+ a separate CLIP tower folder) → SR-3D with fresh PE and region extractor."""

    name = "llava_original"

    def can_load(self, path: Path, config: dict[str, Any]) -> bool:
        if (path / "llm").is_dir():  # VILA-1.5 folders also say llava_llama, but keep parts in sub-folders
            return False
        archs = [str(a) for a in config.get("architectures") or []]
        return "mm_vision_tower" in config or any(a in LLM_TYPES for a in archs)

    def _plan(
        self, path: Path, given_path: str, vision_tower: str | Path | None, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """Everything :meth:`load` derives without reading weights: ``config``, ``tokenizer``, ``raw``
        (the folder's config.json), ``tower_dir``, ``vision_config``, ``notes``, ``stored_vocab``, ``cut_vocab`` (the size
        the stored matrices are cut to, or None) and ``image_newline`` (whether the checkpoint must hold
        one). SR3DConfig overrides are popped from ``kwargs``."""
        from transformers import AutoConfig

        from sr3d_plugin.modeling.configuration_sr3d import SR3DConfig
        from sr3d_plugin.modeling.llava_conventions import conv_mode_for_model_name, model_name_from_path

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
        if raw.get("s2"):
            raise SR3DConfigError(f"{path}: s2=true (multi-scale S2 vision tower) is not supported")
        tower_dir = _resolve_tower(path, vision_tower, raw.get("mm_vision_tower"))
        notes: list[str] = []

        text_keys = {k: v for k, v in raw.items() if not k.startswith(("mm_", "tune_", "freeze_")) and k not in (
            "architectures", "model_type", "image_aspect_ratio", "tokenizer_padding_side", "tokenizer_model_max_length",
            "_name_or_path", "transformers_version", "use_mm_proj", "mm_patch_merge_type", "image_grid_pinpoints",
            "torch_dtype", "dtype", "unfreeze_mm_vision_tower", "s2", "s2_scales",
        )}  # fmt: skip
        text_config = AutoConfig.for_model(llm_type, **text_keys)
        vision_config = AutoConfig.from_pretrained(str(tower_dir))
        vision_config = getattr(vision_config, "vision_config", None) or vision_config
        if select == "cls_patch" and getattr(vision_config, "model_type", "") == "clip_vision_model":
            raise SR3DConfigError(
                f"{path}: mm_vision_select_feature='cls_patch' keeps CLIP's CLS token (grid² + 1 tokens per tile); "
                "the plugin lays vision tokens on a grid (3D PE, regions), so this is not supported; expected 'patch'"
            )
        mm_hidden = raw.get("mm_hidden_size")
        if mm_hidden is not None and int(mm_hidden) != int(vision_config.hidden_size):
            raise SR3DConfigError(
                f"{path}: mm_hidden_size={mm_hidden} but the vision tower in {tower_dir} is "
                f"{vision_config.hidden_size} wide; expected equal"
            )

        # the LLM config is passed so that the tokenizer does not try to read the llava_llama config.json
        tokenizer = load_sentencepiece_tokenizer(path, config=text_config)
        if raw.get("mm_use_im_patch_token", True):
            notes.append(
                "mm_use_im_patch_token: the original adds an unused <im_patch> token with a randomly initialised "
                "embedding row; it is not added here (logits over the other tokens are unaffected)"
            )
        stored_vocab = vocab = int(text_config.vocab_size)
        cut_vocab = None
        if len(tokenizer) < vocab:  # load_pretrained_model: model.resize_token_embeddings(len(tokenizer))
            cut_vocab = vocab = len(tokenizer)
            text_config.vocab_size = vocab
        added = add_special_tokens(tokenizer, [SR3D_SPECIAL_TOKENS["image"], SR3D_SPECIAL_TOKENS["mask"]])
        if added:
            notes.append(f"added {added} to the tokenizer (the original code uses the placeholder id -200)")
        if len(tokenizer) > vocab:
            size = -(-len(tokenizer) // 64) * 64
            text_config.vocab_size = size
            notes.append(f"LLM embeddings padded from {vocab} to {size} rows (multiple of 64, mean-initialised)")

        aspect = str(raw.get("image_aspect_ratio") or "square")
        merge = str(raw.get("mm_patch_merge_type") or "flat")
        host: dict[str, Any] = {"image_aspect_ratio": "native", "mm_patch_merge_type": "flat"}
        if aspect == "pad":
            host["image_aspect_ratio"] = "pad"
        elif aspect == "anyres":
            if merge not in ("flat", "spatial", "spatial_unpad"):
                raise SR3DConfigError(
                    f"{path}: mm_patch_merge_type={merge!r}; expected 'flat', 'spatial' or 'spatial_unpad'"
                )
            host.update(
                image_aspect_ratio="anyres", image_grid_pinpoints=_pinpoints(path, raw.get("image_grid_pinpoints")),
                mm_patch_merge_type=merge, unpad_rounding="floor", use_image_newline="unpad" in merge,
            )  # fmt: skip
        conv_mode = conv_mode_for_model_name(model_name_from_path(given_path))

        kwargs_config: dict[str, Any] = {
            "vision_config": vision_config.to_dict(),
            "text_config": text_config.to_dict(),
            "projector_type": projector,
            "tile_size": int(vision_config.image_size),
            "use_thumbnail": False,
            "vision_feature_layer": int(raw.get("mm_vision_select_layer", -2)),
            "vision_feature_select": select,
            "image_end_text": None,
            "tile_separator": "",
            "image_token_id": tokenizer.convert_tokens_to_ids(SR3D_SPECIAL_TOKENS["image"]),
            "mask_token_id": tokenizer.convert_tokens_to_ids(SR3D_SPECIAL_TOKENS["mask"]),
            "conv_mode": conv_mode,
            "tokenize_image_chunks": True,
            **host,
        }
        kwargs_config.update(overrides)
        config = SR3DConfig(**kwargs_config)
        if config.image_aspect_ratio in ("dynamic", "resize") and config.mm_patch_merge_type != "flat":
            config.mm_patch_merge_type = "flat"
        return {
            "config": config, "tokenizer": tokenizer, "raw": raw, "tower_dir": tower_dir, "notes": notes, "vision_config": vision_config,
            "stored_vocab": stored_vocab, "cut_vocab": cut_vocab, "image_newline": bool(host.get("use_image_newline")),
            "merge": merge,
        }  # fmt: skip

    def config(self, path: Path, vision_tower: str | Path | None = None, **kwargs: Any) -> Any:
        """The :class:`SR3DConfig` :meth:`load` builds (same options), without reading the model weights."""
        return self._plan(Path(path), str(path), vision_tower, dict(kwargs))["config"]

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
            **kwargs: SR3DConfig overrides (e.g. ``conv_mode="vicuna_v1"``, ``image_aspect_ratio="resize"``),
                ``attn_implementation``.
        """
        from transformers import AutoImageProcessor

        from sr3d_plugin.modeling.processing_sr3d import SR3DProcessor

        given_path = str(path)
        path = Path(path)
        plan = self._plan(path, given_path, vision_tower, kwargs)
        config, tokenizer, raw, tower_dir = plan["config"], plan["tokenizer"], plan["raw"], plan["tower_dir"]
        notes: list[str] = []
        if dtype is None or dtype == "auto":
            dtype = parse_dtype(raw.get("dtype") or raw.get("torch_dtype") or "float16")

        ours, saved_tower = map_original_keys(read_weights(path, allow_pickle=True))
        if saved_tower and raw.get("unfreeze_mm_vision_tower"):
            # the original builds the tower at init (unfreeze_mm_vision_tower) and from_pretrained loads these
            notes.append("unfreeze_mm_vision_tower: the checkpoint's own vision tower tensors are used")
            tower_state = {"vision_tower." + k.removeprefix("vision_model."): v for k, v in saved_tower.items()}
        else:
            if saved_tower:
                notes.append(
                    f"vision tower read from {tower_dir} (mm_vision_tower), as the original does; the tower "
                    "tensors stored in the checkpoint are ignored"
                )
            tower_state = _vision_tower_state(tower_dir, plan["vision_config"], dtype)
        ours.update(tower_state)
        notes.extend(plan["notes"])
        keys = ("llm.model.embed_tokens.weight", "llm.lm_head.weight")
        if plan["cut_vocab"] is not None:
            for key in keys:
                if key in ours:
                    ours[key] = ours[key][: plan["cut_vocab"]].clone()
        size = int(config.text_config.vocab_size)
        if size > (plan["cut_vocab"] or plan["stored_vocab"]):
            pad_vocabulary(ours, list(keys), size)
        if not plan["image_newline"]:
            ours.pop("image_newline", None)
        elif "image_newline" not in ours:
            raise SR3DInputError(
                f"{path}: mm_patch_merge_type={plan['merge']!r} but the checkpoint has no model.image_newline"
            )
        model = instantiate(
            config, ours, dtype=dtype, quantization_config=quantization_config, notes=notes,
            device_map=device_map, allowed_missing=(*FRESH_PARTS, "image_newline"), **kwargs,
        )  # fmt: skip
        # the original's CLIPImageProcessor is PIL-based: use transformers' PIL backend for the same pixels
        image_processor = AutoImageProcessor.from_pretrained(str(tower_dir), backend="pil")
        processor = SR3DProcessor.from_model_config(
            config, image_processor, tokenizer, default_system=None, image_marker_suffix="\n",
            pixel_backend="pil",
        )  # fmt: skip
        return model, processor
