"""Memory planner: peak GPU memory of a training step, from the config alone (no weights loaded).

Parameters are counted on a model built on the ``meta`` device; activations follow closed-form
per-token counts of the tensors autograd keeps for the backward pass (method and assumptions in
``docs/training.md``). :class:`LiveTensorMeter` measures the same quantity on a real run (bytes of
live tensor storages, the CPU analogue of ``torch.cuda.max_memory_allocated``); the tests compare
the two on a small model.

Units: bytes internally, GiB (2³⁰ bytes) in :meth:`MemoryPlan.to_dict`.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["GIB", "LiveTensorMeter", "MemoryPlan", "measure_training_step", "plan_memory"]

GIB = float(2**30)
#: CUDA context + caching-allocator slack assumed on a GPU (not part of torch's allocated bytes)
CUDA_OVERHEAD_BYTES = int(0.75 * GIB)
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class MemoryPlan:
    """A peak-memory estimate for one process.

    Attributes:
        breakdown: bytes per component (``weights.*``, ``adapters``, ``gradients``, ``optimizer``,
            ``activations.*``, ``logits``, ``overhead``).
        params: parameter counts (``trainable``, ``frozen``, per module).
        shapes: the assumed workload (tiles, tokens per tile, sequence length, supervised tokens, batch).
        alternatives: peaks in GiB under other settings (with/without gradient checkpointing, full logits).
        notes: assumptions and warnings.
    """

    breakdown: dict[str, int] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, Any] = field(default_factory=dict)
    alternatives: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    source: str = ""
    peak_bytes: int = 0
    allocated_peak_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "estimated_peak_gib": round(self.peak_bytes / GIB, 2),
            "allocated_peak_gib": round(self.allocated_peak_bytes / GIB, 2),
            "breakdown_gib": {k: round(v / GIB, 3) for k, v in self.breakdown.items()},
            "params": self.params,
            "shapes": self.shapes,
            "alternatives_gib": self.alternatives,
            "model_source": self.source,
            "notes": self.notes,
        }

    def format(self) -> str:
        d = self.to_dict()
        lines = [
            f"model: {self.source}",
            f"parameters: trainable {self.params.get('trainable', 0):,}  frozen {self.params.get('frozen', 0):,}",
            "workload: " + ", ".join(f"{k}={v}" for k, v in self.shapes.items()),
            f"estimated peak GPU memory per process: {d['estimated_peak_gib']:.2f} GiB",
        ]
        for k, v in d["breakdown_gib"].items():
            lines.append(f"  {k:<34} {v:8.3f} GiB")
        for k, v in self.alternatives.items():
            lines.append(f"  (alternative) {k:<22} {v:8.2f} GiB")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# parameter counts
# ----------------------------------------------------------------------------------------------


_META_CACHE: dict[str, nn.Module] = {}


def _meta_model(config: Any) -> nn.Module:
    """The model on the ``meta`` device (shapes only; cached per config)."""
    from sr3d_plugin.modeling import SR3DForConditionalGeneration

    key = config.to_json_string(use_diff=False)
    if key not in _META_CACHE:
        with torch.device("meta"):
            _META_CACHE.clear()
            _META_CACHE[key] = SR3DForConditionalGeneration(config)
    return _META_CACHE[key]


def _count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _llm_linears(llm: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in llm.named_modules() if isinstance(m, nn.Linear)]


# ----------------------------------------------------------------------------------------------
# activation model
# ----------------------------------------------------------------------------------------------


def _projector_saved_per_token(kind: str, c: int, h: int, lin_b: float, ln_b: float) -> float:
    """Bytes autograd keeps per *output* token of a trained projector (inputs of its Linear/LN/GELU layers)."""
    if kind.startswith("mlp_downsample"):
        k = 2 if "2x2" in kind else 3
        if kind == "mlp_downsample_3x3_fix":
            # LN(9C) in, Linear(9C) in, GELU(3C) in, LN(3C) in, Linear(3C) in, GELU(H) in, Linear(H) in
            return k * k * c * (ln_b + lin_b) + 3 * c * (lin_b + ln_b + lin_b) + 2 * h * lin_b
        return k * k * c * (ln_b + lin_b) + 2 * h * lin_b  # LN, Linear, GELU, Linear
    if kind == "linear":
        return c * lin_b
    if kind.startswith("mlp") and "gelu" in kind:
        depth = int(kind[3]) if kind[3].isdigit() else 2
        return c * lin_b + (depth - 1) * 2 * h * lin_b
    return 3 * (c + h) * lin_b  # unknown projector: a conservative guess


def _llm_layer_saved_per_token(
    h: int, i: int, kvd: int, heads: int, r: int, a: int, t: int, lora: bool, dropout: float, cast_inputs: bool
) -> float:
    """Bytes one decoder layer (Qwen2/Llama block, SDPA attention) keeps per token for backward.

    Derived by listing the tensors autograd saves (RMSNorm keeps an fp32 copy of its input and the
    reciprocal RMS; SDPA keeps q, k, v, the output and the log-sum-exp; the gated MLP keeps gate, up,
    act(gate) and their product; each LoRA layer keeps its rank-r intermediate).
    """
    if a == 4:
        per = 24 * h + 8 * kvd + 16 * i + 4 * heads + 8
    else:
        per = 16 * h + 4 * kvd + 8 * i + 4 * heads + 8
    if lora:
        per += 7 * r * (t if cast_inputs else a)
        if cast_inputs and t != a:  # peft casts each LoRA input to the adapter dtype and keeps the copy
            per += 6 * h * t + i * t
        if dropout > 0:
            width = t if cast_inputs else a
            per += (6 * h + i) * (width + 1)
    return per


def frame_extra_tokens(config: Any) -> int:
    """Tokens besides the projected ones per multi-view frame: the image end token and the frame separator.

    SR-3D writes one bare ``<image>`` per frame (``frame_separator`` ``""``), each followed by the
    encoder's ``"\\n"`` end token: one extra token per frame.
    """
    return (1 if config.image_end_text else 0) + (1 if getattr(config, "frame_separator", "") else 0)


def plan_memory(
    recipe: Any,
    config: Any = None,
    source: str = "",
    tiles: int | None = None,
    text_tokens: int = 256,
    answer_tokens: int = 64,
    num_processes: int = 1,
    device: str = "cuda",
) -> MemoryPlan:
    """Estimate the peak memory of one training step of ``recipe`` (weights are never loaded).

    Args:
        recipe: the training recipe.
        config: the model's SR3DConfig (default: :func:`~sr3d_plugin.training.model_setup.model_config_for`).
        source: where the config came from (reported).
        tiles: tiles per sample (default ``data.num_frames``: one tile per frame of multi-view input;
            a single image has at most ``max_tiles`` + 1).
        text_tokens: prompt and answer text tokens per sample besides the image tokens.
        answer_tokens: supervised (assistant) tokens per sample.
        num_processes: data-parallel processes (ZeRO / FSDP shard states across them).
        device: ``"cuda"`` adds the CUDA context / allocator overhead; ``"cpu"`` counts tensors only.

    Returns:
        The :class:`MemoryPlan`.
    """
    from sr3d_plugin.training.model_setup import model_config_for

    if config is None:
        config, source = model_config_for(recipe)
    m, lo, q, tr = recipe.model, recipe.lora, recipe.quantization, recipe.training
    model = _meta_model(config)
    notes: list[str] = []

    dtype_b = _DTYPE_BYTES[m.dtype]
    t = _DTYPE_BYTES[m.trainable_dtype]
    autocast = tr.mixed_precision in ("bf16", "fp16")
    a = 2 if (autocast or dtype_b == 2) else 4  # activation bytes of the LLM / vision tower
    if q.load_in_4bit:
        a = 2 if q.compute_dtype != "float32" else 4
    cast_inputs = not autocast  # with autocast the trainer turns off peft's input casting

    # ---- parameters ---------------------------------------------------------------------------
    n_vision = _count(model.vision_tower)
    trained = [x for x in m.trained_modules if getattr(model, x, None) is not None]
    n_mod = sum(_count(getattr(model, x)) for x in trained)
    n_other_small = sum(
        _count(getattr(model, x))
        for x in ("mm_projector", "perception_encoder", "region_extractor")
        if x not in trained and getattr(model, x, None) is not None
    )
    llm = model.llm
    n_llm = _count(llm)
    linears = _llm_linears(llm)
    lm_head = llm.get_output_embeddings()
    body = [(n, lin) for n, lin in linears if lin is not lm_head]
    n_lin = sum(lin.weight.numel() for _, lin in body)
    targets = set(lo.target_modules)
    n_lora = sum(lo.r * (lin.in_features + lin.out_features) for n, lin in body if n.rsplit(".", 1)[-1] in targets)
    if not lo.enabled:
        n_lora = 0
    n_llm_trained = n_llm if m.train_llm else 0
    trainable = n_lora + n_mod + n_llm_trained
    frozen = n_vision + n_other_small + (n_llm - n_llm_trained) + (n_mod if lo.enabled else 0)
    params = {
        "trainable": trainable,
        "frozen": frozen,
        "vision_tower": n_vision,
        "llm": n_llm,
        "llm_linear_body": n_lin,
        "lora": n_lora,
        **{x: _count(getattr(model, x)) for x in ("mm_projector", "perception_encoder", "region_extractor")},
    }

    # ---- weights ------------------------------------------------------------------------------
    b: dict[str, int] = {}
    if q.load_in_4bit:
        per = 0.5 + (1 / 64 + 4 / (64 * 256) if q.double_quant else 4 / 64)  # NF4 + absmax (+ 2nd-level consts)
        b["weights.llm_4bit"] = int(n_lin * per)
        b["weights.llm_unquantised"] = (n_llm - n_lin) * dtype_b  # embeddings, norms, lm_head, biases
    else:
        b["weights.llm"] = (n_llm - n_llm_trained) * dtype_b + n_llm_trained * dtype_b
    b["weights.vision_tower"] = n_vision * dtype_b
    # trained SR-3D modules: the trainable copy (+ peft keeps the frozen original beside it)
    b["weights.sr3d_modules"] = n_mod * t + (n_mod * dtype_b if lo.enabled else 0) + n_other_small * dtype_b
    b["adapters"] = n_lora * t
    grad_b = n_lora * t + n_mod * t + n_llm_trained * dtype_b
    stage = 0
    if tr.deepspeed:
        import json

        try:
            with open(tr.deepspeed, encoding="utf-8") as fh:
                stage = int(json.load(fh).get("zero_optimization", {}).get("stage", 0))
        except (OSError, ValueError):
            notes.append(f"could not read the DeepSpeed config {tr.deepspeed}; assuming no sharding")
    elif tr.fsdp:
        stage = 3
    if tr.optimizer == "adamw":
        if tr.deepspeed and dtype_b == 2:
            # DeepSpeed bf16/fp16: fp32 master weights + two fp32 moments for every trained parameter
            opt_b = 12 * trainable
        else:
            opt_b = 2 * (n_lora * t + n_mod * t) + 2 * n_llm_trained * dtype_b
    else:  # bitsandbytes 8-bit AdamW: two uint8 states + fp32 block constants (blocks of 256)
        opt_b = int(2 * trainable * (1 + 4 / 256))
    if n_llm_trained and dtype_b == 2 and not tr.deepspeed:
        notes.append("full LLM finetune with bf16 weights and no fp32 master copy: prefer DeepSpeed or fp32 weights")
    w = max(1, int(num_processes))
    if stage >= 1:
        opt_b //= w
    if stage >= 2:
        grad_b //= w
    if stage >= 3:
        for k in [k for k in b if k.startswith("weights.")] + ["adapters"]:
            b[k] //= w
    if stage and w == 1:
        notes.append(f"ZeRO/FSDP stage {stage} shards states across processes; pass num_processes= to plan per GPU")
    b["gradients"] = grad_b
    b["optimizer"] = opt_b

    # ---- workload ------------------------------------------------------------------------------
    bsz = tr.per_device_batch_size
    n_tiles = int(tiles if tiles is not None else recipe.data.num_frames)
    tpt = int(config.tokens_per_tile)
    seq = n_tiles * (tpt + frame_extra_tokens(config)) + int(text_tokens)
    tokens = bsz * seq
    sup = bsz * int(answer_tokens)
    vt = bsz * n_tiles
    vc = config.vision_config
    c, iv, lv_layers = vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers
    lv = config.grid_size**2 + (1 if config.drops_cls_token else 0)
    tc = config.text_config
    h, inter, layers = tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers
    heads = tc.num_attention_heads
    hd = getattr(tc, "head_dim", None) or h // heads
    kvd = (getattr(tc, "num_key_value_heads", None) or heads) * hd
    vocab = tc.vocab_size
    shapes = {
        "batch": bsz,
        "tiles_per_sample": n_tiles,
        "tokens_per_tile": tpt,
        "sequence_length": seq,
        "supervised_tokens": sup,
        "vision_tokens": vt * lv,
        "activation_bytes": a,
    }

    # ---- activations ---------------------------------------------------------------------------
    # vision tower: frozen, nothing kept for backward; while it runs, every layer's hidden state is
    # held (output_hidden_states) plus one layer's working set
    attn_eager = (m.attn_implementation or "sdpa") == "eager"
    vis_transient = vt * lv * ((lv_layers + 1) * c + 4 * c + 2 * iv) * a
    if attn_eager:
        vis_transient += vt * vc.num_attention_heads * lv * lv * a
    lin_b = a if autocast else t
    ln_b = 4 if autocast else t
    pe_saved = vt * lv * (3 * c * ln_b + 51 * t) if "perception_encoder" in trained else 0
    feats = vt * lv * c * a  # PE-augmented features, kept by the region pooling
    proj_saved = (
        vt * tpt * _projector_saved_per_token(config.projector_type, c, h, lin_b, ln_b)
        if "mm_projector" in trained
        else 0
    )
    lora_on = lo.enabled
    per_layer = tokens * _llm_layer_saved_per_token(
        h,
        inter,
        kvd,
        heads,
        lo.r,
        a,
        t,
        lora_on or m.train_llm,
        lo.dropout if lora_on else 0.0,
        cast_inputs and lora_on,
    )
    dequant = h * inter * a if q.load_in_4bit else 0  # one 4-bit weight dequantised at a time
    # backward of one layer: its recomputed activations (with checkpointing) + activation gradients
    layer_backward = (per_layer if tr.gradient_checkpointing else 0) + tokens * (h + inter) * a + dequant
    if tr.gradient_checkpointing:
        llm_saved = layers * tokens * h * a
        llm_saved_alt = layers * per_layer
    else:
        llm_saved = layers * per_layer
        llm_saved_alt = layers * tokens * h * a
    final_norm = tokens * (4 * h + 4)  # fp32 copy of the final RMSNorm input + reciprocal RMS
    logit_rows = sup if tr.loss_on_label_positions else tokens
    logits = logit_rows * vocab * (a + 12) + logit_rows * h * a  # logits, fp32 copy, log-softmax, grad
    logits_alt = (tokens if tr.loss_on_label_positions else sup) * vocab * (a + 12)
    inputs = vt * (3 * config.tile_size**2 * 4 + config.grid_size**2 * 3 * 4) + tokens * 8 * 3  # pixels, xyz, ids
    saved_front = inputs + pe_saved + feats + proj_saved
    saved = saved_front + llm_saved + final_norm
    llm_phase = saved + max(logits, layer_backward)
    vision_phase = inputs + vis_transient
    b["activations.vision_tower_transient"] = vis_transient
    b["activations.inputs"] = inputs
    b["activations.pe_projector"] = pe_saved + feats + proj_saved
    b["activations.llm"] = llm_saved + final_norm + (layer_backward if layer_backward >= logits else 0)
    b["logits"] = logits if logits > layer_backward else 0
    persistent = sum(v for k, v in b.items() if not k.startswith("activations.") and k != "logits")
    act_peak = max(vision_phase, llm_phase)
    if act_peak == vision_phase:
        b["activations.vision_tower_transient"] = vis_transient
        b["activations.pe_projector"] = 0
        b["activations.llm"] = 0
        b["logits"] = 0
    else:
        b["activations.vision_tower_transient"] = 0
    allocated = persistent + act_peak
    overhead = CUDA_OVERHEAD_BYTES if device == "cuda" else 0
    b["overhead.cuda_context_allocator"] = overhead
    peak = allocated + overhead

    def alt(saved_llm: int, logit_b: int) -> float:
        ph = saved_front + saved_llm + final_norm + max(logit_b, layer_backward)
        return round((persistent + max(vision_phase, ph) + overhead) / GIB, 2)

    alternatives = {
        ("without" if tr.gradient_checkpointing else "with") + "_gradient_checkpointing": alt(llm_saved_alt, logits),
        ("full_logits" if tr.loss_on_label_positions else "label_position_logits"): alt(llm_saved, logits_alt),
    }
    if q.load_in_4bit:
        notes.append("4-bit: NF4 at 0.5 byte/weight + absmax constants; embeddings and lm_head stay in " + m.dtype)
    if tr.mixed_precision == "no" and dtype_b == 2 and lo.enabled and t == 4:
        notes.append("bf16 weights with fp32 adapters and no autocast: peft keeps fp32 copies of LoRA inputs")
    shapes["activation_peak_phase"] = "vision tower forward" if act_peak == vision_phase else "LLM backward"
    shapes["vision_phase_gib"] = round(vision_phase / GIB, 2)
    shapes["llm_phase_gib"] = round(llm_phase / GIB, 2)
    return MemoryPlan(
        breakdown=b,
        params=params,
        shapes=shapes,
        alternatives=alternatives,
        notes=notes,
        source=source,
        peak_bytes=int(peak),
        allocated_peak_bytes=int(allocated),
    )


# ----------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------


class LiveTensorMeter(TorchDispatchMode):
    """Measures live tensor-storage bytes (current and peak) of everything torch computes inside it.

    Every tensor an operator returns is tracked by its storage until the storage is freed, so views
    are counted once. Tensors that already exist (weights, optimizer states) are added with
    :meth:`include`. This is what ``torch.cuda.max_memory_allocated`` reports on a GPU, minus the
    caching allocator's rounding; it works on any device, including the CPU.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self._live:
            return
        n = int(st.nbytes())
        self._live[key] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key)

    def include(self, tensors: Any) -> None:
        """Count existing tensors (e.g. ``model.parameters()``, buffers, optimizer states)."""
        for x in tree_flatten(list(tensors) if not isinstance(tensors, torch.Tensor) else [tensors])[0]:
            if isinstance(x, torch.Tensor):
                self._track(x)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor):
                self._track(x)
        return out


