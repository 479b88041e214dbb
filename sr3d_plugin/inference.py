"""Inference API: ask an SR-3D model a question about an image, frames, a video or a scanned scene.

.. code-block:: python

    from sr3d_plugin.inference import SR3DPipeline

    pipe = SR3DPipeline.from_pretrained("checkpoints/sr3d-8b", depth_model="depth-anything/Depth-Anything-V2-Small-hf")
    out = pipe.ask("Is <region0> left of <region1>?", scene="scans/scene0000_00",
                   regions=["frame=3 box=10,20,110,140", "box3d=1.2,0.4,0.5,0.6,0.6,1.0"])
    print(out["answer"])

What happens in :meth:`SR3DPipeline.ask` (SR3D-FACTS §2, §3, §6):

1. **Frames, 3D positions, regions** — :func:`sr3d_plugin.visual_inputs.visual_input`, the path that
   training records and the lmms-eval model share: one ``image`` (tiled dynamically), ``frames``, a
   ``video`` or a ``scene`` sampled uniformly to ``num_frames`` (``config.num_video_frames``; one tile
   per frame); positions (models with ``use_position_encoding``) from ``points`` → ``depth_model`` →
   the given depth (metric with intrinsics, relative without), canonicalised in ``config.canonical_mode``
   for metric depth; regions (:mod:`sr3d_plugin.regions`) referred to by ``<mask>`` or ``<regionK>``.
2. **Generation** (:meth:`SR3DPipeline.generate`, batched, left padding) with the model's ``generate``
   (greedy unless ``do_sample``), seeded with ``seed``.
3. **Scoring** (``score_answer``, :meth:`SR3DPipeline.score`): ``answer_logprob`` = Σᵢ log p(aᵢ | prompt, a₍<ᵢ₎), the *summed*
   log-probability (natural log) of the answer's tokens under teacher forcing, i.e.
   log p(answer | prompt). The answer is tokenised on its own (no special tokens) and appended
   right after the generation prompt (``…<|im_start|>assistant\\n``); the end-of-turn token is not
   included.

**Many questions** (:meth:`SR3DPipeline.ask_iter`, :meth:`~SR3DPipeline.ask_many`, or :meth:`~SR3DPipeline.ask`
with a list): items with their own scene / image / frames / video, geometry, regions, ``score_answer`` …,
checked before anything runs (a bad item's error names its index and field), answered in batches of
``batch_size`` in input order. With the scene cache a scene is read, encoded and prefilled once for
all its questions; greedy answers equal single calls.

**Streaming** (:meth:`SR3DPipeline.ask_stream`, or ``ask(..., streamer=...)`` with any transformers
streamer): the answer's text pieces as they are generated (a ``TextIteratorStreamer`` fed by a
generation thread), then the full result.
"""

from __future__ import annotations

import inspect
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sr3d_plugin import _checks
from sr3d_plugin._checks import describe
from sr3d_plugin.decoding import ContinuationScore, cut_at_stops, eos_token_ids, score_continuations
from sr3d_plugin.devices import resolve_device
from sr3d_plugin.errors import SR3DConfigError, SR3DError, SR3DInputError
from sr3d_plugin.modeling.inputs import Region, VisualInput
from sr3d_plugin.regions import RegionSpec, check_question, count_region_references
from sr3d_plugin.scene_cache import DEFAULT_SCENE_CACHE_MIB, ReuseGenerator, SceneCache

__all__ = [
    "ASK_ITEM_FIELDS",
    "AnswerStream",
    "ContinuationScore",
    "SR3DPipeline",
    "check_item_fields",
    "count_region_references",
    "cut_at_stops",
]

PathLike = str | os.PathLike


