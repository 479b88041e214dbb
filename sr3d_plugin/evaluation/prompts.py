"""The prompt of each task: the texts in the bundled task YAML and how a record becomes a question.

Versioned with the task (``metadata.prompt_version`` in its YAML; SR3D-FACTS §9: prompt suffixes move
ScanQA scores a lot). Used by the lmms-eval tasks (:mod:`sr3d_plugin.evaluation.lmms_tasks`) and by
training on prepared evaluation records (:mod:`sr3d_plugin.records`), so that both ask the same way;
needs neither lmms-eval nor torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sr3d_plugin.errors import SR3DConfigError
from sr3d_plugin.evaluation.schema import TASKS, VSIBENCH_MC_TYPES

__all__ = ["TASK_NAMES", "doc_to_text", "task_prompt_kwargs"]

#: lmms-eval task name of each schema task
TASK_NAMES: dict[str, str] = {t: f"sr3d_{t}" for t in TASKS}


def task_prompt_kwargs(task: str) -> dict[str, Any]:
    """``lmms_eval_specific_kwargs`` of a bundled task YAML (the prompt texts), read without lmms-eval.

    ``!function`` tags are read as plain strings, everything else with the safe loader.
    """
    import yaml

    from sr3d_plugin.resources import eval_tasks_dir

    if task not in TASK_NAMES:
        raise SR3DConfigError(f"unknown task {task!r}; expected one of {sorted(TASK_NAMES)}")
    name = TASK_NAMES[task]
    path = eval_tasks_dir() / name / f"{name}.yaml"

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    with open(path, encoding="utf-8") as fh:
        config = yaml.load(fh, Loader=_Loader)  # a SafeLoader subclass
    return dict(config.get("lmms_eval_specific_kwargs") or {})


def _kw(kwargs: Mapping[str, Any] | None, key: str, task: str) -> str:
    kwargs = kwargs or {}
    value = kwargs.get(key)
    if value is None and isinstance(kwargs.get("default"), Mapping):
        value = kwargs["default"].get(key)
    if value is None:
        raise SR3DConfigError(
            f"{TASK_NAMES[task]}: lmms_eval_specific_kwargs.default.{key} is missing in the task YAML"
        )
    return str(value)


def _join(*parts: str) -> str:
    return "\n".join(p for p in parts if p)


def doc_to_text(task: str, doc: Mapping[str, Any], kwargs: Mapping[str, Any] | None) -> str:
    """The prompt of one record (ScanQA, SQA3D, Scan2Cap, VSI-Bench conventions; YAML texts)."""
    if isinstance(doc.get("prompt"), str) and doc["prompt"].strip():
        return doc["prompt"]
    pre = _kw(kwargs, "pre_prompt", task)
    if task == "scanqa":
        return _join(pre, doc["question"].strip(), _kw(kwargs, "post_prompt", task))
    if task == "sqa3d":
        situation = str(doc.get("situation") or "").strip()
        question = " ".join(p for p in (situation, doc["question"].strip()) if p)
        return _join(pre, question, _kw(kwargs, "post_prompt", task))
    if task == "scan2cap":
        template = _kw(kwargs, "caption_prompt", task)
        return _join(pre, template.replace("{object_name}", str(doc.get("object_name", "")).replace("_", " ")))
    # vsibench: the thinking-in-space / lmms-eval layout
    if doc["question_type"] in VSIBENCH_MC_TYPES:
        options = "Options:\n" + "\n".join(doc.get("options") or [])
        return _join(pre, doc["question"], options, _kw(kwargs, "mca_post_prompt", task))
    return _join(pre, doc["question"], _kw(kwargs, "na_post_prompt", task))
