"""Evaluation pre-flight: before a model loads, check that every selected task can run.

For each task (``scanqa``, ``sqa3d``, ``scan2cap``, ``vsibench``; lmms-eval names ``sr3d_<task>`` and the
group ``sr3d_3d`` accepted) :func:`preflight` checks, without loading a model or decoding a frame:

* the prepared records ``<data>/<task>/<split>.jsonl`` exist (split: the task YAML's ``test_split``)
  and pass the schema (:func:`sr3d_plugin.evaluation.schema.load_records`);
* every record's scene folder / video file exists, and its prompt has one ``<mask>`` per region;
* every record has a **geometry source** for the 3D positions, following the rule of
  :class:`~sr3d_plugin.evaluation.record_inputs.RecordInputBuilder`: a point-map file (``points``
  field, or ``<pointmap_dir>/[<dataset>/]<scene_id>.npz|.npy``), or the scene's depth maps
  (``depth/`` + ``pose/`` of a ScanNet-layout scene; videos have none), or a depth model that can be loaded
  here (a local folder, or a hub id already in the Hugging Face cache — or any hub id when the
  hub may be contacted).

A task that fails a check cannot give meaningful answers (without geometry every question of
VSI-Bench offline ended in an empty answer and an overall score of 0): ``sr3d eval`` skips it and
lists it (default) or refuses to start (``strict``); :meth:`PreflightReport.raise_if_failed` names what is
missing and what to provide. A model without the 3D positional encoding
(``use_position_encoding: false``) needs no geometry source.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sr3d_plugin.errors import SR3DConfigError, SR3DInputError

__all__ = [
    "PreflightReport",
    "TaskCheck",
    "check_documents",
    "depth_model_available",
    "model_depth_model",
    "model_needs_positions",
    "preflight",
    "task_split",
]

#: problems shown per task in a message
SHOWN = 5
_POINT_SUFFIXES = (".npz", ".npy")


@dataclass
class TaskCheck:
    """The pre-flight of one task: ``ok``, else ``problems`` (one line each) and ``provide`` (what to add)."""

    task: str
    split: str
    records_file: str
    records: int = 0
    problems: list[str] = field(default_factory=list)
    provide: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def lmms_name(self) -> str:
        return f"sr3d_{self.task}"

    def message(self, shown: int = SHOWN) -> str:
        lines = [f"{self.lmms_name} ({self.records_file}): " + "; ".join(self.problems[:shown])]
        if len(self.problems) > shown:
            lines[0] += f"; … and {len(self.problems) - shown} more"
        if self.provide:
            lines.append("  provide: " + "; or ".join(dict.fromkeys(self.provide)))
        return "\n".join(lines)


@dataclass
class PreflightReport:
    """Per-task outcome of :func:`preflight` (``checks`` in the order the tasks were given)."""

    data_dir: str
    checks: list[TaskCheck]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def runnable(self) -> list[str]:
        return [c.lmms_name for c in self.checks if c.ok]

    @property
    def failed(self) -> list[TaskCheck]:
        return [c for c in self.checks if not c.ok]

    def message(self) -> str:
        return "\n".join(c.message() for c in self.failed)

    def raise_if_failed(self, only_if_none_runnable: bool = False) -> None:
        """Raise :class:`~sr3d_plugin.errors.SR3DInputError` naming every task that cannot run, what
        is missing and what to provide (with ``only_if_none_runnable``: only when no task can run)."""
        if self.ok or (only_if_none_runnable and self.runnable):
            return
        head = (
            "no selected task can run"
            if not self.runnable
            else f"{len(self.failed)} of {len(self.checks)} task(s) cannot run"
        )
        raise SR3DInputError(f"evaluation pre-flight in {self.data_dir}: {head}:\n{self.message()}")


def task_split(task: str) -> str:
    """The ``test_split`` of the bundled task YAML of ``task`` (e.g. ``val`` for ScanQA, ``test`` for SQA3D)."""
    from sr3d_plugin.resources import eval_tasks_dir

    path = eval_tasks_dir() / f"sr3d_{task}" / f"sr3d_{task}.yaml"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SR3DConfigError(f"task {task!r}: cannot read its YAML {str(path)!r} ({exc})") from None
    m = re.search(r"^test_split:\s*(\S+)", text, re.MULTILINE)
    if not m:
        raise SR3DConfigError(f"task {task!r}: {str(path)!r} has no test_split")
    return m.group(1)


def expand_tasks(tasks: str | list[str]) -> tuple[list[str], list[str]]:
    """``(sr3d tasks as schema names, other names)`` of a comma-separated lmms-eval task list."""
    from sr3d_plugin.evaluation.schema import TASKS

    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    ours: list[str] = []
    other: list[str] = []
    for name in filter(None, names):
        if name == "sr3d_3d":
            ours.extend(t for t in TASKS if t not in ours)
        elif name.startswith("sr3d_") and name[5:] in TASKS:
            if name[5:] not in ours:
                ours.append(name[5:])
        else:
            other.append(name)
    return ours, other


def depth_model_available(name: str | None, offline: bool | None = None) -> tuple[bool, str]:
    """``(available, why)`` for a Depth Anything id or folder, without loading it.

    A local folder must hold a ``config.json``; a hub id counts as available when it is in the
    Hugging Face cache, or when the hub may be contacted (``offline`` False; default: not
    ``HF_HUB_OFFLINE``).
    """
    from sr3d_plugin.sources.depth_anything import DEFAULT_DEPTH_MODEL

    name = name or DEFAULT_DEPTH_MODEL
    p = Path(name).expanduser()
    if p.exists() or name.startswith((".", "/", "~")):
        if (p / "config.json").is_file():
            return True, f"local folder {str(p)!r}"
        return False, f"depth model folder {str(p)!r} has no config.json"
    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # a malformed id: not in the cache
        cached = None
    if isinstance(cached, str):
        return True, f"{name!r} in the Hugging Face cache"
    if not offline:
        return True, f"{name!r} (downloaded from the hub when first used)"
    return False, f"depth model {name!r} is not in the Hugging Face cache and the hub is offline (HF_HUB_OFFLINE=1)"


def _model_config(model_dir: str | os.PathLike | None) -> dict[str, Any]:
    if model_dir is None:
        return {}
    try:
        data = json.loads((Path(model_dir).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_needs_positions(model_dir: str | os.PathLike | None) -> bool:
    """False when the model folder's ``config.json`` turns the 3D positional encoding off; True otherwise."""
    return _model_config(model_dir).get("use_position_encoding") is not False


