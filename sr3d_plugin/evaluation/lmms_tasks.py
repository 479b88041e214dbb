"""The logic behind the lmms-eval task folders in ``eval_tasks/`` (their ``utils.py`` files only import it).

Tasks: ``sr3d_scanqa``, ``sr3d_sqa3d``, ``sr3d_scan2cap``, ``sr3d_vsibench`` and the group ``sr3d_3d``
(the ``sr3d_`` prefix keeps them clear of lmms-eval's built-in names, which would win a clash).

Data location
-------------
Each task reads ``<DATA>/<task>/<split>.jsonl`` (:mod:`sr3d_plugin.evaluation.schema`, written by
``sr3d prepare``) where ``<DATA>`` is the environment variable ``SR3D_DATA`` (``sr3d eval --data DIR``
sets it), else ``dataset_kwargs.data_dir`` of the task YAML. The split is the YAML's ``test_split``.
Records are validated when the task loads (schema, visual files present, one ``<mask>`` per region),
so a bad record stops the run before any inference, with an error naming it. Nothing is downloaded.

Prompts
-------
Prompt texts live in each YAML's ``lmms_eval_specific_kwargs.default`` and are versioned by
``metadata.prompt_version``; both are echoed in lmms-eval's results (``configs``). A record with a
ready ``prompt`` field is asked verbatim.

Scoring
-------
``process_results`` keeps ``{question_id, prediction, records}`` per document; every metric's
aggregation calls :func:`sr3d_plugin.evaluation.scoring.score_task` on the collected predictions
(its cache makes the metrics of one task share a single scoring run and one METEOR process), so
the numbers equal ``sr3d metrics`` on the logged samples. Aggregation never raises (that would
lose the finished predictions): a scoring error is logged and the metric is reported as N/A.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sr3d_plugin.errors import SR3DConfigError, SR3DInputError
from sr3d_plugin.evaluation.prompts import TASK_NAMES, doc_to_text, task_prompt_kwargs
from sr3d_plugin.evaluation.record_inputs import DATA_DIR_FIELD, resolve_record_path
from sr3d_plugin.evaluation.schema import (
    SCHEMA_VERSION,
    TASKS,
    box_from_record,
    load_records,
    record_label,
    records_path,
)
from sr3d_plugin.io_utils import stable_hash

__all__ = [
    "DATA_ENV",
    "GROUP_NAME",
    "RECORDS_FIELD",
    "TASK_NAMES",
    "aggregate",
    "data_dir",
    "doc_to_text",
    "doc_to_visual",
    "metric_function_name",
    "metric_names",
    "process_results",
    "task_class",
    "task_prompt_kwargs",
]

#: environment variable naming the prepared data folder
DATA_ENV = "SR3D_DATA"
#: the group that runs all four
GROUP_NAME = "sr3d_3d"
#: field added to every document: the absolute records file (aggregation reads scoring fields from it)
RECORDS_FIELD = "sr3d_records_file"
#: extra metric: predictions that were empty or not text (failed inputs end up here), scored as wrong
EMPTY_METRIC = "empty_predictions"

_MASK = "<mask>"


# ----------------------------------------------------------------------------------------------
# data folder and records
# ----------------------------------------------------------------------------------------------


def data_dir(configured: Any = None) -> Path:
    """The prepared data folder: ``$SR3D_DATA``, else ``configured`` (the YAML's ``dataset_kwargs.data_dir``)."""
    value = os.environ.get(DATA_ENV) or configured
    if not value:
        raise SR3DConfigError(
            f"the sr3d evaluation tasks read prepared data from ${DATA_ENV}; set {DATA_ENV}=<folder written by "
            "`sr3d prepare`> (or run `sr3d eval --data DIR`)"
        )
    p = Path(str(value)).expanduser().resolve()
    if not p.is_dir():
        raise SR3DConfigError(f"{DATA_ENV}={str(value)!r} is not a folder; expected the output of `sr3d prepare`")
    return p


def _normalise(task: str, rec: dict[str, Any]) -> dict[str, Any]:
    """One Arrow-friendly type per field (``datasets`` needs a column to have one type)."""
    out = dict(rec)
    if task == "vsibench":
        out["ground_truth"] = str(out["ground_truth"])
        out["options"] = list(out.get("options") or [])
    if task == "scan2cap":
        out["object_id"] = str(out["object_id"])
        for name in ("gt_box", "pred_box"):
            if out.get(name) is not None:
                out[name] = list(box_from_record(out[name]))
        if out.get("iou") is not None:
            out["iou"] = float(out["iou"])
    return out


def _check_visual(task: str, records: list[dict[str, Any]], root: Path, prompts: list[str]) -> None:
    """Every record names an existing scene folder or video, and has one region per ``<mask>``."""
    missing: dict[str, list[str]] = {}
    checked: dict[Path, bool] = {}
    for i, (rec, prompt) in enumerate(zip(records, prompts)):
        label = record_label(rec, i)
        kind = next((k for k in ("scene", "video") if rec.get(k) is not None), None)
        if kind is None:
            want = "'video' file" if task == "vsibench" else "'scene' folder"
            raise SR3DInputError(f"{task} {label}: no {want}; prepare the data with `sr3d prepare`")
        path = resolve_record_path(rec[kind], root, kind, f"{task} {label}")
        if path not in checked:
            checked[path] = path.is_dir() if kind == "scene" else path.is_file()
        if not checked[path]:
            missing.setdefault(f"{kind} {str(path)!r}", []).append(label)
        regions = rec.get("regions") or []
        if not isinstance(regions, list):
            raise SR3DInputError(f"{task} {label}: 'regions' must be a list, got {type(regions).__name__}")
        n_masks = prompt.count(_MASK)
        if n_masks != len(regions):
            raise SR3DInputError(
                f"{task} {label}: the prompt has {n_masks} {_MASK} token(s) but the record has {len(regions)} "
                f"region(s); expected one region per {_MASK}"
            )
    if missing:
        shown = "; ".join(
            f"{what} (used by {', '.join(labels[:2])}{' …' if len(labels) > 2 else ''})"
            for what, labels in list(missing.items())[:5]
        )
        raise SR3DInputError(
            f"{task}: {len(missing)} visual input(s) not found: {shown}"
            + (" …" if len(missing) > 5 else "")
            + "; prepare the scenes/videos with `sr3d prepare` or fix the paths"
        )


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _task_class(base: type) -> type:
    class SR3DTask(base):  # type: ignore[misc, valid-type]
        """A ``ConfigurableTask`` whose documents come from the prepared JSONL records (module docstring)."""

        SR3D_TASK = ""

        def __init__(self, config: dict[str, Any] | None = None, model_name: str | None = None, **kwargs: Any) -> None:
            config = {k: v for k, v in dict(config or {}).items() if k != "class"}
            super().__init__(config=config, model_name=model_name, **kwargs)

        def download(self, dataset_kwargs: dict[str, Any] | None = None) -> None:
            import datasets

            task = self.SR3D_TASK
            split = self.config.test_split
            if not split:
                raise SR3DConfigError(f"{TASK_NAMES[task]}: the task YAML needs test_split")
            root = data_dir((dataset_kwargs or {}).get("data_dir"))
            path = records_path(root, task, split).resolve()
            records = load_records(path, task)
            if not records:
                raise SR3DInputError(f"{path} holds no records; nothing to evaluate")
            kwargs = self.lmms_eval_specific_kwargs or {}
            prompts = [doc_to_text(task, rec, kwargs) for rec in records]
            _check_visual(task, records, root, prompts)
            rows = []
            for rec in records:
                row = _normalise(task, rec)
                row[DATA_DIR_FIELD] = str(root)
                row[RECORDS_FIELD] = str(path)
                rows.append(row)
            keys: dict[str, None] = {}
            for row in rows:  # `from_list` keeps only the first row's keys: give every row every key
                keys.update(dict.fromkeys(row))
            rows = [{k: row.get(k) for k in keys} for row in rows]
            try:
                ds = datasets.Dataset.from_list(rows)
            except Exception as exc:  # pyarrow type clashes between records
                raise SR3DInputError(
                    f"{path}: records cannot be put in one table ({type(exc).__name__}: {exc}); "
                    "a field has different types in different records"
                ) from exc
            self.dataset = datasets.DatasetDict({split: ds})
            self.dataset_no_image = self.dataset
            self.DATASET_PATH = str(path)
            self.config.dataset_path = str(path)
            meta = self.config.metadata if isinstance(self.config.metadata, dict) else {}
            meta.update(
                {
                    "data_file": str(path),
                    "data_sha256": _file_sha256(path),
                    "records": len(records),
                    "schema_version": SCHEMA_VERSION,
                }
            )
            self.config.metadata = meta
            _RECORDS.put(path, records)
            if task in _CAPTION_TASKS and int(os.environ.get("RANK", "0") or 0) == 0:
                shared_scorers()  # rank 0 aggregates: let METEOR's Java start during inference

    return SR3DTask


_CLASSES: dict[str, type] = {}
_CLASS_LOCK = threading.Lock()


def task_class(task: str) -> type:
    """The ``ConfigurableTask`` subclass of one schema task (created once; lmms-eval is imported here)."""
    if task not in TASKS:
        raise SR3DConfigError(f"unknown sr3d task {task!r}; expected one of {', '.join(TASKS)}")
    with _CLASS_LOCK:
        if task not in _CLASSES:
            from lmms_eval.api.task import ConfigurableTask

            base = _task_class(ConfigurableTask)
            cls = type(f"SR3D{task.capitalize()}Task", (base,), {"SR3D_TASK": task, "__module__": __name__})
            _CLASSES[task] = cls
        return _CLASSES[task]


class _RecordStore:
    """Records per file (reloaded when the file changes), for aggregation."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, tuple[tuple[int, int], list[dict[str, Any]], dict[str, int]]] = {}

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int]:
        st = path.stat()
        return st.st_mtime_ns, st.st_size

    def put(self, path: Path, records: list[dict[str, Any]]) -> None:
        with self._lock:
            self._data[str(path)] = (self._stamp(path), records, {r["question_id"]: i for i, r in enumerate(records)})

    def get(self, path: str, task: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
        p = Path(path)
        with self._lock:
            hit = self._data.get(str(p))
            if hit is not None and p.is_file() and hit[0] == self._stamp(p):
                return hit[1], hit[2]
        records = load_records(p, task)
        self.put(p, records)
        return records, {r["question_id"]: i for i, r in enumerate(records)}


_RECORDS = _RecordStore()


# ----------------------------------------------------------------------------------------------
# visuals (the prompts live in sr3d_plugin.evaluation.prompts)
# ----------------------------------------------------------------------------------------------


def doc_to_visual(doc: Mapping[str, Any], kwargs: Mapping[str, Any] | None = None) -> list[Any]:
    """Visuals for models other than ``sr3d`` (which reads the record itself): the video path, or
    ``num_frames`` (default 32) uniformly sampled colour frames of the scene as PIL images."""
    label = record_label(doc)
    root = doc.get(DATA_DIR_FIELD)
    if doc.get("video") is not None:
        return [str(resolve_record_path(doc["video"], root, "video", label))]
    from sr3d_plugin.sources.base import uniform_frame_indices
    from sr3d_plugin.sources.files import IMAGE_SUFFIXES, load_rgb
    from sr3d_plugin.sources.scannet import numbered_files

    scene = resolve_record_path(doc["scene"], root, "scene", label)
    colors = numbered_files(scene / "color", IMAGE_SUFFIXES, "colour")
    order = sorted(colors)
    n = int((kwargs or {}).get("num_frames", 32))
    return [load_rgb(colors[order[i]], "colour frame") for i in uniform_frame_indices(len(order), n)]


# ----------------------------------------------------------------------------------------------
# results and aggregation
# ----------------------------------------------------------------------------------------------


def metric_names(task: str) -> tuple[str, ...]:
    """The lmms-eval metrics of a task: :func:`~sr3d_plugin.evaluation.scoring.score_keys` + ``empty_predictions``."""
    from sr3d_plugin.evaluation.scoring import score_keys

    return (*score_keys(task), EMPTY_METRIC)


def metric_function_name(metric: str) -> str:
    """``"CIDEr@0.5IoU"`` → ``"aggregate_cider_0_5iou"`` (the ``utils.py`` attribute named in the YAML)."""
    return "aggregate_" + re.sub(r"[^0-9a-z]+", "_", metric.lower()).strip("_")


def process_results(task: str, doc: Mapping[str, Any], results: list[Any]) -> dict[str, Any]:
    """One small item per metric: ``{"question_id", "prediction", "records"}`` (never raises)."""
    pred: Any = results[0] if results else ""
    while isinstance(pred, (list, tuple)):  # multi-round answers: the last one
        pred = pred[-1] if pred else ""
    item = {"question_id": str(doc.get("question_id")), "prediction": pred, "records": doc.get(RECORDS_FIELD)}
    return {m: item for m in metric_names(task)}


_NOTED: set[str] = set()
_SCORERS: Any = None
_SCORERS_LOCK = threading.Lock()
#: tasks scored with the caption metrics (METEOR runs on Java)
_CAPTION_TASKS = ("scanqa", "scan2cap")


def shared_scorers() -> Any:
    """One :class:`~sr3d_plugin.evaluation.metrics.CaptionScorers` for the whole lmms-eval process.

    Created when a caption task loads, so METEOR's Java process starts while the model runs; closed
    at exit.
    """
    global _SCORERS
    with _SCORERS_LOCK:
        if _SCORERS is None:
            import atexit

            from sr3d_plugin.evaluation.metrics import CaptionScorers

            _SCORERS = CaptionScorers(meteor=True)
            atexit.register(_SCORERS.close)
        return _SCORERS


def aggregate(task: str, metric: str, items: list[Any]) -> float | None:
    """lmms-eval aggregation of one metric of ``task`` over the per-document items (``None`` when it cannot be computed).

    Each task folder's ``utils.py`` binds one ``aggregate_<metric>`` function per metric to this
    (named by :func:`metric_function_name`); the items are what :func:`process_results` returned.
    """
    if metric not in metric_names(task):
        raise SR3DConfigError(
            f"{TASK_NAMES[task]} has no metric {metric!r}; expected one of {list(metric_names(task))}"
        )
    from loguru import logger as eval_logger

    from sr3d_plugin.evaluation.scoring import score_task

    try:
        predictions: dict[str, Any] = {}
        chosen: list[tuple[int, dict[str, Any]]] = []
        duplicates = 0
        for item in items:
            if not isinstance(item, Mapping) or "question_id" not in item or not item.get("records"):
                raise SR3DInputError(f"{TASK_NAMES[task]}: a per-document result is malformed: {item!r}")
            records, by_id = _RECORDS.get(str(item["records"]), task)
            qid = str(item["question_id"])
            if qid not in by_id:
                raise SR3DInputError(
                    f"{TASK_NAMES[task]}: prediction for unknown question_id {qid!r} ({item['records']})"
                )
            if qid in predictions:
                duplicates += 1
                continue
            predictions[qid] = item.get("prediction")
            chosen.append((by_id[qid], records[by_id[qid]]))
        chosen.sort(key=lambda x: x[0])  # file order, as `sr3d metrics` reads them
        scorers = shared_scorers() if task in _CAPTION_TASKS else None
        result = score_task(task, predictions, [r for _, r in chosen], cache=True, scorers=scorers)
        key = f"{task}:" + stable_hash(sorted(predictions.items(), key=lambda kv: kv[0]))
        if key not in _NOTED:
            _NOTED.add(key)
            for note in result["notes"]:
                eval_logger.warning(f"{TASK_NAMES[task]}: {note}")
            if duplicates:
                eval_logger.warning(f"{TASK_NAMES[task]}: {duplicates} duplicate prediction(s) ignored (first kept)")
        if metric == EMPTY_METRIC:
            c = result["counts"]
            return float(c["empty"] + c["invalid"] + c["missing"])
        value = result["scores"].get(metric)
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
    except Exception as exc:  # never lose the finished predictions
        eval_logger.error(
            f"{TASK_NAMES[task]}: metric {metric} could not be computed ({type(exc).__name__}: {exc}); the "
            "predictions are in the samples log (--log_samples) and can be scored with `sr3d metrics`"
        )
        return None
