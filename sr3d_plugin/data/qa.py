"""``sr3d prepare scanqa`` and ``sr3d prepare sqa3d``: the official QA releases → ``<out>/<task>/<split>.jsonl``.

ScanQA v1.0 (``ATR-DBI/ScanQA``): ``ScanQA_v1.0_<split>.json``, a list of ``{question_id, scene_id,
question, answers, object_ids, object_names}``. Only ``train`` and ``val`` carry answers; the test
splits (``test_w_obj``, ``test_wo_obj``) have none and cannot be scored locally.

SQA3D (``SilongYong/SQA3D``, balanced task files): ``v1_balanced_questions_<split>_scannetv2.json``
(``{"questions": [{question_id, scene_id, situation, alternative_situation, question, …}]}``) and
``v1_balanced_sqa_annotations_<split>_scannetv2.json`` (``{"annotations": [{question_id, scene_id,
answers: [{answer, answer_id, …}], question_type, …}]}``), joined on ``question_id``.

Records point at ``scenes/<scene_id>`` (prepare the scenes with ``sr3d prepare scannet`` first);
questions on a scene that is not prepared are an error, or are left out and counted with
``--skip-missing``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sr3d_plugin.data.common import (
    Converter,
    as_bool,
    find_file,
    load_json,
    missing_scene_error,
    progress_bar,
    require_fields,
    scene_ref,
    write_jsonl,
)
from sr3d_plugin.errors import SR3DInputError

__all__ = ["SQA3DConverter", "ScanQAConverter"]

_SKIP_HELP = "leave out questions whose scene folder is not prepared (counted in the summary)"


def _answers(values: Any, where: str) -> list[str]:
    if not isinstance(values, list) or not values:
        raise SR3DInputError(f"{where}: 'answers' must be a non-empty list")
    out: list[str] = []
    for v in values:
        text = v.get("answer") if isinstance(v, dict) else v
        if not isinstance(text, str):
            raise SR3DInputError(f"{where}: every answer must be a string (or {{'answer': str}}), got {v!r}")
        if text not in out:
            out.append(text)
    return out


def _finish(
    dataset: str,
    out: Path,
    split: str,
    records: list[dict[str, Any]],
    missing: dict[str, int],
    skip: bool,
    source: Path,
) -> dict[str, Any]:
    if missing and not skip:
        raise missing_scene_error(dataset, missing, out)
    kept = [r for r in records if r["scene_id"] not in missing]
    if not kept:
        raise SR3DInputError(f"{dataset}: no question left to write for split {split!r} ({len(records)} read)")
    path = out / dataset / f"{split}.jsonl"
    write_jsonl(path, kept)
    return {
        "dataset": dataset,
        "split": split,
        "source": str(source),
        "written": str(path),
        "records": len(kept),
        "skipped_missing_scene": sum(missing.values()),
        "missing_scenes": sorted(missing),
    }


class ScanQAConverter(Converter):
    """ScanQA v1.0 JSON → records (module docstring)."""

    name = "scanqa"
    description = "ScanQA v1.0 (ScanQA_v1.0_<split>.json); scored splits: val (default), train"
    default_split = "val"
    options = {"skip_missing": _SKIP_HELP}

    def convert(
        self,
        raw: Any,
        out: Any,
        split: str | None = None,
        *,
        overwrite: bool = False,
        progress: bool = True,
        **options: Any,
    ) -> dict[str, Any]:
        split, out, _dest, done = self.start(out, split, overwrite, options)
        if split.startswith("test"):
            raise SR3DInputError(
                f"scanqa: split {split!r} has no public answers (ScanQA's test sets are scored by its server); "
                "use split='val'"
            )
        if done is not None:
            return done
        source = find_file(raw, [f"ScanQA_v1.0_{split}.json"], "scanqa")
        data = load_json(source, "ScanQA file")
        if not isinstance(data, list):
            raise SR3DInputError(f"{source}: expected a JSON list of questions, got {type(data).__name__}")
        records: list[dict[str, Any]] = []
        missing: dict[str, int] = {}
        seen: set[str] = set()
        for i, e in enumerate(progress_bar(data, f"scanqa {split}", len(data), progress)):
            qid_hint = e.get("question_id") if isinstance(e, dict) else None
            where = f"{source.name} entry #{i}" + (f" (question_id {qid_hint!r})" if qid_hint is not None else "")
            require_fields(e, ("question_id", "scene_id", "question", "answers"), where)
            qid = str(e["question_id"])
            if qid in seen:
                raise SR3DInputError(f"{where}: duplicate question_id {qid!r}")
            seen.add(qid)
            scene_id = str(e["scene_id"])
            rel, exists = scene_ref(out, scene_id)
            if not exists:
                missing[scene_id] = missing.get(scene_id, 0) + 1
            records.append(
                {
                    "question_id": qid,
                    "scene_id": scene_id,
                    "question": str(e["question"]),
                    "answers": _answers(e["answers"], where),
                    "object_ids": [int(x) for x in e.get("object_ids") or []],
                    "object_names": [str(x) for x in e.get("object_names") or []],
                    "scene": rel,
                }
            )
        return _finish(
            self.name, out, split, records, missing, as_bool(options.get("skip_missing", False), "skip_missing"), source
        )


class SQA3DConverter(Converter):
    """SQA3D balanced questions + annotations → records (module docstring)."""

    name = "sqa3d"
    description = (
        "SQA3D balanced task (v1_balanced_questions/sqa_annotations_<split>_scannetv2.json); default split test"
    )
    default_split = "test"
    options = {"skip_missing": _SKIP_HELP}

    def convert(
        self,
        raw: Any,
        out: Any,
        split: str | None = None,
        *,
        overwrite: bool = False,
        progress: bool = True,
        **options: Any,
    ) -> dict[str, Any]:
        split, out, _dest, done = self.start(out, split, overwrite, options)
        if done is not None:
            return done
        raw = Path(raw).expanduser()
        qfile = find_file(
            raw.parent if raw.is_file() else raw, [f"v1_balanced_questions_{split}_scannetv2.json"], "sqa3d"
        )
        afile = find_file(
            raw.parent if raw.is_file() else raw, [f"v1_balanced_sqa_annotations_{split}_scannetv2.json"], "sqa3d"
        )
        qdata = load_json(qfile, "SQA3D questions file")
        adata = load_json(afile, "SQA3D annotations file")
        if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
            raise SR3DInputError(f"{qfile}: expected an object with a 'questions' list")
        if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
            raise SR3DInputError(f"{afile}: expected an object with an 'annotations' list")
        questions: dict[str, dict[str, Any]] = {}
        for i, q in enumerate(qdata["questions"]):
            where = f"{qfile.name} question #{i}"
            require_fields(q, ("question_id", "scene_id", "situation", "question"), where)
            questions[str(q["question_id"])] = q
        records: list[dict[str, Any]] = []
        missing: dict[str, int] = {}
        used: set[str] = set()
        anns = adata["annotations"]
        for i, a in enumerate(progress_bar(anns, f"sqa3d {split}", len(anns), progress)):
            qid_hint = a.get("question_id") if isinstance(a, dict) else None
            where = f"{afile.name} annotation #{i}" + (f" (question_id {qid_hint!r})" if qid_hint is not None else "")
            require_fields(a, ("question_id", "answers"), where)
            qid = str(a["question_id"])
            if qid in used:
                raise SR3DInputError(f"{where}: duplicate question_id {qid!r}")
            q = questions.get(qid)
            if q is None:
                raise SR3DInputError(f"{where}: question_id {qid!r} is not in {qfile.name}")
            used.add(qid)
            scene_id = str(a.get("scene_id") or q["scene_id"])
            rel, exists = scene_ref(out, scene_id)
            if not exists:
                missing[scene_id] = missing.get(scene_id, 0) + 1
            records.append(
                {
                    "question_id": qid,
                    "scene_id": scene_id,
                    "situation": str(q["situation"]),
                    "question": str(q["question"]),
                    "answers": _answers(a["answers"], where),
                    "scene": rel,
                }
            )
        unanswered = len(questions) - len(used)
        summary = _finish(
            self.name, out, split, records, missing, as_bool(options.get("skip_missing", False), "skip_missing"), afile
        )
        summary["questions_without_annotation"] = unanswered
        return summary
