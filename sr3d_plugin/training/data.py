"""Training data: records or generated samples → processor outputs → padded batches.

* :func:`load_training_source` reads ``data.train_file`` (JSON/JSONL records, docs/data-format.md) or
  calls ``data.generator`` (``module:function``) which returns records, a JSONL path, or a map-style
  dataset of in-memory samples (objects with ``visual`` and ``messages()`` or ``question``/``answer``,
  e.g. :class:`sr3d_plugin.synthetic.qa.SpatialQADataset`).
* :class:`SR3DTrainDataset` turns item ``(epoch, index)`` into one processed sample: frames are
  sampled, regions parsed, augmentation applied with randomness from ``(seed, epoch, index)``, point
  maps computed (cached), the conversation rendered with the chat template and everything outside
  the assistant turns masked out of the labels (the processor's supervised spans).
* :class:`EpochSampler` yields ``(epoch, index)`` pairs in a permutation seeded by ``(seed, epoch)``.
* :class:`SR3DCollator` pads ``input_ids``/``labels``/``attention_mask`` on the right and concatenates
  ``pixel_values [T, 3, S, S]``, ``tile_xyz [T, g, g, 3]`` and the block-diagonal
  ``region_weights [R, T, g²]`` of the samples.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sr3d_plugin.errors import SR3DConfigError, SR3DInputError
from sr3d_plugin.modeling.inputs import VisualInput
from sr3d_plugin.training.augment import frames_to_keep, mask_to_box, relabel_regions, remap_region_frames, sample_rng

__all__ = ["EpochSampler", "SR3DCollator", "SR3DTrainDataset", "TrainingSource", "load_training_source"]


class TrainingSource:
    """Where samples come from: records with a base folder for their paths, or in-memory samples.

    ``report`` is the data check of the records file (:class:`~sr3d_plugin.data_check.DataReport`,
    None for in-memory data) and ``skipped`` the number of invalid records left out
    (``data.skip_invalid``).
    """

    def __init__(
        self,
        records: list[dict[str, Any]] | None = None,
        base: Path | None = None,
        samples: Any = None,
        report: Any = None,
        skipped: int = 0,
    ):
        if (records is None) == (samples is None):
            raise SR3DConfigError("a training source holds either records or samples")
        self.records = records
        self.base = base or Path.cwd()
        self.samples = samples
        self.report = report
        self.skipped = int(skipped)

    def __len__(self) -> int:
        return len(self.records) if self.records is not None else len(self.samples)


def checked_records(data: Any, path: Path) -> TrainingSource:
    """The records of ``path`` after the data check (:func:`sr3d_plugin.data_check.check_records`).

    Every bad record is reported at once, with file, line and id: as an
    :class:`~sr3d_plugin.errors.SR3DDataError`, or — with ``data.skip_invalid`` — by leaving it out
    (``source.skipped``, ``source.report``). No record left is an error either way.
    """
    from sr3d_plugin.data_check import check_records
    from sr3d_plugin.limits import MAX_RECORD_BYTES

    report = check_records(
        path, num_frames=data.num_frames, max_record_bytes=getattr(data, "max_record_bytes", MAX_RECORD_BYTES)
    )
    fatal = [p for p in report.problems if p.line == 0]  # the file itself is missing or unreadable
    if report.problems and (fatal or not getattr(data, "skip_invalid", False)):
        report.raise_if_invalid(
            hint="fix these records, or set data.skip_invalid=true to train on the others"
            if not fatal
            else "check data.train_file"
        )
    records = report.valid_records()
    if not records:
        raise SR3DConfigError(f"no valid record left in {path} ({report.summary()})")
    return TrainingSource(records=records, base=path.resolve().parent, report=report, skipped=report.num_invalid)


def load_training_source(data: Any, out_dir: Path | None = None) -> TrainingSource:
    """The recipe's data section as a :class:`TrainingSource`, checked before training starts.

    Record files (``data.train_file``, or a JSONL path from a generator) go through the data check
    (:func:`checked_records`); generated in-memory records through the structural check.
    """
    from sr3d_plugin.records import validate_record

    if data.train_file is not None:
        return checked_records(data, Path(data.train_file))
    module_name, _, attr = str(data.generator).partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SR3DConfigError(f"data.generator={data.generator!r} cannot be imported: {exc}") from exc
    kwargs = dict(data.generator_args)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        params = {}
    if "out_dir" in params and "out_dir" not in kwargs and out_dir is not None:
        kwargs["out_dir"] = str(out_dir)
    try:
        result = fn(**kwargs)
    except TypeError as exc:
        raise SR3DConfigError(f"data.generator {data.generator} rejected data.generator_args {kwargs}: {exc}") from exc
    if isinstance(result, (str, Path)):
        return checked_records(data, Path(result))
    if isinstance(result, list) and result and isinstance(result[0], dict):
        for i, rec in enumerate(result):
            validate_record(rec, f"generated record {i}")
        return TrainingSource(records=result, base=Path(out_dir) if out_dir is not None else Path.cwd())
    if hasattr(result, "__len__") and hasattr(result, "__getitem__") and len(result) > 0:
        return TrainingSource(samples=result)
    raise SR3DConfigError(
        f"data.generator {data.generator} returned {type(result).__name__}; expected records, a JSONL path or a dataset"
    )


class EpochSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, index)`` for every sample, shuffled by a permutation seeded with ``(seed, epoch)``.

    The epoch travels with each index, so augmentation is reproducible in worker processes and after a
    resume. Call :meth:`set_epoch` before iterating an epoch.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True) -> None:
        self.size, self.seed, self.shuffle, self.epoch = int(size), int(seed), bool(shuffle), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        return np.random.default_rng([self.seed & 0xFFFFFFFF, int(epoch), 0xE90C]).permutation(self.size).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return iter([(epoch, i) for i in self.order(epoch)])

    def __len__(self) -> int:
        return self.size


def _cache_arg(value: str | None) -> Any:
    if value is None:
        return False
    return True if value == "default" else value


class SR3DTrainDataset(torch.utils.data.Dataset):
    """One processed training sample per ``(epoch, index)`` (or plain ``index``, epoch 0).

    Args:
        source: the :class:`TrainingSource`.
        processor: the model's :class:`~sr3d_plugin.modeling.SR3DProcessor`.
        config: the model's config (frame count, canonical mode, whether positions are needed).
        data: the recipe's data section (frames, system prompt, depth source, cache, augmentation).
        seed: the run's seed (augmentation randomness).

    Returns from ``__getitem__``: ``input_ids [L]``, ``labels [L]`` (−100 outside assistant turns),
    ``num_tiles`` (int) and, with visual input, ``pixel_values [T, 3, S, S]``, ``tile_xyz [T, g, g, 3]``,
    ``region_weights [R, T, g²]`` (with regions).
    """

    def __init__(self, source: TrainingSource, processor: Any, config: Any, data: Any, seed: int = 0) -> None:
        from sr3d_plugin.records import RecordReader

        self.source = source
        self.processor = processor
        self.config = config
        self.data = data
        self.seed = int(seed)
        self.reader = RecordReader(
            config,
            num_frames=data.num_frames,
            depth_source=data.depth_source,
            cache=_cache_arg(data.pointmap_cache),
        )

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = (0, int(key)) if isinstance(key, (int, np.integer)) else (int(key[0]), int(key[1]))
        rng = sample_rng(self.seed, epoch, index)
        if self.source.records is not None:
            rec = self.source.records[index]
            try:
                messages, visual = self._from_record(rec, rng)
                return self.encode(messages, visual)  # the <mask>-count check of the processor names the record too
            except SR3DInputError as exc:
                raise SR3DInputError(f"training record {index} (id {rec.get('id', '?')!r}): {exc}") from exc
        messages, visual = self._from_sample(self.source.samples[index], rng)
        return self.encode(messages, visual)

    # ------------------------------------------------------------------------------------------

    def _from_record(
        self, rec: dict[str, Any], rng: np.random.Generator
    ) -> tuple[list[dict[str, str]], VisualInput | None]:
        from sr3d_plugin.records import VISUAL_KEYS, record_messages, subset_frames

        aug = self.data.augment
        base = self.source.base
        if not any(rec.get(k) is not None for k in VISUAL_KEYS):
            return record_messages(rec, 0, self.data.system_prompt), None
        frames = self.reader.frames(rec, base)
        regions = self.reader.regions(rec, frames, base)
        regions = [mask_to_box(r) if rng.random() < aug.mask_to_box_prob else r for r in regions]
        cache = None
        multi_view = rec.get("image") is None
        if multi_view and len(frames) > 1 and rng.random() < aug.frame_drop_prob:
            protected = {k for r in regions for k in r.masks}
            keep = frames_to_keep(len(frames), protected, rng, aug.frame_drop_max_fraction)
            if keep is not None:
                frames = subset_frames(frames, keep)
                regions = remap_region_frames(regions, keep)
                cache = False  # random subsets would fill the point-map cache
        canonical, valid = self.reader.positions(rec, frames, base, cache=cache)
        messages = record_messages(rec, len(frames), self.data.system_prompt)
        if len(regions) > 1 and rng.random() < aug.region_shuffle_prob:
            messages, regions = relabel_regions(messages, regions, rng.permutation(len(regions)).tolist())
        visual = VisualInput(list(frames.images), points=canonical, valid=valid, regions=regions, multi_view=multi_view)
        return messages, visual

    def _from_sample(self, sample: Any, rng: np.random.Generator) -> tuple[list[dict[str, str]], VisualInput | None]:
        """In-memory samples (already canonical point maps): the same augmentation, no re-canonicalisation."""
        aug = self.data.augment
        if hasattr(sample, "messages"):
            messages = [dict(m) for m in sample.messages()]
        else:
            messages = [{"role": "user", "content": sample.question}, {"role": "assistant", "content": sample.answer}]
        visual: VisualInput | None = sample.visual
        if self.data.system_prompt is not None and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self.data.system_prompt})
        if visual is None:
            return messages, None
        n = visual.num_images
        for m in messages:
            m["content"] = m["content"].replace("<image>\n", "").replace("<image>", "")
        regions = [mask_to_box(r) if rng.random() < aug.mask_to_box_prob else r for r in visual.regions]
        images, points, valid = list(visual.images), visual.points, visual.valid
        if visual.multi_view and n > 1 and rng.random() < aug.frame_drop_prob:
            keep = frames_to_keep(n, {k for r in regions for k in r.masks}, rng, aug.frame_drop_max_fraction)
            if keep is not None:
                images = [images[i] for i in keep]
                points = None if points is None else points[keep]
                valid = None if valid is None else valid[keep]
                regions = remap_region_frames(regions, keep)
        if len(regions) > 1 and rng.random() < aug.region_shuffle_prob:
            messages, regions = relabel_regions(messages, regions, rng.permutation(len(regions)).tolist())
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[first_user]["content"] = "<image>" * len(images) + messages[first_user]["content"]
        visual = VisualInput(images, points=points, valid=valid, regions=regions, multi_view=visual.multi_view)
        return messages, visual

    def encode(self, messages: list[dict[str, str]], visual: VisualInput | None) -> dict[str, Any]:
        """Render, tokenise and tile one sample; labels only on assistant turns."""
        text, spans = self.processor.assistant_spans(messages)
        batch = self.processor(text, visual, supervised_spans=[spans], padding_side="right")
        out: dict[str, Any] = {
            "input_ids": batch["input_ids"][0],
            "labels": batch["labels"][0],
            "num_tiles": int(batch["num_tiles"][0]),
        }
        for key in ("pixel_values", "tile_xyz", "region_weights"):
            if key in batch:
                out[key] = batch[key]
        if not bool((out["labels"] != -100).any()):
            raise SR3DInputError("a sample has no supervised token (empty assistant turns?)")
        return out


class SR3DCollator:
    """Pads and concatenates processed samples into one model batch.

    Args:
        pad_token_id: id used for padding ``input_ids`` (labels pad with −100, attention with 0).

    Returns from ``__call__``: ``input_ids [B, L]``, ``attention_mask [B, L]``, ``labels [B, L]``,
    ``num_tiles [B]`` and, when any sample has images, ``pixel_values [T, 3, S, S]``,
    ``tile_xyz [T, g, g, 3]`` and ``region_weights [R, T, g²]`` (zero outside each region's own
    sample's tiles) — the layout :class:`~sr3d_plugin.modeling.SR3DProcessor` produces for a batch.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not samples:
            raise SR3DInputError("cannot collate an empty batch")
        width = max(int(s["input_ids"].shape[0]) for s in samples)
        b = len(samples)
        ids = torch.full((b, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, width), -100, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for i, s in enumerate(samples):
            n = int(s["input_ids"].shape[0])
            ids[i, :n] = s["input_ids"]
            labels[i, :n] = s["labels"]
            mask[i, :n] = 1
        out: dict[str, torch.Tensor] = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "num_tiles": torch.tensor([int(s["num_tiles"]) for s in samples], dtype=torch.long),
        }
        with_pixels = [s for s in samples if "pixel_values" in s]
        if with_pixels:
            out["pixel_values"] = torch.cat([s["pixel_values"] for s in with_pixels])
            with_xyz = [s for s in with_pixels if "tile_xyz" in s]
            if with_xyz:
                if len(with_xyz) != len(with_pixels):
                    raise SR3DInputError("either every sample with images has 3D positions or none has")
                out["tile_xyz"] = torch.cat([s["tile_xyz"] for s in with_xyz])
            total_t = int(out["pixel_values"].shape[0])
            blocks, offset = [], 0
            for s in with_pixels:
                t = int(s["pixel_values"].shape[0])
                if "region_weights" in s:
                    rw = s["region_weights"]
                    full = torch.zeros(rw.shape[0], total_t, rw.shape[2], dtype=rw.dtype)
                    full[:, offset : offset + t] = rw
                    blocks.append(full)
                offset += t
            if blocks:
                out["region_weights"] = torch.cat(blocks)
        return out
