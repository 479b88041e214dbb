"""Training recipes: typed dataclass sections read from YAML, with dotted command-line overrides.

A recipe is a YAML mapping with the sections ``model``, ``data`` (with ``augment``), ``lora``,
``quantization``, ``training`` and ``logging`` plus ``description`` and an optional ``extends``
(another recipe whose values this one overrides). Every field is declared below with its type and a
``metadata={"help": ...}`` text (peft style); ``sr3d train --help`` is generated from them.

Validation happens before any work starts: an unknown key, a value of the wrong type or a missing
file raises :class:`~sr3d_plugin.errors.SR3DConfigError` naming the key, the value and what was
expected (with close key names suggested for typos).

Paths: ``recipes/...`` resolves inside the bundled recipes folder
(:func:`sr3d_plugin.resources.recipes_dir`, also in an installed wheel); ``~`` is expanded; other
relative paths are relative to the current working directory, except ``extends`` which is relative
to the recipe file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from sr3d_plugin.errors import SR3DConfigError
from sr3d_plugin.limits import MAX_RECORD_BYTES, safe_yaml

__all__ = [
    "AugmentSection",
    "DataSection",
    "LoggingSection",
    "LoraSection",
    "ModelSection",
    "QuantizationSection",
    "Recipe",
    "TrainingSection",
    "bundled_recipes",
    "field_help",
    "find_recipe",
    "load_recipe",
    "parse_overrides",
    "resolve_path",
]

#: the language-model linear layers LoRA targets by default (Qwen2 / Llama naming)
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: the SR-3D modules trained in full and saved with the adapter (SR3D-FACTS §7)
DEFAULT_TRAINED_MODULES = ["perception_encoder", "mm_projector", "region_extractor"]


#: largest ``data.num_frames`` (and record ``num_frames``) accepted: far beyond the paper's 32 frames, far below
#: what would exhaust memory before the first step (each frame is at least one 448-px tile)
MAX_NUM_FRAMES = 1024
#: largest seed accepted (numpy and ``random`` seeds are unsigned 32-bit)
MAX_SEED = 2**32 - 1


def _help(
    text: str,
    range: tuple[float | None, float | None] | None = None,
    open: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Field metadata: ``help`` text, and for numbers ``range=(low, high)`` (None: unbounded) with
    ``open`` = ``"low"``, ``"high"`` or ``"both"`` for the excluded ends (closed by default). Every
    float field must also be finite (no nan / inf), with or without a range."""
    meta: dict[str, Any] = {"help": text, **extra}
    if range is not None:
        meta["range"] = range
        meta["open"] = open
    return meta


# ----------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelSection:
    """Which model to start from and which parts to train."""

    path: str | None = field(
        default=None,
        metadata=_help(
            "checkpoint folder to finetune: an sr3d folder, a VILA/NVILA/SR-3D folder or a LLaVA folder "
            "(download hub ids first, e.g. `hf download a8cheng/sr3d-nvila-8b-singleview-pretrain --local-dir ...`)",
            path=True,
        ),
    )
    builder: str | None = field(
        default=None, metadata=_help("model builder name (see `sr3d plugins --kind model_builders`); default: detect")
    )
    preset: str | None = field(
        default=None,
        metadata=_help(
            "architecture preset: 'tiny' (built from scratch with random weights when path is empty) or "
            "'sr3d-8b' (SigLIP-so400m + Qwen2-7B; used by --dry-run when the checkpoint is not on this machine)"
        ),
    )
    config_overrides: dict[str, Any] = field(
        default_factory=dict,
        metadata=_help("keyword overrides of the tiny config (tile_size, llm_hidden, llm_layers, vision_hidden, ...)"),
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="bfloat16", metadata=_help("dtype of the frozen weights (vision tower, LLM when not quantised)")
    )
    trainable_dtype: Literal["float32", "bfloat16"] = field(
        default="float32", metadata=_help("dtype of trained weights (LoRA, PE, projector, region extractor)")
    )
    attn_implementation: str | None = field(
        default="sdpa", metadata=_help("attention kernel of the LLM and vision tower: sdpa, eager, flash_attention_2")
    )
    trained_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_TRAINED_MODULES),
        metadata=_help(
            "SR-3D sub-modules trained in full and saved with the adapter (perception_encoder, mm_projector, "
            "region_extractor); never vision_tower"
        ),
    )
    train_llm: bool = field(
        default=False,
        metadata=_help("train every LLM weight (full finetune, the paper's setting); requires lora.enabled=false"),
    )


