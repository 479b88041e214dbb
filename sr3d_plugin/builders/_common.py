"""Plumbing shared by the model builders (private: the public entry points are in ``sr3d_plugin.builders``).

A foreign checkpoint is turned into an SR-3D model in three steps:

1. its config is mapped onto an :class:`~sr3d_plugin.modeling.SR3DConfig` (builder-specific);
2. its tensors are collected into one flat state dict whose keys are our module paths
   (``llm.*``, ``vision_tower.*``, ``mm_projector.*``, ``perception_encoder.*``, ``region_extractor.*``);
3. :func:`instantiate` hands config + state dict to ``SR3DForConditionalGeneration.from_pretrained``,
   so dtype, ``device_map`` and bitsandbytes quantisation go through transformers' own loading path.

Everything here reads local files only; weights are read from safetensors (pickled ``.bin`` files only
with ``torch.load(weights_only=True)``, never unrestricted unpickling, SR3D-FACTS §9).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from sr3d_plugin.errors import SR3DConfigError, SR3DInputError

logger = logging.getLogger("sr3d_plugin.builders")

__all__ = [
    "FRESH_PARTS",
    "UNUSED_PARTS",
    "add_special_tokens",
    "config_override_names",
    "instantiate",
    "pad_vocabulary",
    "read_json",
    "read_weights",
    "split_config_overrides",
    "tensor_shape",
]

#: sub-modules a builder may create fresh when the checkpoint has no weights for them
FRESH_PARTS = ("perception_encoder.", "region_extractor.")
#: also tolerated: the SigLIP attention-pooling head, which SR-3D never uses (features come from hidden states)
UNUSED_PARTS = ("vision_tower.head.",)

#: keyword arguments of ``from_pretrained`` that builders forward unchanged
_LOAD_KWARGS = {
    "attn_implementation",
    "device_map",
    "max_memory",
    "offload_folder",
    "low_cpu_mem_usage",
}


def config_override_names() -> set[str]:
    """Names of the SR-3D fields of :class:`SR3DConfig` a caller may override when building a model."""
    from sr3d_plugin.modeling.configuration_sr3d import SR3DConfig

    names = set(SR3DConfig.__annotations__)
    return names - {"model_type", "sub_configs_defaults", "vision_config", "text_config"}


def split_config_overrides(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop and return the keyword arguments that are SR3DConfig fields (e.g. ``use_position_encoding=False``)."""
    names = config_override_names()
    return {key: kwargs.pop(key) for key in list(kwargs) if key in names}


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, with errors that name the file."""
    if not path.is_file():
        raise SR3DInputError(f"{path} does not exist; expected a JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SR3DInputError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise SR3DInputError(f"{path} holds a JSON {type(data).__name__}; expected an object")
    return data


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map", {})
        names = sorted(set(weight_map.values()))
        files = [folder / name for name in names]
        for f in files:
            if f.resolve().parent != folder.resolve():
                raise SR3DInputError(f"{index} points outside its folder ({f}); refusing to read it")
            if not f.is_file():
                raise SR3DInputError(f"{index} lists {f.name}, which is missing from {folder}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    return sorted(folder.glob("*.safetensors"))


def tensor_shape(folder: Path, key: str) -> tuple[int, ...] | None:
    """The shape of tensor ``key`` in a safetensors weight folder, read from the file header only
    (no tensor data); None when no safetensors file of the folder holds ``key``."""
    from safetensors import safe_open

    files = _safetensors_files(folder)
    if not files:
        read_weights(folder)  # raises the error a load would raise (no weights / pickled weights only)
    for f in files:
        with safe_open(str(f), "pt") as handle:
            if key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                return tuple(int(n) for n in handle.get_slice(key).get_shape())
    return None


def read_weights(folder: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face weight folder, keys exactly as stored.

    Args:
        folder: folder with ``model.safetensors``, a sharded ``model.safetensors.index.json`` or, when
            ``allow_pickle``, ``pytorch_model*.bin`` files (read with ``torch.load(weights_only=True)``).
        allow_pickle: accept ``.bin`` files when no safetensors file exists.

    Returns:
        name → tensor, CPU.
    """
    from safetensors.torch import load_file

    files = _safetensors_files(folder)
    out: dict[str, torch.Tensor] = {}
    if files:
        for f in files:
            out.update(load_file(str(f)))
        return out
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins and allow_pickle:
        for f in bins:
            state = torch.load(str(f), map_location="cpu", weights_only=True)
            if not isinstance(state, Mapping):
                raise SR3DInputError(f"{f} does not hold a state dict (got {type(state).__name__})")
            out.update(state)
        return out
    if bins:
        raise SR3DInputError(
            f"{folder} only has pickled weights ({bins[0].name}); expected safetensors (convert them first, "
            "or use a builder that reads .bin files with weights_only=True)"
        )
    raise SR3DInputError(f"{folder} has no weights; expected model.safetensors (or a sharded safetensors index)")


