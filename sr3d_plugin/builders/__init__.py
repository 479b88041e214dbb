"""Model builders: turn a checkpoint folder (ours, VILA/NVILA/SR-3D, LLaVA) or a config into an SR-3D model.

``load_model(path)`` picks the builder automatically (:func:`detect_builder`) or by name; builders are
registered through the ``register_model_builders`` plugin hook. Built-in builders:

========================  ===================================================================
``sr3d``                  our own folders (``save_pretrained`` output, model_type ``sr3d``)
``vila``                  VILA / NVILA-Lite / SR-3D release folders (``llm/``, ``vision_tower/``, …)
``llava_hf``              transformers LLaVA-family folders (``llava``, ``llava_next``, ``llava_onevision``)
``llava_original``        folders of the original LLaVA code base (``LlavaLlamaForCausalLM``)
``scratch``               a fresh model from an SR3DConfig (dict, JSON or YAML) + tokenizer
========================  ===================================================================

A builder is any object with ``can_load(path, config_dict) -> bool``,
``load(path, **kwargs) -> (model, processor)`` and ``config(path, **kwargs) -> SR3DConfig`` (the config
``load`` would build, without reading weights: :func:`model_config`, used by the memory planner). Loading options common to all builders (normalised by
:func:`~sr3d_plugin.builders.quantization.resolve_load_options`): ``dtype``, ``device_map``,
``load_in_4bit`` / ``load_in_8bit`` (bitsandbytes on the LLM only), ``quantization_config``,
``attn_implementation``; builders also accept SR3DConfig fields as overrides
(e.g. ``use_position_encoding=False``). A builder may attach ``model.load_notes`` (list of str):
what it created fresh or could not reproduce.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sr3d_plugin.errors import SR3DInputError

__all__ = [
    "CONFIG_FILE_SUFFIXES",
    "LOADING_OPTIONS",
    "convert_checkpoint",
    "detect_builder",
    "foreign_builder_for",
    "load_foreign_model",
    "load_model",
    "model_config",
]

#: options of :func:`load_model` that say how weights are loaded (not what the model is)
LOADING_OPTIONS = (
    "dtype", "torch_dtype", "device_map", "load_in_4bit", "load_in_8bit", "quantization_config",
    "attn_implementation", "max_memory", "offload_folder", "low_cpu_mem_usage",
)  # fmt: skip

#: files (not folders) that the ``scratch`` builder reads as an SR3DConfig
CONFIG_FILE_SUFFIXES = (".json", ".yaml", ".yml")


def _read_config(path: Path) -> dict[str, Any]:
    from sr3d_plugin.builders._common import read_json

    cfg = path / "config.json"
    if not cfg.is_file():
        raise SR3DInputError(f"{path} has no config.json; expected a model folder")
    return read_json(cfg)


def detect_builder(path: str | Path) -> str:
    """Name of the builder that understands ``path`` (a model folder, or a config file for ``scratch``)."""
    from sr3d_plugin import plugins

    p = Path(path)
    if p.is_file() and p.suffix.lower() in CONFIG_FILE_SUFFIXES:
        return "scratch"
    if not p.is_dir():
        raise SR3DInputError(
            f"model folder {p} does not exist (hub ids must be downloaded first, e.g. with `hf download`)"
        )
    config = _read_config(p)
    for name, reg in sorted(plugins.registry("model_builders").items()):
        builder = reg.factory()
        if builder.can_load(p, config):
            return name
    raise SR3DInputError(
        f"no model builder recognises {p} (model_type={config.get('model_type')!r}, "
        f"architectures={config.get('architectures')}); registered builders: "
        f"{', '.join(sorted(plugins.registry('model_builders')))}"
    )


def load_model(path: str | Path | dict[str, Any], builder: str | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """Load ``(model, processor)`` from a folder with the named (or detected) builder.

    Args:
        path: model folder (or, for ``scratch``, an SR3DConfig JSON/YAML file or a mapping of its fields).
        builder: registered builder name; detected from the folder when None.
        **kwargs: ``dtype`` (``"bfloat16"``, ``"float16"``, ``"float32"``, ``"auto"`` or a torch dtype;
            default: the checkpoint's), ``device_map``, ``load_in_4bit`` / ``load_in_8bit`` (NF4 + double
            quantisation / LLM.int8 on the LLM only; vision tower, PE, projector, region extractor and
            ``lm_head`` stay in ``dtype``), ``quantization_config``, ``attn_implementation``, SR3DConfig
            field overrides and builder-specific options (see each builder).
    """
    from sr3d_plugin import plugins
    from sr3d_plugin.builders.quantization import resolve_load_options

    if isinstance(path, dict):  # a mapping of SR3DConfig fields + builder keys (scratch)
        name, target = builder or "scratch", path
    else:
        name, target = builder or detect_builder(path), Path(path)
    options = resolve_load_options(kwargs)
    return plugins.create("model_builders", name).load(target, **options)


def model_config(path: str | Path | dict[str, Any], builder: str | None = None, **kwargs: Any) -> tuple[Any, str]:
    """The :class:`SR3DConfig` that :func:`load_model` would build, without reading weights.

    Args:
        path: as for :func:`load_model` (a mapping is accepted by the ``scratch`` builder).
        builder: registered builder name; detected from ``path`` when None (``scratch`` for a mapping).
        **kwargs: SR3DConfig field overrides and builder-specific options, as for :func:`load_model`;
            loading options (``dtype``, ``device_map``, quantisation) are ignored.

    Returns:
        ``(config, builder name)``.
    """
    from sr3d_plugin import plugins

    if builder is not None:
        name = builder
    else:
        name = "scratch" if isinstance(path, dict) else detect_builder(path)
    options = {k: v for k, v in kwargs.items() if k not in LOADING_OPTIONS}
    target = path if isinstance(path, dict) else Path(path)
    return plugins.create("model_builders", name).config(target, **options), name


def foreign_builder_for(path: Any, kwargs: dict[str, Any]) -> str | None:
    """The builder for a non-``sr3d`` local folder given to ``SR3DForConditionalGeneration.from_pretrained``.

    Returns None (use transformers' own loading) for our folders, hub ids, an explicit ``config`` or
    ``state_dict``, and folders no builder recognises.
    """
    if path is None or kwargs.get("config") is not None or kwargs.get("state_dict") is not None:
        return None
    p = Path(str(path))
    if not p.is_dir() or not (p / "config.json").is_file():
        return None
    try:
        config = _read_config(p)
    except SR3DInputError:
        return None
    if config.get("model_type") == "sr3d":
        return None
    try:
        return detect_builder(p)
    except SR3DInputError:
        return None


#: ``from_pretrained`` arguments that mean nothing for a local foreign folder (dropped when routing)
_HUB_KWARGS = (
    "cache_dir", "force_download", "local_files_only", "token", "revision", "use_safetensors", "weights_only",
    "trust_remote_code", "_from_auto", "_from_pipeline", "proxies", "subfolder", "variant", "ignore_mismatched_sizes",
)  # fmt: skip


def load_foreign_model(path: Any, model_args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``SR3DForConditionalGeneration.from_pretrained`` routing: load a foreign folder with its builder.

    Returns the model (or ``(model, info)`` when ``output_loading_info`` is set), or None when
    ``path`` is not a foreign folder and transformers' own loading applies.
    """
    name = foreign_builder_for(path, kwargs)
    if name is None:
        return None
    if model_args:
        raise SR3DInputError(f"positional model arguments {model_args!r} are not supported for a {name} folder")
    options = {k: v for k, v in kwargs.items() if k not in _HUB_KWARGS}
    want_info = bool(options.pop("output_loading_info", False))
    model, _ = load_model(path, builder=name, **options)
    if want_info:
        return model, {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": [],
                       "builder": name, "notes": list(getattr(model, "load_notes", []))}  # fmt: skip
    return model


def convert_checkpoint(
    source: str | Path, destination: str | Path, builder: str | None = None, overwrite: bool = False, **kwargs: Any
) -> dict[str, Any]:
    """Load ``source`` with a builder and write a standard SR-3D folder to ``destination``.

    The folder holds ``config.json``, ``model.safetensors`` (safetensors only) and the processor files;
    it is written atomically (:func:`sr3d_plugin.io_utils.atomic_dir`) and loads with
    ``AutoModelForImageTextToText.from_pretrained``. Quantised conversion is refused.

    Returns:
        a summary: ``source``, ``destination``, ``builder``, ``dtype``, ``parameters``, ``notes``.
    """
    from sr3d_plugin.errors import SR3DConfigError
    from sr3d_plugin.io_utils import atomic_dir

    src, dst = Path(source), Path(destination)
    if kwargs.get("load_in_4bit") or kwargs.get("load_in_8bit") or kwargs.get("quantization_config") is not None:
        raise SR3DConfigError("conversion writes full-precision weights; load_in_4bit/load_in_8bit are not allowed")
    if dst.exists() and not overwrite:
        raise SR3DInputError(f"destination {dst} already exists; pass overwrite=True to replace it")
    if dst.resolve() == src.resolve():
        raise SR3DInputError(f"destination {dst} is the source folder; expected a new folder")
    name = builder or detect_builder(src)
    model, processor = load_model(src, builder=name, **kwargs)
    with atomic_dir(dst) as tmp:
        model.save_pretrained(str(tmp))  # transformers 5 writes safetensors only
        processor.save_pretrained(str(tmp))
        for pickled in tmp.glob("*.bin"):
            pickled.unlink()
    return {
        "source": str(src),
        "destination": str(dst),
        "builder": name,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "notes": list(getattr(model, "load_notes", [])),
    }
