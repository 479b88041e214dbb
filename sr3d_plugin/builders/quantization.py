"""Quantised (bitsandbytes) and mixed-precision loading options shared by every builder.

Only the language model is quantised: the vision tower, the 3D position encoder, the projector,
the region extractor and the LLM's output head stay ordinary ``nn.Linear`` layers in the requested
dtype (VILA quantises only the LLM too, SR3D-FACTS §7). transformers 5 matches
``llm_int8_skip_modules`` against full module paths, so the skip list names them from the root
of :class:`~sr3d_plugin.modeling.SR3DForConditionalGeneration` (SR3D-FACTS §9).

4-bit uses NF4 with double quantisation (QLoRA's setting); 8-bit uses LLM.int8().
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from sr3d_plugin.devices import device_of
from sr3d_plugin.errors import SR3DConfigError

__all__ = [
    "LLM_ONLY_SKIP_MODULES",
    "check_bitsandbytes",
    "make_quantization_config",
    "resolve_load_options",
]

#: full module paths kept out of bitsandbytes (everything that is not the LLM body)
LLM_ONLY_SKIP_MODULES = ["vision_tower", "mm_projector", "perception_encoder", "region_extractor", "llm.lm_head"]


@functools.lru_cache(maxsize=4)
def _probe(bits: int, device: str) -> str | None:
    """Run one tiny quantised matmul; return an error text, or None when it works."""
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # ImportError, or a broken native library
        return f"bitsandbytes cannot be imported ({type(exc).__name__}: {exc})"
    try:
        if bits == 4:
            layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
        layer = layer.to(device)
        with torch.no_grad():
            layer(torch.ones(1, 64, device=device))
    except Exception as exc:  # backend without support for this mode on this device
        return f"{type(exc).__name__}: {exc}"
    return None


def check_bitsandbytes(bits: int, device: str = "cpu") -> None:
    """Raise :class:`SR3DConfigError` when bitsandbytes cannot run ``bits``-bit layers on ``device``."""
    if bits not in (4, 8):
        raise SR3DConfigError(f"bits={bits!r}; expected 4 or 8")
    error = _probe(bits, device)
    if error is not None:
        raise SR3DConfigError(
            f"load_in_{bits}bit=True needs bitsandbytes with {bits}-bit support on {device}, which failed here: "
            f"{error}. Install a bitsandbytes build for this device or load without quantisation"
        )


def make_quantization_config(
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    compute_dtype: torch.dtype | None = None,
    skip_modules: list[str] | None = None,
    quant_type: str = "nf4",
    double_quant: bool = True,
) -> Any:
    """A ``BitsAndBytesConfig`` that quantises the LLM only (None when neither flag is set).

    The one place such a config is made: model loading (``load_in_4bit=True`` options) and training
    recipes (``quantization:`` section, see :func:`sr3d_plugin.training.model_setup.bnb_config`) both
    call it.

    Args:
        load_in_4bit: 4-bit weights (``quant_type``, double quantisation by default), compute in ``compute_dtype``.
        load_in_8bit: LLM.int8().
        compute_dtype: dtype of the 4-bit matmuls (default float32; bfloat16 on GPUs is usual).
        skip_modules: full module paths kept in full precision (default :data:`LLM_ONLY_SKIP_MODULES`).
        quant_type: ``"nf4"`` (QLoRA) or ``"fp4"``.
        double_quant: also quantise the 4-bit scales (QLoRA's double quantisation).
    """
    if load_in_4bit and load_in_8bit:
        raise SR3DConfigError("load_in_4bit and load_in_8bit are both set; expected at most one")
    if quant_type not in ("nf4", "fp4"):
        raise SR3DConfigError(f"quant_type={quant_type!r}; expected 'nf4' or 'fp4'")
    if not (load_in_4bit or load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=load_in_4bit,
        load_in_8bit=load_in_8bit,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype or torch.float32,
        bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=list(skip_modules or LLM_ONLY_SKIP_MODULES),
    )


def _with_skip_modules(config: Any) -> Any:
    """Make sure a user-given BitsAndBytesConfig keeps the non-LLM parts out of quantisation."""
    skip = list(getattr(config, "llm_int8_skip_modules", None) or [])
    for name in LLM_ONLY_SKIP_MODULES:
        if name not in skip:
            skip.append(name)
    config.llm_int8_skip_modules = skip
    return config


def resolve_load_options(kwargs: dict[str, Any], default_dtype: Any = None) -> dict[str, Any]:
    """Normalise loading options for a builder (returns a new dict).

    Understands ``dtype`` (names such as ``"bfloat16"``, ``"torch.bfloat16"``, ``"auto"`` or a torch
    dtype; ``torch_dtype`` is accepted as an alias), ``load_in_4bit`` / ``load_in_8bit`` (turned into a
    ``quantization_config``), an explicit ``quantization_config`` (skip list completed) and
    ``device_map``; everything else is passed through.
    """
    from sr3d_plugin.modeling.configuration_sr3d import parse_dtype

    out = dict(kwargs)
    if "torch_dtype" in out:
        if out.get("dtype") is not None:
            raise SR3DConfigError("both dtype and torch_dtype were given; pass only dtype")
        out["dtype"] = out.pop("torch_dtype")
    dtype = parse_dtype(out.get("dtype")) if out.get("dtype") is not None else default_dtype
    load_in_4bit = bool(out.pop("load_in_4bit", False))
    load_in_8bit = bool(out.pop("load_in_8bit", False))
    if load_in_4bit and load_in_8bit:
        raise SR3DConfigError("load_in_4bit and load_in_8bit are both set; expected at most one")
    qconfig = out.get("quantization_config")
    if qconfig is not None and (load_in_4bit or load_in_8bit):
        raise SR3DConfigError("pass either quantization_config or load_in_4bit/load_in_8bit, not both")
    if load_in_4bit or load_in_8bit:
        check_bitsandbytes(4 if load_in_4bit else 8, device_of(out.get("device_map")))
        compute = dtype if isinstance(dtype, torch.dtype) else None
        qconfig = make_quantization_config(load_in_4bit, load_in_8bit, compute_dtype=compute)
    elif qconfig is not None:
        qconfig = _with_skip_modules(qconfig)
    if qconfig is not None:
        out["quantization_config"] = qconfig
    out["dtype"] = dtype
    return out