def measure_training_step(recipe: Any, frames: int, *, tile_size: int = 112) -> tuple[MemoryPlan, int]:
    """The planner's estimate next to the measured peak of one real training step, on the CPU.

    Builds the recipe's model (random weights; set ``recipe.model.config_overrides`` for the size),
    prepares it for training, and runs one step (forward, backward, AdamW) on ``frames`` random
    ``tile_size``² frames with random point maps and one region, so that optimizer states exist; the
    second step runs under :class:`LiveTensorMeter` with weights, buffers, optimizer states and the
    batch included — the CPU analogue of ``torch.cuda.max_memory_allocated``. With
    ``training.mixed_precision=bf16`` the step runs under CPU autocast.

    Returns:
        ``(plan, peak_bytes)``: :func:`plan_memory` for the same workload (one sample: tiles, text and
        answer tokens; the recipe's ``per_device_batch_size`` is replaced by 1) and the measured peak in bytes.
    """
    import copy

    import numpy as np
    from PIL import Image

    from sr3d_plugin.modeling.inputs import Region, VisualInput
    from sr3d_plugin.training.model_setup import build_model, optimizer_groups, prepare_for_training

    recipe = copy.deepcopy(recipe)
    recipe.training.per_device_batch_size = 1  # the step below trains one sample; plan the same workload
    torch.manual_seed(0)
    model, proc, _ = build_model(recipe)
    model, _ = prepare_for_training(model, recipe)
    model.train()
    rng = np.random.default_rng(0)
    size = (tile_size, tile_size)
    imgs = [Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)) for _ in range(frames)]
    points = torch.rand(frames, *size, 3) * 2 - 1
    vis = VisualInput(imgs, points=points, regions=[Region.from_box(1, (10, 10, 60, 60), size)])
    msgs = [
        {"role": "user", "content": "<image>" * frames + "What is <mask>? Describe the object in the region."},
        {"role": "assistant", "content": "A wooden table next to the wall. A lamp on the floor."},
    ]
    text, spans = proc.assistant_spans(msgs)
    batch = proc(text, vis, supervised_spans=[spans], padding_side="right")
    opt = torch.optim.AdamW(optimizer_groups(model, recipe), lr=1e-4)
    bf16 = recipe.training.mixed_precision == "bf16"

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # optimizer states exist from here on
    meter = LiveTensorMeter()
    meter.include(list(model.parameters()) + list(model.buffers()))
    meter.include([v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)])
    meter.include([v for v in batch.values() if torch.is_tensor(v)])
    with meter:
        meter.reset_peak()
        step()
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config  # LoRA or full finetune
    plan = plan_memory(
        recipe,
        config=config,
        tiles=frames,
        text_tokens=batch["input_ids"].shape[1] - frames * (config.tokens_per_tile + frame_extra_tokens(config)),
        answer_tokens=int((batch["labels"] != -100).sum()),
        device="cpu",
    )
    return plan, meter.peak


def round_gib(x: float) -> float:
    return math.floor(x / GIB * 100 + 0.5) / 100
