"""lmms-eval hooks of the ``sr3d_vsibench`` task, each named in ``sr3d_vsibench.yaml``.

The logic lives in :mod:`sr3d_plugin.evaluation.lmms_tasks`; this file only binds it to the task.
"""

from __future__ import annotations

from typing import Any

from sr3d_plugin.evaluation import lmms_tasks

TASK = "vsibench"

#: the task class (reads the prepared records, checks them before the model runs)
SR3DTaskClass = lmms_tasks.task_class(TASK)


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    return lmms_tasks.doc_to_text(TASK, doc, lmms_eval_specific_kwargs)


def process_results(doc: dict[str, Any], results: list[Any]) -> dict[str, Any]:
    return lmms_tasks.process_results(TASK, doc, results)


def aggregate_overall(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "overall", items)


def aggregate_object_counting(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "object_counting", items)


def aggregate_object_abs_distance(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "object_abs_distance", items)


def aggregate_object_size_estimation(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "object_size_estimation", items)


def aggregate_room_size_estimation(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "room_size_estimation", items)


def aggregate_object_rel_distance(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "object_rel_distance", items)


def aggregate_object_rel_direction(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "object_rel_direction", items)


def aggregate_route_planning(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "route_planning", items)


def aggregate_obj_appearance_order(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "obj_appearance_order", items)


def aggregate_object_rel_direction_easy(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "object_rel_direction_easy", items)


def aggregate_object_rel_direction_medium(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "object_rel_direction_medium", items)


def aggregate_object_rel_direction_hard(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "object_rel_direction_hard", items)


def aggregate_empty_predictions(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "empty_predictions", items)
