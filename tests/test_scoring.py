"""Task-level scoring (``score_task``), the record schema, and the ``sr3d metrics`` command.

METEOR (Java) starts once for the module (the ScanQA and Scan2Cap full-metric tests share one
:class:`CaptionScorers`); everything else runs with ``meteor=False``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil

import pytest

from sr3d_plugin.cli import main as sr3d_main
from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.evaluation import metrics as M
from sr3d_plugin.evaluation.schema import load_records, records_path, validate_record
from sr3d_plugin.evaluation.scoring import clear_cache, load_predictions, score_keys, score_task


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def lmms_vsibench():
    """lmms-eval's ``tasks/vsibench/utils.py`` loaded from its file (see tests/test_metrics.py:
    importing it as a package module first imports all of ``lmms_eval.tasks``, ~10–15 s)."""
    lmms_eval = pytest.importorskip("lmms_eval")
    path = os.path.join(os.path.dirname(lmms_eval.__file__), "tasks", "vsibench", "utils.py")
    spec = importlib.util.spec_from_file_location("_lmms_vsibench_utils_scoring", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def meteor_scorers():
    if shutil.which("java") is None:
        pytest.skip("METEOR needs Java")
    with M.CaptionScorers(meteor=True) as scorers:
        yield scorers


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


def scanqa_records():
    return [
        {
            "question_id": "q0",
            "scene_id": "scene0000_00",
            "question": "What is by the bed?",
            "answers": ["brown chair"],
        },
        {
            "question_id": "q1",
            "scene_id": "scene0000_00",
            "question": "What color?",
            "answers": ["white", "white wall"],
        },
        {"question_id": "q2", "scene_id": "scene0001_00", "question": "Where?", "answers": ["left of door"]},
        {"question_id": "q3", "scene_id": "scene0001_00", "question": "How many?", "answers": ["2"]},
        {"question_id": "q4", "scene_id": "scene0002_00", "question": "What is it?", "answers": ["tv stand"]},
        {"question_id": "q5", "scene_id": "scene0002_00", "question": "What?", "answers": ["black office chair"]},
    ]


SCANQA_PREDS = {
    "q0": "The brown chair.",  # EM after cleaning
    "q1": "white cabinet",  # EM-R only ("white" ⊂ prediction)
    "q2": "right of window",  # wrong
    "q3": "two",  # EM ("2" → "two")
    "q4": "",  # empty → wrong for EM and EM-R-strict, an EM-R hit by LEO's rule
    # q5 missing → wrong
}


def sqa3d_records():
    rows = [
        ("s0", "What is in front of me?", "table", None),
        ("s1", "Is the door open?", "yes", None),
        ("s2", "How many chairs are on my left?", "2", None),
        ("s3", "Can I sit on the object behind me?", "no", None),
        ("s4", "Which direction is the sink?", "left", None),
        ("s5", "Where is the lamp?", "on the desk", None),
        ("s6", "What color is the wall?", "white", None),
        ("s7", "Whatever it is, pick it up?", "yes", "others"),  # given type wins over the prefix
    ]
    return [
        {
            "question_id": qid,
            "scene_id": "scene0003_00",
            "situation": "I am standing by the window.",
            "question": q,
            "answers": [a],
            **({"question_type": t} if t else {}),
        }
        for qid, q, a, t in rows
    ]


SQA3D_PREDS = {
    "s0": "Table",
    "s1": "no",
    "s2": "two",
    "s3": "No.",
    "s4": "to the left",  # EM-R only
    "s5": "on desk",  # EM after article removal
    "s6": "gray",
    "s7": "yes",
}


SCAN2CAP_REFS = [
    ["this is a brown chair. it is next to the desk.", "a brown wooden chair by a desk."],
    ["the white table is in the middle of the room.", "a white rectangular table."],
    ["a black monitor on the desk, facing the chair.", "the monitor is black."],
    ["this is a tall bookshelf. it is against the wall.", "a tall bookshelf."],
    ["a small trash can near the door.", "the trash can is gray."],
    ["the bed is in the corner, next to the window.", "a large bed with white sheets."],
]
SCAN2CAP_PREDS = {
    "o0": "This is a brown chair. It is next to a desk.",
    "o1": "A white table in the middle of the room.",
    "o2": "The black monitor is on the desk.",
    "o3": "A tall bookshelf against the wall.",
    "o4": "A gray trash can by the door.",
    "o5": "The bed is in the corner of the room.",
}
SCAN2CAP_IOUS = [0.9, 0.3, 0.5, 0.75, 0.1, 0.51]  # 0.5 exactly fails (official: IoU > 0.5)


def scan2cap_records(with_iou=True):
    recs = []
    for i, refs in enumerate(SCAN2CAP_REFS):
        rec = {
            "question_id": f"o{i}",
            "scene_id": "scene0004_00",
            "object_id": str(i),
            "object_name": "thing",
            "references": refs,
        }
        if with_iou:
            rec["iou"] = SCAN2CAP_IOUS[i]
        recs.append(rec)
    return recs


def vsibench_records_and_preds():
    mc = {
        "object_rel_direction_easy": [("A", "A"), ("B", "b."), ("C", "A")],
        "object_rel_direction_medium": [("A", "A. left"), ("D", " D")],
        "object_rel_direction_hard": [("B", "B"), ("C", "The answer is C")],
        "object_rel_distance": [("A", "A"), ("B", "B."), ("C", "")],
        "route_planning": [("D", "D"), ("A", "B")],
        "obj_appearance_order": [("C", "C"), ("A", "a")],
    }
    num = {
        "object_counting": [("3", "3"), ("4", "three"), ("2", "two chairs"), ("5", "")],
        "object_abs_distance": [("2.5", "2.5"), ("1.2", "about 1.5 meters"), ("3.0", "-3"), ("4", "far")],
        "object_size_estimation": [("120", "100"), ("45", "45.0"), ("80", "one hundred")],
        "room_size_estimation": [("20.5", "20"), ("35", "50"), ("12", "12.6 square meters")],
    }
    records, preds = [], {}
    i = 0
    for qtype, items in {**mc, **num}.items():
        for gt, pred in items:
            qid = f"v{i}"
            is_mc = qtype in mc
            records.append(
                {
                    "question_id": qid,
                    "scene_id": f"scene{i:04d}",
                    "question": "How far?" if not is_mc else "Which one?",
                    "question_type": qtype,
                    "options": ["A. x", "B. y", "C. z", "D. w"] if is_mc else [],
                    "ground_truth": gt,
                    "dataset": ("scannet", "scannetpp", "arkitscenes")[i % 3],
                    "video": f"videos/scene{i:04d}.mp4",
                }
            )
            preds[qid] = pred
            i += 1
    return records, preds


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- ScanQA
def test_scanqa_em_by_hand():
    out = score_task("scanqa", SCANQA_PREDS, scanqa_records(), meteor=False)
    assert out["scores"]["EM@1"] == pytest.approx(100 * 2 / 6)  # q0, q3
    assert out["scores"]["EM-R"] == pytest.approx(100 * 4 / 6)  # + q1 + q4 (empty: LEO's rule)
    assert out["scores"]["EM-R-strict"] == pytest.approx(100 * 3 / 6)  # + q1
    assert out["counts"] == {
        "records": 6,
        "scored": 6,
        "answered": 4,
        "missing": 1,
        "empty": 1,
        "invalid": 0,
        "empty_after_cleaning": 1,
    }
    assert list(out["scores"]) == list(score_keys("scanqa"))
    assert any("1 missing and 0 non-string" in n and "scored as wrong" in n for n in out["notes"])
    assert any("LEO's rule: 1 prediction(s) empty after cleaning" in n for n in out["notes"])


@pytest.mark.parametrize("task", ["scanqa", "sqa3d"])
def test_em_r_leo_rule_versus_strict_on_empty_outputs(task):
    recs = scanqa_records() if task == "scanqa" else sqa3d_records()
    ids = [r["question_id"] for r in recs]
    # every prediction empty, blank or punctuation only: LEO gives EM-R 100, strict and EM give 0
    preds = {q: ["", "  ", "?!", "\n"][i % 4] for i, q in enumerate(ids)}
    out = score_task(task, preds, recs, meteor=False)
    em = "EM@1" if task == "scanqa" else "EM"
    assert out["scores"][em] == 0.0
    assert out["scores"]["EM-R"] == 100.0
    assert out["scores"]["EM-R-strict"] == 0.0
    assert out["counts"]["empty_after_cleaning"] == len(ids)
    assert out["counts"]["empty"] == sum(1 for v in preds.values() if not v.strip())
    # one real answer among them: both variants agree on it
    first = recs[0]
    preds[first["question_id"]] = first["answers"][0]
    out = score_task(task, preds, recs, meteor=False)
    assert out["scores"]["EM-R-strict"] == pytest.approx(100 / len(ids))
    assert out["scores"]["EM-R"] == 100.0
    assert out["counts"]["empty_after_cleaning"] == len(ids) - 1


def test_em_r_missing_prediction_is_wrong_for_both_variants():
    recs = scanqa_records()
    out = score_task("scanqa", {}, recs, meteor=False)
    assert out["scores"]["EM-R"] == 0.0 and out["scores"]["EM-R-strict"] == 0.0
    assert out["counts"]["missing"] == len(recs) and out["counts"]["empty_after_cleaning"] == 0


def test_scanqa_full_metrics_equal_bare_scorers(meteor_scorers):
    recs = scanqa_records()
    out = score_task("scanqa", SCANQA_PREDS, recs, scorers=meteor_scorers)
    # the same corpus by hand: cleaned strings, "" for the empty and the missing prediction
    refs = {r["question_id"]: [M.clean_answer(a) for a in r["answers"]] for r in recs}
    cands = {q: M.clean_answer(SCANQA_PREDS.get(q, "")) for q in refs}
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {q: refs[q] for q in refs}
    res = {q: [cands[q]] for q in refs}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    expected = {f"BLEU-{i + 1}": 100 * bleu[i] for i in range(4)}
    expected["ROUGE-L"] = 100 * Rouge().compute_score(gts, res)[0]
    expected["CIDEr"] = 100 * Cider().compute_score(gts, res)[0]
    expected["METEOR"] = 100 * meteor_scorers.meteor.compute_score(gts, res)[0]
    for name, value in expected.items():
        assert out["scores"][name] == pytest.approx(value, abs=1e-9), name
    assert out["scores"]["METEOR"] is not None
    assert out["notes"] == [
        "1 missing and 0 non-string prediction(s) were scored as wrong answers",
        "EM-R follows LEO's rule: 1 prediction(s) empty after cleaning (1 empty as given) count as EM-R hits; "
        "EM-R-strict counts them wrong",
    ]


def test_only_predicted_leaves_out_missing():
    out = score_task("scanqa", SCANQA_PREDS, scanqa_records(), meteor=False, only_predicted=True)
    assert out["counts"]["scored"] == 5 and out["counts"]["missing"] == 0
    assert out["scores"]["EM@1"] == pytest.approx(100 * 2 / 5)


def test_non_string_predictions_count_as_invalid():
    preds = dict(SCANQA_PREDS, q5=["black office chair"])
    out = score_task("scanqa", preds, scanqa_records(), meteor=False)
    assert out["counts"]["invalid"] == 1 and out["counts"]["missing"] == 0
    assert out["scores"]["EM@1"] == pytest.approx(100 * 2 / 6)


# --------------------------------------------------------------------------- SQA3D
def test_sqa3d_per_type():
    out = score_task("sqa3d", SQA3D_PREDS, sqa3d_records())
    s = out["scores"]
    assert out["counts"]["by_type"] == {"what": 2, "is": 1, "how": 1, "can": 1, "which": 1, "others": 2}
    assert s["EM"] == pytest.approx(100 * 5 / 8)  # s0 s2 s3 s5 s7
    assert s["EM-R"] == pytest.approx(100 * 6 / 8)  # + s4
    assert s["EM-R-strict"] == pytest.approx(100 * 6 / 8)  # no empty prediction: the same
    assert s["EM/what"] == pytest.approx(50.0)
    assert s["EM/is"] == 0.0
    assert s["EM/how"] == 100.0 and s["EM/can"] == 100.0
    assert s["EM/which"] == 0.0 and s["EM-R/which"] == 100.0
    assert s["EM/others"] == 100.0
    assert list(s) == list(score_keys("sqa3d"))


def test_sqa3d_empty_type_is_none():
    recs = [r for r in sqa3d_records() if r["question_id"] != "s3"]
    preds = {k: v for k, v in SQA3D_PREDS.items() if k != "s3"}
    out = score_task("sqa3d", preds, recs)
    assert out["scores"]["EM/can"] is None and out["counts"]["by_type"]["can"] == 0


# --------------------------------------------------------------------------- Scan2Cap
def _bare_cider(refs, cands):
    from pycocoevalcap.cider.cider import Cider

    return 100 * Cider().compute_score({k: refs[k] for k in refs}, {k: [cands[k]] for k in refs})[0]


def test_scan2cap_wrapping_and_iou_variant():
    recs = scan2cap_records()
    out = score_task("scan2cap", SCAN2CAP_PREDS, recs, meteor=False)
    refs = {r["question_id"]: [M.wrap_caption(x) for x in r["references"]] for r in recs}
    cands = {q: M.wrap_caption(SCAN2CAP_PREDS[q]) for q in refs}
    assert out["scores"]["CIDEr"] == pytest.approx(_bare_cider(refs, cands), abs=1e-9)

    passing = {q for q, iou in zip(refs, SCAN2CAP_IOUS) if iou > 0.5}
    assert passing == {"o0", "o3", "o5"}  # 0.5 itself fails
    iou_cands = {q: (cands[q] if q in passing else "sos eos") for q in refs}
    expected = _bare_cider(refs, iou_cands)
    assert out["scores"]["CIDEr@0.5IoU"] == pytest.approx(expected, abs=1e-9)
    assert out["scores"]["CIDEr@0.5IoU"] < out["scores"]["CIDEr"]
    # corpus-level over ALL objects: not the same as scoring only the passing ones
    subset = _bare_cider({q: refs[q] for q in passing}, {q: cands[q] for q in passing})
    assert abs(out["scores"]["CIDEr@0.5IoU"] - subset) > 1.0
    assert out["counts"]["iou_pass"] == 3 and out["counts"]["with_iou"] == 6
    assert list(out["scores"]) == list(score_keys("scan2cap"))


def test_scan2cap_threshold_option_and_boxes():
    recs = scan2cap_records(with_iou=False)
    # boxes giving the same IoUs as SCAN2CAP_IOUS along x: overlap t of two unit cubes → t/(2-t)
    for rec, iou in zip(recs, SCAN2CAP_IOUS):
        shift = 1 - 2 * iou / (1 + iou)
        rec["gt_box"] = [0, 0, 0, 1, 1, 1]
        rec["pred_box"] = {"center": [shift, 0, 0], "size": [1, 1, 1]}
    from_boxes = score_task("scan2cap", SCAN2CAP_PREDS, recs, meteor=False)
    from_iou = score_task("scan2cap", SCAN2CAP_PREDS, scan2cap_records(), meteor=False)
    box_ious = [M.box_iou_3d(r["gt_box"], [*r["pred_box"]["center"], *r["pred_box"]["size"]]) for r in recs]
    assert box_ious == pytest.approx(SCAN2CAP_IOUS)
    assert from_boxes["counts"]["iou_pass"] == sum(v > 0.5 for v in box_ious)
    low = score_task("scan2cap", SCAN2CAP_PREDS, scan2cap_records(), meteor=False, iou_threshold=0.25)
    assert low["counts"]["iou_pass"] == 5 and "CIDEr@0.25IoU" in low["scores"]
    assert from_iou["scores"]["CIDEr"] == pytest.approx(from_boxes["scores"]["CIDEr"])


def test_scan2cap_missing_prediction_is_sos_eos_and_no_iou_fields():
    recs = scan2cap_records(with_iou=False)
    preds = {k: v for k, v in SCAN2CAP_PREDS.items() if k != "o1"}
    out = score_task("scan2cap", preds, recs, meteor=False)
    assert out["scores"]["CIDEr@0.5IoU"] is None and out["counts"]["iou_pass"] is None
    assert any("not computed" in n for n in out["notes"])
    refs = {r["question_id"]: [M.wrap_caption(x) for x in r["references"]] for r in recs}
    cands = {q: (M.wrap_caption(preds[q]) if q in preds else "sos eos") for q in refs}
    assert out["scores"]["CIDEr"] == pytest.approx(_bare_cider(refs, cands), abs=1e-9)


def test_scan2cap_with_meteor(meteor_scorers):
    out = score_task("scan2cap", SCAN2CAP_PREDS, scan2cap_records(), scorers=meteor_scorers)
    assert out["scores"]["METEOR"] is not None and out["scores"]["METEOR@0.5IoU"] is not None
    assert out["scores"]["METEOR@0.5IoU"] < out["scores"]["METEOR"]


def test_scan2cap_mixed_iou_information_is_an_error():
    recs = scan2cap_records()
    del recs[2]["iou"]
    with pytest.raises(SR3DInputError, match=r"record #2 \(question_id 'o2'\)"):
        score_task("scan2cap", SCAN2CAP_PREDS, recs, meteor=False)


# --------------------------------------------------------------------------- VSI-Bench
def _lmms_scores(module, records, preds, parser):
    docs = []
    for rec in records:
        doc = copy.deepcopy(rec)
        if parser == "first_token":  # the original VSI-Bench code: float() of the first token
            module_extract = module.extract_number
            module.extract_number = lambda text: module.to_float(module.fuzzy_matching(text))
            try:
                docs.append(module.vsibench_process_results(doc, [preds[rec["question_id"]]])["vsibench_overall"])
            finally:
                module.extract_number = module_extract
        else:
            docs.append(module.vsibench_process_results(doc, [preds[rec["question_id"]]])["vsibench_overall"])
    return module._compute_all_subscores(docs)


@pytest.mark.parametrize("parser", ["lmms_eval", "first_token"])
def test_vsibench_equals_lmms_eval(parser, lmms_vsibench):
    records, preds = vsibench_records_and_preds()
    ours = score_task("vsibench", preds, records, vsibench_number_parser=parser)["scores"]
    ref = _lmms_scores(lmms_vsibench, records, preds, parser)
    assert ours["overall"] == pytest.approx(100 * ref["overall"], abs=1e-9)
    assert ours["object_rel_direction"] == pytest.approx(100 * ref["object_rel_direction_accuracy"], abs=1e-9)
    for name in ("object_rel_distance", "route_planning", "obj_appearance_order"):
        assert ours[name] == pytest.approx(100 * ref[f"{name}_accuracy"], abs=1e-9), name
    for name in ("object_counting", "object_abs_distance", "object_size_estimation", "room_size_estimation"):
        assert ours[name] == pytest.approx(100 * ref[f"{name}_MRA:.5:.95:.05"], abs=1e-9), name
    assert list(ours) == list(score_keys("vsibench"))


def test_vsibench_counts_and_partial_types():
    records, preds = vsibench_records_and_preds()
    out = score_task("vsibench", preds, records)
    assert out["counts"]["unparsed"] == 1  # "far"
    assert out["counts"]["empty"] == 2
    assert out["counts"]["by_type"]["object_counting"] == 4
    # only two sub-scores present: overall is their mean
    some = [r for r in records if r["question_type"] in ("route_planning", "object_counting")]
    part = score_task("vsibench", {r["question_id"]: preds[r["question_id"]] for r in some}, some)["scores"]
    assert part["overall"] == pytest.approx((part["route_planning"] + part["object_counting"]) / 2)
    assert part["object_rel_direction"] is None


# --------------------------------------------------------------------------- bad input
def test_missing_field_names_record_and_field():
    recs = scanqa_records()
    del recs[3]["answers"]
    with pytest.raises(SR3DInputError, match=r"record #3 \(question_id 'q3'\): field 'answers': missing"):
        score_task("scanqa", {}, recs, meteor=False)


@pytest.mark.parametrize(
    "task, patch, field",
    [
        ("scanqa", {"answers": []}, "answers"),
        ("scanqa", {"answers": ["a", 3]}, "answers"),
        ("scanqa", {"question_id": 7}, "question_id"),
        ("sqa3d", {"question_type": "why"}, "question_type"),
        ("vsibench", {"question_type": "object_color"}, "question_type"),
        ("vsibench", {"dataset": "hm3d"}, "dataset"),
        ("scan2cap", {"gt_box": [0, 0, 0, 1, 1]}, "gt_box"),
        ("scan2cap", {"iou": 1.5}, "iou"),
    ],
)
def test_bad_fields(task, patch, field):
    base = {
        "scanqa": scanqa_records()[0],
        "sqa3d": sqa3d_records()[0],
        "vsibench": vsibench_records_and_preds()[0][0],
        "scan2cap": scan2cap_records()[0],
    }[task]
    with pytest.raises(SR3DInputError, match=f"field '{field}'"):
        validate_record(task, {**base, **patch}, 0)


def test_vsibench_ground_truth_checks():
    records, _ = vsibench_records_and_preds()
    numeric = next(r for r in records if r["question_type"] == "object_counting")
    with pytest.raises(SR3DInputError, match="ground_truth"):
        validate_record("vsibench", {**numeric, "ground_truth": "three"})
    with pytest.raises(SR3DInputError, match="ground_truth"):
        validate_record("vsibench", {**numeric, "ground_truth": "0"})
    validate_record("vsibench", {**numeric, "ground_truth": 3})  # a JSON number is fine
    mc = records[0]
    with pytest.raises(SR3DInputError, match="options"):
        validate_record("vsibench", {**mc, "options": []})


def test_extra_fields_allowed_and_prompt_instead_of_question():
    rec = {**scanqa_records()[0], "frames": [1, 2], "region": {"box": [0, 0, 1, 1]}}
    del rec["question"]
    with pytest.raises(SR3DInputError, match="'question'"):
        validate_record("scanqa", rec)
    validate_record("scanqa", {**rec, "prompt": "<image>\nWhat is by the bed?"})


def test_null_optional_fields_count_as_absent():
    # Hugging Face `datasets` fills keys missing from some JSON lines with None
    recs = [{**r, "question_type": r.get("question_type"), "prompt": None} for r in sqa3d_records()]
    assert recs[0]["question_type"] is None
    assert score_task("sqa3d", SQA3D_PREDS, recs)["counts"]["by_type"]["what"] == 2
    caps = [{**r, "iou": None, "gt_box": None, "pred_box": None} for r in scan2cap_records(with_iou=False)]
    out = score_task("scan2cap", SCAN2CAP_PREDS, caps, meteor=False)
    assert out["scores"]["CIDEr@0.5IoU"] is None and out["scores"]["CIDEr"] is not None


def test_duplicate_ids_unknown_ids_and_bad_predictions():
    recs = scanqa_records()
    with pytest.raises(SR3DInputError, match=r"duplicate question_id 'q0' in record #0 and record #6"):
        score_task("scanqa", {}, [*recs, dict(recs[0])], meteor=False)
    with pytest.raises(SR3DInputError, match="unknown question_id"):
        score_task("scanqa", {"nope": "x"}, recs, meteor=False)
    with pytest.raises(SR3DInputError, match="mapping"):
        score_task("scanqa", [("q0", "x")], recs, meteor=False)
    with pytest.raises(SR3DInputError, match="keys must be question_id strings"):
        score_task("scanqa", {0: "x"}, recs, meteor=False)
    with pytest.raises(SR3DInputError, match="unknown evaluation task"):
        score_task("vsi_bench", {}, recs)
    with pytest.raises(SR3DInputError, match="nothing to score"):
        score_task("scanqa", {}, recs, only_predicted=True, meteor=False)


def test_cache_returns_independent_copies():
    first = score_task("sqa3d", SQA3D_PREDS, sqa3d_records())
    first["scores"]["EM"] = -1.0
    second = score_task("sqa3d", SQA3D_PREDS, sqa3d_records())
    assert second["scores"]["EM"] == pytest.approx(100 * 5 / 8)
    changed = score_task("sqa3d", dict(SQA3D_PREDS, s6="white"), sqa3d_records())
    assert changed["scores"]["EM"] == pytest.approx(100 * 6 / 8)


# --------------------------------------------------------------------------- files and CLI
def run_cli(argv, capsys):
    code = sr3d_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_records_path_and_loading(tmp_path):
    path = records_path(tmp_path, "scanqa", "val")
    assert path == tmp_path / "scanqa" / "val.jsonl"
    write_jsonl(path, scanqa_records())
    assert load_records(path, "scanqa") == scanqa_records()
    with pytest.raises(SR3DInputError, match="split"):
        records_path(tmp_path, "scanqa", "../val")
    path.write_text(path.read_text() + "{not json}\n")
    with pytest.raises(SR3DInputError, match=r"val.jsonl:7: not valid JSON"):
        load_records(path, "scanqa")


@pytest.mark.parametrize("task", ["sqa3d", "vsibench", "scanqa", "scan2cap"])
def test_cli_equals_score_task(task, tmp_path, capsys):
    if task == "sqa3d":
        recs, preds = sqa3d_records(), SQA3D_PREDS
    elif task == "vsibench":
        recs, preds = vsibench_records_and_preds()
    elif task == "scanqa":
        recs, preds = scanqa_records(), SCANQA_PREDS
    else:
        recs, preds = scan2cap_records(), SCAN2CAP_PREDS
    write_jsonl(tmp_path / "data" / task / "test.jsonl", recs)
    aliases = ["prediction", "text", "answer", "pred"]
    rows = [{"question_id": q, aliases[i % 4]: t} for i, (q, t) in enumerate(preds.items())]
    pred_file = write_jsonl(tmp_path / "preds.jsonl", rows)
    out_file = tmp_path / "out" / "result.json"
    argv = ["metrics", task, str(pred_file), "--data", str(tmp_path / "data"), "--split", "test", "--json"]
    argv += ["--no-meteor", "--out", str(out_file)]
    code, stdout, _ = run_cli(argv, capsys)
    assert code == 0
    printed = json.loads(stdout)
    expected = score_task(task, preds, recs, meteor=False, cache=False)
    for key, value in expected["scores"].items():
        assert printed["scores"][key] == (pytest.approx(value) if value is not None else None), key
    assert printed["counts"] == expected["counts"]
    assert json.loads(out_file.read_text())["scores"] == printed["scores"]
    assert printed["source"]["split"] == "test"


def test_cli_reads_lmms_eval_sample_logs(tmp_path, capsys):
    recs, preds = vsibench_records_and_preds()
    write_jsonl(tmp_path / "data" / "vsibench" / "test.jsonl", recs)  # VSI-Bench's default split
    rows = []
    for doc_id, rec in enumerate(recs):
        text = preds[rec["question_id"]]
        row = {"doc_id": doc_id, "doc_hash": "x", "target": rec["ground_truth"], "filtered_resps": text}
        if doc_id % 3 == 1:
            row["filtered_resps"] = [[text]]  # nested form of multi-request tasks
        if doc_id % 3 == 2:  # an sr3d task puts the id into its per-sample metric value
            row = {"doc_id": 10_000 + doc_id, "resps": [text], "sr3d_score": {"question_id": rec["question_id"]}}
        rows.append(row)
    rows.reverse()
    log = write_jsonl(tmp_path / "samples_vsibench.jsonl", rows)
    assert load_predictions(log, recs) == preds
    code, stdout, _ = run_cli(["metrics", "vsibench", str(log), "--data", str(tmp_path / "data"), "--json"], capsys)
    assert code == 0
    assert json.loads(stdout)["scores"] == score_task("vsibench", preds, recs, cache=False)["scores"]


def test_cli_table_and_errors(tmp_path, capsys):
    write_jsonl(tmp_path / "data" / "sqa3d" / "test.jsonl", sqa3d_records())  # SQA3D's default split
    pred_file = write_jsonl(tmp_path / "p.jsonl", [{"question_id": q, "prediction": t} for q, t in SQA3D_PREDS.items()])
    code, stdout, _ = run_cli(["metrics", "sqa3d", str(pred_file), "--data", str(tmp_path / "data")], capsys)
    assert code == 0
    assert "EM/what" in stdout and "62.50" in stdout and "by_type: what 2" in stdout

    dup = write_jsonl(tmp_path / "dup.jsonl", [{"question_id": "s0", "prediction": "a"}] * 2)
    code, _, err = run_cli(["metrics", "sqa3d", str(dup), "--data", str(tmp_path / "data")], capsys)
    assert code == 2 and "dup.jsonl:2: duplicate prediction for question_id 's0' (first on line 1)" in err

    unknown = write_jsonl(tmp_path / "unk.jsonl", [{"question_id": "zz", "prediction": "a"}])
    code, _, err = run_cli(["metrics", "sqa3d", str(unknown), "--data", str(tmp_path / "data")], capsys)
    assert code == 2 and "unknown question_id" in err and "'zz'" in err

    notext = write_jsonl(tmp_path / "nt.jsonl", [{"question_id": "s0", "output": "a"}])
    code, _, err = run_cli(["metrics", "sqa3d", str(notext), "--data", str(tmp_path / "data")], capsys)
    assert code == 2 and "nt.jsonl:1: no prediction text" in err

    code, _, err = run_cli(["metrics", "sqa3d", str(pred_file), "--data", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "not found" in err


def test_metrics_default_split_per_task(tmp_path, capsys):
    import yaml

    from sr3d_plugin.data import qa, scan2cap, vsibench
    from sr3d_plugin.evaluation.lmms_tasks import TASK_NAMES
    from sr3d_plugin.evaluation.schema import DEFAULT_SPLITS, default_split
    from sr3d_plugin.resources import eval_tasks_dir

    assert DEFAULT_SPLITS == {"scanqa": "val", "sqa3d": "test", "scan2cap": "val", "vsibench": "test"}
    converters = {
        "scanqa": qa.ScanQAConverter,
        "sqa3d": qa.SQA3DConverter,
        "scan2cap": scan2cap.Scan2CapConverter,
        "vsibench": vsibench.VSIBenchConverter,
    }
    for task, split in DEFAULT_SPLITS.items():
        name = TASK_NAMES[task]
        text = (eval_tasks_dir() / name / f"{name}.yaml").read_text()
        line = next(x for x in text.splitlines() if x.startswith("test_split:"))
        assert yaml.safe_load(line)["test_split"] == split == default_split(task), task
        assert converters[task].default_split == split, task
    # without --split: sqa3d reads test.jsonl (a val.jsonl beside it is not used)
    write_jsonl(tmp_path / "data" / "sqa3d" / "test.jsonl", sqa3d_records())
    write_jsonl(tmp_path / "data" / "sqa3d" / "val.jsonl", sqa3d_records()[:2])
    pred_file = write_jsonl(tmp_path / "p.jsonl", [{"question_id": q, "prediction": t} for q, t in SQA3D_PREDS.items()])
    code, stdout, _ = run_cli(["metrics", "sqa3d", str(pred_file), "--data", str(tmp_path / "data"), "--json"], capsys)
    assert code == 0
    out = json.loads(stdout)
    assert out["source"]["split"] == "test" and out["counts"]["records"] == 8
    # the table prints the empty count beside EM-R
    preds = dict(SQA3D_PREDS, s6="", s5="...")
    pred_file = write_jsonl(tmp_path / "p2.jsonl", [{"question_id": q, "prediction": t} for q, t in preds.items()])
    code, stdout, _ = run_cli(["metrics", "sqa3d", str(pred_file), "--data", str(tmp_path / "data")], capsys)
    assert code == 0
    emr_line = next(x for x in stdout.splitlines() if x.strip().startswith("EM-R "))
    assert "2 empty prediction(s) counted as hits" in emr_line