class SR3DPipeline:
    """An SR-3D model with its processor, ready to answer questions (see the module docstring).

    Args:
        model: an :class:`~sr3d_plugin.modeling.SR3DForConditionalGeneration` (or compatible).
        processor: its :class:`~sr3d_plugin.modeling.SR3DProcessor`.
        depth_model: default Depth Anything V2 id or folder for inputs without geometry (None: only
            when asked; ``"auto"``: the model config's ``depth_model``).
        device: device of the depth estimator (default: the model's device).
        load_seconds: time it took to load the model (reported in ``timings["load"]``).
        model_path: where the model came from (reported).
        reuse: scene-level reuse (:mod:`sr3d_plugin.scene_cache`): the frames, geometry, visual features
            and prompt-prefix KV cache of a scene are computed once and reused by every later question
            on it, with identical answers; False: every question is computed from scratch.
        scene_cache_mib: byte budget of that cache in MiB (LRU; on the model's device).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        depth_model: str | PathLike | None = None,
        device: str | torch.device | None = None,
        load_seconds: float = 0.0,
        model_path: str | None = None,
        reuse: bool = True,
        scene_cache_mib: float = DEFAULT_SCENE_CACHE_MIB,
    ) -> None:
        self.model = model
        self.processor = processor
        self.config = model.config
        self.depth_model = None if depth_model is None else str(depth_model)
        self.device = resolve_device(device) if device is not None else self.model_device()
        self.load_seconds = float(load_seconds)
        self.model_path = model_path
        if not isinstance(reuse, bool):
            raise SR3DConfigError(f"reuse={reuse!r}; expected True or False")
        #: the scene cache (None with ``reuse=False``)
        self.scene_cache: SceneCache | None = SceneCache.from_mib(scene_cache_mib) if reuse else None

    def clear_cache(self) -> None:
        """Forget every cached scene (call it after changing the model's weights or frames in place)."""
        if self.scene_cache is not None:
            self.scene_cache.clear()

    @classmethod
    def from_pretrained(
        cls,
        path: PathLike,
        builder: str | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        load_in_4bit: bool = False,
        depth_model: str | PathLike | None = None,
        reuse: bool = True,
        scene_cache_mib: float = DEFAULT_SCENE_CACHE_MIB,
        base: PathLike | None = None,
        **load_kwargs: Any,
    ) -> SR3DPipeline:
        """Load a model folder with :func:`sr3d_plugin.builders.load_model` and wrap it.

        A peft adapter folder (``adapter_config.json``; also a run or checkpoint folder holding one in
        ``adapter/``) loads like peft's ``AutoPeftModel``: its base model (``base_model_name_or_path``,
        or ``base``) through the builders, the LoRA applied with peft without merging, the trained
        SR-3D modules and the processor saved with the adapter (:func:`sr3d_plugin.training.merge.load_adapter`).

        Args:
            path: model folder (ours, VILA/NVILA/SR-3D layout, or anything a registered builder reads),
                an adapter folder, or ``"tiny"`` for the tiny random model bundled with the package.
            builder: builder name (default: detected from the folder; of the base for an adapter).
            dtype: ``"bfloat16"``, ``"float16"``, ``"float32"``, ``"auto"`` or a torch dtype (default: the checkpoint's).
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"`` (default: CUDA when available).
            load_in_4bit: quantise the language model to 4 bits (bitsandbytes; placed by the builder).
            depth_model: default depth estimator for inputs without geometry (see the class).
            reuse, scene_cache_mib: scene-level reuse and its budget (see the class).
            base: base model folder of an adapter ``path`` (default: the one recorded in the adapter).
            **load_kwargs: passed on to the builder (e.g. ``device_map="auto"`` to spread a large model
                over several GPUs, ``load_in_8bit``, ``attn_implementation``); with a ``device_map`` or
                quantisation the model is not moved to ``device`` afterwards.
        """
        t0 = time.perf_counter()
        dev = resolve_device(device)
        kwargs: dict[str, Any] = dict(load_kwargs)
        if dtype is not None:
            kwargs["dtype"] = dtype
        quantized = bool(load_in_4bit or kwargs.get("load_in_8bit") or kwargs.get("quantization_config") is not None)
        if load_in_4bit:
            kwargs["load_in_4bit"] = True
        if quantized:  # bitsandbytes places the weights while loading; they cannot be moved afterwards
            kwargs.setdefault("device_map", {"": dev.index or 0} if dev.type == "cuda" else None)
        placed = quantized or kwargs.get("device_map") is not None
        from sr3d_plugin.builders import load_model
        from sr3d_plugin.resources import resolve_model_name

        path = resolve_model_name(path)

        from sr3d_plugin.training.merge import is_adapter, load_adapter

        adapter = is_adapter(path)
        if base is not None and not adapter:
            raise SR3DInputError(
                f"base={str(base)!r} is given but {str(path)!r} is not an adapter folder (no adapter_config.json)"
            )
        try:
            if adapter:
                model, processor, _, _ = load_adapter(path, base, builder=builder, **kwargs)
            else:
                model, processor = load_model(path, builder=builder, **kwargs)
        except (SR3DInputError, SR3DConfigError):
            raise
        except (OSError, ValueError, KeyError) as exc:
            raise SR3DInputError(f"cannot load the model from {str(path)!r}: {exc}") from exc
        if not placed:
            model = model.to(dev)
        model.eval()
        return cls(model, processor, depth_model, dev, time.perf_counter() - t0, str(path), reuse, scene_cache_mib)

    def model_device(self) -> torch.device:
        """Device of the model's first parameter (where its inputs go)."""
        try:
            return next(self.model.parameters()).device
        except StopIteration:  # pragma: no cover - a model without parameters
            return torch.device("cpu")

    def to_device(self, batch: Any) -> dict[str, Any]:
        """A processor batch with its tensors on the model's device."""
        dev = self.model_device()
        return {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    @property
    def needs_positions(self) -> bool:
        """Whether the model adds a 3D positional encoding (and so needs depth, points or a depth model)."""
        return bool(getattr(self.config, "use_position_encoding", True))

    # ------------------------------------------------------------------------------------------
    # visual inputs (sr3d_plugin.visual_inputs with this model's defaults)
    # ------------------------------------------------------------------------------------------

    def read_frames(self, *, num_frames: int | None = None, **inputs: Any) -> Any:
        """:func:`sr3d_plugin.visual_inputs.read_frames` with ``num_frames`` defaulting to ``config.num_video_frames``."""
        from sr3d_plugin.visual_inputs import read_frames

        n = getattr(self.config, "num_video_frames", 32) if num_frames is None else num_frames
        return read_frames(num_frames=n, **inputs)

    def positions(
        self, frames: Any, *, points: Any = None, depth_model: str | PathLike | None = None, cache: Any = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """:func:`sr3d_plugin.visual_inputs.positions` (``source="auto"``) with the model's canonical mode and
        the pipeline's device: ``(canonical [V, H, W, 3] float32, valid [V, H, W] or None, info)``."""
        from sr3d_plugin.visual_inputs import positions

        mode = getattr(self.config, "canonical_mode", "sr3d")
        return positions(
            frames, "auto", points=points, depth_model=depth_model, canonical_mode=mode, device=self.device, cache=cache
        )

    # ------------------------------------------------------------------------------------------
    # batched generation and scoring
    # ------------------------------------------------------------------------------------------

    def encode(self, prompts: Sequence[str], visuals: Sequence[VisualInput | None]) -> dict[str, Any]:
        """The processor batch of ``prompts`` with their ``visuals`` (left padding), on the model's device."""
        return self.to_device(self.processor(list(prompts), list(visuals), padding_side="left"))

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str],
        visuals: Sequence[VisualInput | None],
        *,
        stop: Sequence[str] = (),
        return_details: bool = False,
        **gen: Any,
    ) -> list[Any]:
        """Answers to a batch of chat prompts (``processor.build_prompt``), one per prompt, in order.

        Args:
            prompts: ``B`` prompts ending in the generation prompt.
            visuals: their ``B`` visual inputs (one per prompt).
            stop: strings the answers are cut at.
            return_details: return dicts ``{"text", "prompt_tokens", "generated_tokens", "num_tiles",
                "timings": {"encode", "generate"} (seconds, whole batch)}``.
            **gen: the model's ``generate`` arguments (``max_new_tokens``, ``do_sample``, ``temperature``,
                ``num_beams`` …); ``pad_token_id`` defaults to the tokenizer's (else its EOS).

        Returns:
            ``B`` answer strings (stripped), or ``B`` dicts with ``return_details``.
        """
        if len(prompts) != len(visuals):
            raise SR3DInputError(f"{len(prompts)} prompt(s) for {len(visuals)} visual input(s); expected one each")
        t0 = time.perf_counter()
        tok = self.processor.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is not None:
            gen.setdefault("pad_token_id", int(pad))
        if self.scene_cache is not None and ReuseGenerator.supports(self.model, visuals):
            reuser = ReuseGenerator(self.model, self.processor, self.scene_cache, self.model_device())
            inputs = reuser.generate(prompts, visuals, gen)
            out = inputs["sequences"]
            t1 = t0 + inputs["encode_s"]
        else:
            inputs = self.encode(prompts, visuals)
            t1 = time.perf_counter()
            out = self.model.generate(**inputs, **gen)
        prompt_len = int(inputs["input_ids"].shape[1])
        texts = [cut_at_stops(t, stop) for t in self.processor.decode_answer(out, prompt_len)]
        seconds = {"encode": t1 - t0, "generate": time.perf_counter() - t1}
        if not return_details:
            return texts
        eos = eos_token_ids(self.model, self.processor.tokenizer)
        details = []
        for r, text in enumerate(texts):
            new_ids = out[r, prompt_len:].tolist()
            details.append(
                {
                    "text": text,
                    "prompt_tokens": int(inputs["attention_mask"][r].sum()),
                    "generated_tokens": next((i for i, x in enumerate(new_ids) if x in eos), len(new_ids)),
                    "num_tiles": int(inputs["num_tiles"][r].sum()) if "num_tiles" in inputs else 0,
                    "timings": seconds,
                }
            )
        return details

    def score(self, batch: dict[str, Any], continuations: Sequence[str | Sequence[int]]) -> list[ContinuationScore]:
        """Teacher-forced ``log p(continuation | prompt)`` per row of a processor ``batch``
        (:func:`sr3d_plugin.decoding.score_continuations`: natural log, summed over the continuation's
        tokens, tokenised on their own and appended right after each prompt's last real token)."""
        return score_continuations(self.model, self.processor.tokenizer, self.to_device(batch), continuations)

    def answer_logprob(self, inputs: dict[str, Any], answer: str) -> tuple[float, int]:
        """Teacher-forced ``log p(answer | prompt)`` of one prompt: ``(summed log-probability, number of
        answer tokens)`` (:meth:`score` of a one-row batch)."""
        if not answer:
            raise SR3DInputError(f"score_answer {answer!r} has no tokens; expected a non-empty answer")
        if inputs["input_ids"].shape[0] != 1:
            raise SR3DInputError("answer_logprob scores one prompt at a time; use score for batches")
        s = self.score(inputs, [answer])[0]
        return s.logprob, s.num_tokens

    # ------------------------------------------------------------------------------------------
    # asking
    # ------------------------------------------------------------------------------------------

    def ask(
        self,
        question: str | Sequence[str | Mapping[str, Any]],
        *,
        image: Any = None,
        frames: Sequence[Any] | None = None,
        video: PathLike | None = None,
        scene: PathLike | None = None,
        depth: Any = None,
        depth_model: str | PathLike | None = None,
        intrinsics: Any = None,
        poses: Any = None,
        points: Any = None,
        regions: Sequence[str | RegionSpec | Region] = (),
        num_frames: int | None = None,
        max_new_tokens: int = 64,
        score_answer: str | None = None,
        seed: int = 0,
        do_sample: bool = False,
        temperature: float | None = None,
        system: str | None = None,
        depth_scale: float = 1000.0,
        cache: Any = False,
        batch_size: int = 8,
        streamer: Any = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Answer ``question`` about one visual input (or, given a list, every question of it: :meth:`ask_many`).

        Args:
            question: the user text; refers to regions with ``<mask>`` (in order) or ``<regionK>``. A list
                (of strings, or of mappings of per-question fields) is answered with :meth:`ask_many`, the
                other arguments then being every question's defaults; the result is a list.
            image, frames, video, scene, depth, intrinsics, poses, points: exactly one visual input
                and its geometry, as :func:`sr3d_plugin.visual_inputs.visual_input` (an image is tiled
                dynamically; frames, videos and scenes give one tile per sampled frame).
            depth_model: Depth Anything V2 id or folder (``"auto"``: the model config's default);
                overrides the pipeline's default and a scene's own depth.
            regions: region specs (:mod:`sr3d_plugin.regions`) or :class:`Region` objects, in the order
                ``<mask>`` tokens use them.
            num_frames: frames sampled from frame lists, videos and scenes (default ``config.num_video_frames``).
            max_new_tokens: generation budget.
            score_answer: also return ``answer_logprob`` = log p(score_answer | prompt) (module docstring).
            seed: seeds torch / numpy / random before generating.
            do_sample: sample instead of greedy decoding (``temperature`` optional).
            system: system prompt (default the processor's ``default_system``: none for VILA folders, so the
                chat template's own default applies as in SR-REAL, and for LLaVA folders, whose conversation
                template brings its own; "You are a helpful assistant." otherwise).
            depth_scale: raw depth units per metre for integer depth images.
            cache: point-map cache (False, True, a folder or a :class:`~sr3d_plugin.pointmap.PointMapCache`).
            batch_size: questions generated together when ``question`` is a list (:meth:`ask_many`).
            streamer: a transformers streamer (``TextStreamer``, ``TextIteratorStreamer`` or any
                ``BaseStreamer``) that receives the new token ids as they are generated (one question
                only; :meth:`ask_stream` wraps this in an iterator of text pieces).

        Returns:
            ``{"answer", "answer_logprob"? (with score_answer), "score_answer"?, "answer_tokens"?,
            "regions", "num_frames", "frame_ids", "num_tiles", "prompt_tokens", "generated_tokens",
            "geometry", "input", "model", "seed", "timings"}`` — ``timings`` in seconds: ``load`` (the
            model, once per pipeline), ``read``, ``geometry``, ``regions``, ``encode`` (processor),
            ``generate`` (vision tower + LLM), ``score`` and ``total`` (this call). A list of such dicts
            for a list of questions.
        """
        inputs: dict[str, Any] = {
            "image": image,
            "frames": frames,
            "video": video,
            "scene": scene,
            "depth": depth,
            "depth_model": depth_model,
            "intrinsics": intrinsics,
            "poses": poses,
            "points": points,
            "regions": regions,
            "num_frames": num_frames,
            "max_new_tokens": max_new_tokens,
            "score_answer": score_answer,
            "system": system,
            "depth_scale": depth_scale,
        }
        if isinstance(question, (list, tuple)):
            if streamer is not None:
                raise SR3DInputError(
                    f"streamer= streams one answer; got a list of {len(question)} questions (ask them one at a time)"
                )
            return self.ask_many(
                question,
                batch_size=batch_size,
                seed=seed,
                do_sample=do_sample,
                temperature=temperature,
                cache=cache,
                **inputs,
            )
        t_start = time.perf_counter()
        job = self._prepare(question, do_sample=do_sample, temperature=temperature, cache=cache, **inputs)
        return self._answer_one(job, seed, streamer, t_start)

    def ask_stream(self, question: str, *, timeout: float | None = None, **kwargs: Any) -> AnswerStream:
        """Answer one question, streaming its text as it is generated.

        The inputs are read and checked here (bad input raises now); generation then runs in a
        background thread with a transformers ``TextIteratorStreamer``. Iterate the returned
        :class:`AnswerStream` for the text pieces (``"".join(pieces).strip() == stream.result["answer"]``);
        ``stream.result`` is the dict :meth:`ask` returns (it waits for the end of the generation and
        re-raises an error of the generation thread).
        Use the pipeline for nothing else until the stream has ended (the thread uses its model and cache).

        Args:
            question: the user text (one question).
            timeout: seconds to wait for the next piece before ``queue.Empty`` is raised (None: no limit).
            **kwargs: the keyword arguments of :meth:`ask` (not ``streamer`` or ``batch_size``).
        """
        from transformers import TextIteratorStreamer

        if not isinstance(question, str):
            raise SR3DInputError(f"ask_stream streams one answer; question must be text, got {describe(question)}")
        for name in ("streamer", "batch_size"):
            if name in kwargs:
                raise SR3DInputError(f"ask_stream makes its own streamer and asks one question; drop {name}=")
        unknown = sorted(set(kwargs) - set(inspect.signature(self.ask).parameters))
        if unknown:
            raise TypeError(f"ask_stream() got unexpected keyword argument(s) {', '.join(unknown)} (it takes ask's)")
        seed = kwargs.pop("seed", 0)
        t_start = time.perf_counter()
        job = self._prepare(question, **kwargs)
        streamer = TextIteratorStreamer(
            self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=timeout
        )
        return AnswerStream(streamer, lambda: self._answer_one(job, seed, streamer, t_start))

    def ask_many(
        self,
        items: Sequence[str | Mapping[str, Any]],
        *,
        batch_size: int = 8,
        seed: int = 0,
        do_sample: bool = False,
        temperature: float | None = None,
        cache: Any = False,
        **defaults: Any,
    ) -> list[dict[str, Any]]:
        """Answer many questions, possibly about many scenes, in input order (``list(ask_iter(...))``).

        See :meth:`ask_iter` for the items, the batching and what is shared between questions.
        """
        return list(
            self.ask_iter(
                items,
                batch_size=batch_size,
                seed=seed,
                do_sample=do_sample,
                temperature=temperature,
                cache=cache,
                **defaults,
            )
        )

    def ask_iter(
        self,
        items: Sequence[str | Mapping[str, Any]],
        *,
        batch_size: int = 8,
        seed: int = 0,
        do_sample: bool = False,
        temperature: float | None = None,
        cache: Any = False,
        **defaults: Any,
    ) -> Iterator[dict[str, Any]]:
        """Answer many questions batch by batch, yielding each result (the dict :meth:`ask` returns) in input order.

        Every item is checked before anything is generated; bad ones raise :class:`SR3DInputError`
        naming the item's index and field (``item 3, "regions": …``; the error's ``item_index`` and
        ``item_field`` attributes hold them). Inputs that fail while being read raise when their batch
        comes, named the same way, after the earlier batches were yielded.

        Args:
            items: questions: strings, or mappings with the fields :data:`ASK_ITEM_FIELDS` — ``question``
                (required), ``id`` (any JSON scalar, echoed as the result's ``"id"``), the visual input
                (``image`` / ``frames`` / ``video`` / ``scene``) and geometry (``depth``, ``intrinsics``,
                ``poses``, ``points``), ``depth_model``, ``depth_scale``, ``regions``, ``num_frames``,
                ``max_new_tokens``, ``score_answer``, ``system``, with :meth:`ask`'s meanings. A missing
                (or None) field takes the value of ``defaults``; an item that names its own visual input
                takes none of the defaults' visual input or geometry fields.
            batch_size: questions read and generated together (>= 1). Within a batch, questions with the
                same frames and prompt prefix share one prefill (:mod:`sr3d_plugin.scene_cache`);
                questions with another ``max_new_tokens`` are generated separately.
            seed: seeds torch / numpy / random before each generation (greedy answers do not depend on it).
            do_sample, temperature: as :meth:`ask`, for every question. Sampled answers of a batch come
                from the same distributions as single calls but not from the same random draws.
            cache: point-map cache, as :meth:`ask`.
            **defaults: per-question fields shared by the items (e.g. ``scene=``, ``regions=``).

        With the pipeline's scene cache (``reuse=True``) a scene's frames, geometry, visual features and
        prompt-prefix KV are computed once and reused by every later question on it, across batches;
        greedy answers equal those of single :meth:`ask` calls. ``timings`` of a result are its own
        ``read`` / ``geometry`` / ``regions`` (0 when reused) and its batch's ``encode`` / ``generate`` /
        ``score`` / ``total`` seconds.
        """
        jobs, ids = self._batch_items(items, defaults)
        size = _checks.integer(batch_size, "batch_size", minimum=1)
        return self._answer_batches(jobs, ids, size, seed, {"do_sample": do_sample, "temperature": temperature}, cache)

    # ------------------------------------------------------------------------------------------
    # the steps of asking
    # ------------------------------------------------------------------------------------------

    def _prepare(
        self,
        question: str,
        *,
        do_sample: bool = False,
        temperature: float | None = None,
        cache: Any = False,
        memo: OrderedDict[Any, Any] | None = None,
        **given: Any,
    ) -> _Job:
        """Check one question and read its visual input (from the scene cache when it holds it): a :class:`_Job`.

        ``given``: per-question keyword arguments of :meth:`ask` (:data:`_QUESTION_DEFAULTS` for the others).
        """
        from sr3d_plugin.visual_inputs import default_depth_model

        unknown = sorted(set(given) - set(_QUESTION_DEFAULTS))
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)}; see SR3DPipeline.ask")
        inputs = {**_QUESTION_DEFAULTS, **given}
        regions, max_new_tokens, score_answer = inputs["regions"], inputs["max_new_tokens"], inputs["score_answer"]
        depth_model, num_frames, system = inputs["depth_model"], inputs["num_frames"], inputs["system"]
        regions = [regions] if isinstance(regions, (str, Region, RegionSpec)) else list(regions)
        proc = self.processor
        check_question(
            question, len(regions), getattr(proc, "image_token", "<image>"), getattr(proc, "mask_token", "<mask>")
        )
        if max_new_tokens is None or int(max_new_tokens) <= 0:
            raise SR3DInputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if score_answer is not None and (not isinstance(score_answer, str) or not score_answer):
            raise SR3DInputError(f"score_answer {score_answer!r} has no tokens; expected a non-empty answer")
        if depth_model == "auto":
            depth_model = default_depth_model(self.config)
        dm = depth_model if depth_model is not None else self.depth_model
        settings: dict[str, Any] = {
            **{name: inputs[name] for name in VISUAL_FIELDS + GEOMETRY_FIELDS},
            "depth_model": depth_model,  # an explicit depth model beats a scene's own depth
            "fallback_depth_model": default_depth_model(self.config) if dm == "auto" else dm,  # only fills gaps
            "num_frames": getattr(self.config, "num_video_frames", 32) if num_frames is None else num_frames,
            "depth_scale": inputs["depth_scale"],
            "needs_positions": self.needs_positions,
            "canonical_mode": getattr(self.config, "canonical_mode", "sr3d"),
        }
        base, reused = self._scene_input(settings, cache, memo)
        bundle = _with_regions(base, regions, {"read": 0.0, "geometry": 0.0} if reused else dict(base.timings))
        prompt = proc.build_prompt(question, bundle.visual, **({} if system is None else {"system": system}))
        gen: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "do_sample": bool(do_sample)}
        if do_sample and temperature is not None:
            gen["temperature"] = float(temperature)
        return _Job(prompt, bundle, {"load": self.load_seconds, **bundle.timings}, gen, score_answer)

    def _scene_input(
        self, settings: dict[str, Any], cache: Any, memo: OrderedDict[Any, Any] | None
    ) -> tuple[Any, bool]:
        """The region-free :class:`~sr3d_plugin.visual_inputs.VisualBundle` of ``settings`` and whether it was
        reused: from the scene cache (inputs given as paths), from ``memo`` (the same in-memory objects
        earlier in one :meth:`ask_iter` call), else read and kept in both."""
        from sr3d_plugin.visual_inputs import visual_input

        if self.scene_cache is None:
            return visual_input(**settings, regions=(), device=self.device, cache=cache), False
        key = SceneCache.input_key(**settings)
        if key is not None:  # paths: the scene cache
            hit = self.scene_cache.get(key)
            if hit is not None:
                return hit, True
            base = visual_input(**settings, regions=(), device=self.device, cache=cache)
            self.scene_cache.put(key, base, _bundle_bytes(base))
            return base, False
        memo_key = _identity_key(settings)  # objects in memory: the same objects earlier in this call
        if memo is not None and memo_key in memo:
            memo.move_to_end(memo_key)
            return memo[memo_key], True
        base = visual_input(**settings, regions=(), device=self.device, cache=cache)
        if memo is not None:
            memo[memo_key] = base
            while len(memo) > _MEMO_SCENES:
                memo.popitem(last=False)
        return base, False

    def _answer_one(self, job: _Job, seed: int, streamer: Any, t_start: float) -> dict[str, Any]:
        from transformers import set_seed

        gen = dict(job.gen) if streamer is None else {**job.gen, "streamer": streamer}
        set_seed(int(seed))
        (out,) = self.generate([job.prompt], [job.bundle.visual], return_details=True, **gen)
        scores, score_s = self._score_jobs([job])
        return self._result(job, out, scores[0], score_s, seed, time.perf_counter() - t_start)

    def _answer_batches(
        self,
        jobs: list[dict[str, Any]],
        ids: list[Any],
        size: int,
        seed: int,
        sampling: dict[str, Any],
        cache: Any,
    ) -> Iterator[dict[str, Any]]:
        from transformers import set_seed

        memo: OrderedDict[Any, Any] | None = OrderedDict() if self.scene_cache is not None else None
        for start in range(0, len(jobs), size):
            t0 = time.perf_counter()
            batch: list[_Job] = []
            for i in range(start, min(len(jobs), start + size)):
                try:
                    batch.append(self._prepare(**jobs[i], **sampling, cache=cache, memo=memo))
                except SR3DInputError as exc:
                    raise _item_error(i, None, str(exc)) from exc
                except OSError as exc:
                    if isinstance(exc, SR3DError):
                        raise
                    raise _item_error(i, None, f"cannot read input: {exc}") from exc
            outs: list[Any] = [None] * len(batch)
            groups: dict[tuple, list[int]] = {}
            for j, job in enumerate(batch):
                groups.setdefault(tuple(sorted(job.gen.items())), []).append(j)
            for members in groups.values():
                set_seed(int(seed))
                got = self.generate(
                    [batch[j].prompt for j in members],
                    [batch[j].bundle.visual for j in members],
                    return_details=True,
                    **batch[members[0]].gen,
                )
                for j, out in zip(members, got):
                    outs[j] = out
            scores, score_s = self._score_jobs(batch)
            total = time.perf_counter() - t0
            for j, job in enumerate(batch):
                result = self._result(job, outs[j], scores[j], score_s, seed, total)
                item_id = ids[start + j]
                yield result if item_id is _NO_ID else {"id": item_id, **result}

    def _score_jobs(self, jobs: Sequence[_Job]) -> tuple[list[ContinuationScore | None], float]:
        """Teacher-forced scores of the jobs with a ``score_answer`` (one batch; cached visual features
        when the scene cache is on) and the seconds it took."""
        rows = [j for j, job in enumerate(jobs) if job.score_answer is not None]
        scores: list[ContinuationScore | None] = [None] * len(jobs)
        if not rows:
            return scores, 0.0
        t = time.perf_counter()
        prompts = [jobs[j].prompt for j in rows]
        visuals = [jobs[j].bundle.visual for j in rows]
        answers = [str(jobs[j].score_answer) for j in rows]
        if self.scene_cache is not None and ReuseGenerator.supports(self.model, visuals):
            reuser = ReuseGenerator(self.model, self.processor, self.scene_cache, self.model_device())
            with torch.inference_mode():
                batch = reuser.scoring_batch(prompts, visuals)
            got = score_continuations(self.model, self.processor.tokenizer, batch, answers)
        else:
            got = self.score(self.encode(prompts, visuals), answers)
        for j, s in zip(rows, got):
            scores[j] = s
        return scores, time.perf_counter() - t

    def _result(
        self, job: _Job, out: dict[str, Any], score: ContinuationScore | None, score_s: float, seed: int, total: float
    ) -> dict[str, Any]:
        timings = dict(job.timings)
        timings.update(out["timings"])
        result: dict[str, Any] = {"answer": out["text"]}
        if score is not None:
            result.update({"answer_logprob": score.logprob, "score_answer": job.score_answer})
            result["answer_tokens"] = score.num_tokens
            timings["score"] = score_s
        timings["total"] = total
        result.update(job.bundle.summary())
        result.update(
            {
                "num_tiles": out["num_tiles"],
                "prompt_tokens": out["prompt_tokens"],
                "generated_tokens": out["generated_tokens"],
                "model": self.model_path,
                "seed": int(seed),
                "timings": {k: round(float(v), 4) for k, v in timings.items()},
            }
        )
        return result

    def _batch_items(
        self, items: Sequence[str | Mapping[str, Any]], defaults: Mapping[str, Any]
    ) -> tuple[list[dict[str, Any]], list[Any]]:
        """Every item merged with ``defaults`` and checked: ``(keyword arguments of _prepare, ids)``."""
        if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
            raise SR3DInputError(
                f"items must be a list of questions (strings or mappings of fields), got {describe(items)}"
            )
        unknown = sorted(set(defaults) - set(ASK_ITEM_FIELDS) | ({"question", "id"} & set(defaults)))
        if unknown:
            raise SR3DInputError(
                f"unexpected default(s) {', '.join(unknown)}; the defaults of every question are "
                + ", ".join(f for f in ASK_ITEM_FIELDS if f not in ("question", "id"))
            )
        proc = self.processor
        tokens = (getattr(proc, "image_token", "<image>"), getattr(proc, "mask_token", "<mask>"))
        jobs: list[dict[str, Any]] = []
        ids: list[Any] = []
        for i, item in enumerate(list(items)):
            fields = check_item_fields(i, item)
            item_id = fields.pop("id", _NO_ID)
            own = any(f in fields for f in VISUAL_FIELDS)
            merged = {
                k: v
                for k, v in defaults.items()
                if v is not None and not (own and k in VISUAL_FIELDS + GEOMETRY_FIELDS)
            }
            merged.update(fields)
            jobs.append(_check_item(i, merged, tokens))
            ids.append(item_id)
        return jobs, ids


class AnswerStream:
    """The text of one answer as it is generated (:meth:`SR3DPipeline.ask_stream`).

    Iterating yields the non-empty text pieces of a transformers ``TextIteratorStreamer`` (whole words
    mostly; the end of the answer last), once; :attr:`result` is :meth:`SR3DPipeline.ask`'s dict.
    """

    def __init__(self, streamer: Any, work: Callable[[], dict[str, Any]]) -> None:
        self._streamer = streamer
        self._result: dict[str, Any] | None = None
        self._error: BaseException | None = None
        self._consumed = False
        self._thread = threading.Thread(target=self._run, args=(work,), name="sr3d-ask-stream", daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], dict[str, Any]]) -> None:
        try:
            self._result = work()
        except BaseException as exc:  # handed to the reader; end() unblocks its iteration
            self._error = exc
            self._streamer.end()

    def __iter__(self) -> Iterator[str]:
        if self._consumed:
            return
        self._consumed = True
        for piece in self._streamer:
            if piece:
                yield piece
        self._finish()

    def _finish(self) -> dict[str, Any]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    @property
    def result(self) -> dict[str, Any]:
        """The answer's dict (as :meth:`SR3DPipeline.ask`); waits for the generation to end."""
        return self._finish()


@dataclass
class _Job:
    """One checked question with its visual input, ready to generate."""

    prompt: str
    bundle: Any  # VisualBundle with the question's regions
    timings: dict[str, float]
    gen: dict[str, Any]
    score_answer: str | None


#: fields of one question of :meth:`SR3DPipeline.ask_iter` (and of a line of ``sr3d ask --questions``)
ASK_ITEM_FIELDS = (
    "question",
    "id",
    "image",
    "frames",
    "video",
    "scene",
    "depth",
    "intrinsics",
    "poses",
    "points",
    "depth_model",
    "depth_scale",
    "regions",
    "num_frames",
    "max_new_tokens",
    "score_answer",
    "system",
)
#: the visual input fields (exactly one per question)
VISUAL_FIELDS = ("image", "frames", "video", "scene")
#: the geometry fields that belong to a visual input
GEOMETRY_FIELDS = ("depth", "intrinsics", "poses", "points")
#: what :meth:`SR3DPipeline.ask` takes per question, with its defaults
_QUESTION_DEFAULTS: dict[str, Any] = {
    **dict.fromkeys(VISUAL_FIELDS + GEOMETRY_FIELDS),
    "depth_model": None,
    "regions": (),
    "num_frames": None,
    "max_new_tokens": 64,
    "score_answer": None,
    "system": None,
    "depth_scale": 1000.0,
}
_NO_ID = object()
#: in-memory scene inputs remembered within one ask_iter call
_MEMO_SCENES = 8


def _item_error(index: int, field: str | None, detail: str) -> SR3DInputError:
    """``SR3DInputError("item I[, "field"]: detail")`` with ``item_index``, ``item_field`` and ``item_detail``."""
    err = SR3DInputError(f"item {index}{'' if field is None else f', {json.dumps(field)}'}: {detail}")
    err.item_index, err.item_field, err.item_detail = index, field, detail  # type: ignore[attr-defined]
    return err


def check_item_fields(index: int, item: Any) -> dict[str, Any]:
    """The given (not None) fields of one :meth:`SR3DPipeline.ask_iter` item: a question string or a mapping
    of :data:`ASK_ITEM_FIELDS` (else :class:`SR3DInputError` naming ``index`` and the field)."""
    if isinstance(item, str):
        return {"question": item}
    if not isinstance(item, Mapping):
        raise _item_error(index, None, f"expected a question (text) or a mapping of fields, got {describe(item)}")
    for name in item:
        if name not in ASK_ITEM_FIELDS:
            raise _item_error(index, str(name), f"unknown field; expected some of {', '.join(ASK_ITEM_FIELDS)}")
    item_id = item.get("id")
    if item_id is not None and (isinstance(item_id, bool) or not isinstance(item_id, (str, int))):
        raise _item_error(index, "id", f"expected text or an integer, got {describe(item_id)}")
    return {k: v for k, v in item.items() if v is not None}


def _check_item(index: int, fields: dict[str, Any], tokens: tuple[str, str]) -> dict[str, Any]:
    """One merged item checked (field types and ranges, one visual input, regions against the question)."""
    if "question" not in fields:
        raise _item_error(index, "question", "missing; expected the question text")
    given = [f for f in VISUAL_FIELDS if f in fields]
    if len(given) != 1:
        got = "none" if not given else " and ".join(json.dumps(f) for f in given)
        raise _item_error(
            index,
            None,
            f"expected exactly one visual input ({', '.join(map(json.dumps, VISUAL_FIELDS))}; the item's own "
            f"or a default), got {got}",
        )
    regions = fields.get("regions", ())
    if isinstance(regions, (str, Region, RegionSpec)):
        regions = [regions]
    if not isinstance(regions, (list, tuple)) or not all(isinstance(r, (str, Region, RegionSpec)) for r in regions):
        raise _item_error(index, "regions", f"expected a list of region specs (text), got {describe(regions)}")
    fields["regions"] = list(regions)
    numbers = {
        "num_frames": lambda v, n: _checks.integer(v, n, minimum=1),
        "max_new_tokens": lambda v, n: _checks.integer(v, n, minimum=1),
        "depth_scale": lambda v, n: _checks.finite_number(v, n, positive=True),
    }
    for name, check in numbers.items():
        if name in fields:
            try:  # the field quoted, as in JSON (not name=, which the CLI would turn into a flag)
                fields[name] = check(fields[name], json.dumps(name))
            except SR3DInputError as exc:
                raise _item_error(index, name, str(exc)) from exc
    for name in ("score_answer", "system", "depth_model"):
        if name in fields and (not isinstance(fields[name], str) or not fields[name]):
            raise _item_error(index, name, f"expected non-empty text, got {describe(fields[name])}")
    for name in ("frames", "poses", "depth"):
        if isinstance(fields.get(name), Mapping):
            raise _item_error(index, name, f"expected a path or a list of paths, got {describe(fields[name])}")
    try:
        check_question(fields["question"], len(regions), *tokens)
    except SR3DInputError as exc:
        raise _item_error(index, "question", str(exc)) from exc
    return fields


def _identity_key(settings: Mapping[str, Any]) -> tuple:
    """A key of scene settings holding in-memory objects: plain values as they are, objects by identity."""
    plain = (str, int, float, bool, type(None))
    return ("memo", tuple((k, v if isinstance(v, plain) else ("obj", id(v))) for k, v in sorted(settings.items())))


def _bundle_bytes(bundle: Any) -> int:
    from sr3d_plugin.scene_cache import _nbytes

    return _nbytes([bundle.frames, bundle.visual.points, bundle.visual.valid])


def _with_regions(base: Any, regions: Sequence[Any], timings: dict[str, float]) -> Any:
    """A :class:`~sr3d_plugin.visual_inputs.VisualBundle` of ``base``'s frames and geometry with ``regions``
    (specs or :class:`Region` objects) resolved on its sampled frames, as :func:`visual_input` does."""
    from sr3d_plugin.regions import parse_region_spec, resolve_regions
    from sr3d_plugin.visual_inputs import VisualBundle

    t = time.perf_counter()
    specs = [parse_region_spec(r) if isinstance(r, str) else r for r in regions]
    region_objs = resolve_regions(specs, base.frames) if specs else []
    timings["regions"] = time.perf_counter() - t
    visual = base.visual.with_regions(region_objs)  # frames and point maps were checked when base was made
    return VisualBundle(visual, base.frames, base.geometry, specs, timings, base.kind)
