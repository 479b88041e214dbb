"""Annotation records read by the evaluation tasks and by ``sr3d metrics`` (SR3D-FACTS §8).

Layout
------
One JSON-Lines file per task and split::

    <data_dir>/<task>/<split>.jsonl        task ∈ {scanqa, sqa3d, scan2cap, vsibench}

Each line is one JSON object (one question, or one object to caption for Scan2Cap). The order of
the lines is the order of the lmms-eval documents, so an lmms-eval ``doc_id`` is the 0-based index
of a record among the non-blank lines.

Fields
------
Common to every task:

``question_id`` (str, required)
    Unique within the file. Predictions refer to records by this id.
``scene_id`` (str, required)
    ScanNet scene (``scene0011_00``) or, for VSI-Bench, the video's scene name.
``question`` (str)
    Required for scanqa, sqa3d and vsibench unless the record carries a ready ``prompt`` (str);
    optional for scan2cap (the task builds the captioning prompt from the object).

Per task:

scanqa
    ``answers`` (list[str], non-empty): every reference answer.
sqa3d
    ``situation`` (str); ``answers`` (list[str], non-empty); ``question_type`` (optional, one of
    what/is/how/can/which/others — derived from the question's first word when absent, see
    :func:`sr3d_plugin.evaluation.metrics.sqa3d_question_type`).
scan2cap
    ``object_id`` (str or int); ``object_name`` (str); ``references`` (list[str], non-empty: all
    ScanRefer descriptions of the object). For the @0.5IoU scores either ``gt_box`` **and**
    ``pred_box`` — each ``[cx, cy, cz, dx, dy, dz]`` (axis-aligned centre and full size, metres) or
    ``{"center": [3], "size": [3]}`` — or a precomputed ``iou`` in [0, 1]. Without them only the
    plain caption scores are reported. Recommended id: ``"<scene_id>|<object_id>|<object_name>"``
    (the key of the official Scan2Cap corpus).
vsibench
    ``question_type`` (one of :data:`VSIBENCH_QUESTION_TYPES`); ``options`` (list[str]; non-empty
    for the multiple-choice types, may be empty for the numeric ones); ``ground_truth`` (str: the
    option letter for multiple-choice types, a positive number for numeric types — a JSON number
    is accepted there too); ``dataset`` (scannet / scannetpp / arkitscenes); ``video`` (str: path
    of the video, relative to ``<data_dir>`` or absolute).

An optional field set to ``null`` counts as absent (Hugging Face ``datasets`` fills keys missing
from some lines with None). Any other field is allowed and ignored here (the data-preparation step adds scene, frame and region
fields). To extend the schema, add a :class:`FieldSpec` to :data:`TASK_FIELDS`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from sr3d_plugin.errors import SR3DInputError

__all__ = [
    "SCHEMA_VERSION",
    "SQA3D_QUESTION_TYPES",
    "TASKS",
    "TASK_FIELDS",
    "VSIBENCH_DATASETS",
    "VSIBENCH_MC_TYPES",
    "VSIBENCH_NUMERIC_TYPES",
    "VSIBENCH_QUESTION_TYPES",
    "FieldSpec",
    "SQA3DRecord",
    "Scan2CapRecord",
    "ScanQARecord",
    "VSIBenchRecord",
    "box_from_record",
    "check_task",
    "load_records",
    "record_label",
    "records_path",
    "validate_record",
    "validate_records",
]

SCHEMA_VERSION = 1

#: evaluation tasks that have a record format (and a scorer)
TASKS: tuple[str, ...] = ("scanqa", "sqa3d", "scan2cap", "vsibench")

#: SQA3D question types, in the reference's order (SR3D-FACTS §8)
SQA3D_QUESTION_TYPES: tuple[str, ...] = ("what", "is", "how", "can", "which", "others")

#: VSI-Bench multiple-choice types (scored by first-token accuracy)
VSIBENCH_MC_TYPES: tuple[str, ...] = (
    "object_rel_direction_easy",
    "object_rel_direction_medium",
    "object_rel_direction_hard",
    "object_rel_distance",
    "route_planning",
    "obj_appearance_order",
)
#: VSI-Bench numeric types (scored by mean relative accuracy)
VSIBENCH_NUMERIC_TYPES: tuple[str, ...] = (
    "object_abs_distance",
    "object_counting",
    "object_size_estimation",
    "room_size_estimation",
)
VSIBENCH_QUESTION_TYPES: tuple[str, ...] = VSIBENCH_MC_TYPES + VSIBENCH_NUMERIC_TYPES
VSIBENCH_DATASETS: tuple[str, ...] = ("scannet", "scannetpp", "arkitscenes")


# --------------------------------------------------------------------------- typed views (docs)
class _Common(TypedDict):
    question_id: str
    scene_id: str


class ScanQARecord(_Common, total=False):
    """One ScanQA question (``answers`` required; ``question`` or ``prompt`` required)."""

    question: str
    prompt: str
    answers: list[str]


class SQA3DRecord(_Common, total=False):
    """One SQA3D question (``situation`` and ``answers`` required; ``question_type`` optional)."""

    question: str
    prompt: str
    situation: str
    answers: list[str]
    question_type: str


class Scan2CapRecord(_Common, total=False):
    """One ScanRefer object to caption (``object_id``, ``object_name``, ``references`` required)."""

    object_id: str | int
    object_name: str
    references: list[str]
    gt_box: list[float] | dict[str, list[float]]
    pred_box: list[float] | dict[str, list[float]]
    iou: float
    question: str
    prompt: str


class VSIBenchRecord(_Common, total=False):
    """One VSI-Bench question (all fields below required; ``options`` may be empty if numeric)."""

    question: str
    prompt: str
    question_type: str
    options: list[str]
    ground_truth: str
    dataset: str
    video: str


# --------------------------------------------------------------------------- field table
@dataclass(frozen=True)
class FieldSpec:
    """One field of a record: ``check(value) -> problem or None`` and whether it must be present."""

    name: str
    check: Callable[[Any], str | None]
    required: bool = True
    help: str = ""


def _is_str(v: Any) -> str | None:
    return None if isinstance(v, str) else f"expected a string, got {type(v).__name__}"


def _is_nonempty_str(v: Any) -> str | None:
    if not isinstance(v, str):
        return f"expected a non-empty string, got {type(v).__name__}"
    return None if v.strip() else "expected a non-empty string, got an empty one"


def _is_str_list(nonempty: bool) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if not isinstance(v, list):
            return f"expected a list of strings, got {type(v).__name__}"
        if nonempty and not v:
            return "expected at least one string, got an empty list"
        for i, item in enumerate(v):
            if not isinstance(item, str):
                return f"item {i} is {type(item).__name__}, expected a string"
        return None

    return check


def _one_of(choices: Sequence[str]) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in choices else f"got {v!r}, expected one of {', '.join(choices)}"

    return check


def _is_object_id(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        return f"expected a string or an integer, got {type(v).__name__}"
    return None


def _is_box(v: Any) -> str | None:
    try:
        _box_values(v)
    except ValueError as exc:
        return str(exc)
    return None


def _is_iou(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return f"expected a number in [0, 1], got {type(v).__name__}"
    if not (0.0 <= float(v) <= 1.0):
        return f"expected a number in [0, 1], got {v!r}"
    return None


TASK_FIELDS: dict[str, tuple[FieldSpec, ...]] = {
    "scanqa": (FieldSpec("answers", _is_str_list(nonempty=True), help="reference answers"),),
    "sqa3d": (
        FieldSpec("situation", _is_str, help="situation text"),
        FieldSpec("answers", _is_str_list(nonempty=True), help="reference answers"),
        FieldSpec("question_type", _one_of(SQA3D_QUESTION_TYPES), required=False, help="question bucket"),
    ),
    "scan2cap": (
        FieldSpec("object_id", _is_object_id, help="ScanNet instance id"),
        FieldSpec("object_name", _is_str, help="ScanNet category name"),
        FieldSpec("references", _is_str_list(nonempty=True), help="reference descriptions"),
        FieldSpec("gt_box", _is_box, required=False, help="[cx, cy, cz, dx, dy, dz] ground-truth box"),
        FieldSpec("pred_box", _is_box, required=False, help="[cx, cy, cz, dx, dy, dz] predicted box"),
        FieldSpec("iou", _is_iou, required=False, help="precomputed IoU of pred_box with gt_box"),
    ),
    "vsibench": (
        FieldSpec("question_type", _one_of(VSIBENCH_QUESTION_TYPES), help="VSI-Bench question type"),
        FieldSpec("options", _is_str_list(nonempty=False), help="answer options ('A. …')"),
        FieldSpec("ground_truth", lambda v: None, help="option letter or number"),  # checked below
        FieldSpec("dataset", _one_of(VSIBENCH_DATASETS), help="source data set of the video"),
        FieldSpec("video", _is_nonempty_str, help="video path"),
    ),
}

_QUESTION_REQUIRED = {"scanqa": True, "sqa3d": True, "scan2cap": False, "vsibench": True}


# --------------------------------------------------------------------------- helpers
def check_task(task: str) -> str:
    """Return ``task`` if it is a known evaluation task, else raise :class:`SR3DInputError`."""
    if task not in TASKS:
        raise SR3DInputError(f"unknown evaluation task {task!r}; expected one of {', '.join(TASKS)}")
    return task


def record_label(rec: Any, index: int | None = None) -> str:
    """How error messages name a record: its position and its ``question_id`` when it has one."""
    label = "record" if index is None else f"record #{index}"
    if isinstance(rec, Mapping) and isinstance(rec.get("question_id"), str):
        label += f" (question_id {rec['question_id']!r})"
    return label


def _box_values(v: Any) -> tuple[float, float, float, float, float, float]:
    if isinstance(v, Mapping):
        if "center" not in v or "size" not in v:
            raise ValueError(f"a box mapping needs 'center' and 'size', got keys {sorted(v)}")
        center, size = v["center"], v["size"]
        if not (isinstance(center, (list, tuple)) and isinstance(size, (list, tuple))):
            raise ValueError("box 'center' and 'size' must be lists of 3 numbers")
        if len(center) != 3 or len(size) != 3:
            raise ValueError(f"box 'center' and 'size' need 3 numbers each, got {len(center)} and {len(size)}")
        flat = list(center) + list(size)
    elif isinstance(v, (list, tuple)):
        if len(v) != 6:
            raise ValueError(f"expected a box [cx, cy, cz, dx, dy, dz] (6 numbers), got {len(v)} values")
        flat = list(v)
    else:
        raise ValueError(f"expected a box [cx, cy, cz, dx, dy, dz] or {{'center','size'}}, got {type(v).__name__}")
    out = []
    for x in flat:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise ValueError(f"box values must be finite numbers, got {x!r}")
        out.append(float(x))
    if min(out[3:]) < 0:
        raise ValueError(f"box sizes must be >= 0, got {out[3:]}")
    return tuple(out)  # type: ignore[return-value]


def box_from_record(value: Any) -> tuple[float, float, float, float, float, float]:
    """A box field as ``(cx, cy, cz, dx, dy, dz)`` floats (centre and full size, metres)."""
    try:
        return _box_values(value)
    except ValueError as exc:
        raise SR3DInputError(str(exc)) from None


def _vsibench_ground_truth_problem(rec: Mapping[str, Any]) -> str | None:
    gt = rec.get("ground_truth")
    qtype = rec.get("question_type")
    if qtype in VSIBENCH_MC_TYPES:
        if not isinstance(gt, str) or not gt.strip():
            return f"expected the option letter as a non-empty string, got {gt!r}"
        if not rec.get("options"):
            return None  # reported on the 'options' field
        return None
    if qtype in VSIBENCH_NUMERIC_TYPES:
        if isinstance(gt, bool):
            return f"expected a positive number, got {gt!r}"
        if isinstance(gt, str):
            try:
                value = float(gt)
            except ValueError:
                return f"expected a positive number (as a string), got {gt!r}"
        elif isinstance(gt, (int, float)):
            value = float(gt)
        else:
            return f"expected a positive number, got {type(gt).__name__}"
        if not math.isfinite(value) or value <= 0:
            return f"expected a positive finite number, got {gt!r}"
    return None


def validate_record(task: str, rec: Any, index: int | None = None) -> None:
    """Check one record of ``task`` against the schema; raise :class:`SR3DInputError` if it is bad.

    The message names the record (``question_id`` and position ``index`` when given) and the field.
    Unknown extra fields are allowed.
    """
    check_task(task)
    label = record_label(rec, index)
    if not isinstance(rec, Mapping):
        raise SR3DInputError(f"{label}: expected a JSON object, got {type(rec).__name__}")

    def bad(field: str, problem: str) -> SR3DInputError:
        return SR3DInputError(f"{task} {label}: field {field!r}: {problem}")

    for name in ("question_id", "scene_id"):
        if name not in rec:
            raise bad(name, "missing")
        problem = _is_nonempty_str(rec[name])
        if problem:
            raise bad(name, problem)
    for name in ("question", "prompt"):
        if rec.get(name) is not None and (problem := _is_str(rec[name])):
            raise bad(name, problem)
    if _QUESTION_REQUIRED[task] and rec.get("question") is None and rec.get("prompt") is None:
        raise bad("question", "missing (give 'question' or a ready 'prompt')")

    for spec in TASK_FIELDS[task]:
        if rec.get(spec.name) is None:  # absent, or None as `datasets` fills absent JSON keys
            if spec.required:
                raise bad(spec.name, f"missing ({spec.help})" if spec.help else "missing")
            continue
        problem = spec.check(rec[spec.name])
        if problem:
            raise bad(spec.name, problem)

    if task == "vsibench":
        if rec["question_type"] in VSIBENCH_MC_TYPES and not rec["options"]:
            raise bad("options", f"a multiple-choice question ({rec['question_type']}) needs options")
        problem = _vsibench_ground_truth_problem(rec)
        if problem:
            raise bad("ground_truth", problem)
    elif task == "sqa3d":
        if rec.get("question_type") is None and rec.get("question") is None:
            raise bad("question_type", "missing, and there is no 'question' to derive it from")
    elif task == "scan2cap":
        has_gt, has_pred = rec.get("gt_box") is not None, rec.get("pred_box") is not None
        if has_gt != has_pred:
            missing = "pred_box" if has_gt else "gt_box"
            raise bad(missing, "missing (gt_box and pred_box go together; or give a precomputed 'iou')")


def validate_records(task: str, records: Sequence[Any]) -> None:
    """Validate every record and check that question ids are unique (error names both positions)."""
    check_task(task)
    if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Sequence):
        raise SR3DInputError(f"{task}: expected a list of records, got {type(records).__name__}")
    seen: dict[str, int] = {}
    for i, rec in enumerate(records):
        validate_record(task, rec, i)
        qid = rec["question_id"]
        if qid in seen:
            raise SR3DInputError(
                f"{task}: duplicate question_id {qid!r} in record #{seen[qid]} and record #{i}; ids must be unique"
            )
        seen[qid] = i


def records_path(data_dir: str | os.PathLike, task: str, split: str) -> Path:
    """``<data_dir>/<task>/<split>.jsonl``."""
    check_task(task)
    if not split or "/" in split or "\\" in split or split in (".", ".."):
        raise SR3DInputError(f"bad split name {split!r}; expected a plain name such as 'val' or 'test'")
    return Path(data_dir) / task / f"{split}.jsonl"


def load_records(path: str | os.PathLike, task: str, validate: bool = True) -> list[dict[str, Any]]:
    """Read a task's JSONL annotation file (blank lines skipped) and validate it.

    Errors name the file and line number. Returns the records in file order.
    """
    check_task(task)
    path = Path(path)
    if not path.is_file():
        raise SR3DInputError(f"annotation file {str(path)!r} not found (expected <data_dir>/{task}/<split>.jsonl)")
    from sr3d_plugin.limits import MAX_RECORD_BYTES, iter_json_records

    records: list[dict[str, Any]] = []
    for lineno, rec, problem in iter_json_records(path, MAX_RECORD_BYTES):  # a line is never read past the limit
        if problem is not None:
            raise SR3DInputError(f"{path}:{lineno}: {problem}")
        if not isinstance(rec, dict):
            raise SR3DInputError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    if validate:
        try:
            validate_records(task, records)
        except SR3DInputError as exc:
            raise SR3DInputError(f"{path}: {exc}") from None
    return records


#: the split each benchmark is evaluated on (the task YAMLs' ``test_split``, the converters' default)
DEFAULT_SPLITS: dict[str, str] = {"scanqa": "val", "sqa3d": "test", "scan2cap": "val", "vsibench": "test"}


def default_split(task: str) -> str:
    """The evaluation split of ``task``: ``val`` for ScanQA and Scan2Cap, ``test`` for SQA3D and VSI-Bench."""
    return DEFAULT_SPLITS[check_task(task)]
