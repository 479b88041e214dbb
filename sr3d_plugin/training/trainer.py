"""The training loop: accelerate for devices and scale-out, atomic checkpoints, exact resume.

Why an accelerate loop rather than ``transformers.Trainer`` (see ``docs/training.md``): SR-3D batches
carry tensors whose first axis is not the batch (tiles, regions), the loss is normalised by the
supervised-token count of a whole accumulation window, checkpoints must appear atomically and carry
only trained weights, and a resumed run must replay the exact sample order and augmentation. Each of
these is a few lines here; with ``Trainer`` they meant overriding private methods. accelerate still
provides everything distributed: DDP, FSDP and DeepSpeed, mixed precision, sharded checkpoints,
RNG states, trackers.

Run folder::

    <output_dir>/recipe.yaml           the resolved recipe
    <output_dir>/base-model/           random base weights (tiny from-scratch recipes only)
    <output_dir>/checkpoint-<step>/    trained weights, optimizer, scheduler, RNG and data position as
                                       safetensors + JSON, adapter/ (peft), recipe.yaml, manifest.json
                                       (see :mod:`sr3d_plugin.training.checkpoint`: no pickles)
    <output_dir>/adapter/              final adapter + processor (what ``sr3d merge`` takes);
                                       model/ instead when training without LoRA
    <output_dir>/logs/                 TensorBoard;  <output_dir>/log.jsonl  every logged event

A checkpoint is written into ``.checkpoint-<step>.tmp``, its manifest last, and renamed when
complete, so a ``checkpoint-<step>`` folder is never half-written; a failed write (disk full,
read-only) removes the temporary folder and stops training with :class:`SR3DDiskError`, the
previous checkpoints intact; stale temporary folders are removed at start. A resume verifies the
manifest before anything is read. The output folder is checked for writability before the model
loads.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sr3d_plugin.errors import SR3DConfigError, SR3DDiskError, SR3DError
from sr3d_plugin.io_utils import atomic_dir, atomic_write_text, replace_folder
from sr3d_plugin.training.checkpoint import (
    batch_layout,
    describe_os_error,
    gather_training_state,
    load_training_state,
    refuse_deepspeed_resume,
    resume_batch_position,
    save_training_state,
    verify_checkpoint,
    write_manifest,
)

__all__ = ["TrainState", "find_checkpoint", "train", "trained_weights_only"]

_CKPT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint (data position included)."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for k, v in state.items():
            setattr(self, k, int(v))


def find_checkpoint(output_dir: str | Path, which: str | bool | None = True) -> Path | None:
    """A complete checkpoint: the newest in ``output_dir`` (``which`` True/"latest") or the folder ``which``."""
    if which in (None, False):
        return None
    if isinstance(which, str) and which not in ("latest", ""):
        p = Path(which)
        if not (p / "trainer_state.json").is_file():
            raise SR3DConfigError(f"resume={str(which)!r}: not a complete checkpoint folder (no trainer_state.json)")
        return p
    out = Path(output_dir)
    found = []
    if out.is_dir():
        for d in out.iterdir():
            m = _CKPT.match(d.name)
            if m and (d / "trainer_state.json").is_file():
                found.append((int(m.group(1)), d))
    return max(found)[1] if found else None


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, f"{key}."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = json.dumps(v) if v is not None else "null"
    return out


def _recipe_yaml(recipe: Any) -> str:
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def _optimizer(groups: list[dict[str, Any]], tr: Any) -> torch.optim.Optimizer:
    kw = {"lr": tr.learning_rate, "betas": (tr.adam_beta1, tr.adam_beta2), "eps": tr.adam_epsilon}
    if tr.optimizer == "adamw":
        params = [p for g in groups for p in g["params"]]
        if params and all(type(p) is torch.nn.Parameter and p.device.type == "cpu" for p in params):
            # torch picks the per-tensor loop on the CPU; the multi-tensor path does the same arithmetic
            # (bit-identical weights, tests/test_training_optimizer.py) in a third less time for small models
            return torch.optim.AdamW(groups, **kw, foreach=True)
        return torch.optim.AdamW(groups, **kw)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if tr.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(groups, **kw)


def _trainable_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def train(
    recipe: Any,
    resume: str | bool | None = None,
    emit: Callable[[dict[str, Any]], None] | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train ``recipe``; returns the final summary (also emitted as the ``end`` event).

    Known third-party warnings (:mod:`sr3d_plugin._quiet`) are silenced for the duration of the run.

    Args:
        recipe: a validated :class:`~sr3d_plugin.training.recipe.Recipe`.
        resume: True / ``"latest"`` for the newest checkpoint in the output folder, a checkpoint path,
            or None to start fresh (an output folder with checkpoints then is an error). On resume,
            ``log.jsonl`` entries of steps after the checkpoint's are dropped (they are run again).
        emit: called on the main process with each event (``start``, ``log``, ``checkpoint``, ``end``).
        progress: show a progress bar (default ``logging.progress_bar``).
    """
    import torch.multiprocessing as tmp

    from sr3d_plugin._quiet import known_warnings_silenced

    # training.cpu_threads and data.worker_sharing hold for the run only
    threads, sharing = torch.get_num_threads(), tmp.get_sharing_strategy()
    try:
        with known_warnings_silenced():
            return _train(recipe, resume, emit, progress)
    finally:
        torch.set_num_threads(threads)
        tmp.set_sharing_strategy(sharing)