def model_depth_model(model_dir: str | os.PathLike | None) -> str | None:
    """The ``depth_model`` named by the model folder's ``config.json`` (None: the package default)."""
    value = _model_config(model_dir).get("depth_model")
    return value if isinstance(value, str) and value.strip() else None


def _point_map(rec: dict[str, Any], root: Path, pointmap_dir: Path | None) -> Path | None:
    if rec.get("points") is not None:
        p = Path(str(rec["points"])).expanduser()
        return p if p.is_absolute() else root / p
    if pointmap_dir is None:
        return None
    subdirs = [rec["dataset"]] if isinstance(rec.get("dataset"), str) else []
    for sub in [*subdirs, ""]:
        for suffix in _POINT_SUFFIXES:
            cand = pointmap_dir / sub / f"{rec.get('scene_id', '')}{suffix}"
            if cand.is_file():
                return cand
    return None


def _check_task(
    task: str,
    root: Path,
    depth_source: str,
    pointmap_dir: Path | None,
    depth_model: tuple[bool, str],
    needs_positions: bool,
    mask_token: str,
) -> TaskCheck:
    from sr3d_plugin.evaluation.prompts import doc_to_text, task_prompt_kwargs
    from sr3d_plugin.evaluation.schema import load_records, record_label, records_path

    split = task_split(task)
    path = records_path(root, task, split)
    check = TaskCheck(task, split, str(path))
    if not path.is_file():
        check.problems.append(f"no prepared records ({path.name} not found)")
        check.provide.append(f"run `sr3d prepare {task} ...` into {root} (writes {task}/{split}.jsonl)")
        return check
    try:
        records = load_records(path, task)
    except SR3DInputError as exc:
        check.problems.append(str(exc))
        check.provide.append(f"re-run `sr3d prepare {task}` or fix {path}")
        return check
    check.records = len(records)
    if not records:
        check.problems.append("the records file holds no records")
        return check
    kwargs = task_prompt_kwargs(task)
    exists: dict[Path, bool] = {}
    missing_visual: list[str] = []
    no_geometry: list[str] = []
    for i, rec in enumerate(records):
        label = record_label(rec, i)
        kind = next((k for k in ("scene", "video") if rec.get(k) is not None), None)
        if kind is None:
            check.problems.append(f"{label}: no 'scene' folder or 'video' file")
            continue
        p = Path(str(rec[kind])).expanduser()
        p = p if p.is_absolute() else root / p
        if p not in exists:
            exists[p] = p.is_dir() if kind == "scene" else p.is_file()
        if not exists[p]:
            missing_visual.append(f"{kind} {str(p)!r} ({label})")
            continue
        try:
            n_masks = doc_to_text(task, rec, kwargs).count(mask_token)
        except SR3DInputError as exc:
            check.problems.append(f"{label}: {exc}")
            continue
        n_regions = len(rec.get("regions") or [])
        if n_masks != n_regions:
            check.problems.append(f"{label}: the prompt has {n_masks} {mask_token} token(s) but {n_regions} region(s)")
        if not needs_positions:
            continue
        points = _point_map(rec, root, pointmap_dir)
        if points is not None and not points.is_file():
            check.problems.append(f"{label}: point-map file {str(points)!r} not found")
            continue
        has_depth = kind == "scene" and (p / "depth").is_dir() and (p / "pose").is_dir()
        if depth_source == "reconstruction":
            ok = points is not None
        elif depth_source in ("gt_depth", "relative_depth"):
            ok = has_depth
        elif depth_source == "depth_anything":
            ok = depth_model[0]
        else:  # auto
            ok = points is not None or has_depth or depth_model[0]
        if not ok:
            no_geometry.append(f"{kind} {p.name}")
    if missing_visual:
        shown = ", ".join(missing_visual[:SHOWN]) + (" …" if len(missing_visual) > SHOWN else "")
        check.problems.insert(0, f"{len(missing_visual)} record(s) name a missing visual input: {shown}")
        check.provide.append(f"prepare the scenes/videos with `sr3d prepare` into {root}")
    if no_geometry:
        inputs = list(dict.fromkeys(no_geometry))
        shown = ", ".join(inputs[:SHOWN]) + (f" and {len(inputs) - SHOWN} more" if len(inputs) > SHOWN else "")
        what = {
            "reconstruction": "no point-map file",
            "gt_depth": "no depth maps",
            "relative_depth": "no depth maps",
            "depth_anything": depth_model[1],
        }.get(depth_source, f"no point map, no depth maps and no usable depth model ({depth_model[1]})")
        check.problems.append(
            f"{len(no_geometry)} of {len(records)} record(s) have no geometry source for the 3D positions "
            f"(depth_source={depth_source}: {what}); inputs: {shown}"
        )
        check.provide += [
            "point maps: `sr3d pointmap` (or CUT3R / MASt3R / VGGT output) as <pointmap_dir>/<scene_id>.npz, "
            "passed as the model argument pointmap_dir=",
            "a local Depth Anything V2 folder as the model argument depth_model= (or download it into the "
            "Hugging Face cache and evaluate with the hub online)",
        ]
        if depth_source in ("gt_depth", "relative_depth"):
            check.provide.append("scene folders with depth/ maps, or another depth_source")
    return check