@dataclass
class AugmentSection:
    """Mask augmentation (SR3D-FACTS §7). Randomness is derived from (seed, epoch, sample index)."""

    mask_to_box_prob: float = field(
        default=0.0,
        metadata=_help("probability that a region's mask is replaced by its bounding box (per region)", range=(0, 1)),
    )
    frame_drop_prob: float = field(
        default=0.0,
        metadata=_help(
            "probability that a multi-view sample drops frames (never a frame a region lives on; >= 1 frame kept)",
            range=(0, 1),
        ),
    )
    frame_drop_max_fraction: float = field(
        default=0.5,
        metadata=_help("largest fraction of the droppable frames removed when a sample drops frames", range=(0, 1)),
    )
    region_shuffle_prob: float = field(
        default=0.0,
        metadata=_help(
            "probability that a sample's regions are relabelled in random order (<regionK>, <mask> and 'Region [k]' "
            "references are rewritten consistently)",
            range=(0, 1),
        ),
    )


@dataclass
class DataSection:
    """Where the training records come from and how visual inputs are built (docs/data-format.md)."""

    train_file: str | None = field(
        default=None,
        metadata=_help("JSON or JSONL records (docs/data-format.md); paths inside are relative to it", path=True),
    )
    generator: str | None = field(
        default=None,
        metadata=_help(
            "records from a generator entry point 'module:function' (called with generator_args and the output "
            "folder as out_dir; returns a list of records or the path of a JSONL file), instead of train_file"
        ),
    )
    generator_args: dict[str, Any] = field(default_factory=dict, metadata=_help("keyword arguments of the generator"))
    num_frames: int = field(
        default=32,
        metadata=_help("frames sampled uniformly from scenes, videos and frame lists", range=(1, MAX_NUM_FRAMES)),
    )
    system_prompt: str | None = field(
        default="You are a helpful assistant.", metadata=_help("system message of every conversation (null: none)")
    )
    depth_source: str = field(
        default="auto",
        metadata=_help("point-map source for records without points (auto, gt_depth, relative_depth, depth_anything)"),
    )
    canonical_mode: Literal["sr3d", "robust"] | None = field(
        default=None, metadata=_help("canonical space: sr3d (released convention), robust, or null (source default)")
    )
    pointmap_cache: str | None = field(
        default="default",
        metadata=_help("point-map cache folder; 'default' (~/.cache/sr3d or $SR3D_CACHE), or null to disable"),
    )
    max_length: int | None = field(
        default=None, metadata=_help("skip samples whose token count exceeds this (null: no limit)", range=(1, None))
    )
    num_workers: int = field(default=2, metadata=_help("DataLoader worker processes", range=(0, 256)))
    worker_sharing: Literal["file_descriptor", "file_system"] | None = field(
        default=None,
        metadata=_help(
            "how worker processes hand batches over (torch.multiprocessing sharing strategy, for the run only): "
            "file_system (shared-memory names) halves the hand-over of small batches; null: torch's default"
        ),
    )
    skip_invalid: bool = field(
        default=False,
        metadata=_help(
            "records failing the data check (files, regions in their images, <mask> counts, frame references; "
            "`sr3d validate-data`) are skipped and counted instead of stopping the run before the model loads"
        ),
    )
    max_record_bytes: int = field(
        default=MAX_RECORD_BYTES,
        metadata=_help(
            "largest record (bytes of one JSONL line / JSON-list element) in data.train_file", range=(1, None)
        ),
    )
    shuffle: bool = field(
        default=True, metadata=_help("shuffle the samples every epoch (seeded by training.seed and epoch)")
    )
    augment: AugmentSection = field(default_factory=AugmentSection, metadata=_help("mask augmentation"))


