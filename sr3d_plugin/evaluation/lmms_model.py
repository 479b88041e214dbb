"""The ``sr3d`` model for lmms-eval (simple model, found through the ``lmms_eval.models`` entry point).

.. code-block:: bash

    SR3D_DATA=data/prepared python -m lmms_eval --model sr3d \\
        --model_args pretrained=checkpoints/sr3d-8b,num_frames=32,dtype=bfloat16 \\
        --tasks sr3d_3d --include_path "$(sr3d tasks-path)" --batch_size 4 --log_samples --output_path out/

Model arguments (``--model_args key=value,…``):

=================  ==========================================================================
``pretrained``     model folder (ours, VILA/NVILA/SR-3D, LLaVA; see :func:`sr3d_plugin.builders.load_model`)
``adapter``        a trained LoRA adapter folder (``sr3d train``), applied without merging to
                   ``pretrained`` or, without it, to the base recorded in ``adapter_config.json``
``builder``        builder name (default: detected from the folder)
``depth_source``   ``auto`` | ``gt_depth`` (``gt``) | ``relative_depth`` | ``depth_anything`` |
                   ``reconstruction`` (:data:`sr3d_plugin.visual_inputs.DEPTH_SOURCES`, see
                   :class:`~sr3d_plugin.evaluation.record_inputs.RecordInputBuilder`)
``depth_model``    Depth Anything V2 id or folder (default: the config's ``depth_model``)
``pointmap_dir``   reconstruction point maps ``[<dataset>/]<scene_id>.npz|.npy``
``num_frames``     frames per scene / video (default 32, SR3D-FACTS §3)
``dtype``          ``bfloat16`` | ``float16`` | ``float32`` | ``auto`` (default: the checkpoint's)
``device``         ``cuda`` | ``cuda:1`` | ``cpu`` | ``auto`` (with several processes: each process's own GPU)
``device_map``     e.g. ``auto`` to spread one large model over the GPUs of one process
``load_in_4bit``   quantise the LLM to 4 bits (bitsandbytes)
``max_new_tokens`` overrides the tasks' generation budget
``batch_size``     requests per forward pass (left padding; also ``--batch_size``)
``system_prompt``  chat system prompt (default the processor's: none for VILA folders, so the chat
                   template's own default applies; "You are a helpful assistant." otherwise)
``on_error``       ``empty`` (default: a request whose inputs cannot be built gets an empty answer,
                   scored as wrong and counted; the error is logged) or ``raise``
``scene_cache``    MiB of scene-level reuse (default 4096; ``0`` turns it off): the visual features
                   (vision tower + PE + projector) and the KV cache of the prompt prefix (system +
                   frame tokens) of a scene are computed once and reused by its other questions,
                   with identical answers (:mod:`sr3d_plugin.scene_cache`); requests are batched
                   by scene
``answers_dir``    resumable run: every answer is appended (fsync'd) to this folder as it is produced,
                   and answers already there for the same model, settings, record, prompt and
                   generation settings are reused (:mod:`sr3d_plugin.evaluation.answer_store`)
=================  ==========================================================================

The model reads each request's record (scene, frames, depth, poses, regions) from
``self.task_dict[task][split][doc_id]``; the task's ``doc_to_visual`` is not used. Under
``accelerate launch -m lmms_eval`` every process loads the model on its own device (data
parallelism, as lmms-eval's built-in models do); ``accelerate launch --cpu`` works with gloo.

This class is an adapter: prompts come from the processor (``build_prompt``), answers from
:meth:`SR3DPipeline.generate <sr3d_plugin.inference.SR3DPipeline.generate>` and log-likelihoods from
:meth:`SR3DPipeline.score <sr3d_plugin.inference.SR3DPipeline.score>`; it adds lmms-eval's request
bookkeeping (batching by scene, stop strings, failures).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from loguru import logger as eval_logger
from tqdm import tqdm

from sr3d_plugin.errors import SR3DConfigError, SR3DError, SR3DInputError
from sr3d_plugin.evaluation.lmms_entry import MODEL_CLASS_PATH, MODEL_ID
from sr3d_plugin.evaluation.record_inputs import RecordInputBuilder
from sr3d_plugin.evaluation.schema import record_label
from sr3d_plugin.inference import SR3DPipeline, cut_at_stops
from sr3d_plugin.scene_cache import DEFAULT_SCENE_CACHE_MIB
from sr3d_plugin.visual_inputs import depth_source_name

__all__ = ["MANIFEST", "SR3DLmms"]

#: the ``sr3d`` manifest; the entry point itself is :func:`sr3d_plugin.evaluation.lmms_entry.manifests`
#: (this module imports ``lmms_eval.models``, so an entry point here would be circular)
MANIFEST = ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS_PATH)

_ON_ERROR = ("empty", "raise")
# lmms-eval passes these to every model; they mean nothing here
_IGNORED_KWARGS = ("max_batch_size", "trust_remote_code", "use_cache")


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise SR3DConfigError(f"model argument {name}={value!r} must be true or false")


def _as_int(value: Any, name: str, minimum: int = 1) -> int:
    try:
        out = int(str(value).strip()) if not isinstance(value, int) or isinstance(value, bool) else value
    except ValueError:
        raise SR3DConfigError(f"model argument {name}={value!r} must be an integer") from None
    if isinstance(value, bool) or out < minimum:
        raise SR3DConfigError(f"model argument {name}={value!r} must be an integer >= {minimum}")
    return out


def _as_mib(value: Any, name: str) -> float:
    try:
        out = float(str(value).strip())
    except ValueError:
        out = float("nan")
    if isinstance(value, bool) or not out >= 0 or out == float("inf"):
        raise SR3DConfigError(f"model argument {name}={value!r} must be a number of MiB >= 0 (0 turns it off)")
    return out


def _opt_str(value: Any) -> str | None:
    if value is None:
        return None
    s = str(value).strip()
    return None if s == "" or s.lower() == "none" else s


class SR3DLmms(lmms):
    """SR-3D (or any model a builder loads) as an lmms-eval simple model (module docstring)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        builder: str | None = None,
        depth_source: str = "auto",
        depth_model: str | None = None,
        pointmap_dir: str | None = None,
        num_frames: int | str = 32,
        dtype: str | None = None,
        device: str | None = None,
        device_map: str | None = None,
        load_in_4bit: bool | str = False,
        max_new_tokens: int | str | None = None,
        batch_size: int | str = 1,
        system_prompt: str | None = None,
        on_error: str = "empty",
        cache_size: int | str = 2,
        scene_cache: float | str = DEFAULT_SCENE_CACHE_MIB,
        answers_dir: str | None = None,
        adapter: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(k for k in kwargs if k not in _IGNORED_KWARGS)
        if unknown:
            raise SR3DConfigError(
                f"unknown sr3d model argument(s) {unknown}; expected pretrained, builder, depth_source, depth_model, "
                "pointmap_dir, num_frames, dtype, device, device_map, load_in_4bit, max_new_tokens, batch_size, "
                "system_prompt, on_error, cache_size, scene_cache, answers_dir, adapter"
            )
        pretrained = _opt_str(pretrained)
        adapter = _opt_str(adapter)
        if pretrained is None and adapter is None:
            raise SR3DConfigError(
                "the sr3d model needs pretrained=<model folder> or adapter=<adapter folder> (a model argument)"
            )
        if adapter is not None:
            from sr3d_plugin.training.merge import is_adapter

            if not is_adapter(adapter):
                raise SR3DConfigError(f"adapter={adapter!r} holds no adapter_config.json (expected an adapter folder)")
        try:
            depth_source = depth_source_name(depth_source)
        except SR3DInputError as exc:
            raise SR3DConfigError(str(exc)) from None
        if on_error not in _ON_ERROR:
            raise SR3DConfigError(f"on_error={on_error!r}; expected one of {', '.join(_ON_ERROR)}")
        batch = str(batch_size).strip()
        if batch.startswith("auto"):
            raise SR3DConfigError("batch_size=auto is not supported by the sr3d model; give a number")
        self.batch_size_per_gpu = _as_int(batch, "batch_size")
        self.max_new_tokens = None if _opt_str(max_new_tokens) is None else _as_int(max_new_tokens, "max_new_tokens")
        self.on_error = on_error
        self.system_prompt = _opt_str(system_prompt)
        device_map = _opt_str(device_map)

        from accelerate import Accelerator

        accelerator = Accelerator()
        multi = accelerator.num_processes > 1
        if multi:
            if device_map is not None:
                raise SR3DConfigError(
                    "device_map spreads one model over several GPUs of one process; do not combine it with "
                    "accelerate's multi-process launch"
                )
            dev = f"cuda:{accelerator.local_process_index}" if torch.cuda.is_available() else "cpu"
            self.accelerator = accelerator
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes
        else:
            dev = _opt_str(device) or "auto"

        scene_mib = _as_mib(scene_cache, "scene_cache")
        load: dict[str, Any] = {}
        if device_map is not None:
            load["device_map"] = device_map
        self.pipeline = SR3DPipeline.from_pretrained(
            adapter if adapter is not None else pretrained,
            base=pretrained if adapter is not None else None,
            builder=_opt_str(builder),
            dtype=_opt_str(dtype),
            device=dev,
            load_in_4bit=_as_bool(load_in_4bit, "load_in_4bit"),
            depth_model=_opt_str(depth_model),
            reuse=scene_mib > 0,
            scene_cache_mib=scene_mib or DEFAULT_SCENE_CACHE_MIB,
            **load,
        )
        self._device = self.pipeline.device
        self.inputs = RecordInputBuilder(
            self.pipeline,
            num_frames=_as_int(num_frames, "num_frames"),
            depth_source=depth_source,
            depth_model=_opt_str(depth_model),
            pointmap_dir=_opt_str(pointmap_dir),
            cache_size=_as_int(cache_size, "cache_size", minimum=0),
        )
        #: requests whose inputs could not be built: (task, doc_id, question_id, error text)
        self.failures: list[tuple[str, int, str | None, str]] = []
        self.answer_store = self._open_answer_store(
            answers_dir,
            adapter if adapter is not None else pretrained,  # an adapter's weights are what its answers depend on
            builder=_opt_str(builder),
            dtype=_opt_str(dtype),
            load_in_4bit=load_in_4bit,
            **({"adapter_base": pretrained} if adapter is not None else {}),
        )
        if self.rank == 0:
            base_text = pretrained or "its recorded base"
            loaded_what = pretrained if adapter is None else f"adapter {adapter} on {base_text}"
            eval_logger.info(
                f"sr3d: loaded {loaded_what} in {self.pipeline.load_seconds:.1f}s on {self._device} "
                f"(num_frames={self.inputs.num_frames}, depth_source={depth_source}, world_size={self.world_size})"
            )

    # ------------------------------------------------------------------------------------------
    # properties lmms-eval reads
    # ------------------------------------------------------------------------------------------

    @property
    def model(self) -> Any:
        return self.pipeline.model

    @property
    def processor(self) -> Any:
        return self.pipeline.processor

    @property
    def tokenizer(self) -> Any:
        return self.pipeline.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def eot_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    # ------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError) as exc:
            raise SR3DInputError(f"no document {doc_id} in task {task!r} split {split!r}: {exc}") from exc

    def _prompt(self, context: str, visual: Any, history: Sequence[tuple[str, str]] = ()) -> str:
        """Chat prompt from the processor: system, the visual markers + first user turn, earlier turns,
        generation prompt (image markers that a task left in its text are dropped)."""
        image_token = getattr(self.processor, "image_token", "<image>")

        def clean(text: str) -> str:
            return text.replace(image_token, "").strip()

        turns = [(clean(u), a) for u, a in history]
        system = {} if self.system_prompt is None else {"system": self.system_prompt}
        return self.processor.build_prompt(clean(context), visual, history=turns, **system)

    def _record_failure(self, task: str, split: str, doc_id: int, doc: Any, exc: BaseException) -> None:
        if doc is None:
            doc = self._safe_doc(task, split, doc_id)
        qid = doc.get("question_id") if isinstance(doc, dict) else None
        text = f"{type(exc).__name__}: {exc}"
        self.failures.append((task, doc_id, qid, text))
        self._failed_docs.add((task, doc_id))
        eval_logger.warning(
            f"sr3d: {task} doc {doc_id} ({record_label(doc)}) got an empty answer because its input failed: {text}"
        )
        if self.on_error == "raise":
            raise exc

    def _preflight(self, requests: Sequence[Instance]) -> None:
        """Before any question: every document has a geometry source (:func:`~sr3d_plugin.evaluation.preflight.check_documents`)."""
        from sr3d_plugin.evaluation.preflight import check_documents

        docs = []
        for req in requests:
            task, split, doc_id = req.args[-2], req.args[-1], req.args[-3]
            try:
                docs.append((task, self._doc(task, split, doc_id)))
            except SR3DError:
                continue  # reported by the request itself
        check_documents(docs, self.inputs)

    def _build(self, task: str, split: str, doc_id: int) -> tuple[Any, Any]:
        """(doc, VisualInput) for one request."""
        doc = self._doc(task, split, doc_id)
        return doc, self.inputs.visual(doc)

    def _batch_to_device(self, batch: Any) -> dict[str, Any]:
        return self.pipeline.to_device(batch)

    def _gen_kwargs(self, gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        if isinstance(until, str):
            until = [until]
        stops = [s for s in (until or []) if isinstance(s, str) and s]
        max_new = self.max_new_tokens or int(kw.pop("max_new_tokens", 0) or 0) or 128
        kw.pop("max_new_tokens", None)
        temperature = float(kw.pop("temperature", 0) or 0)
        do_sample = bool(kw.pop("do_sample", False)) or temperature > 0
        out: dict[str, Any] = {"max_new_tokens": max_new, "do_sample": do_sample}
        if do_sample:
            out["temperature"] = temperature if temperature > 0 else 1.0
            if kw.get("top_p") is not None:
                out["top_p"] = float(kw["top_p"])
        num_beams = kw.get("num_beams")
        if num_beams is not None and int(num_beams) > 1:
            out["num_beams"] = int(num_beams)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        if pad is not None:
            out["pad_token_id"] = int(pad)
        return out, stops

    _cut = staticmethod(cut_at_stops)

    def _ordered_batches(self, requests: Sequence[Instance], group: Callable[[tuple], Any]) -> list[list[int]]:
        """Request indices grouped by ``group(args)`` and by scene (cache locality), cut into batches."""

        def key(i: int) -> tuple[str, int]:
            task, split, doc_id = requests[i].args[-2], requests[i].args[-1], requests[i].args[-3]
            try:
                return self.inputs.source_key(self._doc(task, split, doc_id)), int(doc_id)
            except SR3DError:
                return "", int(doc_id)

        groups: dict[Any, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(group(req.args), []).append(i)
        batches: list[list[int]] = []
        for idxs in groups.values():
            idxs.sort(key=key)
            bs = self.batch_size
            batches.extend(idxs[j : j + bs] for j in range(0, len(idxs), bs))
        return batches

    # ------------------------------------------------------------------------------------------
    # generate_until
    # ------------------------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (or sampled) answers, one per request; ``args = (context, gen_kwargs, doc_to_visual, doc_id, task, split)``.

        With ``answers_dir`` the stored answers are reused and only the other requests are computed.
        """
        if self.answer_store is None:
            return self._generate_until(requests)
        return self._generate_until_resumable(requests)

    def _generate_until(self, requests: list[Instance]) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        self._preflight(requests)

        def group(args: tuple) -> Any:
            return (args[4], args[5], json.dumps(args[1], sort_keys=True, default=str))

        batches = self._ordered_batches(requests, group)
        pbar = tqdm(total=len(requests), disable=self.rank != 0, desc="sr3d responding")
        t0 = time.perf_counter()
        for batch in batches:
            prepared: list[tuple[int, str, Any]] = []
            for i in batch:
                context, _, _, doc_id, task, split = requests[i].args
                doc = None
                try:
                    doc, visual = self._build(task, split, doc_id)
                    prompt = self._prompt(context, visual)
                    prepared.append((i, prompt, visual))
                except Exception as exc:  # a broken input must not lose the other predictions
                    self._record_failure(task, split, doc_id, doc, exc)
                    results[i] = ""
            if prepared:
                gen, stops = self._gen_kwargs(requests[prepared[0][0]].args[1])
                for i, text in self._generate(prepared, gen, stops, requests).items():
                    results[i] = text
            pbar.update(len(batch))
            self._answers_done(requests, batch, results)
        pbar.close()
        if self.rank == 0 and requests:
            eval_logger.info(f"sr3d: {len(requests)} answers in {time.perf_counter() - t0:.1f}s")
        return [r if r is not None else "" for r in results]

    # ------------------------------------------------------------------------------------------
    # resumable runs (answers_dir): the answer store around generate_until
    # ------------------------------------------------------------------------------------------

    def _open_answer_store(self, answers_dir: Any, pretrained: str, **model: Any) -> Any:
        folder = _opt_str(answers_dir)
        #: called after each batch of _generate_until with (requests, batch indices, results)
        self._answer_sink: Callable[[Sequence[Instance], list[int], list[str | None]], None] | None = None
        self._failed_docs: set[tuple[str, int]] = set()
        if folder is None:
            return None
        from sr3d_plugin.evaluation.answer_store import AnswerStore, run_settings

        inputs = self.inputs
        settings = run_settings(
            pretrained,
            **{k: str(v) for k, v in model.items()},
            num_frames=inputs.num_frames,
            depth_source=inputs.depth_source,
            depth_model=inputs.depth_model,
            pointmap_dir=None if inputs.pointmap_dir is None else str(inputs.pointmap_dir.resolve()),
            system_prompt=self.system_prompt,
            max_new_tokens=self.max_new_tokens,
        )
        store = AnswerStore(folder, settings, rank=self.rank)
        if self.rank == 0:
            bad = f", {store.bad_lines} unreadable line(s) ignored" if store.bad_lines else ""
            eval_logger.info(f"sr3d: answer store {store.folder}: {len(store)} stored answer(s){bad}")
        return store

    def _request_key(self, req: Instance) -> str:
        context, gen_kwargs, _, doc_id, task, split = req.args
        doc = self._safe_doc(task, split, doc_id)
        gen, stops = self._gen_kwargs(gen_kwargs)
        return self.answer_store.key(task, split, doc_id, doc, context, {**gen, "stop": stops})

    def _generate_until_resumable(self, requests: list[Instance]) -> list[str]:
        store = self.answer_store
        self._failed_docs.clear()
        keys = [self._request_key(req) for req in requests]
        results: list[str | None] = [store.get(key) for key in keys]
        todo = [i for i, r in enumerate(results) if r is None]
        eval_logger.info(
            f"sr3d: answer store: {len(requests) - len(todo)} of {len(requests)} answer(s) reused, "
            f"{len(todo)} to compute (rank {self.rank})"
        )

        def sink(sub: Sequence[Instance], batch: list[int], sub_results: list[str | None]) -> None:
            for j in batch:
                text = sub_results[j]
                _, _, _, doc_id, task, split = sub[j].args
                if text is None or (task, doc_id) in self._failed_docs:
                    continue  # failed inputs are retried by the next run
                doc = self._safe_doc(task, split, doc_id)
                qid = doc.get("question_id") if isinstance(doc, dict) else None
                store.put(keys[todo[j]], text, task=task, split=split, doc_id=doc_id, question_id=qid)

        self._answer_sink = sink
        try:
            computed = self._generate_until([requests[i] for i in todo]) if todo else []
        finally:
            self._answer_sink = None
        for i, text in zip(todo, computed):
            results[i] = text
        return [r if r is not None else "" for r in results]

    def _answers_done(self, requests: Sequence[Instance], batch: list[int], results: list[str | None]) -> None:
        if self._answer_sink is not None:
            self._answer_sink(requests, batch, results)

    def _generate(
        self, prepared: list[tuple[int, str, Any]], gen: dict[str, Any], stops: list[str], requests: Sequence[Instance]
    ) -> dict[int, str]:
        """Generate for a batch; if the batch fails, retry one by one so that only bad requests fail."""
        try:
            return self._generate_batch(prepared, gen, stops)
        except Exception as exc:
            if len(prepared) == 1:
                i = prepared[0][0]
                _, _, _, doc_id, task, split = requests[i].args
                self._record_failure(task, split, doc_id, None, exc)
                return {i: ""}
        out: dict[int, str] = {}
        for item in prepared:
            out.update(self._generate(prepared=[item], gen=gen, stops=stops, requests=requests))
        return out

    def _safe_doc(self, task: str, split: str, doc_id: int) -> Any:
        try:
            return self._doc(task, split, doc_id)
        except SR3DError:
            return None

    def _generate_batch(
        self, prepared: list[tuple[int, str, Any]], gen: dict[str, Any], stops: list[str]
    ) -> dict[int, str]:
        texts = self.pipeline.generate([p for _, p, _ in prepared], [v for _, _, v in prepared], stop=stops, **gen)
        return {i: t for (i, _, _), t in zip(prepared, texts)}

    # ------------------------------------------------------------------------------------------
    # loglikelihood
    # ------------------------------------------------------------------------------------------

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` per request (natural log, summed over tokens).

        ``args = (context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)``; the
        continuation is tokenised on its own and appended after the generation prompt (as
        :meth:`SR3DPipeline.score`). A request whose input fails gets ``(-inf, False)``.
        """
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        self._preflight(requests)
        batches = self._ordered_batches(requests, lambda args: (args[4], args[5]))
        pbar = tqdm(total=len(requests), disable=self.rank != 0, desc="sr3d scoring")
        for batch in batches:
            prepared: list[tuple[int, str, Any, list[int]]] = []
            for i in batch:
                context, cont, _, doc_id, task, split = requests[i].args
                doc = None
                try:
                    doc, visual = self._build(task, split, doc_id)
                    if callable(cont):
                        cont = cont(doc)
                    if isinstance(cont, list):
                        cont = cont[0] if cont else ""
                    ids = self.tokenizer(str(cont), add_special_tokens=False)["input_ids"]
                    prepared.append((i, self._prompt(context, visual), visual, list(ids)))
                except Exception as exc:
                    self._record_failure(task, split, doc_id, doc, exc)
                    results[i] = (float("-inf"), False)
            for item in prepared:
                if not item[3]:
                    results[item[0]] = (0.0, True)
            scored = [p for p in prepared if p[3]]
            if scored:
                try:
                    results_batch = self._loglik_batch(scored)
                except Exception:
                    results_batch = {}
                    for item in scored:
                        try:
                            results_batch.update(self._loglik_batch([item]))
                        except Exception as exc:
                            _, _, _, doc_id, task, split = requests[item[0]].args
                            self._record_failure(task, split, doc_id, None, exc)
                            results_batch[item[0]] = (float("-inf"), False)
                for i, r in results_batch.items():
                    results[i] = r
            pbar.update(len(batch))
        pbar.close()
        return [r if r is not None else (float("-inf"), False) for r in results]

    def _loglik_batch(self, prepared: list[tuple[int, str, Any, list[int]]]) -> dict[int, tuple[float, bool]]:
        batch = self.processor([p for _, p, _, _ in prepared], [v for _, _, v, _ in prepared], padding_side="left")
        scores = self.pipeline.score(batch, [cont for _, _, _, cont in prepared])
        return {i: (s.logprob, s.greedy) for (i, _, _, _), s in zip(prepared, scores)}

    # ------------------------------------------------------------------------------------------
    # multi-round generation
    # ------------------------------------------------------------------------------------------

    def generate_until_multi_round(self, requests: list[Instance]) -> list[Any]:
        """Multi-turn answers; ``args = (context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split)``.

        Round 0 answers ``context``. Each later round calls ``doc_to_text(doc, previous_output=[answers
        so far], round_idx=r, previous_round_info=info)``, which returns ``(visuals, context,
        terminal, round_results, info)`` as in lmms-eval's built-in models; the conversation (same
        visual input) continues until ``terminal``. Returns per request ``round_results`` of the
        terminal call when given, else the list of answers. Requests run one at a time.
        """
        results: list[Any] = []
        pbar = tqdm(total=len(requests), disable=self.rank != 0, desc="sr3d multi-round")
        for req in requests:
            context, gen_kwargs, _, doc_to_text, doc_id, task, split = req.args
            answers: list[str] = []
            doc = None
            try:
                doc, visual = self._build(task, split, doc_id)
                gen, stops = self._gen_kwargs(gen_kwargs)
                history: list[tuple[str, str]] = []
                info = None
                final: Any = None
                round_idx = 0
                while True:
                    if round_idx > 0:
                        step = doc_to_text(
                            doc, previous_output=list(answers), round_idx=round_idx, previous_round_info=info
                        )
                        _, context, terminal, round_res, info = step
                        if terminal:
                            final = round_res
                            break
                    prompt = self._prompt(context, visual, history)
                    text = self._generate_batch([(0, prompt, visual)], gen, stops)[0]
                    history.append((context, text))
                    answers.append(text)
                    round_idx += 1
                    if round_idx > 64:
                        raise SR3DInputError(f"{task} doc {doc_id}: more than 64 rounds without a terminal signal")
                results.append(final if final is not None else answers)
            except Exception as exc:
                self._record_failure(task, split, doc_id, doc, exc)
                results.append(answers or [""])
            pbar.update(1)
        pbar.close()
        return results
