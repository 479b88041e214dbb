"""Sharded training on CPU processes: PyTorch FSDP2 with gloo, and DeepSpeed on its CPU accelerator.

accelerate 1.15 switches to FSDP only for GPU-like devices (``AcceleratorState`` turns
``fsdp_plugin`` into ``DistributedType.FSDP`` only from ``MULTI_GPU``, ``MULTI_XPU``, ...; CPU
processes stay ``MULTI_CPU``, i.e. DDP). PyTorch's own FSDP2 (``fully_shard``) runs on CPU
tensors with gloo, so for several CPU processes the trainer reads the same options through
accelerate's :class:`~accelerate.FullyShardedDataParallelPlugin` (recipe ``training.fsdp`` or the
``FSDP_*`` variables that ``accelerate launch --config_file recipes/accelerate/fsdp.yaml`` sets)
and applies them itself with :func:`shard_model_on_cpu`; accelerate then prepares only the
optimizer and the data loader (it would wrap the model in DDP otherwise).

DeepSpeed needs no such help, only a process-group backend: without ``cpu=True`` accelerate finds
no backend for CPU processes and counts one process, with ``cpu=True`` it ignores DeepSpeed, so the
trainer passes ``InitProcessGroupKwargs(backend="gloo")`` (:func:`cpu_deepspeed_kwargs`) and
DeepSpeed's CPU accelerator does the rest.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from sr3d_plugin.errors import SR3DConfigError

__all__ = [
    "cpu_deepspeed_kwargs",
    "cpu_fsdp_plugin",
    "cpu_processes",
    "fill_zero3_auto",
    "full_model_state_dict",
    "gradient_sync_off",
    "is_cpu_fsdp",
    "shard_model_on_cpu",
    "wants_deepspeed",
    "wants_fsdp",
    "without_zero3_init",
]


def cpu_processes() -> bool:
    """Whether this is one of several processes (``WORLD_SIZE`` > 1) on a machine without CUDA."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def wants_fsdp(fsdp: dict[str, Any] | None) -> bool:
    """FSDP asked for by the recipe (``training.fsdp``) or by ``accelerate launch`` (``ACCELERATE_USE_FSDP``)."""
    return bool(fsdp) or _env_flag("ACCELERATE_USE_FSDP")


def wants_deepspeed(deepspeed: str | None) -> bool:
    """DeepSpeed asked for by the recipe (``training.deepspeed``) or by ``accelerate launch``."""
    return bool(deepspeed) or _env_flag("ACCELERATE_USE_DEEPSPEED")


def cpu_deepspeed_kwargs() -> dict[str, Any]:
    """``Accelerator`` keyword arguments that let DeepSpeed run on CPU processes (gloo, no ``cpu=True``)."""
    from accelerate.utils import InitProcessGroupKwargs

    return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}


def cpu_fsdp_plugin(fsdp: dict[str, Any] | None) -> Any:
    """accelerate's FSDP plugin for ``fsdp`` (recipe options, the ``FSDP_*`` environment filling the rest).

    Raises:
        SR3DConfigError: options accelerate rejects, or ones the CPU path does not implement
            (FSDP1, CPU offload of parameters, ``cpu_ram_efficient_loading``), naming the option.
    """
    from accelerate import FullyShardedDataParallelPlugin

    try:
        plugin = FullyShardedDataParallelPlugin(**(fsdp or {}))
    except (TypeError, ValueError) as exc:
        raise SR3DConfigError(f"training.fsdp={fsdp!r}: {exc}") from None
    if plugin.fsdp_version != 2:
        raise SR3DConfigError(
            f"training.fsdp.fsdp_version={plugin.fsdp_version}: CPU processes shard with PyTorch's FSDP2 "
            "(fully_shard); expected fsdp_version: 2"
        )
    from torch.distributed.fsdp import CPUOffloadPolicy

    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        raise SR3DConfigError("training.fsdp.cpu_offload=true: parameters already live on the CPU; expected false")
    if plugin.cpu_ram_efficient_loading:
        raise SR3DConfigError(
            "training.fsdp.cpu_ram_efficient_loading=true is not implemented for CPU processes; expected false"
        )
    return plugin