@dataclass
class LoraSection:
    """LoRA on the language model only (never the vision tower, SR3D-FACTS §9)."""

    enabled: bool = field(default=True, metadata=_help("train LoRA adapters on the LLM"))
    r: int = field(default=64, metadata=_help("LoRA rank (VILA default 64)", range=(1, None)))
    alpha: int = field(default=128, metadata=_help("LoRA alpha (scale = alpha / r)", range=(0, None), open="low"))
    dropout: float = field(default=0.05, metadata=_help("dropout on the LoRA input", range=(0, 1), open="high"))
    target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        metadata=_help("names of LLM linear layers to adapt; matched only under llm. (regex anchored at llm.)"),
    )
    use_rslora: bool = field(default=False, metadata=_help("rank-stabilised scaling alpha / sqrt(r)"))


@dataclass
class QuantizationSection:
    """QLoRA: bitsandbytes quantisation of the LLM only (vision tower and SR-3D modules stay unquantised)."""

    load_in_4bit: bool = field(default=False, metadata=_help("load the LLM linear layers in 4 bit (QLoRA)"))
    quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata=_help("4-bit data type"))
    double_quant: bool = field(default=True, metadata=_help("quantise the quantisation constants too"))
    compute_dtype: Literal["bfloat16", "float16", "float32"] = field(
        default="bfloat16", metadata=_help("dtype of the 4-bit matmuls")
    )


@dataclass
class TrainingSection:
    """Optimisation, checkpointing and scale-out."""

    output_dir: str = field(default="runs/sr3d", metadata=_help("run folder (checkpoints, adapter, logs)", path=True))
    seed: int = field(
        default=42,
        metadata=_help("seed of initialisation, shuffling, augmentation and dropout", range=(0, MAX_SEED)),
    )
    num_epochs: float = field(
        default=1.0, metadata=_help("epochs to train (ignored when max_steps > 0)", range=(0, None))
    )
    max_steps: int = field(
        default=-1, metadata=_help("optimizer steps to train; -1 (or 0): num_epochs", range=(-1, None))
    )
    per_device_batch_size: int = field(
        default=1, metadata=_help("samples per micro-batch per process", range=(1, None))
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata=_help("micro-batches per optimizer step", range=(1, None))
    )
    learning_rate: float = field(
        default=5e-5,
        metadata=_help("peak learning rate (LoRA and LLM weights)", range=(0, None), open="low"),
    )
    modules_learning_rate: float | None = field(
        default=None,
        metadata=_help(
            "peak learning rate of the PE / projector / region extractor (null: learning_rate)",
            range=(0, None),
            open="low",
        ),
    )
    weight_decay: float = field(
        default=0.0, metadata=_help("AdamW weight decay (not on biases and norms)", range=(0, None))
    )
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = field(
        default="cosine", metadata=_help("learning-rate schedule")
    )
    warmup_ratio: float = field(
        default=0.03,
        metadata=_help("fraction of the steps used for linear warm-up", range=(0, 1), open="high"),
    )
    max_grad_norm: float | None = field(
        default=1.0, metadata=_help("gradient clipping norm (null: off)", range=(0, None), open="low")
    )
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = field(
        default="adamw", metadata=_help("adamw (torch) or a bitsandbytes 8-bit AdamW")
    )
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW beta1", range=(0, 1), open="high"))
    adam_beta2: float = field(default=0.999, metadata=_help("AdamW beta2", range=(0, 1), open="high"))
    adam_epsilon: float = field(default=1e-8, metadata=_help("AdamW epsilon", range=(0, None), open="low"))
    mixed_precision: Literal["no", "bf16", "fp16"] = field(
        default="no", metadata=_help("autocast precision of the forward pass (accelerate)")
    )
    gradient_checkpointing: bool = field(
        default=True, metadata=_help("recompute LLM layer activations in the backward pass (use_reentrant=False)")
    )
    loss_on_label_positions: bool = field(
        default=True,
        metadata=_help("compute logits and the loss only where labels are not -100 (same loss, far less memory)"),
    )
    save_steps: int = field(
        default=500,
        metadata=_help("write a checkpoint every N optimizer steps (0: only at the end)", range=(0, None)),
    )
    save_total_limit: int | None = field(
        default=3, metadata=_help("keep only the newest N checkpoints (null: all)", range=(1, None))
    )
    logging_steps: int = field(default=10, metadata=_help("log every N optimizer steps", range=(1, None)))
    deepspeed: str | None = field(
        default=None,
        metadata=_help(
            "DeepSpeed JSON config (e.g. recipes/deepspeed/zero2.json); launch with torchrun/accelerate", path=True
        ),
    )
    fsdp: dict[str, Any] | None = field(
        default=None,
        metadata=_help(
            "FSDP options passed to accelerate's FullyShardedDataParallelPlugin (sharding_strategy, auto_wrap_policy, "
            "transformer_cls_names_to_wrap, use_orig_params, ...); null: no FSDP"
        ),
    )
    deterministic: bool = field(
        default=False, metadata=_help("torch.use_deterministic_algorithms (bit-identical resumes on the CPU)")
    )
    cpu_threads: int | None = field(
        default=None,
        metadata=_help(
            "torch intra-op threads of a CPU run (null: torch's default). Float sums depend on the thread "
            "count, so a pinned count gives the same weights on any machine; data workers use the other cores",
            range=(1, 1024),
        ),
    )


