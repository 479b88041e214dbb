"""Scene-level reuse: what the questions on one scene share is computed once per run.

Evaluation sets ask many questions about each scene (ScanQA val: ~66 per scene). For every question
on the same frames, these are the same and are kept in a :class:`SceneCache`:

* **scene inputs** (``SR3DPipeline.ask``): the sampled frames, their canonical point maps and the
  geometry report, keyed by the input paths, ``num_frames``, the depth settings and the canonical
  mode (:meth:`SceneCache.input_key`); regions are resolved per question on the cached frames;
* **visual features**: :meth:`SR3DForConditionalGeneration.encode_visual
  <sr3d_plugin.modeling.SR3DForConditionalGeneration.encode_visual>` (vision tower + 3D PE +
  projector), keyed by a content fingerprint of the frames and point maps
  (:func:`visual_fingerprint`), the model (object identity) and its dtype and device;
* **the KV cache of the shared prompt prefix**: everything before the question text — the system
  message, ``<|im_start|>user\\n`` and every frame's placeholder tokens with their end-of-tile ids
  (the layout SR-REAL's ``generate_content`` and our processor produce; the conformance data under
  ``conformance/data/sr3d_*`` show ``…user\\n<image>…<image>Is <mask> …``). The prefix ends right after
  the last image block, so region ``<mask>`` tokens, which differ per question, are never in it.
  It is computed once per (visual features, prefix ids) as a transformers
  :class:`~transformers.DynamicCache`, copied for each batch (``copy.deepcopy`` +
  ``batch_repeat_interleave``), and the LLM's ``generate`` prefills only each question's own tokens.
  Questions of one batch that share a prefix are generated together: the prefix first, then each
  question's tokens, padded *between* prefix and question (masked; position ids follow the attention
  mask, so every token keeps the position it has in the uncached, left-padded batch).

Sampling (``do_sample``) draws from the same distributions; a single question with a seed draws the
same tokens, but a batch that splits into several groups (other scenes, beams) consumes the random
stream in another order than the uncached batch, so sampled answers of such batches can differ.

Region embeddings still depend on each question's masks: they are pooled from the cached features
with the question's own ``region_weights``.

Teacher-forced scoring (``SR3DPipeline.ask(..., score_answer=...)``) runs on the cached visual features
too (:meth:`ReuseGenerator.scoring_batch`), so a scene's vision tower runs once for its questions and
their scores alike.

Memory is bounded: one LRU over all three kinds of entry with a byte budget (``max_bytes``; entries
live where the model computed them, so on a GPU the budget is GPU memory). An entry larger than the
whole budget is used for the call that made it and not kept.

Answers equal the uncached path: the same embeddings enter the same LLM; only the order of floating
point operations differs (prefill split into prefix + question, other batch shapes), as it does
between batch sizes. Greedy tokens were identical in every test (float32); in bfloat16 a near-tie
between two tokens can flip, exactly as it can when the batch size changes.

The fingerprint of a frame or point map is memoised per object (checked with a weak reference):
frames and point maps must not be modified in place while a cache is in use; call
:meth:`SceneCache.clear` after changing them or the model's weights (e.g. loading other adapters).
"""

from __future__ import annotations

import copy
import hashlib
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sr3d_plugin.errors import SR3DConfigError

__all__ = ["DEFAULT_SCENE_CACHE_MIB", "ReuseStats", "SceneCache", "prefix_length", "visual_fingerprint"]

#: default byte budget of a pipeline's scene cache, in MiB
DEFAULT_SCENE_CACHE_MIB = 4096.0


# ----------------------------------------------------------------------------------------------
# content fingerprints
# ----------------------------------------------------------------------------------------------

_DIGESTS: dict[int, tuple[Any, str]] = {}


