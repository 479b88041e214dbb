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
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from sr3d_plugin.decoding import ContinuationScore, cut_at_stops, eos_token_ids, score_continuations
from sr3d_plugin.devices import resolve_device
from sr3d_plugin.errors import SR3DConfigError, SR3DInputError
from sr3d_plugin.modeling.inputs import Region, VisualInput
from sr3d_plugin.regions import RegionSpec, check_question, count_region_references
from sr3d_plugin.scene_cache import DEFAULT_SCENE_CACHE_MIB, ReuseGenerator, SceneCache

__all__ = ["ContinuationScore", "SR3DPipeline", "count_region_references", "cut_at_stops"]

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
        question: str,
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
    ) -> dict[str, Any]:
        """Answer ``question`` about one visual input.

        Args:
            question: the user text; refers to regions with ``<mask>`` (in order) or ``<regionK>``.
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

        Returns:
            ``{"answer", "answer_logprob"? (with score_answer), "score_answer"?, "answer_tokens"?,
            "regions", "num_frames", "frame_ids", "num_tiles", "prompt_tokens", "generated_tokens",
            "geometry", "input", "model", "seed", "timings"}`` — ``timings`` in seconds: ``load`` (the
            model, once per pipeline), ``read``, ``geometry``, ``regions``, ``encode`` (processor),
            ``generate`` (vision tower + LLM), ``score`` and ``total`` (this call).
        """
        from transformers import set_seed

        from sr3d_plugin.visual_inputs import default_depth_model, visual_input

        t_start = time.perf_counter()
        regions = [regions] if isinstance(regions, (str, Region, RegionSpec)) else list(regions)
        proc = self.processor
        check_question(
            question, len(regions), getattr(proc, "image_token", "<image>"), getattr(proc, "mask_token", "<mask>")
        )
        if max_new_tokens is None or int(max_new_tokens) <= 0:
            raise SR3DInputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if depth_model == "auto":
            depth_model = default_depth_model(self.config)
        dm = depth_model if depth_model is not None else self.depth_model
        settings: dict[str, Any] = {
            "image": image,
            "frames": frames,
            "video": video,
            "scene": scene,
            "depth": depth,
            "intrinsics": intrinsics,
            "poses": poses,
            "points": points,
            "depth_model": depth_model,  # an explicit depth model beats a scene's own depth
            "fallback_depth_model": default_depth_model(self.config) if dm == "auto" else dm,  # only fills gaps
            "num_frames": getattr(self.config, "num_video_frames", 32) if num_frames is None else num_frames,
            "depth_scale": depth_scale,
            "needs_positions": self.needs_positions,
            "canonical_mode": getattr(self.config, "canonical_mode", "sr3d"),
        }
        key = SceneCache.input_key(**settings) if self.scene_cache is not None else None
        base = self.scene_cache.get(key) if key is not None and self.scene_cache is not None else None
        if base is None:
            base = visual_input(**settings, regions=(), device=self.device, cache=cache)
            if key is not None and self.scene_cache is not None:
                self.scene_cache.put(key, base, _bundle_bytes(base))
            bundle = _with_regions(base, regions, dict(base.timings))
        else:
            bundle = _with_regions(base, regions, {"read": 0.0, "geometry": 0.0})
        visual, timings = bundle.visual, {"load": self.load_seconds, **bundle.timings}
        prompt = proc.build_prompt(question, visual, **({} if system is None else {"system": system}))
        set_seed(int(seed))
        gen: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "do_sample": bool(do_sample)}
        if do_sample and temperature is not None:
            gen["temperature"] = float(temperature)
        (out,) = self.generate([prompt], [visual], return_details=True, **gen)
        timings.update(out["timings"])
        result: dict[str, Any] = {"answer": out["text"]}
        if score_answer is not None:
            t = time.perf_counter()
            logprob, n_tok = self.answer_logprob(self.encode([prompt], [visual]), score_answer)
            result.update({"answer_logprob": logprob, "score_answer": score_answer, "answer_tokens": n_tok})
            timings["score"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start
        result.update(bundle.summary())
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