@dataclass
class LoggingSection:
    """Progress and metric logging."""

    report_to: list[str] = field(
        default_factory=lambda: ["tensorboard"],
        metadata=_help("trackers: tensorboard, wandb (when installed); [] for none (log.jsonl is always written)"),
    )
    run_name: str | None = field(
        default=None, metadata=_help("run name for the trackers (default: output folder name)")
    )
    progress_bar: bool = field(default=True, metadata=_help("show a tqdm progress bar on the main process"))


@dataclass
class Recipe:
    """A complete training recipe."""

    description: str = field(default="", metadata=_help("one-line summary shown by `sr3d recipes`"))
    extends: str | None = field(
        default=None, metadata=_help("a recipe (file or bundled name) whose values this one overrides")
    )
    model: ModelSection = field(default_factory=ModelSection, metadata=_help("model"))
    data: DataSection = field(default_factory=DataSection, metadata=_help("data"))
    lora: LoraSection = field(default_factory=LoraSection, metadata=_help("LoRA"))
    quantization: QuantizationSection = field(default_factory=QuantizationSection, metadata=_help("quantisation"))
    training: TrainingSection = field(default_factory=TrainingSection, metadata=_help("training"))
    logging: LoggingSection = field(default_factory=LoggingSection, metadata=_help("logging"))
    #: where the recipe was read from (not a YAML key)
    source: str | None = field(default=None, metadata=_help("recipe file (set by the loader)", internal=True))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (what a run folder stores as ``recipe.yaml``)."""
        out = dataclasses.asdict(self)
        out.pop("source", None)
        return out

    def validate(self, check_files: bool = True) -> list[str]:
        """Cross-field checks; returns warnings. Raises :class:`SR3DConfigError` on an inconsistent recipe.

        Args:
            check_files: also require that every input file or folder exists (off for dry runs, where
                missing files are reported as warnings).
        """
        check_ranges(self)
        warnings: list[str] = []
        m, d, lo, q, t = self.model, self.data, self.lora, self.quantization, self.training

        def problem(msg: str, is_file: bool = False) -> None:
            if is_file and not check_files:
                warnings.append(msg)
            else:
                raise SR3DConfigError(msg)

        if m.path is None and m.preset != "tiny":
            problem("model.path is empty; give a checkpoint folder (or model.preset=tiny to train from scratch)", True)
        if m.path is not None and not Path(m.path).exists():
            problem(f"model.path={m.path!r} does not exist; expected a checkpoint folder", True)
        if m.preset not in (None, "tiny", "sr3d-8b"):
            raise SR3DConfigError(f"model.preset={m.preset!r}; expected 'tiny', 'sr3d-8b' or null")
        if "vision_tower" in m.trained_modules:
            raise SR3DConfigError("model.trained_modules contains 'vision_tower'; the vision tower stays frozen")
        unknown = [x for x in m.trained_modules if x not in DEFAULT_TRAINED_MODULES]
        if unknown:
            raise SR3DConfigError(
                f"model.trained_modules has unknown modules {unknown}; expected some of {DEFAULT_TRAINED_MODULES}"
            )
        if m.train_llm and lo.enabled:
            raise SR3DConfigError("model.train_llm=true (full finetune) and lora.enabled=true exclude each other")
        if q.load_in_4bit and (m.train_llm or not lo.enabled):
            raise SR3DConfigError("quantization.load_in_4bit needs lora.enabled=true (QLoRA trains adapters only)")
        if (d.train_file is None) == (d.generator is None):
            raise SR3DConfigError("give exactly one of data.train_file and data.generator")
        if d.train_file is not None and not Path(d.train_file).is_file():
            problem(f"data.train_file={d.train_file!r} does not exist; expected a JSON or JSONL file", True)
        if d.generator is not None and ":" not in d.generator:
            raise SR3DConfigError(f"data.generator={d.generator!r}; expected 'module:function'")
        if t.max_steps <= 0 and t.num_epochs <= 0:
            raise SR3DConfigError("training.max_steps and training.num_epochs are both <= 0; nothing to train")
        if t.deepspeed is not None and not Path(t.deepspeed).is_file():
            problem(f"training.deepspeed={t.deepspeed!r} does not exist; expected a DeepSpeed JSON file", True)
        if t.deepspeed is not None and t.fsdp is not None:
            raise SR3DConfigError("training.deepspeed and training.fsdp exclude each other")
        if q.load_in_4bit and (t.deepspeed is not None or t.fsdp is not None):
            warnings.append("QLoRA with DeepSpeed/FSDP sharding is not supported by these recipes; use DDP")
        bad = [r for r in self.logging.report_to if r not in ("tensorboard", "wandb")]
        if bad:
            raise SR3DConfigError(f"logging.report_to has unknown trackers {bad}; expected tensorboard or wandb")
        return warnings


# ----------------------------------------------------------------------------------------------
# typed ranges
# ----------------------------------------------------------------------------------------------


def range_text(meta: Mapping[str, Any], is_float: bool) -> str:
    """The interval of a field's ``range`` metadata in interval notation, e.g. ``(0, inf)`` or ``[1, 1024]``."""
    low, high = meta["range"]
    opened = meta.get("open") or ""
    left = "(" if low is None or opened in ("low", "both") else "["
    right = ")" if high is None or opened in ("high", "both") else "]"

    def num(v: float | None, sign: str) -> str:
        if v is None:
            return f"{sign}inf"
        return f"{v:g}" if is_float else str(int(v))

    return f"{left}{num(low, '-')}, {num(high, '')}{right}"


