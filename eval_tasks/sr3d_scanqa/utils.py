"""lmms-eval hooks of the ``sr3d_scanqa`` task, each named in ``sr3d_scanqa.yaml``.

The logic lives in :mod:`sr3d_plugin.evaluation.lmms_tasks`; this file only binds it to the task.
"""

from __future__ import annotations

from typing import Any

from sr3d_plugin.evaluation import lmms_tasks

TASK = "scanqa"

#: the task class (reads the prepared records, checks them before the model runs)
SR3DTaskClass = lmms_tasks.task_class(TASK)


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    return lmms_tasks.doc_to_text(TASK, doc, lmms_eval_specific_kwargs)


def process_results(doc: dict[str, Any], results: list[Any]) -> dict[str, Any]:
    return lmms_tasks.process_results(TASK, doc, results)


def aggregate_em_1(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "EM@1", items)


def aggregate_em_r(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "EM-R", items)


def aggregate_em_r_strict(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "EM-R-strict", items)


def aggregate_bleu_1(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "BLEU-1", items)


def aggregate_bleu_2(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "BLEU-2", items)


def aggregate_bleu_3(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "BLEU-3", items)


def aggregate_bleu_4(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "BLEU-4", items)


def aggregate_meteor(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "METEOR", items)


def aggregate_rouge_l(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "ROUGE-L", items)


def aggregate_cider(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "CIDEr", items)


def aggregate_empty_predictions(items: list[Any]) -> float | None:
    return lmms_tasks.aggregate(TASK, "empty_predictions", items)
