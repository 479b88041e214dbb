"""Model set-up for finetuning: load or build, quantise the LLM, add LoRA, choose what trains.

Rules (SR3D-FACTS §7, §9):

* the vision tower is frozen and never wrapped by LoRA — targets are a regex anchored at ``llm.``,
  because SigLIP's attention also has ``q_proj``/``k_proj``/``v_proj``;
* the perception encoder (3D PE), projector and region extractor train in full and are saved with
  the adapter (peft ``modules_to_save``), in ``model.trainable_dtype`` (fp32 by default);
* QLoRA quantises only the LLM's linear layers (NF4 + double quantisation); the skip list holds
  full module paths, as transformers 5 requires;
* gradient checkpointing on the LLM with ``use_reentrant=False``;
* an inference pass on the CPU before training repacks bitsandbytes 4-bit weights into a layout
  whose matmul has no backward, so LoRA gradients below it vanish — :func:`restore_4bit_training_layout`
  undoes it and training calls it before the first step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sr3d_plugin.errors import SR3DConfigError, SR3DInputError
from sr3d_plugin.modeling.configuration_sr3d import SR3D_SPECIAL_TOKENS, SR3DConfig, parse_dtype
from sr3d_plugin.presets import PRESETS

__all__ = [
    "PRESETS",
    "TrainableReport",
    "bnb_config",
    "build_model",
    "format_trainable",
    "lora_target_regex",
    "model_config_for",
    "optimizer_groups",
    "prepare_for_training",
    "restore_4bit_training_layout",
    "trainable_report",
]


def _tiny_spec(recipe: Any) -> dict[str, Any]:
    """The ``scratch`` builder's input for ``model.preset: tiny`` (seeded with ``training.seed``)."""
    from sr3d_plugin.presets import tiny_scratch_spec

    return tiny_scratch_spec(dict(recipe.model.config_overrides), seed=recipe.training.seed)


def model_config_for(recipe: Any) -> tuple[SR3DConfig, str]:
    """The model's config without loading weights: ``(config, where it came from)``.

    From ``model.path`` when it exists on this machine (through the builder that would load it,
    ``model.builder`` or :func:`~sr3d_plugin.builders.detect_builder`), else from ``model.preset``.
    """
    from sr3d_plugin import builders

    m = recipe.model
    if m.path is not None and Path(m.path).exists():
        p = Path(m.path)
        try:
            config, name = builders.model_config(p, builder=m.builder)
        except SR3DInputError:
            if m.builder is not None or m.preset is None:
                raise
        else:
            return config, f"{name} checkpoint {p}"
    if m.preset == "tiny":
        return builders.model_config(_tiny_spec(recipe), builder="scratch")[0], "preset tiny"
    if m.preset in PRESETS:
        return PRESETS[m.preset](), f"preset {m.preset}"
    raise SR3DConfigError(
        f"cannot plan model.path={m.path!r}: the folder is not on this machine and model.preset is not set "
        "(use model.preset=sr3d-8b to plan for SR-3D-8B)"
    )


def bnb_config(recipe: Any) -> Any:
    """``BitsAndBytesConfig`` of the recipe's quantisation section (LLM linear layers only), or None."""
    from sr3d_plugin.builders.quantization import make_quantization_config

    q = recipe.quantization
    return make_quantization_config(
        load_in_4bit=bool(q.load_in_4bit),
        compute_dtype=parse_dtype(q.compute_dtype),
        quant_type=q.quant_type,
        double_quant=q.double_quant,
    )


def build_model(
    recipe: Any, device: torch.device | str | None = None, base_dir: Path | None = None
) -> tuple[Any, Any, str]:
    """Load (or build from scratch) the model and processor named by the recipe.

    Args:
        recipe: the :class:`~sr3d_plugin.training.recipe.Recipe`.
        device: where 4-bit weights are placed (bitsandbytes quantises on load).
        base_dir: for ``preset: tiny`` without a path, the random base model is written here (so
            ``sr3d merge`` and resumed runs find the same base); required for 4-bit tiny models.

    Returns:
        ``(model, processor, base_path)`` — ``base_path`` is the folder the frozen weights come from.
    """
    m = recipe.model
    dtype = parse_dtype(m.dtype)
    quant = bnb_config(recipe)
    path = m.path
    if path is None:
        if m.preset != "tiny":
            raise SR3DConfigError("model.path is empty; give a checkpoint folder or model.preset=tiny")
        from sr3d_plugin.builders import load_model
        from sr3d_plugin.modeling import SR3DForConditionalGeneration

        torch.manual_seed(recipe.training.seed)
        model, processor = load_model(_tiny_spec(recipe), builder="scratch")
        if base_dir is None:
            if quant is not None:
                raise SR3DConfigError("a 4-bit tiny model needs a base folder to be quantised from")
            return model.to(dtype), processor, ""
        base_dir = Path(base_dir)
        if not (base_dir / "config.json").is_file():
            from sr3d_plugin.io_utils import atomic_dir

            with atomic_dir(base_dir) as tmp:
                model.save_pretrained(str(tmp))
                processor.save_pretrained(str(tmp))
        path = str(base_dir)
        if quant is None:
            # reload so that a resumed run starts from byte-identical frozen weights
            model = SR3DForConditionalGeneration.from_pretrained(path, dtype=dtype)
            return model, processor, path
    from sr3d_plugin.builders import load_model

    kwargs: dict[str, Any] = {"dtype": dtype}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    if quant is not None:
        kwargs["quantization_config"] = quant
        from sr3d_plugin.devices import placement_map

        kwargs["device_map"] = placement_map(device if device is not None else "cpu")
    model, processor = load_model(path, builder=m.builder, **kwargs)
    return model, processor, str(path)