def _in_range(value: float, meta: Mapping[str, Any]) -> bool:
    low, high = meta["range"]
    opened = meta.get("open") or ""
    if low is not None and (value < low or (value == low and opened in ("low", "both"))):
        return False
    return not (high is not None and (value > high or (value == high and opened in ("high", "both"))))


def _numeric_kind(tp: Any) -> type | None:
    """``float`` / ``int`` for a field typed ``float`` / ``int`` (optionally ``| None``), else None."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    kinds = [a for a in args if a is not type(None)]
    return kinds[0] if len(kinds) == 1 and kinds[0] in (int, float) else None


#: ``model.config_overrides`` keys that are sizes or counts (must be positive integers)
_SIZE_KEY = re.compile(r"(^|_)(size|hidden|layers|heads|dim|tiles|frames|tokens|embeddings|experts|groups)$")


def _check_overrides(value: Any, key: str) -> None:
    """Sizes and counts in ``model.config_overrides`` (nested too) are positive integers, every number finite."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            sub = f"{key}.{k}"
            is_number = isinstance(v, (int, float)) and not isinstance(v, bool)
            whole = isinstance(v, int) or (isinstance(v, float) and math.isfinite(v) and v.is_integer())
            if is_number and _SIZE_KEY.search(str(k)) and (not whole or v <= 0):
                raise SR3DConfigError(f"{sub}={v!r}; expected a positive integer (a size or count)")
            _check_overrides(v, sub)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_overrides(v, f"{key}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise SR3DConfigError(f"{key}={value!r}; expected a finite number")


def check_ranges(obj: Any, prefix: str = "") -> None:
    """Every number of a recipe (or one section) is finite and inside its field's ``range``.

    Raises :class:`SR3DConfigError` naming the dotted key, the value and the interval, e.g.
    ``training.learning_rate=nan; expected a finite number in (0, inf)``.
    """
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.metadata.get("internal"):
            continue
        key = f"{prefix}{f.name}"
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{key}.")
            continue
        if f.name == "config_overrides":
            _check_overrides(value, key)
            continue
        kind = _numeric_kind(hints[f.name])
        if kind is None or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SR3DConfigError(f"{key}={value!r}; expected {'an integer' if kind is int else 'a number'}")
        meta = f.metadata
        where = f" in {range_text(meta, kind is float)}" if "range" in meta else ""
        what = f"a finite number{where}" if kind is float else f"an integer{where}"
        if (isinstance(value, float) and not math.isfinite(value)) or ("range" in meta and not _in_range(value, meta)):
            raise SR3DConfigError(f"{key}={value!r}; expected {what}")


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "lora": LoraSection,
    "quantization": QuantizationSection,
    "training": TrainingSection,
    "logging": LoggingSection,
}


