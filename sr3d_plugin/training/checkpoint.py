"""Training checkpoints without pickles: safetensors + JSON states, a sha256 manifest, verified on resume.

accelerate's ``save_state`` / ``load_state`` write and read the optimizer, scheduler, sampler, RNG
and custom states with ``torch.save`` / ``pickle``, so a crafted checkpoint runs code on ``--resume``.
This module saves those states itself, in formats whose readers cannot run code:

* tensors (trained weights, optimizer moments, torch RNG states) go to ``.safetensors`` files;
* everything else (optimizer hyper-parameters, scheduler counters, python / numpy RNG states,
  trainer counters) goes to ``.json``, with a few tagged forms for tuples, non-finite floats,
  non-string keys, numeric numpy arrays and references to tensors of the sibling ``.safetensors``.

Checkpoint folder (format ``sr3d-checkpoint`` version 1)::

    model.safetensors                 trained weights only (full names, frozen base left out)
    optimizer.json + .safetensors     optimizer state by parameter name (absent under DeepSpeed)
    scheduler.json [+ .safetensors]   learning-rate scheduler state
    scaler.json                       fp16 gradient scaler (when mixed_precision is fp16)
    rng_<process>.json + .safetensors python, numpy, torch CPU and CUDA generators of each process
    trainer_state.json                step, epoch, position in the epoch, counters
    recipe.yaml, adapter/ (or model/) the recipe and the peft adapter + processor
    manifest.json                     format, version, sha256 and size of every other file; written last

Resume (:func:`verify_checkpoint`, then :func:`load_training_state`) refuses, before anything is
deserialised, a folder without manifest (older checkpoints, written with pickles), a file whose size
or sha256 differs, a file the manifest does not list, a listed file that is missing, links, and any
file whose format could carry a pickle (anything but safetensors, JSON, YAML and text files). The
files that are deserialised are read once into memory, hashed, and parsed from those same bytes.

The manifest is a checksum, not a signature: it catches damage and files dropped into a
checkpoint, and together with the list of readable formats it makes code execution impossible, but
whoever can rewrite a checkpoint can still change its numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from sr3d_plugin.errors import SR3DCheckpointError, SR3DDiskError
from sr3d_plugin.io_utils import atomic_write_bytes, disk_error

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "MANIFEST_NAME",
    "READABLE_SUFFIXES",
    "batch_layout",
    "decode_state",
    "encode_state",
    "load_training_state",
    "read_checkpoint_bytes",
    "read_checkpoint_json",
    "resume_batch_position",
    "save_training_state",
    "verify_checkpoint",
    "write_manifest",
]

CHECKPOINT_FORMAT = "sr3d-checkpoint"
CHECKPOINT_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: File formats a checkpoint may hold: none of their readers can run code.
READABLE_SUFFIXES = frozenset({".safetensors", ".json", ".yaml", ".yml", ".md", ".txt", ".jinja", ".model"})
_MAX_MANIFEST_BYTES = 4 << 20
_MAX_STATE_JSON_BYTES = 256 << 20
_TAG = "__sr3d__"
_NUMPY_KINDS = frozenset("biuf")


# ---- JSON + tensors codec ------------------------------------------------------------------------


def encode_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """A JSON-serialisable copy of ``obj`` whose tensors are moved into ``tensors``.

    Handles dicts (any hashable JSON-scalar keys), lists, tuples, ``None``/bool/int/float/str
    (non-finite floats included), numpy scalars and numeric arrays, and ``torch.Tensor`` (stored
    under ``prefix``-derived names in ``tensors``, contiguous CPU clones). Anything else - a
    function, a class instance - raises :class:`TypeError`: it could only be stored as a pickle.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {_TAG: "float", "value": repr(obj)}
    if isinstance(obj, torch.Tensor):
        key = prefix or "tensor"
        while key in tensors:
            key += "_"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {_TAG: "tensor", "key": key}
    if isinstance(obj, np.generic):
        return encode_state(obj.item(), tensors, prefix)
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _NUMPY_KINDS:
            raise TypeError(f"{prefix or 'state'}: numpy array of dtype {obj.dtype} cannot be stored without pickle")
        return {_TAG: "ndarray", "dtype": obj.dtype.str, "shape": list(obj.shape), "data": obj.ravel().tolist()}
    if isinstance(obj, tuple):
        return {_TAG: "tuple", "items": [encode_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and _TAG not in obj:
            return {k: encode_state(v, tensors, f"{prefix}.{k}" if prefix else k) for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise TypeError(f"{prefix or 'state'}: dict key {k!r} of type {type(k).__name__} cannot be stored")
            items.append([k, encode_state(v, tensors, f"{prefix}.{k}")])
        return {_TAG: "dict", "items": items}
    raise TypeError(f"{prefix or 'state'}: a {type(obj).__name__} cannot be stored without pickle")


def decode_state(obj: Any, tensors: dict[str, torch.Tensor], where: str = "state") -> Any:
    """Inverse of :func:`encode_state`; only plain values, numeric numpy arrays and ``tensors`` come out.

    Raises :class:`SR3DCheckpointError` (naming ``where``) on an unknown tag, a missing tensor or a
    non-numeric array dtype.
    """
    if isinstance(obj, list):
        return [decode_state(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    tag = obj.get(_TAG)
    if tag is None:
        return {k: decode_state(v, tensors, where) for k, v in obj.items()}
    try:
        if tag == "tensor":
            return tensors[obj["key"]]
        if tag == "float":
            if obj["value"] not in ("nan", "inf", "-inf"):
                raise ValueError(obj["value"])
            return float(obj["value"])
        if tag == "tuple":
            return tuple(decode_state(v, tensors, where) for v in obj["items"])
        if tag == "dict":
            return {
                (k if not isinstance(k, list) else tuple(k)): decode_state(v, tensors, where) for k, v in obj["items"]
            }
        if tag == "ndarray":
            dtype = np.dtype(str(obj["dtype"]))
            if dtype.kind not in _NUMPY_KINDS:
                raise ValueError(f"dtype {dtype}")
            return np.asarray(obj["data"], dtype=dtype).reshape([int(s) for s in obj["shape"]])
    except (KeyError, TypeError, ValueError) as exc:
        raise SR3DCheckpointError(f"{where}: malformed {tag!r} entry ({exc})") from None
    raise SR3DCheckpointError(f"{where}: unknown entry tag {tag!r}")


def _put_bytes(path: Path, data: bytes) -> None:
    """Atomic write; an ``OSError`` without a file name gets ``path`` (so the error can name the file)."""
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


def _put_json(path: Path, obj: Any) -> None:
    """:func:`_put_bytes` of ``obj`` as indented JSON with a final newline (as ``atomic_write_json`` writes it)."""
    _put_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def _write_state(folder: Path, name: str, obj: Any) -> None:
    """``<name>.json`` (+ ``<name>.safetensors`` when ``obj`` holds tensors) in ``folder``."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    doc = {"format": CHECKPOINT_FORMAT, "state": encode_state(obj, tensors, "")}
    if tensors:
        _put_bytes(folder / f"{name}.safetensors", save(tensors, metadata={"format": "pt"}))
    _put_json(folder / f"{name}.json", doc)


def _read_state(ckpt: Path, manifest: dict[str, Any], name: str) -> Any:
    doc = read_checkpoint_json(ckpt, manifest, f"{name}.json")
    tensors: dict[str, torch.Tensor] = {}
    if f"{name}.safetensors" in manifest["files"]:
        tensors = _read_safetensors(ckpt, manifest, f"{name}.safetensors")
    if not isinstance(doc, dict) or "state" not in doc:
        raise SR3DCheckpointError(f"checkpoint {ckpt}: {name}.json is not an sr3d state file (no 'state' entry)")
    return decode_state(doc["state"], tensors, f"checkpoint {ckpt}: {name}.json")


# ---- manifest ------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _walk(folder: Path) -> Iterator[tuple[str, Path]]:
    """(posix relative path, path) of every entry below ``folder``, links and special files included."""
    for root, dirs, files in os.walk(folder, followlinks=False):
        base = Path(root)
        for name in sorted(dirs):
            p = base / name
            if p.is_symlink():
                yield p.relative_to(folder).as_posix(), p
        for name in sorted(files):
            p = base / name
            yield p.relative_to(folder).as_posix(), p


def write_manifest(folder: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hash every file of ``folder`` and write ``manifest.json`` (atomically); returns the manifest."""
    files = {}
    for rel, p in _walk(folder):
        if rel == MANIFEST_NAME:
            continue
        files[rel] = {"sha256": _sha256_file(p), "size": p.stat().st_size}
    manifest = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **(extra or {}), "files": files}
    _put_json(folder / MANIFEST_NAME, manifest)
    return manifest


def _refuse(ckpt: Path, message: str) -> SR3DCheckpointError:
    return SR3DCheckpointError(f"checkpoint {ckpt} refused: {message}")


def verify_checkpoint(ckpt: str | os.PathLike) -> dict[str, Any]:
    """Check ``ckpt`` against its manifest without deserialising anything; returns the manifest.

    Raises:
        SR3DCheckpointError: naming the checkpoint and the file at fault, when the manifest is
            missing (older checkpoint), malformed or of another format version; when a file is a
            link, has a format that could carry a pickle, is not listed, is missing, or differs in
            size (truncated) or sha256 (modified).
    """
    ckpt = Path(ckpt)
    mpath = ckpt / MANIFEST_NAME
    if not ckpt.is_dir():
        raise _refuse(ckpt, "not a folder")
    if mpath.is_symlink():
        raise _refuse(ckpt, f"{MANIFEST_NAME} is a link (a checkpoint holds plain files only)")
    if not mpath.is_file():
        pickles = sorted(p.name for p in ckpt.iterdir() if p.suffix in (".pkl", ".bin", ".pt", ".pth"))
        why = f" (it holds {', '.join(pickles[:4])}: accelerate's pickled states)" if pickles else ""
        raise _refuse(
            ckpt,
            f"no {MANIFEST_NAME}{why}. It was written by an older sr3d-plugin, whose checkpoints stored "
            "optimizer, scheduler and RNG states as pickles, or it is incomplete; sr3d-plugin never unpickles "
            "checkpoint files. Start a new run (its trained weights are in the adapter/ folder, safetensors).",
        )
    if mpath.stat().st_size > _MAX_MANIFEST_BYTES:
        raise _refuse(ckpt, f"{MANIFEST_NAME} is {mpath.stat().st_size} bytes (at most {_MAX_MANIFEST_BYTES})")
    try:
        manifest = json.loads(mpath.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise _refuse(ckpt, f"{MANIFEST_NAME} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        raise _refuse(ckpt, f"{MANIFEST_NAME} is not an {CHECKPOINT_FORMAT} manifest")
    if manifest.get("version") != CHECKPOINT_VERSION:
        raise _refuse(
            ckpt, f"{MANIFEST_NAME} has format version {manifest.get('version')!r}; expected {CHECKPOINT_VERSION}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("size"), int)
        for v in files.values()
    ):
        raise _refuse(ckpt, f"{MANIFEST_NAME} has no valid 'files' table (path -> sha256, size)")
    for rel in files:
        pure = PurePosixPath(rel)
        if not rel or pure.is_absolute() or ".." in pure.parts or "\\" in rel or pure.as_posix() != rel:
            raise _refuse(ckpt, f"{MANIFEST_NAME} lists {rel!r}, which is not a plain path inside the checkpoint")
    found = {}
    for rel, p in _walk(ckpt):
        if rel == MANIFEST_NAME:
            continue
        if p.is_symlink():
            raise _refuse(ckpt, f"{rel} is a link (a checkpoint holds plain files only)")
        if not p.is_file():
            raise _refuse(ckpt, f"{rel} is not a regular file")
        if p.suffix.lower() not in READABLE_SUFFIXES:
            raise _refuse(
                ckpt,
                f"{rel}: files of type {p.suffix or '(none)'!r} may carry pickles and are never read; a checkpoint "
                f"holds only {', '.join(sorted(READABLE_SUFFIXES))} files",
            )
        if rel not in files:
            raise _refuse(
                ckpt, f"{rel} is not listed in {MANIFEST_NAME} (a file added after the checkpoint was written)"
            )
        found[rel] = p
    for rel, entry in files.items():
        p = found.get(rel)
        if p is None:
            raise _refuse(ckpt, f"{rel} is listed in {MANIFEST_NAME} but missing")
        size = p.stat().st_size
        if size != entry["size"]:
            raise _refuse(ckpt, f"{rel} is {size} bytes, the manifest says {entry['size']} (truncated or replaced)")
        if _sha256_file(p) != entry["sha256"]:
            raise _refuse(ckpt, f"{rel} does not match its sha256 in {MANIFEST_NAME} (modified)")
    return manifest


def read_checkpoint_bytes(ckpt: Path, manifest: dict[str, Any], rel: str) -> bytes:
    """The bytes of ``rel``, checked against the manifest once more (the bytes parsed are the bytes hashed)."""
    entry = manifest["files"].get(rel)
    if entry is None:
        raise _refuse(ckpt, f"{rel} is missing (not in {MANIFEST_NAME})")
    data = (ckpt / rel).read_bytes()
    if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise _refuse(ckpt, f"{rel} changed after the checkpoint was verified")
    return data


def read_checkpoint_json(ckpt: Path, manifest: dict[str, Any], rel: str) -> Any:
    """A verified JSON file of the checkpoint (plain ``json``; size-limited)."""
    entry = manifest["files"].get(rel)
    if entry is not None and entry["size"] > _MAX_STATE_JSON_BYTES:
        raise _refuse(ckpt, f"{rel} is {entry['size']} bytes (at most {_MAX_STATE_JSON_BYTES})")
    try:
        return json.loads(read_checkpoint_bytes(ckpt, manifest, rel))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _refuse(ckpt, f"{rel} is not valid JSON ({exc})") from None


def _read_safetensors(ckpt: Path, manifest: dict[str, Any], rel: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(read_checkpoint_bytes(ckpt, manifest, rel))
    except SafetensorError as exc:
        raise _refuse(ckpt, f"{rel} is not a valid safetensors file ({exc})") from None


# ---- states --------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((int(py[0]), tuple(int(v) for v in py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((str(np_state[0]), np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _sd_options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _raw_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


def gather_training_state(acc: Any, model: Any, optimizer: Any | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Full (unsharded, CPU) trained weights and optimizer state by parameter name; collective.

    Uses ``torch.distributed.checkpoint.state_dict`` (``full_state_dict``, ``cpu_offload``), which
    knows plain modules, DDP and FSDP alike; on processes other than the main one the dicts may
    be empty. Weights are the trainable parameters only (no buffers, no quantisation states).
    ``optimizer`` None (DeepSpeed) skips the optimizer.
    """
    from accelerate.utils import DistributedType
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _sd_options(cpu_offload=True, ignore_frozen_params=True)
    full = get_model_state_dict(model, options=opts)
    inner = acc.unwrap_model(model)
    if getattr(acc, "distributed_type", None) == DistributedType.FSDP:  # parameter names may be flat: drop buffers
        buffers = {_canonical(n) for n, _ in inner.named_buffers()}
        weights = {k: v for k, v in full.items() if k not in buffers}
    else:  # trained parameters only: buffers and quantisation states (bitsandbytes) belong to the base
        keep = {_canonical(n) for n, p in inner.named_parameters() if p.requires_grad}
        weights = {k: v for k, v in full.items() if k in keep}
    optim = get_optimizer_state_dict(model, _raw_optimizer(optimizer), options=opts) if optimizer is not None else {}
    return weights, optim


def save_training_state(
    acc: Any,
    folder: Path,
    weights: dict[str, torch.Tensor] | None,
    optimizer_state: dict[str, Any] | None,
    scheduler: Any,
    trainer_state: dict[str, Any],
) -> None:
    """Write this process's part of a checkpoint into ``folder`` (no manifest; see :func:`write_manifest`).

    The main process writes weights, optimizer, scheduler, scaler and trainer state; every process
    writes its own ``rng_<process>`` files. Raises ``OSError`` / ``SafetensorError`` as the disk does.
    """
    from safetensors.torch import save

    if acc.is_main_process:
        if weights is not None:
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
            _put_bytes(folder / "model.safetensors", save(tensors, metadata={"format": "pt"}))
        if optimizer_state is not None:
            _write_state(folder, "optimizer", optimizer_state)
        _write_state(folder, "scheduler", scheduler.state_dict())
        scaler = getattr(acc, "scaler", None)
        if scaler is not None:
            _write_state(folder, "scaler", scaler.state_dict())
    _write_state(folder, f"rng_{acc.process_index}", _rng_state())
    if acc.is_main_process:
        _put_json(folder / "trainer_state.json", trainer_state)


_WRAPPER_PARTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def _canonical(name: str) -> str:
    """A parameter name without FSDP / activation-checkpointing / compile wrapper parts (as in state dicts)."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def _check_weights(
    ckpt: Path, weights: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter], shapes: bool = True
) -> None:
    trainable = {n for n, p in params.items() if p.requires_grad}
    missing = sorted(trainable - set(weights))
    if missing:
        raise SR3DCheckpointError(
            f"checkpoint {ckpt} lacks {len(missing)} trainable weight(s) of this recipe (e.g. {missing[0]}); "
            "was it written by another recipe?"
        )
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise SR3DCheckpointError(
            f"checkpoint {ckpt}: model.safetensors holds {len(unknown)} weight(s) this model does not have "
            f"(e.g. {unknown[0]}); was it written by another recipe?"
        )
    for name, value in weights.items() if shapes else ():
        if tuple(value.shape) != tuple(params[name].shape):
            raise SR3DCheckpointError(
                f"checkpoint {ckpt}: model.safetensors {name} has shape {tuple(value.shape)}; "
                f"this model expects {tuple(params[name].shape)}"
            )


def _check_optimizer(
    ckpt: Path,
    state: Any,
    params: dict[str, torch.nn.Parameter],
    groups: list[dict[str, Any]] | None = None,
    shapes: bool = True,
) -> None:
    where = f"checkpoint {ckpt}: optimizer.json"
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict):
        raise SR3DCheckpointError(f"{where}: expected a mapping with 'state' and 'param_groups'")
    if not isinstance(state.get("param_groups"), list):
        raise SR3DCheckpointError(f"{where}: expected a list 'param_groups'")
    for name, entry in state["state"].items():
        if name not in params or not isinstance(entry, dict):
            raise SR3DCheckpointError(f"{where}: state for {name!r}, which is not a trainable parameter of this model")
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or value.ndim == 0):
                what = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else f"a {_kind(value)}"
                raise SR3DCheckpointError(f"{where}: {name}.{key} is {what}; expected a floating-point tensor")
            if not bool(torch.isfinite(value).all()):
                raise SR3DCheckpointError(f"{where}: {name}.{key} holds non-finite values")
            if (
                shapes
                and isinstance(value, torch.Tensor)
                and value.ndim > 0
                and tuple(value.shape) != tuple(params[name].shape)
            ):
                raise SR3DCheckpointError(
                    f"{where}: {name}.{key} has shape {tuple(value.shape)}; expected {tuple(params[name].shape)}"
                )
    if groups is not None:  # hyper-parameters: the keys and kinds of this run's groups
        if len(state["param_groups"]) != len(groups):
            raise SR3DCheckpointError(
                f"{where}: {len(state['param_groups'])} parameter groups where this run has {len(groups)}"
            )
        for i, (saved, current) in enumerate(zip(state["param_groups"], groups)):
            if not isinstance(saved, dict):
                raise SR3DCheckpointError(f"{where}: param_groups[{i}] is not a mapping")
            for key in _KERNEL_FLAGS:  # a run's own choice (kept on resume): true, false or null
                if saved.get(key) is not None and not isinstance(saved.get(key), bool):
                    raise SR3DCheckpointError(
                        f"{where}: param_groups[{i}].{key} is a {_kind(saved[key])}; expected true, false or null"
                    )
            _check_like(
                {k: v for k, v in saved.items() if k != "params" and k not in _KERNEL_FLAGS},
                {k: v for k, v in current.items() if k != "params" and k not in _KERNEL_FLAGS},
                f"{where}: param_groups[{i}]",
            )
            names = saved.get("params")
            if not isinstance(names, list) or not all(isinstance(n, str) and n in params for n in names):
                raise SR3DCheckpointError(f"{where}: param_groups[{i}].params are not parameter names of this model")


#: optimizer-group flags that choose the kernels, not the arithmetic (a resumed run keeps its own)
_KERNEL_FLAGS = ("foreach", "fused", "capturable", "differentiable")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple)):
        return "sequence"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, torch.Tensor):
        return "tensor"
    return type(value).__name__


def _check_like(saved: Any, current: Any, where: str) -> None:
    """``saved`` has the structure of ``current``: same keys, sequence lengths and kinds of values.

    ``load_state_dict`` of schedulers copies whatever it is given into the object (and optimizers
    accept any hyper-parameter values), so a hostile state would fail later, mid-training.
    """
    if _kind(saved) != _kind(current):
        raise SR3DCheckpointError(f"{where}: a {_kind(saved)} where this run has a {_kind(current)}")
    if isinstance(current, dict):
        if set(saved) != set(current):
            diff = sorted(map(str, set(saved) ^ set(current)))
            raise SR3DCheckpointError(f"{where}: keys differ from this run's (e.g. {diff[0]!r})")
        for k in current:
            _check_like(saved[k], current[k], f"{where}.{k}")
    elif isinstance(current, (list, tuple)):
        if len(saved) != len(current):
            raise SR3DCheckpointError(f"{where}: {len(saved)} entries where this run has {len(current)}")
        for i, (a, b) in enumerate(zip(saved, current)):
            _check_like(a, b, f"{where}[{i}]")
    elif isinstance(current, torch.Tensor) and (saved.shape != current.shape or saved.dtype != current.dtype):
        raise SR3DCheckpointError(
            f"{where}: tensor {tuple(saved.shape)} {saved.dtype} where this run has {tuple(current.shape)} {current.dtype}"
        )
    elif isinstance(current, float) and isinstance(saved, (int, float)) and not math.isfinite(saved):
        raise SR3DCheckpointError(f"{where}: {saved!r}; expected a finite number")


def _trainer_state(ckpt: Path, manifest: dict[str, Any]) -> dict[str, int]:
    doc = read_checkpoint_json(ckpt, manifest, "trainer_state.json")
    keys = ("global_step", "epoch", "batch_in_epoch", "samples_seen", "tokens_seen")
    if not isinstance(doc, dict):
        raise SR3DCheckpointError(f"checkpoint {ckpt}: trainer_state.json is not a mapping")
    out = {}
    for k in keys:
        v = doc.get(k)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise SR3DCheckpointError(f"checkpoint {ckpt}: trainer_state.json {k}={v!r}; expected an integer >= 0")
        out[k] = v
    return out


def batch_layout(processes: int, per_device_batch_size: int, gradient_accumulation_steps: int) -> dict[str, int]:
    """The data layout of a run as saved in ``trainer_state.json`` (``layout``): processes x batch x accumulation."""
    return {
        "processes": int(processes),
        "per_device_batch_size": int(per_device_batch_size),
        "gradient_accumulation_steps": int(gradient_accumulation_steps),
    }


def _layout_text(layout: dict[str, int]) -> str:
    p, b, a = layout["processes"], layout["per_device_batch_size"], layout["gradient_accumulation_steps"]
    return (
        f"{p} process(es) x per_device_batch_size {b} x gradient_accumulation_steps {a} = {p * b * a} samples per step"
    )


def resume_batch_position(ckpt: Path, manifest: dict[str, Any], layout: dict[str, int]) -> int:
    """``batch_in_epoch`` of the checkpoint in this run's micro-batches: the same samples, any world size.

    A run's global sample order does not depend on its layout: the epoch permutation
    (:class:`~sr3d_plugin.training.data.EpochSampler`) is cut into global micro-batches of
    ``processes x per_device_batch_size`` consecutive samples (process ``r`` takes the ``r``-th
    ``per_device_batch_size`` of each), and an optimizer step takes ``gradient_accumulation_steps``
    of them. A checkpoint saved after ``k`` local micro-batches of an epoch has consumed
    ``k x processes x per_device_batch_size`` samples of it; this run skips as many.

    ``layout`` is :func:`batch_layout` of this run. Checkpoints without a saved layout (older
    versions) are taken to have this run's batch sizes and the manifest's process count.

    Raises:
        SR3DCheckpointError: the samples per optimizer step differ (resuming would change the
            global batch mid-run), naming both layouts and the setting that would keep it.
    """
    doc = read_checkpoint_json(ckpt, manifest, "trainer_state.json")
    counters = _trainer_state(ckpt, manifest)
    saved = doc.get("layout") if isinstance(doc, dict) else None
    if not isinstance(saved, dict):
        saved = {**layout, "processes": int(manifest.get("processes", layout["processes"]))}
    keys = ("processes", "per_device_batch_size", "gradient_accumulation_steps")
    if not all(isinstance(saved.get(k), int) and not isinstance(saved.get(k), bool) and saved[k] > 0 for k in keys):
        raise SR3DCheckpointError(f"checkpoint {ckpt}: trainer_state.json layout={saved!r}; expected positive {keys}")
    per_step = saved["processes"] * saved["per_device_batch_size"] * saved["gradient_accumulation_steps"]
    here = layout["processes"] * layout["per_device_batch_size"] * layout["gradient_accumulation_steps"]
    if per_step != here:
        hints = []
        p, b, a = layout["processes"], layout["per_device_batch_size"], layout["gradient_accumulation_steps"]
        if per_step % (p * a) == 0:
            hints.append(f"training.per_device_batch_size={per_step // (p * a)}")
        if per_step % (p * b) == 0:
            hints.append(f"training.gradient_accumulation_steps={per_step // (p * b)}")
        hint = f"; set {' or '.join(hints)} to keep it" if hints else ""
        raise SR3DCheckpointError(
            f"checkpoint {ckpt} was written by {_layout_text(saved)}; this run has {_layout_text(layout)}. "
            f"Resuming would change the global batch mid-run{hint}"
        )
    samples = counters["batch_in_epoch"] * saved["processes"] * saved["per_device_batch_size"]
    local = layout["processes"] * layout["per_device_batch_size"]
    if samples % local:  # cannot happen at a step boundary with equal samples per step; a damaged state
        raise SR3DCheckpointError(
            f"checkpoint {ckpt}: {samples} samples consumed in the epoch is not a multiple of this run's "
            f"{local} samples per micro-batch"
        )
    return samples // local


def refuse_deepspeed_resume(ckpt: Path, manifest: dict[str, Any], deepspeed: bool) -> None:
    """:class:`SR3DCheckpointError` when this run or the checkpoint's run used DeepSpeed (no exact resume there)."""
    if deepspeed or manifest.get("engine") == "deepspeed":
        raise SR3DCheckpointError(
            f"checkpoint {ckpt}: resuming under DeepSpeed is not supported. DeepSpeed saves its optimizer states "
            "only with torch.save (pickles), which sr3d-plugin neither writes into checkpoints nor reads; its "
            "checkpoints hold the trained weights (adapter/, model.safetensors) without optimizer state. "
            "Resume with DDP or FSDP (training.deepspeed=null), or start a new run from the adapter."
        )


def _shard_like(full: torch.Tensor, like: Any) -> torch.Tensor:
    """``full`` laid out as the DTensor ``like`` (each process slices its part: all of them hold ``full``)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def load_full_state_on_cpu_fsdp(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor], optim: dict[str, Any]
) -> None:
    """Load full (unsharded) trained weights and optimizer state into an FSDP2 model of the CPU path.

    ``weights``: full tensors by canonical name; ``optim``: the ``full_state_dict`` optimizer layout
    (``state`` and ``param_groups[*].params`` by name) that
    :func:`gather_training_state` writes. Every process holds the
    whole checkpoint and keeps its own slice; no collective runs (``set_model_state_dict`` with a full
    state dict of only the trained subset failed here under gloo with mismatched message sizes).
    """
    params = {_canonical(n): p for n, p in model.named_parameters()}
    with torch.no_grad():
        for name, full in weights.items():
            param = params[name]
            shard = _shard_like(full, param)
            (param.to_local() if hasattr(param, "to_local") else param).copy_(
                shard.to_local() if hasattr(shard, "to_local") else shard
            )
    by_id = {id(p): n for n, p in params.items()}
    state: dict[int, dict[str, Any]] = {}
    groups = []
    for group, saved in zip(optimizer.param_groups, optim["param_groups"]):
        ids = []
        for param in group["params"]:
            index = sum(len(g["params"]) for g in groups) + len(ids)
            entry = optim["state"].get(by_id[id(param)])
            if entry is not None:  # moments sharded as their parameter, step counts as they are
                state[index] = {
                    k: _shard_like(v, param) if isinstance(v, torch.Tensor) and v.ndim > 0 else v
                    for k, v in entry.items()
                }
            ids.append(index)
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": ids})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def load_training_state(
    acc: Any,
    ckpt: Path,
    manifest: dict[str, Any],
    model: Any,
    optimizer: Any,
    scheduler: Any,
    deepspeed: bool,
    warn: Callable[[str], None] | None = None,
) -> dict[str, int]:
    """Restore weights, optimizer, scheduler, scaler and this process's RNG from a verified checkpoint.

    ``manifest`` is what :func:`verify_checkpoint` returned. Returns the trainer counters
    (``global_step``, ``epoch``, ``batch_in_epoch``, ``samples_seen``, ``tokens_seen``).

    Raises:
        SR3DCheckpointError: a DeepSpeed run or checkpoint (DeepSpeed's optimizer states can only be
            saved as pickles, so they are not saved: no exact resume), weights that do not fit this
            model, or states that do not parse.
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    refuse_deepspeed_resume(ckpt, manifest, deepspeed)
    from accelerate.utils import DistributedType

    counters = _trainer_state(ckpt, manifest)
    sharded = getattr(acc, "distributed_type", None) == DistributedType.FSDP  # local shapes differ
    params = {_canonical(n): p for n, p in acc.unwrap_model(model).named_parameters()}
    weights = _read_safetensors(ckpt, manifest, "model.safetensors")
    _check_weights(ckpt, weights, params, shapes=not sharded)
    opt_state = _read_state(ckpt, manifest, "optimizer")
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    _check_optimizer(ckpt, opt_state, trainable, _raw_optimizer(optimizer).param_groups, shapes=not sharded)
    sched_state = _read_state(ckpt, manifest, "scheduler")
    _check_like(sched_state, scheduler.state_dict(), f"checkpoint {ckpt}: scheduler.json")
    scaler = getattr(acc, "scaler", None)
    scaler_state = (
        _read_state(ckpt, manifest, "scaler") if scaler is not None and "scaler.json" in manifest["files"] else None
    )
    rng_name = f"rng_{acc.process_index}"
    rng = _read_state(ckpt, manifest, rng_name) if f"{rng_name}.json" in manifest["files"] else None
    current = "applying the states"
    try:
        raw = _raw_optimizer(optimizer)
        # how the update is computed (per-tensor or multi-tensor, fused) is this run's choice, not the
        # checkpoint's: the arithmetic is the same, but the right kernel depends on the parameters' kind
        kernels = [{k: g[k] for k in _KERNEL_FLAGS if k in g} for g in raw.param_groups]
        from sr3d_plugin.training.sharding import is_cpu_fsdp

        if is_cpu_fsdp(model):  # every process slices the full states itself (see sharding)
            current = "model.safetensors / optimizer.json"
            load_full_state_on_cpu_fsdp(model, raw, weights, opt_state)
        else:
            current = "model.safetensors"
            set_model_state_dict(model, weights, options=_sd_options(strict=False))
            current = "optimizer.json"
            set_optimizer_state_dict(model, raw, opt_state, options=_sd_options())
        for group, saved, flags in zip(raw.param_groups, opt_state["param_groups"], kernels):
            group.update({k: v for k, v in saved.items() if isinstance(v, tuple) and k != "params"})  # tuples
            group.update(flags)
        current = "scheduler.json"
        scheduler.load_state_dict(sched_state)
        if scaler_state is not None:
            current = "scaler.json"
            scaler.load_state_dict(scaler_state)
        if rng is not None:
            current = f"{rng_name}.json"
            _set_rng_state(rng)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        raise SR3DCheckpointError(f"checkpoint {ckpt}: {current} does not fit this run ({exc})") from None
    missing = [i for i in range(acc.num_processes) if f"rng_{i}.json" not in manifest["files"]]
    if missing and warn is not None:  # every process knows, the main one reports
        warn(
            f"checkpoint {ckpt} has no RNG state of process {', '.join(map(str, missing))} (written by "
            f"{manifest.get('processes', '?')} process(es)); its generators keep their seeds"
        )
    return counters


def describe_os_error(exc: BaseException, path: str | os.PathLike, action: str) -> SR3DDiskError:
    """An :class:`SR3DDiskError` naming ``path``, what was being done and why the system refused it
    (:func:`sr3d_plugin.io_utils.disk_error` for an ``OSError``)."""
    if isinstance(exc, OSError):
        return disk_error(exc, path, action)
    return SR3DDiskError(f"{action} {str(path)!r} failed: {exc}")