def _memo_digest(obj: Any, compute: Any) -> str:
    """``compute(obj)``, memoised per live object (weak reference; recomputed for a new object at the same id)."""
    hit = _DIGESTS.get(id(obj))
    if hit is not None and hit[0]() is obj:
        return hit[1]
    digest = compute(obj)
    key = id(obj)
    try:
        ref = weakref.ref(obj, lambda _r, k=key: _DIGESTS.pop(k, None))
    except TypeError:  # pragma: no cover - objects without weak references are not memoised
        return digest
    _DIGESTS[key] = (ref, digest)
    return digest


def _image_digest(image: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def _tensor_digest(t: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    a = t.detach().to("cpu").contiguous()
    h.update(f"{a.dtype}:{tuple(a.shape)}".encode())
    h.update(a.reshape(-1).view(torch.uint8).numpy().tobytes() if a.numel() else b"")
    return h.hexdigest()


def visual_fingerprint(visual: Any) -> str:
    """Content digest of a :class:`~sr3d_plugin.modeling.VisualInput`'s frames, point maps, validity and
    view mode (not its regions): two inputs with the same fingerprint give the same visual features.

    Each image's and tensor's digest is memoised on the object (see the module docstring).
    """
    h = hashlib.blake2b(digest_size=20)
    h.update(f"multi_view={bool(visual.multi_view)};n={len(visual.images)};".encode())
    for image in visual.images:
        h.update(_memo_digest(image, _image_digest).encode())
    for name in ("points", "valid"):
        t = getattr(visual, name)
        h.update(f"{name}=".encode())
        h.update(b"-" if t is None else _memo_digest(t, _tensor_digest).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# the cache
# ----------------------------------------------------------------------------------------------


def _nbytes(value: Any) -> int:
    """Bytes of the tensors held by a cache entry (tensors, SR3DVisualFeatures, transformers caches, containers)."""
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if hasattr(value, "nbytes") and isinstance(value.nbytes, int):
        return int(value.nbytes)
    layers = getattr(value, "layers", None)
    if layers is not None:  # transformers Cache
        return sum(_nbytes(getattr(layer, name, None)) for layer in layers for name in ("keys", "values"))
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    images = getattr(value, "images", None)
    if isinstance(images, list):  # a FrameSet / VisualInput: its images and arrays
        total = sum(im.size[0] * im.size[1] * len(im.getbands()) for im in images)
        arrays = ("depth", "points", "valid", "intrinsics", "cam_to_world")
        return total + sum(_nbytes(getattr(value, n, None)) for n in arrays)
    return 0


@dataclass
class ReuseStats:
    """Counts of a :class:`SceneCache` since it was made (or cleared)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    skipped: int = 0  #: entries larger than the whole budget (used once, not kept)

    def as_dict(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions, "skipped": self.skipped}


class SceneCache:
    """LRU cache of scene inputs, visual features and prompt-prefix KV caches under one byte budget.

    Args:
        max_bytes: budget of all entries together (bytes of their tensors and images); ``> 0``.
        max_entries: optional cap on the number of entries.
        prefix_kv: also keep the KV cache of the shared prompt prefix (greedy / sampled generation
            with ``num_beams=1``); False: only inputs and visual features are reused.
    """

    def __init__(self, max_bytes: int, max_entries: int | None = None, prefix_kv: bool = True) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes <= 0:
            raise SR3DConfigError(f"scene cache max_bytes={max_bytes!r}; expected a positive number of bytes")
        if max_entries is not None and (isinstance(max_entries, bool) or int(max_entries) <= 0):
            raise SR3DConfigError(f"scene cache max_entries={max_entries!r}; expected a positive integer or None")
        self.max_bytes = int(max_bytes)
        self.max_entries = None if max_entries is None else int(max_entries)
        self.prefix_kv = bool(prefix_kv)
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.nbytes = 0
        self.stats = ReuseStats()

    @classmethod
    def from_mib(cls, mib: float, **kwargs: Any) -> SceneCache | None:
        """A cache with a budget of ``mib`` MiB, or None for ``mib == 0`` (reuse off)."""
        try:
            value = float(mib)
        except (TypeError, ValueError):
            raise SR3DConfigError(f"scene_cache={mib!r}; expected a budget in MiB (0 turns reuse off)") from None
        if not np.isfinite(value) or value < 0:
            raise SR3DConfigError(f"scene_cache={mib!r}; expected a budget in MiB >= 0 (0 turns reuse off)")
        return None if value == 0 else cls(max(1, int(value * 2**20)), **kwargs)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable) -> Any:
        """The entry under ``key`` (now the most recently used), or None."""
        hit = self._entries.get(key)
        if hit is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return hit[0]

    def put(self, key: Hashable, value: Any, nbytes: int | None = None) -> None:
        """Keep ``value`` under ``key``, evicting the least recently used entries beyond the budget."""
        size = _nbytes(value) if nbytes is None else int(nbytes)
        if key in self._entries:
            self.nbytes -= self._entries.pop(key)[1]
        if size > self.max_bytes:
            self.stats.skipped += 1
            return
        self._entries[key] = (value, size)
        self.nbytes += size
        while self._entries and (
            self.nbytes > self.max_bytes or (self.max_entries is not None and len(self._entries) > self.max_entries)
        ):
            _, (_, old) = self._entries.popitem(last=False)
            self.nbytes -= old
            self.stats.evictions += 1

    def clear(self) -> None:
        """Drop every entry (after changing the model's weights, or frames in place)."""
        self._entries.clear()
        self.nbytes = 0
        self.stats = ReuseStats()

    def kinds(self) -> dict[str, int]:
        """Number of entries per kind (``"input"``, ``"visual"``, ``"prefix"``)."""
        out: dict[str, int] = {}
        for key in self._entries:
            kind = key[0] if isinstance(key, tuple) and key else "other"
            out[str(kind)] = out.get(str(kind), 0) + 1
        return out

    # ------------------------------------------------------------------------------------------
    # keys
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def model_key(model: Any) -> tuple:
        """Identity of a model for the cache: the object, its parameters' dtype and device."""
        try:
            p = next(model.parameters())
            return (id(model), str(p.dtype), str(p.device))
        except StopIteration:  # pragma: no cover
            return (id(model), "", "")

    @staticmethod
    def input_key(**settings: Any) -> tuple | None:
        """Key of a scene input (paths and settings), or None when an input is not a path or a plain value
        (arrays and images in memory are not cached as inputs; their visual features still are)."""
        import os

        items = []
        for name in sorted(settings):
            value = settings[name]
            if isinstance(value, (list, tuple)):
                if not all(isinstance(v, (str, os.PathLike)) for v in value):
                    return None
                value = tuple(os.path.abspath(os.fspath(v)) for v in value)
            elif isinstance(value, os.PathLike) or (isinstance(value, str) and name in _PATH_SETTINGS):
                value = os.path.abspath(os.fspath(value))
            elif not (value is None or isinstance(value, (str, int, float, bool))):
                return None
            items.append((name, value))
        return ("input", tuple(items))


#: ``input_key`` settings whose strings are file or folder paths
_PATH_SETTINGS = frozenset({"image", "scene", "video", "points", "depth", "intrinsics", "poses", "frames"})


# ----------------------------------------------------------------------------------------------
# generation with reuse
# ----------------------------------------------------------------------------------------------


def prefix_length(ids: Sequence[int], image_id: int, end_ids: Sequence[int], mask_id: int | None) -> int:
    """Length of the question-independent prefix of one prompt's real (unpadded) token ids.

    The prefix ends after the last image placeholder id and the end-of-tile ids that follow it, and
    before any ``<mask>`` id; 0 when the prompt has no image or nothing would be left after the prefix.
    """
    ids = list(ids)
    last = max((i for i, t in enumerate(ids) if t == image_id), default=-1)
    if last < 0:
        return 0
    n = last + 1
    if end_ids and ids[n : n + len(end_ids)] == list(end_ids):
        n += len(end_ids)
    if mask_id is not None and mask_id in ids[:n]:
        n = ids.index(mask_id)
    return n if 0 < n < len(ids) else 0


def _cache_argument(llm: Any) -> str:
    """The name ``generate`` takes a cache under: ``cache`` (transformers ≥ 5.2x) or ``past_key_values``."""
    import inspect

    params = inspect.signature(type(llm).prepare_inputs_for_generation).parameters
    return "cache" if "cache" in params else "past_key_values"


def _region_free(visual: Any) -> Any:
    from sr3d_plugin.modeling.inputs import VisualInput

    if not visual.regions:
        return visual
    return VisualInput(
        list(visual.images), points=visual.points, valid=visual.valid, regions=[], multi_view=visual.multi_view
    )


class ReuseGenerator:
    """Generation of a batch with a :class:`SceneCache` (used by :meth:`SR3DPipeline.generate
    <sr3d_plugin.inference.SR3DPipeline.generate>`; see the module docstring)."""

    def __init__(self, model: Any, processor: Any, cache: SceneCache, device: torch.device) -> None:
        self.model = model
        self.processor = processor
        self.cache = cache
        self.device = device

    @staticmethod
    def supports(model: Any, visuals: Sequence[Any]) -> bool:
        """Whether a batch can take the reuse path (an SR-3D model; every prompt with a visual input)."""
        return (
            hasattr(model, "encode_visual")
            and hasattr(model, "llm")
            and bool(visuals)
            and all(v is not None for v in visuals)
        )

    def visual_features(self, visual: Any) -> Any:
        """:class:`~sr3d_plugin.modeling.SR3DVisualFeatures` of one visual input (cached)."""
        key = ("visual", self.cache.model_key(self.model), visual_fingerprint(visual))
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        bare = _region_free(visual)
        token = getattr(self.processor, "image_token", "<image>")
        batch = self.processor([token * bare.num_images], [bare], padding_side="left")
        tensors = {k: batch[k].to(self.device) for k in ("pixel_values", "tile_xyz", "image_sizes") if k in batch}
        feats = self.model.encode_visual(tensors["pixel_values"], tensors.get("tile_xyz"), tensors.get("image_sizes"))
        self.cache.put(key, feats)
        return feats

    def scoring_batch(self, prompts: Sequence[str], visuals: Sequence[Any]) -> dict[str, Any]:
        """The processor batch of ``prompts`` (left padding) on the device with the cached visual features
        (``visual_features``) in place of pixel tensors: a ``forward`` input for teacher-forced scoring
        (:func:`sr3d_plugin.decoding.score_continuations`) that runs no vision tower for a cached scene."""
        from sr3d_plugin.modeling.modeling_sr3d import SR3DVisualFeatures

        batch = self.processor(list(prompts), list(visuals), padding_side="left", return_visual_tensors=False)
        out = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        out["visual_features"] = SR3DVisualFeatures.cat([self.visual_features(v) for v in visuals])
        return out

    def _prefix_cache(self, vkey: str, prefix_ids: tuple[int, ...], prefix_embeds: torch.Tensor) -> Any:
        key = ("prefix", self.cache.model_key(self.model), vkey, hashlib.blake2b(str(prefix_ids).encode()).hexdigest())
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        mask = torch.ones(1, prefix_embeds.shape[0], dtype=torch.long, device=prefix_embeds.device)
        llm = self.model.llm
        decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else llm  # no logits: only the KV is kept
        out = decoder(inputs_embeds=prefix_embeds[None], attention_mask=mask, use_cache=True, return_dict=True)
        kv = out.get("cache")
        if kv is None:
            kv = out.get("past_key_values")
        if kv is not None:
            self.cache.put(key, kv)
        return kv

    def generate(self, prompts: Sequence[str], visuals: Sequence[Any], gen: dict[str, Any]) -> dict[str, Any]:
        """Generate for a batch, reusing what the cache holds.

        Returns ``{"input_ids" [B, L], "attention_mask" [B, L], "num_tiles" [B], "sequences" [B, L + new],
        "encode_s"}`` — the processor's left-padded ids; as ``SR3DForConditionalGeneration.generate``
        returns, those ids followed by the new tokens (shorter rows padded with ``pad_token_id``); the
        seconds the processor took.
        """
        import time

        proc, model = self.processor, self.model
        t0 = time.perf_counter()
        batch = proc(list(prompts), list(visuals), padding_side="left", return_visual_tensors=False)
        encode_s = time.perf_counter() - t0
        ids = batch["input_ids"].to(self.device)
        attn = batch["attention_mask"].to(self.device)
        vkeys = [visual_fingerprint(v) for v in visuals]
        parts = [self.visual_features(v) for v in visuals]
        from sr3d_plugin.modeling.modeling_sr3d import SR3DVisualFeatures

        rw = batch.get("region_weights")
        embeds, _, _ = model.build_inputs_embeds(
            ids,
            region_weights=None if rw is None else rw.to(self.device),
            visual_features=SR3DVisualFeatures.cat(parts),
        )
        beams = int(gen.get("num_beams") or 1)
        image_id = int(model.config.image_token_id)
        mask_id = None if model.config.mask_token_id is None else int(model.config.mask_token_id)
        end_ids = list(proc._end_ids()) if hasattr(proc, "_end_ids") else []
        pad = gen.get("pad_token_id")
        pad = int(pad) if pad is not None else int(getattr(proc.tokenizer, "pad_token_id", None) or 0)

        rows: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (row, real ids, real embeds)
        for r in range(ids.shape[0]):
            keep = attn[r].bool()
            rows.append((r, ids[r][keep], embeds[r][keep]))
        groups: dict[tuple, list[int]] = {}
        for r, real_ids, _ in rows:
            n = (
                prefix_length(real_ids.tolist(), image_id, end_ids, mask_id)
                if self.cache.prefix_kv and beams == 1
                else 0
            )
            groups.setdefault((vkeys[r], n, tuple(real_ids[:n].tolist())), []).append(r)

        new_rows: dict[int, torch.Tensor] = {}
        for (vkey, n, prefix_ids), members in groups.items():
            kv = self._prefix_cache(vkey, prefix_ids, rows[members[0]][2][:n]) if n else None
            if kv is None:  # no shared prefix (or an LLM without a cache): visual features still reused
                sub_attn = attn[members]
                width = int(sub_attn.sum(dim=1).max())
                out = model.generate(
                    input_ids=ids[members][:, -width:],
                    inputs_embeds=embeds[members][:, -width:],
                    attention_mask=sub_attn[:, -width:],
                    **gen,
                )
                prompt_width = width
            else:
                s_max = max(rows[r][1].shape[0] - n for r in members)
                full = embeds.new_zeros(len(members), n + s_max, embeds.shape[-1])
                full_ids = torch.full((len(members), n + s_max), pad, dtype=torch.long, device=self.device)
                mask = torch.zeros(len(members), n + s_max, dtype=torch.long, device=self.device)
                full[:, :n] = rows[members[0]][2][:n]
                full_ids[:, :n] = rows[members[0]][1][:n]
                mask[:, :n] = 1
                for j, r in enumerate(members):  # each question's own tokens, right-aligned after the gap
                    start = n + s_max - (rows[r][1].shape[0] - n)
                    full[j, start:] = rows[r][2][n:]
                    full_ids[j, start:] = rows[r][1][n:]
                    mask[j, start:] = 1
                cache = copy.deepcopy(kv)
                if len(members) > 1:
                    cache.batch_repeat_interleave(len(members))
                out = model.generate(
                    input_ids=full_ids,
                    inputs_embeds=full,
                    attention_mask=mask,
                    **{_cache_argument(model.llm): cache},
                    **gen,
                )
                prompt_width = n + s_max
            for j, r in enumerate(members):
                new_rows[r] = out[j, prompt_width:]
        width = max(t.shape[0] for t in new_rows.values())
        new = torch.full((ids.shape[0], width), pad, dtype=torch.long, device=self.device)
        for r, t in new_rows.items():
            new[r, : t.shape[0]] = t
        return {
            "input_ids": ids,
            "attention_mask": attn,
            "num_tiles": batch["num_tiles"],
            "sequences": torch.cat([ids, new], dim=1),
            "encode_s": encode_s,
        }