def preflight(
    data_dir: str | os.PathLike,
    tasks: str | list[str] = "sr3d_3d",
    depth_source: str = "auto",
    pointmap_dir: str | os.PathLike | None = None,
    depth_model: str | None = None,
    needs_positions: bool = True,
    offline: bool | None = None,
    mask_token: str = "<mask>",
) -> PreflightReport:
    """Check every selected task's inputs before a model loads (module docstring).

    Args:
        data_dir: the prepared data folder (``sr3d prepare`` output, ``$SR3D_DATA``).
        tasks: lmms-eval task names (comma-separated or a list; ``sr3d_3d`` = all four); names that
            are not sr3d tasks are not checked.
        depth_source, pointmap_dir, depth_model: the sr3d model arguments of the run.
        needs_positions: the model adds the 3D positional encoding (:func:`model_needs_positions`).
        offline: the hub may not be contacted (default: ``HF_HUB_OFFLINE``).

    Returns:
        A :class:`PreflightReport`; nothing is raised for a task that cannot run (see
        :meth:`PreflightReport.raise_if_failed`). Raises :class:`SR3DConfigError` for a bad argument.
    """
    from sr3d_plugin.visual_inputs import depth_source_name

    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise SR3DConfigError(f"data_dir={str(data_dir)!r} is not a folder; expected the output of `sr3d prepare`")
    try:
        depth_source = depth_source_name(depth_source)
    except SR3DInputError as exc:
        raise SR3DConfigError(str(exc)) from None
    pm = None if pointmap_dir is None else Path(pointmap_dir).expanduser()
    if pm is not None and not pm.is_dir():
        raise SR3DConfigError(f"pointmap_dir={str(pointmap_dir)!r} is not a folder")
    ours, _ = expand_tasks(tasks)
    dm = depth_model_available(depth_model, offline) if needs_positions else (True, "not needed")
    checks = [_check_task(t, root, depth_source, pm, dm, needs_positions, mask_token) for t in ours]
    return PreflightReport(str(root), checks)