# ----------------------------------------------------------------------------------------------
# LoRA / freezing
# ----------------------------------------------------------------------------------------------


def lora_target_regex(names: list[str]) -> str:
    """peft ``target_modules`` regex matching the named linear layers under ``llm.`` only (``re.fullmatch``)."""
    if not names:
        raise SR3DConfigError("lora.target_modules is empty")
    for n in names:
        if not re.fullmatch(r"[A-Za-z0-9_]+", n):
            raise SR3DConfigError(f"lora.target_modules entry {n!r} is not a layer name (letters, digits, _)")
    return rf"llm\.(?:.*\.)?(?:{'|'.join(re.escape(n) for n in names)})"


def restore_4bit_training_layout(model: nn.Module) -> int:
    """Undo bitsandbytes' CPU inference repacking of 4-bit weights; returns how many layers were restored.

    On CPUs with AVX512-BF16, a no-grad eval forward converts each ``Linear4bit`` weight to a packed
    layout whose matmul has no backward (SR3D-FACTS §9): later LoRA gradients below that layer are
    silently zero. bitsandbytes ships the inverse conversion; this applies it to every such layer.
    """
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:  # pragma: no cover - bitsandbytes missing or too old
        return 0
    restored = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            weight.data, new_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            weight.quant_state = new_state
            if hasattr(module, "quant_state"):
                module.quant_state = new_state
            restored += 1
    return restored


@dataclass
class TrainableReport:
    """What trains: names and element counts of trainable parameters, and totals."""

    trainable: list[tuple[str, int]] = field(default_factory=list)
    trainable_params: int = 0
    frozen_params: int = 0
    groups: dict[str, int] = field(default_factory=dict)
    group_tensors: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "trainable_params": self.trainable_params,
            "frozen_params": self.frozen_params,
            "groups": self.groups,
            "group_tensors": self.group_tensors,
            "trainable": [{"name": n, "numel": c} for n, c in self.trainable],
        }

    def format(self, verbose: bool = False) -> str:
        """The grouped summary (group, tensors, parameters); every tensor too when ``verbose``."""
        return format_trainable(self.to_dict(), verbose)


def format_trainable(report: dict[str, Any], verbose: bool = False) -> str:
    """Console summary of a :meth:`TrainableReport.to_dict` (as in the ``start`` event): one line per group."""
    lines = [f"trainable parameters: {report['trainable_params']:,} (frozen: {report['frozen_params']:,})"]
    tensors = report.get("group_tensors") or {}
    for g, c in report["groups"].items():
        count = f"{tensors[g]:>6,} tensors" if g in tensors else ""
        lines.append(f"  {g:<20} {count} {c:>14,} params")
    if verbose:
        for row in report["trainable"]:
            lines.append(f"    {row['name']}  {row['numel']:,}")
    elif report["trainable"]:
        lines.append("  (every trainable tensor: --verbose, or the start event of log.jsonl)")
    return "\n".join(lines)


def _group(name: str) -> str:
    if "lora_" in name:
        return "lora"
    for g in ("perception_encoder", "mm_projector", "region_extractor", "vision_tower"):
        if f"{g}." in name or name.startswith(g):
            return g
    return "llm"