def _wrap_predicate(plugin: Any, model: nn.Module) -> Any:
    """``module -> bool``: which sub-modules become their own FSDP unit (accelerate's policy options)."""
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

    policy = plugin.auto_wrap_policy
    names = plugin.transformer_cls_names_to_wrap
    if policy is transformer_auto_wrap_policy or (names and policy is None):
        wanted = set(names or getattr(model, "_no_split_modules", None) or [])
        present = {type(m).__name__ for m in model.modules()}
        missing = sorted(wanted - present)
        if not wanted or missing:
            raise SR3DConfigError(
                f"training.fsdp.transformer_cls_names_to_wrap={sorted(wanted)}: the model has no module of class "
                f"{missing or '(none given)'}; expected layer classes of this model (e.g. Qwen2DecoderLayer)"
            )
        return lambda m: type(m).__name__ in wanted
    if policy is size_based_auto_wrap_policy:
        limit = int(plugin.min_num_params or 0)
        return lambda m: sum(p.numel() for p in m.parameters(recurse=True)) >= limit
    return lambda m: False


def shard_model_on_cpu(model: nn.Module, plugin: Any, mixed_precision: str = "no") -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to ``model`` in place, bottom-up: one unit per wrapped layer, then the root.

    Every parameter becomes a ``DTensor`` sharded on dim 0 across the default process group (gloo);
    the optimizer must be built afterwards. ``mixed_precision`` ``bf16`` / ``fp16`` computes in that
    dtype and reduces gradients in fp32 (FSDP's ``MixedPrecisionPolicy``). Returns ``model``.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    if plugin.activation_checkpointing:
        raise SR3DConfigError(
            "training.fsdp.activation_checkpointing=true: use training.gradient_checkpointing (the LLM's own, "
            "use_reentrant=False) instead; expected false"
        )
    wrap = _wrap_predicate(plugin, model)
    kwargs = {"reshard_after_forward": bool(plugin.reshard_after_forward), "mp_policy": policy}
    modules = list(model.modules())
    for module in reversed(modules[1:]):  # children before parents
        if wrap(module) and not isinstance(module, FSDPModule):
            fully_shard(module, **kwargs)
    fully_shard(model, mp_policy=policy)
    return model


def is_cpu_fsdp(model: Any) -> bool:
    """Whether ``model`` was sharded by :func:`shard_model_on_cpu` (an FSDP2 module not managed by accelerate)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_model_state_dict(acc: Any, model: Any) -> dict[str, Any]:
    """The full state dict (CPU tensors, canonical names) on the main process; collective.

    For an FSDP2 model of the CPU path, via ``torch.distributed.checkpoint.state_dict`` (other
    processes get ``{}``); otherwise accelerate's ``get_state_dict`` (DDP, accelerate's FSDP, ZeRO-3).
    """
    if not is_cpu_fsdp(model):
        return acc.get_state_dict(model) or {}  # ZeRO-3 gathers to the main process: None elsewhere
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextlib.contextmanager
def gradient_sync_off(acc: Any, model: Any) -> Iterator[None]:
    """Accumulate gradients locally (no reduction) inside the block: FSDP2's switch or ``acc.no_sync``."""
    if is_cpu_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with acc.no_sync(model):
            yield


@contextlib.contextmanager
def without_zero3_init(acc: Any) -> Iterator[None]:
    """Build models inside the block without ZeRO-3's ``zero.Init`` (transformers' DeepSpeed hook unset).

    ``zero.Init`` makes every module construction a collective (each parameter is broadcast from
    process 0), but the trainer builds the model main process first (it may write the tiny base model
    and generated data), so the main process waited in a broadcast that the others, waiting at the
    barrier, never joined. Each process builds the full model instead, and ``deepspeed.initialize``
    partitions it (what ``recipes/accelerate/deepspeed-zero3.yaml`` does with ``zero3_init_flag: false``).
    """
    current = getattr(getattr(acc.state, "deepspeed_plugin", None), "dschf", None)  # the object transformers sees
    if current is None:
        yield
        return
    from transformers.integrations import deepspeed as hf_ds

    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds.set_hf_deepspeed_config(current)


def fill_zero3_auto(acc: Any, model: Any) -> None:
    """Fill the ZeRO-3 bucket sizes left ``auto`` from the LLM's hidden size (as accelerate would).

    accelerate derives them from ``model.config.hidden_size``, which an SR-3D config does not have (the
    LLM's is ``text_config.hidden_size``), and stops with "Can find neither model.config.hidden_size
    ...". Values: ``reduce_bucket_size`` H², ``stage3_prefetch_bucket_size`` 0.9 H²,
    ``stage3_param_persistence_threshold`` 10 H (elements).
    """
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(text, "hidden_size", None)
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    if not hidden:
        return
    fill = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    for key, value in fill.items():
        if zero.get(key) == "auto":
            zero[key] = value