def check_documents(docs: list[tuple[str, Any]], inputs: Any) -> None:
    """The lmms-eval model's start-up check: every document to answer has a geometry source.

    ``docs`` are ``(task, document)`` pairs; ``inputs`` is the model's
    :class:`~sr3d_plugin.evaluation.record_inputs.RecordInputBuilder` (its ``depth_source``,
    ``pointmap_dir``, ``depth_model`` and pipeline). Raises :class:`SR3DInputError` before any
    question when some documents could only get empty answers, naming the tasks, the inputs and
    what to provide. Nothing is decoded; a model without the positional encoding passes.
    """
    from sr3d_plugin.evaluation.record_inputs import DATA_DIR_FIELD
    from sr3d_plugin.visual_inputs import default_depth_model

    pipeline = inputs.pipeline
    if not pipeline.needs_positions or not docs:
        return
    mode = inputs.depth_source
    dm: tuple[bool, str] | None = None
    missing: dict[str, list[str]] = {}
    seen: set[tuple[str, str]] = set()
    for task, doc in docs:
        if not isinstance(doc, dict):
            continue
        kind = next((k for k in ("scene", "video") if doc.get(k) is not None), None)
        if kind is None:
            continue  # reported by the request itself
        key = (task, f"{kind}:{doc[kind]}")
        if key in seen:
            continue
        seen.add(key)
        root = Path(str(doc.get(DATA_DIR_FIELD) or "."))
        p = Path(str(doc[kind])).expanduser()
        p = p if p.is_absolute() else root / p
        if not (p.is_dir() if kind == "scene" else p.is_file()):
            continue  # a missing scene or video fails its own request (named there)
        points = _point_map(doc, root, inputs.pointmap_dir)
        has_points = points is not None and points.is_file()
        has_depth = kind == "scene" and (p / "depth").is_dir() and (p / "pose").is_dir()
        if mode == "reconstruction":
            ok = has_points
        elif mode in ("gt_depth", "relative_depth"):
            ok = has_depth
        elif has_points or (mode == "auto" and has_depth):
            ok = True
        else:
            if dm is None:
                dm = depth_model_available(inputs.depth_model or default_depth_model(pipeline.config))
            ok = dm[0]
        if not ok:
            missing.setdefault(task, []).append(f"{kind} {p.name}")
    if missing:
        detail = "; ".join(
            f"{task}: {', '.join(items[:SHOWN])}{f' and {len(items) - SHOWN} more' if len(items) > SHOWN else ''}"
            for task, items in missing.items()
        )
        why = f" ({dm[1]})" if dm is not None and not dm[0] else ""
        raise SR3DInputError(
            f"no geometry source for the 3D positions (depth_source={mode}{why}) of: {detail}; every such question "
            "would get an empty answer. Provide point maps (model argument pointmap_dir=, from `sr3d pointmap`), "
            "a local Depth Anything V2 folder (depth_model=), or run with the hub online"
        )