def drop_log_entries_after(log_file: Path, step: int) -> int:
    """Rewrite ``log_file`` (JSONL events) without the entries of steps after ``step``; returns how many went.

    Entries without a ``step`` (start, resume, warnings, end) are kept; unreadable lines are kept as they are,
    except a last line cut short (no newline) by a killed process, which goes too.
    """
    if not log_file.is_file():
        return 0
    kept: list[str] = []
    dropped = 0
    text = log_file.read_text(encoding="utf-8")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines) - 1 and not text.endswith("\n"):
                dropped += 1  # the half-written last line of a killed run
            else:
                kept.append(line)
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        atomic_write_text(log_file, "".join(k + "\n" for k in kept))
    return dropped


def _train(
    recipe: Any,
    resume: str | bool | None,
    emit: Callable[[dict[str, Any]], None] | None,
    progress: bool | None,
) -> dict[str, Any]:
    from sr3d_plugin.training.data import EpochSampler, SR3DCollator, SR3DTrainDataset, load_training_source
    from sr3d_plugin.training.recipe import check_ranges

    check_ranges(recipe)  # a recipe built in Python: the same typed ranges as a loaded one, before any work
    # a records file is checked before anything is written or loaded (generated data: once it exists)
    source = load_training_source(recipe.data) if recipe.data.train_file is not None else None

    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
    from torch.utils.data import DataLoader
    from transformers import get_scheduler

    from sr3d_plugin.training.model_card import card_facts
    from sr3d_plugin.training.model_setup import build_model, optimizer_groups, prepare_for_training

    t_start = time.perf_counter()
    tr, lg = recipe.training, recipe.logging
    out = Path(tr.output_dir)
    ga = tr.gradient_accumulation_steps

    # ---- accelerator ----------------------------------------------------------------------------
    trackers: list[str] = []
    for name in lg.report_to:
        if name == "wandb":
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                if emit:
                    emit(
                        {
                            "event": "warning",
                            "message": "wandb is not installed; skipping it (pip install sr3d-plugin[wandb])",
                        }
                    )
                continue
        if name in ("tensorboard", "wandb"):
            trackers.append(name)
    acc_kwargs: dict[str, Any] = {
        "mixed_precision": tr.mixed_precision,
        "project_config": ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        "log_with": trackers or None,
    }
    from sr3d_plugin.training import sharding

    on_cpus = sharding.cpu_processes()  # several CPU processes (torchrun / accelerate launch, no CUDA)
    cpu_fsdp = None  # accelerate's FSDP plugin, applied by sharding.shard_model_on_cpu on CPU processes
    if sharding.wants_deepspeed(tr.deepspeed):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise SR3DConfigError(
                "DeepSpeed is asked for (training.deepspeed, or an accelerate launch DeepSpeed config) but is not "
                "installed: pip install 'sr3d-plugin[deepspeed]'"
            )
        if tr.deepspeed:
            from accelerate import DeepSpeedPlugin

            acc_kwargs["deepspeed_plugin"] = DeepSpeedPlugin(
                hf_ds_config=tr.deepspeed, gradient_accumulation_steps=ga, gradient_clipping=tr.max_grad_norm or 0.0
            )
            acc_kwargs["gradient_accumulation_steps"] = ga
        if on_cpus:  # DeepSpeed's CPU accelerator: gloo, and accelerate must not be told cpu=True
            acc_kwargs.update(sharding.cpu_deepspeed_kwargs())
    elif sharding.wants_fsdp(tr.fsdp):
        if on_cpus:
            cpu_fsdp = sharding.cpu_fsdp_plugin(tr.fsdp)
        elif tr.fsdp:
            from accelerate import FullyShardedDataParallelPlugin

            acc_kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(**tr.fsdp)
    if on_cpus and "kwargs_handlers" not in acc_kwargs:
        acc_kwargs["cpu"] = True  # accelerate's MULTI_CPU with gloo (DDP; FSDP2 applied here when asked for)
    acc = Accelerator(**acc_kwargs)
    deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
    main = acc.is_main_process
    pending: list[str] = []
    if tr.fsdp and cpu_fsdp is None and acc.distributed_type != DistributedType.FSDP:
        pending.append(
            f"training.fsdp is set but accelerate runs {acc.distributed_type} here (one process: no sharding)"
        )

    def send(event: dict[str, Any]) -> None:
        if not main:
            return
        try:
            with open(out / "log.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(event, default=str) + "\n")
        except OSError as exc:
            raise describe_os_error(exc, out / "log.jsonl", "appending to") from None
        if emit:
            emit(event)

    # ---- run folder -----------------------------------------------------------------------------
    ckpt = find_checkpoint(out, resume) if resume else None
    if resume and ckpt is None:
        raise SR3DConfigError(f"resume={resume!r}: no complete checkpoint in {out}")
    manifest = None
    if ckpt is not None:  # before anything loads: refused checkpoints cost no model load
        manifest = verify_checkpoint(ckpt)
        refuse_deepspeed_resume(ckpt, manifest, deepspeed)
        layout = batch_layout(acc.num_processes, tr.per_device_batch_size, ga)
        resume_position = resume_batch_position(ckpt, manifest, layout)  # refused here if the layouts clash
    if main:
        check_writable(out)
        for stale in out.glob(".checkpoint-*.tmp*"):
            shutil.rmtree(stale, ignore_errors=True)
        if not resume and find_checkpoint(out, True) is not None:
            raise SR3DConfigError(
                f"{out} already holds checkpoints; pass resume=True to continue, or choose another training.output_dir"
            )
        try:
            atomic_write_text(out / "recipe.yaml", _recipe_yaml(recipe))
        except OSError as exc:
            raise describe_os_error(exc, out / "recipe.yaml", "writing") from None
    acc.wait_for_everyone()
    set_seed(tr.seed)
    if tr.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if tr.cpu_threads and acc.device.type == "cpu":
        torch.set_num_threads(int(tr.cpu_threads))
    if recipe.data.worker_sharing and recipe.data.num_workers > 0:
        import torch.multiprocessing as tmp

        if recipe.data.worker_sharing not in tmp.get_all_sharing_strategies():
            raise SR3DConfigError(
                f"data.worker_sharing={recipe.data.worker_sharing!r} is not available here; expected one of "
                f"{sorted(tmp.get_all_sharing_strategies())}"
            )
        tmp.set_sharing_strategy(recipe.data.worker_sharing)

    # ---- model (main process first: it may write the tiny base model or generated data) --------
    base_dir = out / "base-model" if (recipe.model.path is None and recipe.model.preset == "tiny") else None
    with acc.main_process_first(), sharding.without_zero3_init(acc):
        if source is None:
            source = load_training_source(recipe.data, out_dir=out / "data")
        if source.skipped:
            send(
                {
                    "event": "warning",
                    "message": f"data.skip_invalid: skipped {source.skipped} invalid record(s); "
                    + source.report.message(shown=10),
                    "skipped_records": source.skipped,
                }
            )
        model, processor, base_path = build_model(recipe, device=acc.device, base_dir=base_dir)
    model, report = prepare_for_training(model, recipe)
    peft_config = getattr(model, "peft_config", None)
    if peft_config and base_path:
        for cfg in peft_config.values():
            cfg.base_model_name_or_path = str(Path(base_path).resolve())
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config

    # ---- data -----------------------------------------------------------------------------------
    dataset = SR3DTrainDataset(source, processor, config, recipe.data, seed=tr.seed)
    sampler = EpochSampler(len(dataset), seed=tr.seed, shuffle=recipe.data.shuffle)
    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    loader = DataLoader(
        dataset,
        batch_size=tr.per_device_batch_size,
        sampler=sampler,
        collate_fn=SR3DCollator(pad),
        num_workers=recipe.data.num_workers,
        persistent_workers=recipe.data.num_workers > 0,
        generator=torch.Generator().manual_seed(tr.seed),
        pin_memory=acc.device.type == "cuda",
    )
    if cpu_fsdp is not None:  # FSDP2 on CPU processes: shard before the optimizer sees the parameters
        model = sharding.shard_model_on_cpu(model, cpu_fsdp, tr.mixed_precision)
    optimizer = _optimizer(optimizer_groups(model, recipe), tr)
    if cpu_fsdp is not None:  # accelerate would wrap the sharded model in DDP: it prepares the rest only
        optimizer, loader = acc.prepare(optimizer, loader)
    else:
        if deepspeed:
            sharding.fill_zero3_auto(acc, acc.unwrap_model(model).get_base_model() if peft_config else model)
        model, optimizer, loader = acc.prepare(model, optimizer, loader)
    engine = "deepspeed" if deepspeed else ("fsdp2-cpu" if cpu_fsdp is not None else str(acc.distributed_type))
    batches_per_epoch = len(loader)
    if batches_per_epoch == 0:
        raise SR3DConfigError("the data loader is empty (fewer samples than processes?)")
    steps_per_epoch = math.ceil(batches_per_epoch / ga)
    total = tr.max_steps if tr.max_steps > 0 else max(1, math.ceil(tr.num_epochs * steps_per_epoch))
    scheduler = get_scheduler(
        tr.lr_scheduler, optimizer, num_warmup_steps=math.ceil(tr.warmup_ratio * total), num_training_steps=total
    )
    state = TrainState()

    if ckpt is not None and manifest is not None:
        warnings: list[str] = []
        counters = load_training_state(acc, ckpt, manifest, model, optimizer, scheduler, deepspeed, warnings.append)
        state.load_state_dict(counters)
        state.batch_in_epoch = resume_position  # in this run's micro-batches (another world size, same samples)
        if main:
            try:
                drop_log_entries_after(out / "log.jsonl", state.global_step)
            except OSError as exc:
                raise describe_os_error(exc, out / "log.jsonl", "rewriting") from None
        send({"event": "resume", "checkpoint": str(ckpt), **state.state_dict()})
        for message in warnings:
            send({"event": "warning", "message": message})
        changed = _recipe_changes(ckpt, manifest, recipe)
        if changed:
            send({"event": "warning", "message": f"the recipe differs from the checkpoint's in {', '.join(changed)}"})

    for message in pending:
        send({"event": "warning", "message": message})
    if acc.is_main_process and trackers:
        acc.init_trackers(lg.run_name or out.name, config=_flat(recipe.to_dict()))
    send(
        {
            "event": "start",
            "output_dir": str(out),
            "base_model": base_path or None,
            "processes": acc.num_processes,
            "device": str(acc.device),
            "cpu_threads": torch.get_num_threads() if acc.device.type == "cpu" else None,
            "distributed": str(acc.distributed_type),
            "sharding": engine,
            "samples": len(dataset),
            "batches_per_epoch": batches_per_epoch,
            "total_steps": total,
            "log_dir": str(out / "logs"),
            "log_file": str(out / "log.jsonl"),
            "trackers": trackers,
            **report.to_dict(),
        }
    )

    show = (lg.progress_bar if progress is None else progress) and main
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=state.global_step, desc="train", unit="step", dynamic_ncols=True)

    # ---- loop -----------------------------------------------------------------------------------
    model.train()
    last_loss = float("nan")
    losses: list[float] = []
    saved_at = -1
    while state.global_step < total:
        sampler.set_epoch(state.epoch)
        epoch_loader = acc.skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
        it = iter(epoch_loader)
        epoch_done = False
        while state.global_step < total and not epoch_done:
            window = []
            for _ in range(ga):
                try:
                    window.append(next(it))
                except StopIteration:
                    break
            if not window:
                epoch_done = True
                state.epoch += 1
                state.batch_in_epoch = 0
                break
            step_start = time.perf_counter()
            counts = torch.stack(  # supervised tokens, input tokens (padding excluded) of the window
                [
                    sum((mb["labels"][:, 1:] != -100).sum() for mb in window),
                    sum(mb["attention_mask"].sum() for mb in window),
                ]
            ).to(acc.device)
            counts = acc.reduce(counts, "sum") if acc.num_processes > 1 else counts
            n_global, n_inputs = counts[0], int(counts[1])
            denom = n_global.float().clamp_min(1) / acc.num_processes
            loss_sum = torch.zeros((), device=acc.device)
            for i, mb in enumerate(window):
                last = i == len(window) - 1
                sync = contextlib.nullcontext() if (last or deepspeed) else sharding.gradient_sync_off(acc, model)
                with sync, acc.autocast():
                    outputs = model(**mb, num_items_in_batch=denom, loss_on_label_positions=tr.loss_on_label_positions)
                    loss = outputs.loss
                acc.backward(loss * ga if deepspeed else loss)
                loss_sum += loss.detach().float()
            grad_norm = None
            if tr.max_grad_norm and not deepspeed:
                grad_norm = acc.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], tr.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.global_step += 1
            state.batch_in_epoch += len(window)
            state.samples_seen += sum(int(mb["input_ids"].shape[0]) for mb in window) * acc.num_processes
            state.tokens_seen += int(n_global)
            if state.batch_in_epoch >= batches_per_epoch:
                state.epoch += 1
                state.batch_in_epoch = 0
                epoch_done = True
            loss_value = float(acc.reduce(loss_sum, "mean")) if acc.num_processes > 1 else float(loss_sum)
            last_loss = loss_value
            losses.append(loss_value)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}")
            if state.global_step % tr.logging_steps == 0 or state.global_step == 1 or state.global_step == total:
                row = {
                    "event": "log",
                    "step": state.global_step,
                    "epoch": state.epoch + state.batch_in_epoch / batches_per_epoch,
                    "loss": loss_value,
                    "lr": scheduler.get_last_lr()[0],
                    "supervised_tokens": int(n_global),
                    "input_tokens": n_inputs,
                    "step_seconds": round(time.perf_counter() - step_start, 4),
                }
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
                send(row)
                if trackers:
                    acc.log({k: v for k, v in row.items() if k not in ("event", "step")}, step=state.global_step)
            if tr.save_steps and state.global_step % tr.save_steps == 0:
                facts = card_facts(recipe, base_path, state.global_step, last_loss)
                path = _save_checkpoint(
                    acc, model, optimizer, scheduler, processor, state, out, recipe, deepspeed, facts
                )
                saved_at = state.global_step
                send({"event": "checkpoint", "step": state.global_step, "path": str(path)})
    if bar is not None:
        bar.close()

    # ---- final export ---------------------------------------------------------------------------
    facts = card_facts(recipe, base_path, state.global_step, last_loss if losses else None)
    if saved_at != state.global_step:
        path = _save_checkpoint(acc, model, optimizer, scheduler, processor, state, out, recipe, deepspeed, facts)
        send({"event": "checkpoint", "step": state.global_step, "path": str(path)})
    final = _export_final(acc, model, processor, out, facts)
    if trackers:
        acc.end_training()
    summary = {
        "event": "end",
        "steps": state.global_step,
        "epochs": state.epoch + state.batch_in_epoch / batches_per_epoch,
        "final_loss": last_loss,
        "first_loss": losses[0] if losses else None,
        "output": str(final),
        "seconds": round(time.perf_counter() - t_start, 2),
        "peak_rss_mib": _peak_rss_mib(),
        "peak_cuda_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
    }
    send(summary)
    acc.wait_for_everyone()
    return summary