# ----------------------------------------------------------------------------------------------
# typed conversion
# ----------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp`` (numbers written as strings are accepted: YAML reads ``5e-5`` as text)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and not any(isinstance(c, bool) for c in choices):
            # YAML 1.1 reads no/off/yes/on as booleans: map them back to a matching choice
            for word in ("yes", "on", "true") if value else ("no", "off", "false"):
                if word in choices:
                    return word
        if value in choices and not (isinstance(value, bool) and not any(isinstance(c, bool) for c in choices)):
            return value
        raise _Mismatch
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str) and item is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Mismatch
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
            try:  # "1e9": YAML 1.1 reads an exponent without a dot as text
                number = float(value)
            except ValueError:
                raise _Mismatch from None
            if math.isfinite(number) and number.is_integer():
                return int(number)
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    raise _Mismatch


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise SR3DConfigError(
                f"unknown recipe key {full!r}{_suggest(str(key), list(fields))} "
                f"(known keys{' of ' + prefix if prefix else ''}: {', '.join(fields)})"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and not isinstance(value, dict):
            raise SR3DConfigError(f"recipe key {full!r} must be a mapping of {tp.__name__} fields, got {value!r}")
        try:
            kwargs[key] = _convert(value, tp, full)
        except _Mismatch:
            raise SR3DConfigError(
                f"recipe key {full!r} has value {value!r} ({type(value).__name__}); expected {_type_name(tp)}"
            ) from None
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------
# paths, files, overrides
# ----------------------------------------------------------------------------------------------


def resolve_path(value: str | None, base: Path | None = None) -> str | None:
    """``recipes/...`` → inside the bundled recipes folder; ``~`` expanded; others relative to ``base`` or the cwd."""
    if value is None:
        return None
    text = str(value)
    if text.startswith("recipes/"):
        from sr3d_plugin.resources import recipes_dir

        return str(recipes_dir() / text[len("recipes/") :])
    p = Path(text).expanduser()
    if not p.is_absolute() and base is not None:
        p = base / p
    return str(p)


def find_recipe(name: str | Path) -> Path:
    """A recipe file: an existing path, ``recipes/<x>`` or the name of a bundled recipe (with or without ``.yaml``)."""
    from sr3d_plugin.resources import recipes_dir

    p = Path(resolve_path(str(name)) or "")
    if p.is_file():
        return p
    bundled = recipes_dir()
    for cand in (bundled / str(name), bundled / f"{name}.yaml"):
        if cand.is_file():
            return cand
    names = [r.stem for r in sorted(bundled.glob("*.yaml"))]
    raise SR3DConfigError(
        f"recipe {str(name)!r} not found: not a file and not a bundled recipe{_suggest(str(name), names)} (bundled: {', '.join(names)})"
    )


#: largest recipe file read (bytes); bundled recipes are about 1 kB
MAX_RECIPE_BYTES = 1 << 20


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise SR3DConfigError(f"recipe {path} is {size} bytes; expected at most {MAX_RECIPE_BYTES} (a recipe file)")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SR3DConfigError(f"cannot read recipe {path}: {exc}") from exc
    data = safe_yaml(text, f"recipe {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SR3DConfigError(f"recipe {path} must be a YAML mapping, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _load_raw(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise SR3DConfigError(f"recipe {path} extends itself (cycle: {' -> '.join(str(s) for s in (*seen, path))})")
    data = _read_yaml(path)
    parent = data.get("extends")
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise SR3DConfigError(f"recipe key 'extends' in {path} must be a string, got {parent!r}")
    ppath = Path(resolve_path(parent, base=path.parent) or "")
    if not ppath.is_file():
        ppath = find_recipe(parent)
    base = _load_raw(ppath, (*seen, path))
    base.pop("description", None)
    return _merge(base, data)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["training.learning_rate=1e-4", "lora.r=16"]`` → nested dict (values parsed as YAML scalars/lists)."""

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SR3DConfigError(f"override {item!r} is not KEY=VALUE (e.g. training.learning_rate=1e-4)")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise SR3DConfigError(f"override {item!r} has an empty key")
        try:
            value = safe_yaml(text, f"override {key}") if text.strip() else None
        except SR3DConfigError as exc:
            if "is not valid YAML" not in str(exc):
                raise  # an alias bomb or a recursive alias
            value = text  # not YAML: the text itself
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SR3DConfigError(f"override {item!r} sets a key below a value")
        node[parts[-1]] = value
    return out


def _resolve_paths(obj: Any, base: Path | None) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _resolve_paths(value, base)
        elif f.metadata.get("path") and value is not None:
            setattr(obj, f.name, resolve_path(value, base))


def _one_data_source(raw: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Overrides where naming one data source (``data.train_file`` / ``data.generator``) replaces the recipe's other.

    A recipe with a generator overridden by ``data.train_file=...`` (and nothing said about the generator)
    trains on the file; naming both in the overrides is left to validation.
    """
    data = extra.get("data")
    if not isinstance(data, dict) or not isinstance(raw.get("data"), dict):
        return extra
    for given, other in (("train_file", "generator"), ("generator", "train_file")):
        if data.get(given) is not None and other not in data and raw["data"].get(other) is not None:
            return {**extra, "data": {**data, other: None}}
    return extra


def load_recipe(
    source: str | Path | dict[str, Any],
    overrides: list[str] | dict[str, Any] | None = None,
    check_files: bool = True,
) -> tuple[Recipe, list[str]]:
    """Read, merge, type-check and validate a recipe.

    Args:
        source: a recipe file, a bundled recipe name, or a mapping.
        overrides: ``KEY=VALUE`` strings with dotted keys, or a nested mapping.
        check_files: require every input file to exist (False for dry runs).

    Returns:
        ``(recipe, warnings)``.
    """
    if isinstance(source, dict):
        raw, path = dict(source), None
    else:
        path = find_recipe(source)
        raw = _load_raw(path)
    extra = parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {})
    raw = _merge(raw, _one_data_source(raw, extra))
    raw.pop("extends", None)
    recipe = _build(Recipe, raw, "")
    recipe.source = str(path) if path is not None else None
    _resolve_paths(recipe, None)
    return recipe, recipe.validate(check_files=check_files)


# ----------------------------------------------------------------------------------------------
# documentation
# ----------------------------------------------------------------------------------------------


def field_help(width: int = 100) -> str:
    """Every recipe key with its type, default and help (generated from the dataclasses)."""
    import textwrap

    lines: list[str] = []

    def walk(cls: type, prefix: str, indent: int) -> None:
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            key = f"{prefix}{f.name}"
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                lines.append(f"{' ' * indent}{key}:  ({tp.__doc__.strip().splitlines()[0] if tp.__doc__ else ''})")
                walk(tp, f"{key}.", indent + 2)
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            else:
                default = None
            head = f"{' ' * indent}{key} ({_type_name(tp)}, default {default!r})"
            kind = _numeric_kind(tp)
            if "range" in f.metadata and kind is not None:
                head += f" range {range_text(f.metadata, kind is float)}" + (", finite" if kind is float else "")
            elif kind is float:
                head += " finite"
            body = textwrap.fill(
                f.metadata.get("help", ""),
                width=width,
                initial_indent=" " * (indent + 4),
                subsequent_indent=" " * (indent + 4),
            )
            lines.append(head)
            if body.strip():
                lines.append(body)

    walk(Recipe, "", 2)
    return "\n".join(lines)


#: How each way of distributing a run has been executed (docs/training.md, "Sharded runs on CPU processes").
#: The 8B recipes themselves never ran: no GPU and no SR-3D-8B weights were available where they were written.
EXECUTED_SHARDING = {
    "fsdp2": "executed with 2 CPU processes (FSDP2 + gloo, tiny model; tests/test_distributed.py); never on GPUs",
    "zero2": "executed with 2 CPU processes (DeepSpeed CPU accelerator + gloo, tiny model; "
    "tests/test_distributed.py); never on GPUs",
    "zero3": "executed with 2 CPU processes (DeepSpeed CPU accelerator + gloo, tiny model; "
    "tests/test_distributed.py); never on GPUs",
}


def recipe_sharding(recipe: Any) -> str:
    """``none`` / ``ddp`` / ``fsdp2`` / ``zero2`` / ``zero3``: how ``recipe`` distributes its run.

    A recipe without ``training.deepspeed`` / ``training.fsdp`` is ``none`` (one device, or DDP under a
    launcher: the recipe does not say which).
    """
    import json

    t = recipe.training
    if t.fsdp:
        return "fsdp2" if int(t.fsdp.get("fsdp_version", 1)) == 2 else "fsdp1"
    if t.deepspeed:
        try:
            stage = json.loads(Path(t.deepspeed).read_text(encoding="utf-8"))["zero_optimization"]["stage"]
        except (OSError, ValueError, KeyError, TypeError):
            return "deepspeed"
        return f"zero{int(stage)}"
    return "none"


def execution_status(recipe: Any) -> tuple[str, str]:
    """``(sharding, what ran)`` for ``sr3d recipes``: how the recipe distributes, and where that executed.

    A recipe for SR-3D-8B (``model.preset`` not ``tiny``) is marked unexecuted as a whole: only its
    distribution was exercised, on CPU processes with the tiny model.
    """
    sharding = recipe_sharding(recipe)
    if recipe.model.preset == "tiny":
        return sharding, "executed on the CPU (the recipe itself)"
    if sharding == "none":
        return sharding, "unexecuted (needs a GPU and the 8B weights)"
    ran = EXECUTED_SHARDING.get(sharding, "not executed anywhere")
    return sharding, f"unexecuted (needs GPUs and the 8B weights); its sharding {ran}"


def bundled_recipes() -> list[tuple[str, str, Path]]:
    """``(name, description, path)`` of every recipe shipped in ``recipes/``."""
    from sr3d_plugin.resources import recipes_dir

    out = []
    for p in sorted(recipes_dir().glob("*.yaml")):
        try:
            raw = _load_raw(p)
            desc = str(raw.get("description", "")).strip().splitlines()[0] if raw.get("description") else ""
        except SR3DConfigError as exc:
            desc = f"(unreadable: {exc})"
        out.append((p.stem, desc, p))
    return out