def _numel(p: torch.Tensor) -> int:
    """Element count of a parameter as stored in full precision (bitsandbytes 4-bit params hold 2 per byte)."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    if shape is not None:
        return int(torch.Size(shape).numel())
    return p.numel()


def trainable_report(model: nn.Module) -> TrainableReport:
    """Names and counts of trainable parameters (peft prefixes stripped), grouped by module."""
    rep = TrainableReport()
    for name, p in model.named_parameters():
        n = _numel(p)
        if p.requires_grad:
            short = name.removeprefix("base_model.model.")
            rep.trainable.append((short, n))
            rep.trainable_params += n
            g = _group(short)
            rep.groups[g] = rep.groups.get(g, 0) + n
            rep.group_tensors[g] = rep.group_tensors.get(g, 0) + 1
        else:
            rep.frozen_params += n
    return rep


def _check_vision_tower_untouched(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if "vision_tower" not in name:
            continue
        if hasattr(module, "lora_A") or type(module).__module__.startswith("peft.tuners"):
            raise SR3DConfigError(f"LoRA wrapped the vision tower module {name}; LoRA must target the LLM only")
    for name, p in model.named_parameters():
        if "vision_tower" in name and p.requires_grad:
            raise SR3DConfigError(f"vision tower parameter {name} is trainable; the vision tower must stay frozen")


def _drop_vision_input_grad_hooks(model: nn.Module) -> int:
    """Remove transformers' ``enable_input_require_grads`` hooks from the vision tower; returns how many.

    peft and activation checkpointing call ``enable_input_require_grads`` on the whole model, which in
    transformers 5 hooks *every* sub-model's input embeddings — including SigLIP's patch embedding.
    The frozen tower would then record its whole forward for autograd (tens of GiB for 32 frames of
    SR-3D-8B) although no gradient is needed there: the 3D PE is added after the tower.
    """
    removed = 0
    for name, module in model.named_modules():
        if "vision_tower" not in name:
            continue
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__name__", "") == "make_inputs_require_grads":
                del module._forward_hooks[key]
                removed += 1
    return removed


def prepare_for_training(model: nn.Module, recipe: Any) -> tuple[nn.Module, TrainableReport]:
    """Freeze, add LoRA (or unfreeze the LLM), set dtypes and gradient checkpointing.

    Returns:
        ``(model, report)`` — a peft ``PeftModel`` when ``lora.enabled``, else the model itself.
    """
    m, lo, t = recipe.model, recipe.lora, recipe.training
    train_dtype = parse_dtype(m.trainable_dtype)
    quantised = bool(getattr(model, "is_loaded_in_4bit", False) or recipe.quantization.load_in_4bit)
    restored = restore_4bit_training_layout(model) if quantised else 0
    if restored:
        import warnings

        warnings.warn(
            f"{restored} 4-bit layer(s) had been repacked by an inference pass; restored the training layout "
            "(SR3D-FACTS §9: train before any inference on the CPU)",
            RuntimeWarning,
            stacklevel=2,
        )
    if quantised:
        # prevention: an eval pass during training (e.g. a sample generation) must not repack again
        for module in model.modules():
            if getattr(module, "support_avx512bf16_for_cpu", False):
                module.support_avx512bf16_for_cpu = False
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [name for name in m.trained_modules if getattr(model, name, None) is not None]
    for name in trained:
        getattr(model, name).to(train_dtype)
    if hasattr(model, "llm") and getattr(model.llm, "config", None) is not None:
        model.llm.config.use_cache = False
    if t.gradient_checkpointing:
        llm = model.llm
        if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.x
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # pragma: no cover - older transformers
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lo.enabled:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lo.r,
            lora_alpha=lo.alpha,
            lora_dropout=lo.dropout,
            target_modules=lora_target_regex(lo.target_modules),
            modules_to_save=trained or None,
            use_rslora=lo.use_rslora,
            bias="none",
        )
        model = get_peft_model(model, config, autocast_adapter_dtype=train_dtype == torch.float32)
        if t.mixed_precision != "no":
            # under autocast the matmuls run in bf16/fp16 anyway; peft's cast of every LoRA input to the
            # fp32 adapter dtype would only keep an fp32 copy of each input for backward
            for module in model.modules():
                if hasattr(module, "cast_input_dtype_enabled"):
                    module.cast_input_dtype_enabled = False
        for p in model.parameters():
            if p.requires_grad and p.dtype != train_dtype and p.dtype.is_floating_point:
                p.data = p.data.to(train_dtype)
    else:
        for name in trained:
            for p in getattr(model, name).parameters():
                p.requires_grad_(True)
        if m.train_llm:
            for p in model.llm.parameters():
                p.requires_grad_(True)
    unhooked = _drop_vision_input_grad_hooks(model)
    _check_vision_tower_untouched(model)
    report = trainable_report(model)
    report.notes = [f"removed {unhooked} input-require-grads hook(s) from the frozen vision tower"] if unhooked else []
    if report.trainable_params == 0:
        raise SR3DConfigError("nothing to train: enable lora, model.train_llm or model.trained_modules")
    return model, report


def optimizer_groups(model: nn.Module, recipe: Any) -> list[dict[str, Any]]:
    """AdamW parameter groups: LLM/LoRA weights at ``learning_rate``, SR-3D modules at ``modules_learning_rate``;
    no weight decay on biases and norms (1-D tensors)."""
    t = recipe.training
    mod_lr = t.modules_learning_rate if t.modules_learning_rate is not None else t.learning_rate
    buckets: dict[tuple[float, float], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        short = name.removeprefix("base_model.model.")
        lr = t.learning_rate if _group(short) in ("lora", "llm") else mod_lr
        wd = 0.0 if p.dim() < 2 else t.weight_decay
        buckets.setdefault((lr, wd), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in buckets.items()]


def special_token_ids(processor: Any) -> dict[str, int]:
    """Ids of the SR-3D placeholder tokens in the processor's tokenizer (for sanity checks)."""
    tok = processor.tokenizer
    return {k: int(tok.convert_tokens_to_ids(v)) for k, v in SR3D_SPECIAL_TOKENS.items()}