def _peak_rss_mib() -> float | None:
    """Peak resident set size of this process so far, MiB (``getrusage``; None where unavailable)."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS, KiB on Linux
    except (ImportError, OSError):
        return None


def check_writable(out: Path) -> None:
    """Create ``out`` and write, sync and remove a small file in it; :class:`SR3DDiskError` when that fails.

    Run before the model loads, so that a read-only or full output folder costs nothing and leaves
    nothing behind (``recipe.yaml`` is written after this check).
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".sr3d-write-check.", dir=out)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as exc:
        raise describe_os_error(exc, out, "training.output_dir: writing into") from None


def _no_alias_loader() -> Any:
    """``yaml.SafeLoader`` without aliases (a recipe never needs them; they allow expansion bombs)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.events.AliasEvent):
                raise yaml.YAMLError("YAML aliases are not accepted in a checkpoint's recipe.yaml")
            return super().compose_node(parent, index)

    return Loader


def _recipe_changes(ckpt: Path, manifest: dict[str, Any], recipe: Any) -> list[str]:
    """Keys whose values differ between the checkpoint's recipe and this one (output folder excluded)."""
    import yaml

    from sr3d_plugin.training.checkpoint import read_checkpoint_bytes

    if "recipe.yaml" not in manifest["files"] or manifest["files"]["recipe.yaml"]["size"] > (1 << 20):
        return []
    try:
        text = read_checkpoint_bytes(ckpt, manifest, "recipe.yaml").decode("utf-8")
        before = yaml.load(text, Loader=_no_alias_loader()) or {}  # a SafeLoader subclass
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    if not isinstance(before, dict):
        return []
    old, new = _flat(before), _flat(recipe.to_dict())
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k != "training.output_dir")