def add_special_tokens(tokenizer: Any, tokens: Iterable[str]) -> list[str]:
    """Add the missing ``tokens`` as special tokens (in order); return those that were added."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return missing


def pad_vocabulary(
    state: dict[str, torch.Tensor], keys: Iterable[str], new_size: int, pad_to_multiple_of: int = 1
) -> int:
    """Grow embedding / output matrices in ``state`` to at least ``new_size`` rows (in place).

    New rows are the mean of the existing rows (so new tokens start as an "average" token; the
    LLaVA conversion in transformers does the same with added noise). Returns the final row count.
    """
    size = -(-new_size // pad_to_multiple_of) * pad_to_multiple_of
    for key in keys:
        if key not in state:
            continue
        old = state[key]
        if old.shape[0] >= size:
            continue
        mean = old.float().mean(0, keepdim=True).to(old.dtype)
        state[key] = torch.cat([old, mean.expand(size - old.shape[0], *old.shape[1:])], dim=0)
    return size


def truncate_vocabulary(state: dict[str, torch.Tensor], keys: Iterable[str], new_size: int) -> None:
    """Keep the first ``new_size`` rows of embedding / output matrices in ``state`` (in place).

    What ``resize_token_embeddings(len(tokenizer))`` does to a checkpoint whose vocabulary is padded
    beyond its tokenizer (Qwen2): the first rows are kept unchanged, the padded ones dropped.
    """
    if new_size <= 0:
        raise SR3DInputError(f"cannot cut the vocabulary to {new_size} rows; expected a positive size")
    for key in keys:
        if key in state and state[key].shape[0] > new_size:
            state[key] = state[key][:new_size].contiguous()


def instantiate(
    config: Any,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype | str | None = None,
    quantization_config: Any = None,
    notes: list[str] | None = None,
    allowed_missing: tuple[str, ...] = FRESH_PARTS,
    **load_kwargs: Any,
) -> Any:
    """Build ``SR3DForConditionalGeneration`` from ``config`` and a state dict in our key names.

    Keys of ``state`` that the model does not have, or model keys missing from ``state`` outside
    ``allowed_missing`` prefixes, raise :class:`SR3DInputError` (a key-mapping bug must never load
    silently). Fresh position encoders are re-initialised with ``config.pe_init_gain``
    (xavier, SR3D-FACTS §5).
    """
    from sr3d_plugin.modeling import SR3DForConditionalGeneration

    unknown = set(load_kwargs) - _LOAD_KWARGS
    if unknown:
        raise SR3DConfigError(
            f"unsupported loading option(s) {sorted(unknown)}; expected SR3DConfig fields or one of {sorted(_LOAD_KWARGS)}"
        )
    load_kwargs = {k: v for k, v in load_kwargs.items() if v is not None}
    if dtype is None or dtype == "auto":
        dtype = torch.float32
    if quantization_config is not None and getattr(quantization_config, "load_in_4bit", False):
        # 4-bit matmuls compute in the dtype of the activations around them
        quantization_config.bnb_4bit_compute_dtype = dtype
    # from_pretrained with a state dict gets a concrete dtype (its "auto" would guess it from the tensors)
    model, info = SR3DForConditionalGeneration.from_pretrained(
        None,
        config=config,
        state_dict=state,
        dtype=dtype,
        quantization_config=quantization_config,
        output_loading_info=True,
        **load_kwargs,
    )
    unexpected = sorted(info.get("unexpected_keys", ()))
    if unexpected:
        raise SR3DInputError(
            f"{len(unexpected)} checkpoint tensor(s) have no place in the model, e.g. {unexpected[:5]}; "
            "the checkpoint does not match the mapped config"
        )
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(allowed_missing))
    if missing:
        raise SR3DInputError(
            f"{len(missing)} model tensor(s) are absent from the checkpoint, e.g. {missing[:5]}; expected every "
            f"tensor except fresh {', '.join(p.rstrip('.') for p in allowed_missing)} parts"
        )
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        raise SR3DInputError(f"tensor shapes differ between checkpoint and model: {list(mismatched)[:5]}")
    missing_all = set(info.get("missing_keys", ()))
    fresh = [p.rstrip(".") for p in allowed_missing if any(k.startswith(p) for k in missing_all)]
    if "perception_encoder" in fresh and model.perception_encoder is not None:
        # transformers' missing-weight init uses its own default for the inner Linear layers; the SR-3D
        # convention for a fresh PE is xavier with gain pe_init_gain (a near no-op on a pretrained VLM)
        with torch.no_grad():
            model.perception_encoder.reset_parameters(config.pe_init_gain)
    model.load_notes = list(notes or [])
    for part in fresh:
        if part == "perception_encoder":
            note = (
                f"perception_encoder has no weights in the checkpoint: created fresh (xavier gain "
                f"{config.pe_init_gain}, a near no-op until trained)"
            )
        elif part == "vision_tower.head":
            note = (
                "the checkpoint has no vision pooling head (vision_tower.head); it is unused by SR-3D and left random"
            )
        else:
            note = f"{part} has no weights in the checkpoint: created fresh (train it before relying on it)"
        model.load_notes.append(note)
    for note in model.load_notes:
        logger.warning(note)
    return model.eval()
