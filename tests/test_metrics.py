"""Reference-exact metrics: answer cleaning, EM/EM-R, MRA, SQA3D types, Scan2Cap, caption scorers.

METEOR needs Java and ~2–10 s to start: one :class:`CaptionScorers` (one Java process) is shared by
the module; every other caption test runs with ``meteor=False``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil

import pytest

from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.evaluation import metrics as M


# --------------------------------------------------------------------------- lmms-eval reference
@pytest.fixture(scope="module")
def lmms_vsibench():
    """lmms-eval 0.7.3's own ``tasks/vsibench/utils.py``, loaded from its file.

    ``import lmms_eval.tasks.vsibench.utils`` first runs ``lmms_eval/tasks/__init__.py``, which
    imports the whole task machinery (~10–15 s here). Loading the one file by path only pulls in
    numpy/pandas/datasets/yaml/loguru (~1.5 s) and gives the very same functions.
    """
    lmms_eval = pytest.importorskip("lmms_eval")
    path = os.path.join(os.path.dirname(lmms_eval.__file__), "tasks", "vsibench", "utils.py")
    spec = importlib.util.spec_from_file_location("_lmms_vsibench_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scorers_with_meteor():
    if shutil.which("java") is None:
        pytest.skip("METEOR needs Java")
    with M.CaptionScorers(meteor=True) as scorers:
        yield scorers


# --------------------------------------------------------------------------- clean_answer
# One case per rule; each expected value differs from what the input gives without that rule.
RULE_CASES = [
    ("lowercase", "Brown Chair", "brown chair"),
    ("trim spaces", "  chair  ", "chair"),
    ("collapse spaces", "brown    chair", "brown chair"),
    ("keep only [a-zA-Z0-9,'\\s\\-:]", "chair!?.", "chair"),
    ("kept punctuation", "left-side, o'clock: x", "left-side, o'clock: x"),
    ("typo letf", "letf", "left"),
    ("typo let", "let side", "left side"),
    ("typo tehre", "over tehre", "over there"),
    ("typo rigth", "rigth", "right"),
    ("typo rght", "rght", "right"),
    ("typo behine", "behine", "behind"),
    ("typo tv", "tv stand", "TV stand"),
    ("typo chai", "chai", "chair"),
    ("typo wasing", "wasing machine", "washing machine"),
    ("typo waslked", "waslked", "walked"),
    ("typo oclock", "3 oclock", "three o'clock"),
    ("typo o' clock", "o'   clock", "o'clock"),
    ("number 0", "0", "zero"),
    ("none", "none", "zero"),
    ("number 2", "2 chairs", "two chairs"),
    ("number 10", "10", "ten"),
    ("number 20", "20", "twenty"),
    ("number 23", "23", "twenty-three"),
    ("glued digit", "mat2", "mat"),
    ("article a", "a chair", "chair"),
    ("article an", "an armchair", "armchair"),
    ("article the", "the door", "door"),
    ("articles one after another", "the a chair", "chair"),
    ("backwards", "backwards", "backward"),
]


@pytest.mark.parametrize("rule, raw, expected", RULE_CASES, ids=[c[0] for c in RULE_CASES])
def test_clean_answer_rules(rule, raw, expected):
    assert M.clean_answer(raw) == expected


QUIRK_CASES = [
    ("only whole-word numbers 0-20 and 23", "21 and 100", "21 and 100"),
    ("two glued digits stay", "mat23", "mat23"),
    ("lone article stays", "a", "a"),
    ("numbers before articles", "the 2 chairs", "two chairs"),
    ("TV upper-cased before the article rule", "The TV", "TV"),
    ("curly apostrophe removed by the filter", "it’s", "its"),
    ("colon is a word boundary", "3:30", "three:30"),
    ("punctuation removal can leave two spaces", "chair . left", "chair  left"),
    ("only spaces are trimmed; '$' matches before a final newline", "chair \n", "chair\n"),
    ("non-ASCII letters dropped", "café", "caf"),
]


@pytest.mark.parametrize("rule, raw, expected", QUIRK_CASES, ids=[c[0] for c in QUIRK_CASES])
def test_clean_answer_reference_quirks(rule, raw, expected):
    assert M.clean_answer(raw) == expected


def test_clean_answer_rejects_non_strings():
    with pytest.raises(SR3DInputError, match="int"):
        M.clean_answer(3)


# --------------------------------------------------------------------------- EM / EM-R
def test_exact_match_cleans_both_sides():
    assert M.exact_match("The Chair.", ["chair"])
    assert M.exact_match("2", "two")
    assert not M.exact_match("brown chair", ["chair"])
    assert not M.exact_match("The Chair.", ["chair"], clean=False)


def test_exact_match_is_order_free():
    # LEO's answer_match would stop at "chair" (substring hit) and miss the exact second answer
    assert M.exact_match("brown chair", ["chair", "brown chair"])


@pytest.mark.parametrize(
    "pred, answers, em, emr, strict",
    [
        ("chair", ["chair"], True, True, True),
        ("brown chair", ["chair"], False, True, True),  # answer inside prediction
        ("chair", ["brown chair"], False, True, True),  # prediction inside answer
        ("white board", ["whiteboard"], False, True, True),  # whitespace removed before the test
        ("table", ["chair", "desk"], False, False, False),
        ("on the left", ["left"], False, True, True),
        # LEO's rule: the empty string is a substring of every answer -> EM-R hit; strict: no hit
        ("", ["chair"], False, True, False),
        ("   ", ["chair"], False, True, False),  # trimmed to ""
        ("...", ["chair"], False, True, False),  # cleans to ""
        ("the", ["chair"], False, False, False),  # "the" alone is not an article before a word: kept
        ("chair", ["..."], False, True, False),  # an answer that cleans to "" is inside every prediction
        ("", [""], True, True, True),
    ],
)
def test_em_and_refined_em(pred, answers, em, emr, strict):
    assert M.exact_match(pred, answers) is em
    assert M.refined_exact_match(pred, answers) is emr
    assert M.refined_exact_match_strict(pred, answers) is strict


def _leo_answer_match(pred, gts):
    # LEO's evaluator/scanqa_eval.py answer_match restated (loop over answers, first hit wins)
    for gt in gts:
        p, g = "".join(pred.split()), "".join(gt.split())
        if pred == gt:
            return 1, 1
        if p in g or g in p:
            return 0, 1
    return 0, 0


def test_refined_em_equals_leo_answer_match_on_many_pairs():
    words = ["", " ", "chair", "brown chair", "brownchair", "left", "on left", "the", "two", "2", "...", "tv"]
    for pred in words:
        for a in words:
            for b in ("", "chair", "left side"):
                gts = [M.clean_answer(x) for x in (a, b)]
                cp = M.clean_answer(pred)
                assert M.refined_exact_match(cp, gts, clean=False) is bool(_leo_answer_match(cp, gts)[1]), (pred, a, b)


def test_is_empty_after_cleaning():
    assert M.is_empty_after_cleaning("") and M.is_empty_after_cleaning(" ?! ") and M.is_empty_after_cleaning("\n")
    assert not M.is_empty_after_cleaning("a chair")
    with pytest.raises(SR3DInputError, match="string"):
        M.is_empty_after_cleaning(None)


def test_em_rejects_bad_types():
    with pytest.raises(SR3DInputError):
        M.exact_match(None, ["a"])
    with pytest.raises(SR3DInputError):
        M.refined_exact_match("a", ["a", 3])
    with pytest.raises(SR3DInputError):
        M.refined_exact_match_strict(None, ["a"])


# --------------------------------------------------------------------------- MRA
@pytest.mark.parametrize(
    "pred, gt, expected",
    [
        (10.0, 10.0, 1.0),
        (15.0, 10.0, 0.1),  # |e| = 0.5 passes θ = 0.5 only
        (5.0, 10.0, 0.1),
        (15.0001, 10.0, 0.0),
        (16.0, 10.0, 0.0),
        (10.5, 10.0, 1.0),  # |e| = 0.05 passes θ = 0.95 (1 − 0.95 > 0.05 in binary)
        (14.5, 10.0, 0.1),  # |e| = 0.45 fails θ = 0.55 (1 − 0.55 < 0.45 in binary)
        (None, 10.0, 0.0),
        (float("nan"), 10.0, 0.0),
        (-10.0, 10.0, 0.0),
    ],
)
def test_mra_boundaries(pred, gt, expected, lmms_vsibench):
    assert M.mean_relative_accuracy(pred, gt) == pytest.approx(expected, abs=1e-12)
    try:
        ref = lmms_vsibench.mean_relative_accuracy(pred, gt, 0.5, 0.95, 0.05)
    except TypeError:  # lmms-eval scores an unparsable answer through its TypeError path
        ref = 0.0
    assert M.mean_relative_accuracy(pred, gt) == float(ref)


def test_mra_thresholds_are_lmms_evals():
    assert len(M.MRA_THRESHOLDS) == 10
    assert M.MRA_THRESHOLDS[0] == 0.5 and M.MRA_THRESHOLDS[-1] == 0.95


@pytest.mark.parametrize("gt", [0.0, -1.0, float("inf"), float("nan")])
def test_mra_rejects_bad_ground_truth(gt):
    with pytest.raises(SR3DInputError, match="ground truth"):
        M.mean_relative_accuracy(1.0, gt)


# --------------------------------------------------------------------------- VSI-Bench parsing
VSI_TEXTS = [
    "A",
    "A.",
    "b",
    " A",
    "B. the chair",
    "The answer is A",
    "3",
    "3.5 meters",
    "about 2",
    "three",
    "Three boxes.",
    "twenty-one",
    "three hundred and five",
    "one apple, room 2",
    "-1.5",
    "",
    "none",
    "two thousand",
    "A\n",
]


@pytest.mark.parametrize("text", VSI_TEXTS)
def test_vsibench_parsing_matches_lmms_eval(text, lmms_vsibench):
    assert M.vsibench_choice(text) == lmms_vsibench.fuzzy_matching(text)
    assert M.vsibench_parse_number(text) == lmms_vsibench.extract_number(text)
    first_token = M.vsibench_parse_number(text, parser="first_token")
    assert first_token == lmms_vsibench.to_float(lmms_vsibench.fuzzy_matching(text))


def test_vsibench_choice_correct():
    assert M.vsibench_choice_correct("b.", "B")
    assert not M.vsibench_choice_correct(" B", "B")  # leading space: empty first token
    assert M.vsibench_parse_number("three hundred and five") == 305.0
    with pytest.raises(SR3DInputError, match="parser"):
        M.vsibench_parse_number("3", parser="regex")


# --------------------------------------------------------------------------- SQA3D types
@pytest.mark.parametrize(
    "question, qtype",
    [
        ("What is on the table?", "what"),
        ("  is the door open?", "is"),
        ("How many chairs are there?", "how"),
        ("Can I reach the lamp?", "can"),
        ("Which way should I go?", "which"),
        ("Where is the sink?", "others"),
        ("WHAT color is it?", "what"),
        ("Isn't the door open?", "is"),  # prefix test, as the reference
        ("Should I turn left?", "others"),
    ],
)
def test_sqa3d_question_type(question, qtype):
    assert M.sqa3d_question_type(question) == qtype


# --------------------------------------------------------------------------- Scan2Cap
def test_wrap_caption():
    assert M.wrap_caption("A brown chair, next to the desk.") == "sos a brown chair , next to the desk . eos"
    assert M.wrap_caption("It is white.It is big.") == "sos it is white . it is big . eos"
    assert M.wrap_caption("") == M.SCAN2CAP_EMPTY_CAPTION == "sos eos"
    assert M.wrap_caption("  ") == "sos eos"


def test_box_iou_3d():
    unit = (0, 0, 0, 1, 1, 1)
    assert M.box_iou_3d(unit, unit) == pytest.approx(1.0)
    assert M.box_iou_3d(unit, (0.5, 0, 0, 1, 1, 1)) == pytest.approx(0.5 / 1.5)
    assert M.box_iou_3d(unit, (3, 0, 0, 1, 1, 1)) == 0.0
    assert M.box_iou_3d(unit, (0, 0, 0, 2, 2, 2)) == pytest.approx(1 / 8)
    with pytest.raises(SR3DInputError):
        M.box_iou_3d(unit, (0, 0, 0))


# --------------------------------------------------------------------------- caption scorers
CORPUS_REFS = {
    "q0": ["brown chair", "chair"],
    "q1": ["table"],
    "q2": ["on left side of room", "left"],
    "q3": ["two"],
    "q4": ["white cabinet"],
}
CORPUS_CANDS = {"q0": "brown chair", "q1": "", "q2": "left side", "q3": "three", "q4": "white cabinet"}


def _bare_scores(refs, cands, meteor=None):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {k: list(v) for k, v in refs.items()}
    res = {k: [cands[k]] for k in refs}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU-{i + 1}": 100 * bleu[i] for i in range(4)}
    out["ROUGE-L"] = 100 * Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = 100 * Cider().compute_score(gts, res)[0]
    if meteor is not None:
        out["METEOR"] = 100 * meteor.compute_score(gts, res)[0]
    return out


def test_caption_scores_equal_bare_pycocoevalcap_with_meteor(scorers_with_meteor):
    ours = scorers_with_meteor.score(CORPUS_REFS, CORPUS_CANDS)
    assert list(ours) == list(M.CAPTION_METRICS)
    bare = _bare_scores(CORPUS_REFS, CORPUS_CANDS, meteor=scorers_with_meteor.meteor)
    for name, value in bare.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name
    assert 0 < ours["METEOR"] < 100
    # a newline would desynchronise METEOR's line protocol; it is neutralised instead
    odd = scorers_with_meteor.score({"a": ["left\nside"]}, {"a": "left side|||"})
    assert odd["METEOR"] is not None and odd["METEOR"] > 50
    assert scorers_with_meteor.errors == []


def test_caption_scores_without_meteor():
    with M.CaptionScorers(meteor=False) as scorers:
        assert scorers.meteor is None
        ours = scorers.score(CORPUS_REFS, CORPUS_CANDS)
    assert ours["METEOR"] is None
    bare = _bare_scores(CORPUS_REFS, CORPUS_CANDS)
    for name, value in bare.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name


def test_caption_scores_check_keys_and_types():
    with M.CaptionScorers(meteor=False) as scorers:
        with pytest.raises(SR3DInputError, match="same keys"):
            scorers.score({"a": ["x"]}, {"b": "x"})
        with pytest.raises(SR3DInputError, match="non-empty list"):
            scorers.score({"a": []}, {"a": "x"})
        with pytest.raises(SR3DInputError, match="candidate"):
            scorers.score({"a": ["x"]}, {"a": None})


def test_meteor_failure_keeps_other_metrics(monkeypatch):
    class BrokenMeteor:
        meteor_p = None

        def __init__(self):
            import threading

            self.lock = threading.Lock()

        def compute_score(self, gts, res):
            self.lock.acquire()  # like pycocoevalcap: the lock stays taken when Java dies
            raise ValueError("could not convert string to float: b''")

    with M.CaptionScorers(meteor=False) as scorers:
        scorers.use_meteor = True
        scorers.meteor = BrokenMeteor()
        out = scorers.score(CORPUS_REFS, CORPUS_CANDS)
        assert out["METEOR"] is None
        assert out["CIDEr"] is not None and out["BLEU-1"] is not None
        assert any("METEOR failed" in e for e in scorers.errors)
        assert scorers.meteor is None


def test_meteor_without_java(monkeypatch):
    monkeypatch.setattr(M.shutil, "which", lambda name: None)
    scorers = M.CaptionScorers(meteor=True)
    assert scorers.meteor is None
    assert any("java" in e.lower() for e in scorers.errors)
    out = scorers.score(CORPUS_REFS, CORPUS_CANDS)
    assert out["METEOR"] is None and not math.isnan(out["CIDEr"])
    scorers.close()
