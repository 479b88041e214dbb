"""Builder for fresh models: an SR3DConfig (dict, JSON or YAML) + a tokenizer (+ an image processor).

Use it for tiny models in tests and demos, and to train an SR-3D model from scratch::

    model, processor = load_model("tiny.yaml", builder="scratch")      # or detected from the suffix
    model, processor = ScratchBuilder().build({"vision_config": {...}, "text_config": {...}}, tokenizer="tok/")

The config holds SR3DConfig fields (``vision_config`` and ``text_config`` as dicts with a
``model_type``) plus three builder keys:

* ``tokenizer``: a tokenizer folder, or ``"tiny"`` for the built-in test tokenizer
  (:func:`sr3d_plugin.presets.build_tiny_tokenizer`); required.
* ``image_processor``: an image-processor folder, or a dict of ``SiglipImageProcessor`` arguments;
  default: resize to ``tile_size`` and normalise with mean = std = 0.5.
* ``seed``: random seed of the initial weights (default 0).

``<image>`` and ``<mask>`` are added to the tokenizer when missing; ``text_config.vocab_size`` is
raised to the tokenizer's size when smaller. YAML is read with ``yaml.safe_load`` (SR3D-FACTS §9), aliases bounded (:func:`sr3d_plugin.limits.safe_yaml`).
A folder with an ``sr3d`` ``config.json`` and no weight files is also built fresh (config-only folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sr3d_plugin.builders._common import add_special_tokens, split_config_overrides
from sr3d_plugin.errors import SR3DConfigError, SR3DInputError
from sr3d_plugin.modeling.configuration_sr3d import SR3D_SPECIAL_TOKENS

__all__ = ["ScratchBuilder", "read_config_file"]

_BUILDER_KEYS = ("tokenizer", "image_processor", "seed")
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def read_config_file(path: Path) -> dict[str, Any]:
    """A config mapping from a ``.json`` / ``.yaml`` / ``.yml`` file (YAML via ``safe_load``)."""
    if not path.is_file():
        raise SR3DInputError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            from sr3d_plugin.limits import safe_yaml

            data = safe_yaml(text, f"config file {path}", error=SR3DInputError)
        else:
            raise SR3DInputError(f"config file {path} has suffix {suffix!r}; expected .json, .yaml or .yml")
    except (json.JSONDecodeError, ValueError) as exc:
        raise SR3DInputError(f"cannot parse {path}: {exc}") from exc
    except Exception as exc:  # yaml.YAMLError
        raise SR3DInputError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise SR3DInputError(f"{path} holds a {type(data).__name__}; expected a mapping of SR3DConfig fields")
    return data


def _tokenizer(spec: Any, base: Path | None) -> Any:
    from transformers import AutoTokenizer

    if spec is None:
        raise SR3DConfigError("a scratch model needs a tokenizer: set tokenizer to a tokenizer folder or 'tiny'")
    if isinstance(spec, str) and spec == "tiny":
        from sr3d_plugin.presets import build_tiny_tokenizer

        return build_tiny_tokenizer()
    if not isinstance(spec, (str, Path)) and hasattr(spec, "convert_tokens_to_ids"):
        return spec
    folder = Path(str(spec))
    if not folder.is_absolute() and base is not None:
        folder = base / folder
    if not folder.is_dir():
        raise SR3DInputError(f"tokenizer folder {folder} does not exist; expected a local folder or 'tiny'")
    return AutoTokenizer.from_pretrained(str(folder))


def _image_processor(spec: Any, tile_size: int, base: Path | None) -> Any:
    from transformers import AutoImageProcessor, SiglipImageProcessor

    if spec is None:
        spec = {}
    if isinstance(spec, dict):
        args = {"size": {"height": tile_size, "width": tile_size}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
        args.update(spec)
        return SiglipImageProcessor(**args)
    if hasattr(spec, "preprocess") or callable(spec):
        return spec
    folder = Path(str(spec))
    if not folder.is_absolute() and base is not None:
        folder = base / folder
    if not folder.is_dir():
        raise SR3DInputError(f"image processor folder {folder} does not exist; expected a folder or a dict")
    return AutoImageProcessor.from_pretrained(str(folder))


class ScratchBuilder:
    """An SR3DConfig (mapping, JSON/YAML file or config-only folder) → a randomly initialised model."""

    name = "scratch"

    def can_load(self, path: Path, config: dict[str, Any]) -> bool:
        if config.get("model_type") != "sr3d":
            return False
        return not any(next(path.glob(pattern), None) for pattern in _WEIGHT_PATTERNS)

    def _spec(self, path: Path | dict[str, Any], kwargs: dict[str, Any]) -> tuple[dict[str, Any], Path | None]:
        """``(mapping, base folder)`` from a config file, a config-only folder or a mapping; builder keys and
        SR3DConfig fields are popped from ``kwargs`` into the mapping."""
        base: Path | None = None
        if isinstance(path, dict):
            data = dict(path)
        else:
            p = Path(path)
            if p.is_dir():
                data = read_config_file(p / "config.json")
                base = p
                if (p / "tokenizer_config.json").is_file():
                    data.setdefault("tokenizer", str(p))
            else:
                data = read_config_file(p)
                base = p.parent
        for key in _BUILDER_KEYS:
            if key in kwargs:
                data[key] = kwargs.pop(key)
        data.update(split_config_overrides(kwargs))
        return data, base

    def config(self, path: Path | dict[str, Any], **kwargs: Any) -> Any:
        """The :class:`SR3DConfig` :meth:`load` builds, without creating weights (reads the tokenizer only)."""
        data, base = self._spec(path, kwargs)
        return self._prepare(data, None, base)[0]

    def load(
        self,
        path: Path | dict[str, Any],
        dtype: Any = None,
        device_map: Any = None,
        quantization_config: Any = None,
        **kwargs: Any,
    ) -> tuple[Any, Any]:
        """Build from a config file, a config-only folder or a mapping (``kwargs`` override its entries)."""
        data, base = self._spec(path, kwargs)
        return self.build(data, dtype=dtype, device_map=device_map, quantization_config=quantization_config,
                          base=base, **kwargs)  # fmt: skip

    def _prepare(self, data: dict[str, Any], tokenizer: Any, base: Path | None) -> tuple[Any, Any, Any, int]:
        """``(config, tokenizer, image-processor spec, seed)`` from a mapping of SR3DConfig fields + builder keys."""
        from sr3d_plugin.modeling.configuration_sr3d import SR3DConfig

        data = dict(data)
        for key in ("model_type", "architectures", "transformers_version", "auto_map"):
            data.pop(key, None)
        tok = _tokenizer(tokenizer if tokenizer is not None else data.pop("tokenizer", None), base)
        data.pop("tokenizer", None)
        ip_spec = data.pop("image_processor", None)
        seed = int(data.pop("seed", 0))
        add_special_tokens(tok, [SR3D_SPECIAL_TOKENS["image"], SR3D_SPECIAL_TOKENS["mask"]])
        text = data.get("text_config")
        if not isinstance(text, dict) or "model_type" not in text:
            raise SR3DConfigError(f"text_config={text!r}; expected a mapping with a model_type (e.g. 'qwen2')")
        if not isinstance(data.get("vision_config"), dict) or "model_type" not in data["vision_config"]:
            raise SR3DConfigError(
                f"vision_config={data.get('vision_config')!r}; expected a mapping with a model_type "
                "(e.g. 'siglip_vision_model')"
            )
        text = dict(text)
        if int(text.get("vocab_size", 0) or 0) < len(tok):
            text["vocab_size"] = len(tok)
        data["text_config"] = text
        data["image_token_id"] = tok.convert_tokens_to_ids(SR3D_SPECIAL_TOKENS["image"])
        data["mask_token_id"] = tok.convert_tokens_to_ids(SR3D_SPECIAL_TOKENS["mask"])
        try:
            config = SR3DConfig(**data)
        except TypeError as exc:
            raise SR3DConfigError(f"invalid SR3DConfig field in the scratch config: {exc}") from exc
        return config, tok, ip_spec, seed

    def build(
        self,
        data: dict[str, Any],
        tokenizer: Any = None,
        image_processor: Any = None,
        dtype: Any = None,
        device_map: Any = None,
        quantization_config: Any = None,
        base: Path | None = None,
        **kwargs: Any,
    ) -> tuple[Any, Any]:
        """Build ``(model, processor)`` from a mapping of SR3DConfig fields + builder keys."""
        from sr3d_plugin.builders._common import instantiate
        from sr3d_plugin.modeling import SR3DForConditionalGeneration
        from sr3d_plugin.modeling.configuration_sr3d import parse_dtype
        from sr3d_plugin.modeling.processing_sr3d import SR3DProcessor

        config, tok, ip_spec, seed = self._prepare(data, tokenizer, base)
        if image_processor is not None:
            ip_spec = image_processor
        torch_dtype = parse_dtype(dtype) if dtype not in (None, "auto") else torch.float32
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            fresh = SR3DForConditionalGeneration(config)
            if fresh.perception_encoder is not None and hasattr(fresh.perception_encoder, "reset_parameters"):
                # transformers' post_init initialises the PE's inner Linear layers with its own default; a
                # fresh PE follows the SR-3D convention (xavier, gain pe_init_gain, SR3D-FACTS §5)
                with torch.no_grad():
                    fresh.perception_encoder.reset_parameters(config.pe_init_gain)
        if quantization_config is not None or device_map is not None or kwargs:
            # route through from_pretrained so bitsandbytes / device_map apply exactly as for checkpoints
            model = instantiate(
                config, dict(fresh.state_dict()), dtype=torch_dtype, quantization_config=quantization_config,
                device_map=device_map, allowed_missing=(), **kwargs,
            )  # fmt: skip
        else:
            model = fresh.to(torch_dtype).eval()
            model.load_notes = []
        processor = SR3DProcessor.from_model_config(config, _image_processor(ip_spec, config.tile_size, base), tok)
        return model, processor
