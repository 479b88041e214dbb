"""lmms-eval hooks of the ``sr3d_sqa3d`` task, each named in ``sr3d_sqa3d.yaml``.

The logic lives in :mod:`sr3d_plugin.evaluation.lmms_tasks`; this file only binds it to the task.
"""

from __future__ import annotations

from typing import Any

from sr3d_plugin.evaluation import lmms_tasks

TASK = "sqa3d"

#: the task class (reads the prepared records, checks them before the model runs)
SR3DTaskClass = lmms_tasks.task_class(TASK)


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    return lmms_tasks.doc_to_text(TASK, doc, lmms_eval_specific_kwargs)


def process_results(doc: dict[str, Any], results: list[Any]) -> dict[str, Any]:
    return lmms_tasks.process_results(TASK, doc, results)


def aggregate_em(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "EM", items)


def aggregate_em_r(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "EM-R", items)


def aggregate_em_r_strict(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "EM-R-strict", items)


def aggregate_em_what(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "EM/what", items)


def aggregate_em_is(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "EM/is", items)


def aggregate_em_how(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "EM/how", items)


def aggregate_em_can(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "EM/can", items)


def aggregate_em_which(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "EM/which", items)


def aggregate_em_others(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "EM/others", items)


def aggregate_em_r_what(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "EM-R/what", items)


def aggregate_em_r_is(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "EM-R/is", items)


def aggregate_em_r_how(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "EM-R/how", items)


def aggregate_em_r_can(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "EM-R/can", items)


def aggregate_em_r_which(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "EM-R/which", items)


def aggregate_em_r_others(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "EM-R/others", items)


def aggregate_empty_predictions(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "empty_predictions", items)