def trained_weights_only(models: list[Any], weights: list[dict[str, Any]], output_dir: str) -> None:
    """accelerate ``save_state`` pre-hook: keep only trainable tensors in the saved model state.

    The trainer no longer calls ``save_state`` (its files are pickles, see
    :mod:`sr3d_plugin.training.checkpoint`); the hook stays for code that does. The frozen base (billions of weights) is reloaded from its own folder on resume; a checkpoint
    holds the adapters and the trained SR-3D modules (plus optimizer, scheduler, RNG and data position).
    """
    for mod, w in zip(models, weights):
        keep = _trainable_names(mod)
        for k in list(w):
            if k not in keep:
                del w[k]


def _save_trained(
    model: Any, folder: Path, state_dict: dict[str, Any], processor: Any, card: dict[str, Any] | None = None
) -> None:
    """peft adapter (LoRA + modules_to_save) or, without LoRA, the whole model; plus the processor and,
    with ``card`` (``{"facts", "name"}``), the model card README.md (replacing peft's template)."""
    model.save_pretrained(str(folder), state_dict=state_dict, safe_serialization=True)
    processor.save_pretrained(str(folder))
    if card is not None:
        from sr3d_plugin.training.model_card import write_card

        kind = "adapter" if hasattr(model, "peft_config") else "model"
        write_card(folder, card["facts"], kind, folder_name=card["name"])


