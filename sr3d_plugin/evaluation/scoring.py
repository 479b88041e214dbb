"""Task-level scoring: predictions + annotation records → the full metric set of a benchmark.

:func:`score_task` is shared by ``sr3d metrics`` and by the lmms-eval task aggregation functions,
so it takes plain Python data: ``predictions`` maps ``question_id`` → model text, ``records`` are
annotation records (:mod:`sr3d_plugin.evaluation.schema`).

Input policy
------------
* Bad records (missing or mistyped fields, duplicate ``question_id``), a prediction for an unknown
  ``question_id`` and predictions that are not a mapping raise :class:`SR3DInputError` naming the
  record / id, before anything is computed.
* A record without a prediction (*missing*), an empty or whitespace-only prediction (*empty*) and a
  prediction that is not a string (*invalid*) are scored as wrong answers — EM 0, MRA 0, caption
  candidate ``""`` (ScanQA) or ``"sos eos"`` (Scan2Cap) — and counted in ``counts``. One exception,
  LEO's reference rule: for ScanQA and SQA3D an *empty* prediction is scored as the empty string,
  so it is an ``EM-R`` hit (the empty string is a substring of every answer), like every prediction
  that cleans to ""; ``counts["empty_after_cleaning"]`` says how many there were and
  ``EM-R-strict`` is the same metric without those hits. With ``only_predicted=True`` records
  without a prediction are left out instead (for ``--limit`` runs).
* Predictions are used as given (no stripping), as the reference scorers receive model text.
* If METEOR cannot run (no Java, or the Java process fails) its scores are None, the reason is in
  ``notes`` and every other metric is still reported.

All scores are percentages (0–100).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.evaluation import metrics as M
from sr3d_plugin.evaluation.schema import (
    SQA3D_QUESTION_TYPES,
    VSIBENCH_MC_TYPES,
    VSIBENCH_NUMERIC_TYPES,
    box_from_record,
    check_task,
    validate_records,
)
from sr3d_plugin.io_utils import stable_hash

__all__ = ["EM_R_STRICT", "VSIBENCH_SUBSCORES", "clear_cache", "load_predictions", "score_keys", "score_task"]

#: the stricter EM-R (no hit for an empty prediction), reported beside LEO's ``EM-R``
EM_R_STRICT = "EM-R-strict"
#: tasks whose EM-R follows LEO's rule, empty predictions included
_EM_TASKS = ("scanqa", "sqa3d")

#: the eight VSI-Bench sub-scores averaged into "overall" (rel_direction levels merged into one)
VSIBENCH_SUBSCORES: tuple[str, ...] = (
    "object_counting",
    "object_abs_distance",
    "object_size_estimation",
    "room_size_estimation",
    "object_rel_distance",
    "object_rel_direction",
    "route_planning",
    "obj_appearance_order",
)
_REL_DIRECTION_LEVELS = ("object_rel_direction_easy", "object_rel_direction_medium", "object_rel_direction_hard")
_SCAN2CAP_METRICS = ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L")


def _iou_suffix(iou_threshold: float) -> str:
    return f"@{iou_threshold:g}IoU"


def score_keys(task: str, iou_threshold: float = 0.5) -> tuple[str, ...]:
    """The keys of ``score_task(task, …)["scores"]``, in report order."""
    check_task(task)
    if task == "scanqa":
        return ("EM@1", "EM-R", EM_R_STRICT, *M.CAPTION_METRICS)
    if task == "sqa3d":
        per_type = tuple(f"{m}/{t}" for m in ("EM", "EM-R") for t in SQA3D_QUESTION_TYPES)
        return ("EM", "EM-R", EM_R_STRICT, *per_type)
    if task == "scan2cap":
        suffix = _iou_suffix(iou_threshold)
        return (*_SCAN2CAP_METRICS, *(m + suffix for m in _SCAN2CAP_METRICS))
    return ("overall", *VSIBENCH_SUBSCORES, *_REL_DIRECTION_LEVELS)


# --------------------------------------------------------------------------- small cache
# lmms-eval calls one aggregation function per metric with the same per-document results; the
# cache makes those calls share one scoring run (and one METEOR start-up).
_CACHE: OrderedDict[str, dict[str, Any]] = OrderedDict()
_CACHE_SIZE = 8


def clear_cache() -> None:
    """Forget results cached by :func:`score_task`."""
    _CACHE.clear()


def _mean_pct(values: Sequence[float]) -> float | None:
    return 100.0 * math.fsum(values) / len(values) if values else None


# --------------------------------------------------------------------------- entry point
def score_task(
    task: str,
    predictions: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    *,
    only_predicted: bool = False,
    iou_threshold: float = 0.5,
    vsibench_number_parser: str = "lmms_eval",
    meteor: bool = True,
    scorers: M.CaptionScorers | None = None,
    cache: bool = True,
) -> dict[str, Any]:
    """Score ``predictions`` (``question_id`` → text) against the task's annotation ``records``.

    Returns ``{"task", "scores", "counts", "notes", "options"}``:

    * ``scores`` (percent; keys from :func:`score_keys`):
      scanqa — EM@1, EM-R (LEO's rule), EM-R-strict, BLEU-1..4, METEOR, ROUGE-L, CIDEr (cleaned
      strings); sqa3d — EM, EM-R, EM-R-strict overall and ``EM/<type>``, ``EM-R/<type>`` (None for a
      type without questions); scan2cap — CIDEr, BLEU-4, METEOR, ROUGE-L plain and ``@0.5IoU`` (None when the
      records carry no boxes/IoU); vsibench — ``overall`` (mean of the 8 sub-scores present, the
      three rel_direction levels averaged into ``object_rel_direction``), each sub-score and each
      rel_direction level (None when absent).
    * ``counts``: ``records`` (given), ``scored``, ``answered`` (usable predictions), ``missing``,
      ``empty``, ``invalid``, plus per task ``by_type`` (sqa3d, vsibench), ``unparsed`` (vsibench
      numeric answers without a number), ``iou_pass`` / ``with_iou`` (scan2cap),
      ``empty_after_cleaning`` (scanqa, sqa3d: string predictions that clean to "" — each an EM-R
      hit by LEO's rule, none an EM-R-strict hit).
    * ``notes``: human-readable remarks (METEOR unavailable, @IoU not computed, …).

    Options: ``only_predicted`` scores only records that have a prediction; ``iou_threshold``
    (Scan2Cap: a prediction counts when IoU > threshold, as the official ``ious > min_iou``);
    ``vsibench_number_parser`` ("lmms_eval" or "first_token", see
    :func:`~sr3d_plugin.evaluation.metrics.vsibench_parse_number`); ``meteor=False`` skips METEOR;
    ``scorers`` reuses a :class:`~sr3d_plugin.evaluation.metrics.CaptionScorers` (else one is
    created and closed here); ``cache`` reuses the result of an identical earlier call.
    """
    check_task(task)
    if not isinstance(predictions, Mapping):
        raise SR3DInputError(f"predictions must be a mapping question_id -> text, got {type(predictions).__name__}")
    if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, (int, float)) or not 0 <= iou_threshold < 1:
        raise SR3DInputError(f"iou_threshold must be a number in [0, 1), got {iou_threshold!r}")
    if vsibench_number_parser not in ("lmms_eval", "first_token"):
        raise SR3DInputError(
            f"unknown vsibench_number_parser {vsibench_number_parser!r}; expected 'lmms_eval' or 'first_token'"
        )
    validate_records(task, records)
    known = {rec["question_id"] for rec in records}
    bad_keys = [k for k in predictions if not isinstance(k, str)]
    if bad_keys:
        raise SR3DInputError(
            f"{task}: prediction keys must be question_id strings, got {len(bad_keys)} other keys, e.g. {bad_keys[:3]!r}"
        )
    unknown = [k for k in predictions if k not in known]
    if unknown:
        raise SR3DInputError(
            f"{task}: {len(unknown)} prediction(s) for unknown question_id(s), e.g. {unknown[:5]!r}; "
            "check that predictions and annotations are the same task and split"
        )

    use_meteor = bool(meteor and (scorers is None or scorers.use_meteor))
    options = {
        "only_predicted": only_predicted,
        "iou_threshold": float(iou_threshold),
        "vsibench_number_parser": vsibench_number_parser,
        "meteor": use_meteor,
    }
    key = None
    if cache:
        blob = json.dumps(
            [task, sorted(predictions.items(), key=lambda kv: kv[0]), list(records), options],
            sort_keys=True,
            default=repr,
        )
        key = stable_hash(blob, length=32)
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return copy.deepcopy(_CACHE[key])

    selected = [rec for rec in records if not only_predicted or rec["question_id"] in predictions]
    if not selected:
        raise SR3DInputError(
            f"{task}: nothing to score ({len(records)} records, {len(predictions)} predictions"
            + (", only_predicted=True)" if only_predicted else ")")
        )

    texts: list[str | None] = []
    counts: dict[str, Any] = {"records": len(records), "scored": len(selected), "answered": 0}
    counts.update(missing=0, empty=0, invalid=0)
    for rec in selected:
        qid = rec["question_id"]
        if qid not in predictions:
            counts["missing"] += 1
            texts.append(None)
            continue
        value = predictions[qid]
        if not isinstance(value, str):
            counts["invalid"] += 1
            texts.append(None)
        elif not value.strip():
            counts["empty"] += 1
            # LEO scores the empty string as it is (an EM-R hit); elsewhere it is a wrong answer
            texts.append(value if task in _EM_TASKS else None)
        else:
            counts["answered"] += 1
            texts.append(value)

    notes: list[str] = []
    if task in _EM_TASKS:
        counts["empty_after_cleaning"] = sum(t is not None and M.is_empty_after_cleaning(t) for t in texts)
        if counts["missing"] or counts["invalid"]:
            notes.append(
                f"{counts['missing']} missing and {counts['invalid']} non-string prediction(s) were scored as "
                "wrong answers"
            )
        if counts["empty_after_cleaning"]:
            notes.append(
                f"EM-R follows LEO's rule: {counts['empty_after_cleaning']} prediction(s) empty after cleaning "
                f"({counts['empty']} empty as given) count as EM-R hits; {EM_R_STRICT} counts them wrong"
            )
    elif counts["missing"] or counts["empty"] or counts["invalid"]:
        notes.append(
            f"{counts['missing']} missing, {counts['empty']} empty and {counts['invalid']} non-string "
            "prediction(s) were scored as wrong answers"
        )

    if task in ("scanqa", "scan2cap") and not use_meteor:
        notes.append("METEOR not computed (meteor=False)")
    owns_scorers = scorers is None and task in ("scanqa", "scan2cap")
    if owns_scorers:
        scorers = M.CaptionScorers(meteor=use_meteor)
    try:
        if task == "scanqa":
            scores = _score_scanqa(selected, texts, scorers, use_meteor)
        elif task == "sqa3d":
            scores = _score_sqa3d(selected, texts, counts)
        elif task == "scan2cap":
            scores = _score_scan2cap(selected, texts, scorers, use_meteor, float(iou_threshold), counts, notes)
        else:
            scores = _score_vsibench(selected, texts, vsibench_number_parser, counts)
        scorer_errors = list(scorers.errors) if scorers is not None and task in ("scanqa", "scan2cap") else []
        notes.extend(e for e in scorer_errors if e not in notes)
    finally:
        if owns_scorers and scorers is not None:
            scorers.close()

    result = {"task": task, "scores": scores, "counts": counts, "notes": notes, "options": options}
    if key is not None and not scorer_errors:  # a METEOR failure is worth retrying next time
        _CACHE[key] = copy.deepcopy(result)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return result


# --------------------------------------------------------------------------- per task
def _score_scanqa(
    records: Sequence[Mapping[str, Any]],
    texts: Sequence[str | None],
    scorers: M.CaptionScorers | None,
    use_meteor: bool,
) -> dict[str, float | None]:
    em: list[float] = []
    emr: list[float] = []
    emr_strict: list[float] = []
    refs: dict[int, list[str]] = {}
    cands: dict[int, str] = {}
    for i, (rec, text) in enumerate(zip(records, texts)):
        answers = [M.clean_answer(a) for a in rec["answers"]]
        refs[i] = answers
        if text is None:
            cands[i] = ""
            em.append(0.0)
            emr.append(0.0)
            emr_strict.append(0.0)
            continue
        pred = M.clean_answer(text)
        cands[i] = pred
        em.append(float(M.exact_match(pred, answers, clean=False)))
        emr.append(float(M.refined_exact_match(pred, answers, clean=False)))
        emr_strict.append(float(M.refined_exact_match_strict(pred, answers, clean=False)))
    assert scorers is not None
    scores: dict[str, float | None] = {
        "EM@1": _mean_pct(em),
        "EM-R": _mean_pct(emr),
        EM_R_STRICT: _mean_pct(emr_strict),
    }
    scores.update(scorers.score(refs, cands, meteor=use_meteor))
    return scores


def _score_sqa3d(
    records: Sequence[Mapping[str, Any]], texts: Sequence[str | None], counts: dict[str, Any]
) -> dict[str, float | None]:
    em: dict[str, list[float]] = {t: [] for t in SQA3D_QUESTION_TYPES}
    emr: dict[str, list[float]] = {t: [] for t in SQA3D_QUESTION_TYPES}
    strict: list[float] = []
    for rec, text in zip(records, texts):
        qtype = rec.get("question_type") or M.sqa3d_question_type(rec["question"])
        if text is None:
            hit = hit_r = hit_s = False
        else:
            hit = M.exact_match(text, rec["answers"])
            hit_r = M.refined_exact_match(text, rec["answers"])
            hit_s = M.refined_exact_match_strict(text, rec["answers"])
        em[qtype].append(float(hit))
        emr[qtype].append(float(hit_r))
        strict.append(float(hit_s))
    all_em = [v for t in SQA3D_QUESTION_TYPES for v in em[t]]
    all_emr = [v for t in SQA3D_QUESTION_TYPES for v in emr[t]]
    scores: dict[str, float | None] = {
        "EM": _mean_pct(all_em),
        "EM-R": _mean_pct(all_emr),
        EM_R_STRICT: _mean_pct(strict),
    }
    for name, table in (("EM", em), ("EM-R", emr)):
        for t in SQA3D_QUESTION_TYPES:
            scores[f"{name}/{t}"] = _mean_pct(table[t])
    counts["by_type"] = {t: len(em[t]) for t in SQA3D_QUESTION_TYPES}
    return scores


def _record_iou(rec: Mapping[str, Any]) -> float | None:
    if rec.get("iou") is not None:
        return float(rec["iou"])
    if rec.get("gt_box") is not None and rec.get("pred_box") is not None:
        return M.box_iou_3d(box_from_record(rec["pred_box"]), box_from_record(rec["gt_box"]))
    return None


def _score_scan2cap(
    records: Sequence[Mapping[str, Any]],
    texts: Sequence[str | None],
    scorers: M.CaptionScorers | None,
    use_meteor: bool,
    iou_threshold: float,
    counts: dict[str, Any],
    notes: list[str],
) -> dict[str, float | None]:
    refs: dict[int, list[str]] = {}
    cands: dict[int, str] = {}
    ious: list[float | None] = []
    for i, (rec, text) in enumerate(zip(records, texts)):
        refs[i] = [M.wrap_caption(r) for r in rec["references"]]
        cands[i] = M.SCAN2CAP_EMPTY_CAPTION if text is None else M.wrap_caption(text)
        ious.append(_record_iou(rec))
    assert scorers is not None
    plain = scorers.score(refs, cands, meteor=use_meteor)
    scores: dict[str, float | None] = {m: plain[m] for m in _SCAN2CAP_METRICS}
    suffix = _iou_suffix(iou_threshold)

    with_iou = sum(v is not None for v in ious)
    counts["with_iou"] = with_iou
    if with_iou == 0:
        notes.append(f"no record has 'iou' or 'gt_box'+'pred_box': {suffix} scores not computed")
        counts["iou_pass"] = None
        scores.update({m + suffix: None for m in _SCAN2CAP_METRICS})
        return scores
    if with_iou < len(records):
        first = next(i for i, v in enumerate(ious) if v is None)
        raise SR3DInputError(
            f"scan2cap: record #{first} (question_id {records[first]['question_id']!r}) has no 'iou' and no "
            f"'gt_box'+'pred_box', but {with_iou} other records do; give box information for every object"
        )
    # Official Scan2Cap: an object counts when IoU > threshold; all others get "sos eos", and the
    # corpus still contains every object (so CIDEr's document frequencies include them).
    passed = [v is not None and v > iou_threshold for v in ious]
    counts["iou_pass"] = sum(passed)
    iou_cands = {i: (cands[i] if passed[i] else M.SCAN2CAP_EMPTY_CAPTION) for i in cands}
    at_iou = scorers.score(refs, iou_cands, meteor=use_meteor)
    scores.update({m + suffix: at_iou[m] for m in _SCAN2CAP_METRICS})
    return scores


def _score_vsibench(
    records: Sequence[Mapping[str, Any]],
    texts: Sequence[str | None],
    parser: str,
    counts: dict[str, Any],
) -> dict[str, float | None]:
    per_type: dict[str, list[float]] = {}
    unparsed = 0
    for rec, text in zip(records, texts):
        qtype = rec["question_type"]
        if qtype in VSIBENCH_MC_TYPES:
            value = float(text is not None and M.vsibench_choice_correct(text, rec["ground_truth"]))
        else:
            number = None if text is None else M.vsibench_parse_number(text, parser)
            if text is not None and number is None:
                unparsed += 1
            value = M.mean_relative_accuracy(number, float(rec["ground_truth"]))
        per_type.setdefault(qtype, []).append(value)

    scores: dict[str, float | None] = {}
    sub: dict[str, float | None] = {}
    for qtype in VSIBENCH_NUMERIC_TYPES + VSIBENCH_MC_TYPES:
        sub[qtype] = _mean_pct(per_type.get(qtype, []))
    levels = [sub[t] for t in _REL_DIRECTION_LEVELS if sub[t] is not None]
    sub["object_rel_direction"] = math.fsum(levels) / len(levels) if levels else None
    present = [sub[name] for name in VSIBENCH_SUBSCORES if sub[name] is not None]
    scores["overall"] = math.fsum(present) / len(present) if present else None
    for name in VSIBENCH_SUBSCORES:
        scores[name] = sub[name]
    for level in _REL_DIRECTION_LEVELS:
        scores[level] = sub[level]
    counts["by_type"] = {t: len(per_type.get(t, [])) for t in VSIBENCH_NUMERIC_TYPES + VSIBENCH_MC_TYPES}
    counts["unparsed"] = unparsed
    return scores


# --------------------------------------------------------------------------- prediction files
_TEXT_FIELDS = ("prediction", "text", "answer", "pred")


def _first_response(value: Any) -> Any:
    # lmms-eval keeps one list level per request and per response; the first string is the answer
    while isinstance(value, list):
        if not value:
            return ""
        value = value[0]
    return value


def _line_question_id(obj: Mapping[str, Any], records: Sequence[Mapping[str, Any]] | None, where: str) -> str:
    qid = obj.get("question_id")
    if qid is None and isinstance(obj.get("doc"), Mapping):
        qid = obj["doc"].get("question_id")
    if qid is None:
        # an lmms-eval sample log carries process_results' values; sr3d tasks put the id there
        for value in obj.values():
            if isinstance(value, Mapping) and "question_id" in value:
                qid = value["question_id"]
                break
    if qid is None and "doc_id" in obj:
        doc_id = obj["doc_id"]
        if isinstance(doc_id, bool) or not isinstance(doc_id, int):
            raise SR3DInputError(f"{where}: 'doc_id' must be an integer, got {doc_id!r}")
        if records is None:
            raise SR3DInputError(f"{where}: only a 'doc_id' to identify the question; annotation records are needed")
        if not 0 <= doc_id < len(records):
            raise SR3DInputError(f"{where}: doc_id {doc_id} is outside the {len(records)} annotation records")
        qid = records[doc_id].get("question_id")
    if qid is None:
        raise SR3DInputError(f"{where}: no 'question_id' (nor an lmms-eval 'doc_id')")
    if isinstance(qid, int) and not isinstance(qid, bool):
        qid = str(qid)
    if not isinstance(qid, str):
        raise SR3DInputError(f"{where}: question_id must be a string, got {type(qid).__name__}")
    return qid


def load_predictions(path: str | os.PathLike, records: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Read a predictions JSONL file into ``{question_id: text}``.

    Each line is a JSON object with ``question_id`` and the text in ``prediction`` (aliases
    ``text``, ``answer``, ``pred``), or an lmms-eval ``--log_samples`` line (lmms-eval 0.7.3 writes
    ``doc_id``, ``target``, ``filtered_resps`` and the task's per-sample metric values but not the
    ``doc``): the id then comes from ``doc.question_id``, from a metric value that carries
    ``question_id``, or from ``doc_id`` as the index into ``records`` (the annotation file's order),
    and the text from ``filtered_resps`` (else ``resps``; nested lists give their first item).
    Values are returned as found (a non-string is scored as an invalid answer). Duplicate ids and
    unreadable lines raise :class:`SR3DInputError` naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise SR3DInputError(f"predictions file {str(path)!r} not found")
    out: dict[str, Any] = {}
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SR3DInputError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise SR3DInputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            qid = _line_question_id(obj, records, where)
            for name in _TEXT_FIELDS:
                if name in obj:
                    text = obj[name]
                    break
            else:
                if "filtered_resps" in obj:
                    text = _first_response(obj["filtered_resps"])
                elif "resps" in obj:
                    text = _first_response(obj["resps"])
                else:
                    raise SR3DInputError(
                        f"{where}: no prediction text; expected one of {', '.join(_TEXT_FIELDS)} or lmms-eval "
                        "'filtered_resps'"
                    )
            if qid in out:
                raise SR3DInputError(
                    f"{where}: duplicate prediction for question_id {qid!r} (first on line {first_line[qid]})"
                )
            out[qid] = text
            first_line[qid] = lineno
    return out