def _any_failed(acc: Any, error: BaseException | None) -> bool:
    """Whether ``error`` is set on any process (a collective when there are several)."""
    if acc.num_processes == 1:
        return error is not None
    flag = torch.tensor([0.0 if error is None else 1.0], device=acc.device)
    return bool(acc.reduce(flag, "sum").item() > 0)


def _save_checkpoint(
    acc: Any,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    processor: Any,
    state: TrainState,
    out: Path,
    recipe: Any,
    deepspeed: bool,
    card_facts: dict[str, Any] | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` (no pickles; manifest last) via a temporary folder renamed when complete.

    Raises:
        SR3DDiskError: the disk refused a write (full, read-only, permission); the temporary folder
            is removed and earlier checkpoints are untouched.
    """
    from safetensors import SafetensorError

    name = f"checkpoint-{state.global_step}"
    layout = batch_layout(
        acc.num_processes, recipe.training.per_device_batch_size, recipe.training.gradient_accumulation_steps
    )
    final = out / name
    tmp = out / f".{name}.tmp"
    main = acc.is_main_process
    error: SR3DError | None = None

    def fail_if_any() -> None:
        if _any_failed(acc, error):
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise error or SR3DDiskError(f"writing checkpoint {final} failed on another process")

    if main:
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        except OSError as exc:
            error = describe_os_error(exc, final, "writing checkpoint")
    acc.wait_for_everyone()
    fail_if_any()
    from sr3d_plugin.training.sharding import full_model_state_dict

    state_dict = full_model_state_dict(acc, model)  # gathered (ZeRO-3, FSDP too) for the adapter export
    unwrapped = acc.unwrap_model(model)
    if deepspeed:  # DeepSpeed's optimizer state exists only as its pickles: weights without optimizer
        keep = _trainable_names(unwrapped)
        weights, optim = {k: v for k, v in state_dict.items() if k in keep}, None
    else:
        weights, optim = gather_training_state(acc, model, optimizer)
    sub = "adapter" if hasattr(unwrapped, "peft_config") else "model"
    try:
        save_training_state(acc, tmp, weights, optim, scheduler, {**state.state_dict(), "saved": sub, "layout": layout})
        if main:
            card = None if card_facts is None else {"facts": card_facts, "name": str(final / sub)}
            _save_trained(unwrapped, tmp / sub, state_dict, processor, card)
            atomic_write_text(tmp / "recipe.yaml", _recipe_yaml(recipe))
    except (OSError, SafetensorError) as exc:
        error = describe_os_error(exc, final, "writing checkpoint")
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    acc.wait_for_everyone()
    fail_if_any()
    if main:
        try:
            extra = {"step": state.global_step, "processes": acc.num_processes}
            write_manifest(tmp, {**extra, "engine": "deepspeed" if deepspeed else "torch"})  # last
            replace_folder(tmp, final)
        except OSError as exc:
            error = describe_os_error(exc, final, "writing checkpoint")
    fail_if_any()
    if main:
        _rotate(out, recipe.training.save_total_limit)
    acc.wait_for_everyone()
    return final


def _rotate(out: Path, limit: int | None) -> None:
    if not limit or limit <= 0:
        return
    found = sorted(
        (int(m.group(1)), d)
        for d in out.iterdir()
        if (m := _CKPT.match(d.name)) and (d / "trainer_state.json").is_file()
    )
    for _, d in found[:-limit]:
        shutil.rmtree(d, ignore_errors=True)


def _export_final(acc: Any, model: Any, processor: Any, out: Path, card_facts: dict[str, Any] | None = None) -> Path:
    from sr3d_plugin.training.sharding import full_model_state_dict

    state_dict = full_model_state_dict(acc, model)
    unwrapped = acc.unwrap_model(model)
    sub = "adapter" if hasattr(unwrapped, "peft_config") else "model"
    dest = out / sub
    if acc.is_main_process:
        from safetensors import SafetensorError

        try:
            with atomic_dir(dest) as tmp:
                card = None if card_facts is None else {"facts": card_facts, "name": str(dest)}
                _save_trained(unwrapped, tmp, state_dict, processor, card)
        except (OSError, SafetensorError) as exc:
            raise describe_os_error(exc, dest, "writing the trained weights to") from None
    acc.wait_for_everyone()
    return dest
