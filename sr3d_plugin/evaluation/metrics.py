"""Reference-exact answer and caption metrics for ScanQA, SQA3D, Scan2Cap and VSI-Bench.

Conventions (SR3D-FACTS §8), each checked against the public reference code:

* **Answer cleaning** (:func:`clean_answer`) follows LEO's ``clean_answer``
  (``embodied-generalist/embodied-generalist``, ``data/data_utils.py``), rule for rule and in the
  same order; the same function is used by the Video-3D LLM SQA3D scorer.
* **EM / EM-R** (:func:`exact_match`, :func:`refined_exact_match`) on cleaned strings, as in LEO's
  ``evaluator/scanqa_eval.py``. EM-R is LEO's rule exactly, an empty prediction included (the empty
  string is a substring of every answer, so it scores a hit); :func:`refined_exact_match_strict`
  is the stricter variant in which an empty string only matches exactly. EM is order-free over the
  reference answers (documented on the function).
* **Caption metrics** through pycocoevalcap (BLEU-1..4, METEOR 1.5 on Java, ROUGE-L, CIDEr), on the
  strings as given (no PTB tokenisation, as in LEO and Scan2Cap), reported ×100. One scorer set per
  scoring call; each metric scores the whole corpus in one call (:class:`CaptionScorers`).
* **Scan2Cap** (:func:`wrap_caption`, :func:`box_iou_3d`): captions become ``"sos … eos"`` with
  "." and "," split off and lowercased (the official Scan2Cap corpus form, ``daveredrum/Scan2Cap``
  ``lib/eval_helper.py``); @0.5IoU gives every object whose box IoU does not exceed the threshold
  the candidate ``"sos eos"`` and scores all objects at corpus level.
* **SQA3D** question types (:func:`sqa3d_question_type`) by the reference's prefix test
  (LEO ``get_sqa_question_type``, Video-3D LLM ``process_sqa3d.py``).
* **VSI-Bench** (:func:`vsibench_choice`, :func:`vsibench_parse_number`,
  :func:`mean_relative_accuracy`) as in lmms-eval 0.7.3 ``lmms_eval/tasks/vsibench/utils.py``
  (and, for the ``"first_token"`` number parser, the original ``vision-x-nyu/thinking-in-space``).

All functions here take plain Python values. Scores returned by :class:`CaptionScorers` are
percentages; :func:`mean_relative_accuracy` returns a fraction in [0, 1].
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import shutil
import threading
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from sr3d_plugin.errors import SR3DConfigError, SR3DInputError

__all__ = [
    "CAPTION_METRICS",
    "MRA_THRESHOLDS",
    "SCAN2CAP_EMPTY_CAPTION",
    "CaptionScorers",
    "box_iou_3d",
    "clean_answer",
    "exact_match",
    "is_empty_after_cleaning",
    "mean_relative_accuracy",
    "refined_exact_match",
    "refined_exact_match_strict",
    "sqa3d_question_type",
    "vsibench_choice",
    "vsibench_choice_correct",
    "vsibench_parse_number",
    "wrap_caption",
]

# =========================================================================== answer cleaning
# Word-level typo fixes of the reference (applied after the character filter). One alternation
# with a lookup table gives the same result as the reference's one-substitution-per-typo, because
# no replacement produces another key.
_TYPO_FIXES = {
    "letf": "left",
    "let": "left",
    "tehre": "there",
    "rigth": "right",
    "rght": "right",
    "behine": "behind",
    "tv": "TV",  # sic: the reference upper-cases TV after lower-casing everything else
    "chai": "chair",
    "wasing": "washing",
    "waslked": "walked",
    "oclock": "o'clock",
}
# Whole-word numbers → words (0–20 and 23 only) and "none" → "zero", as in the reference.
_NUMBER_WORDS = {
    "none": "zero",
    "0": "zero",
    "1": "one",
    "2": "two",
    "3": "three",
    "4": "four",
    "5": "five",
    "6": "six",
    "7": "seven",
    "8": "eight",
    "9": "nine",
    "10": "ten",
    "11": "eleven",
    "12": "twelve",
    "13": "thirteen",
    "14": "fourteen",
    "15": "fifteen",
    "16": "sixteen",
    "17": "seventeen",
    "18": "eighteen",
    "19": "nineteen",
    "20": "twenty",
    "23": "twenty-three",
}


def _word_table_pattern(table: Mapping[str, str]) -> re.Pattern[str]:
    # longest keys first so that alternation order never matters
    keys = sorted(table, key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(re.escape(k) for k in keys) + r")\b")


# '$' also matches before a final newline, so "chair \n" loses its space: kept as in the reference
_RE_TRAILING_SPACES = re.compile("[ ]+$")
_RE_LEADING_SPACES = re.compile("^[ ]+")
_RE_MULTI_SPACE = re.compile(" {2,}")
_RE_DISALLOWED = re.compile(r"[^a-zA-Z0-9,'\s\-:]+")
_RE_TYPOS = _word_table_pattern(_TYPO_FIXES)
_RE_O_CLOCK = re.compile(r"\bo'[ ]+clock\b")
_RE_NUMBERS = _word_table_pattern(_NUMBER_WORDS)
_RE_GLUED_DIGIT = re.compile(r"\b([a-zA-Z]+)[0-9]\b")
# Articles are removed one after another (a, then an, then the): a single alternation would give a
# different result on chains such as "the a chair".
_RE_ARTICLES = tuple(re.compile(rf"\b{art}\b ([a-zA-Z]+)") for art in ("a", "an", "the"))
_RE_BACKWARDS = re.compile(r"\bbackwards\b")


@functools.lru_cache(maxsize=1 << 16)
def _clean(text: str) -> str:
    s = text.lower()
    s = _RE_LEADING_SPACES.sub("", _RE_TRAILING_SPACES.sub("", s))  # spaces only, not tabs/newlines
    s = _RE_MULTI_SPACE.sub(" ", s)
    # The reference next turns '.' followed by 2+ spaces into '. ' — a no-op once runs of spaces
    # are collapsed — so it is left out.
    s = _RE_DISALLOWED.sub("", s)
    # The reference then maps 'ç'→'c' and '’'→"'"; both characters are already gone after the
    # filter above, so those two rules never fire ("it’s" becomes "its"). Left out for that reason.
    s = _RE_TYPOS.sub(lambda m: _TYPO_FIXES[m.group(0)], s)
    s = _RE_O_CLOCK.sub("o'clock", s)
    s = _RE_NUMBERS.sub(lambda m: _NUMBER_WORDS[m.group(0)], s)
    s = _RE_GLUED_DIGIT.sub(r"\1", s)
    for pattern in _RE_ARTICLES:
        s = pattern.sub(r"\1", s)
    return _RE_BACKWARDS.sub("backward", s)


def clean_answer(text: str) -> str:
    """Normalise a short answer exactly like LEO's ``clean_answer`` (SR3D-FACTS §8).

    In order: lowercase; trim spaces at both ends; collapse runs of spaces; keep only
    ``[a-zA-Z0-9,'\\s\\-:]``; word typo fixes (letf/let→left, tehre→there, rigth/rght→right,
    behine→behind, tv→TV, chai→chair, wasing→washing, waslked→walked, oclock and "o' clock"→o'clock);
    whole-word numbers 0–20 and 23 to words and none→zero; drop one digit glued to the end of a word
    (``mat2``→``mat``); drop "a", "an", "the" before a word; backwards→backward.

    Faithful quirks: only spaces are trimmed (tabs and newlines stay); removing punctuation can
    leave a double space ("chair . left" → "chair  left"); "3:30" becomes "three:30".
    """
    if not isinstance(text, str):
        raise SR3DInputError(f"clean_answer expects a string, got {type(text).__name__}: {text!r}")
    return _clean(text)


# =========================================================================== EM and EM-R
def _answers_list(answers: str | Iterable[str]) -> list[str]:
    if isinstance(answers, str):
        return [answers]
    out = list(answers)
    for a in out:
        if not isinstance(a, str):
            raise SR3DInputError(f"reference answers must be strings, got {type(a).__name__}: {a!r}")
    return out


def exact_match(pred: str, answers: str | Iterable[str], clean: bool = True) -> bool:
    """EM: the (cleaned) prediction equals one of the (cleaned) reference answers.

    ``clean=False`` compares the strings as given (for callers that cleaned them already).
    Order-free over ``answers``; LEO's ``answer_match`` stops at the first reference that matches
    only as a substring and can then miss an exact match with a later one — the definition in
    SR3D-FACTS §8 (and ScanQA's own EM) has no such order dependence.
    """
    if not isinstance(pred, str):
        raise SR3DInputError(f"prediction must be a string, got {type(pred).__name__}: {pred!r}")
    refs = _answers_list(answers)
    if clean:
        pred, refs = _clean(pred), [_clean(a) for a in refs]
    return pred in refs


def _squeeze(s: str) -> str:
    return "".join(s.split())


def _cleaned_pair(pred: str, answers: str | Iterable[str], clean: bool) -> tuple[str, list[str]]:
    if not isinstance(pred, str):
        raise SR3DInputError(f"prediction must be a string, got {type(pred).__name__}: {pred!r}")
    refs = _answers_list(answers)
    if clean:
        pred, refs = _clean(pred), [_clean(a) for a in refs]
    return pred, refs


def refined_exact_match(pred: str, answers: str | Iterable[str], clean: bool = True) -> bool:
    """EM-R, LEO's rule (``answer_match`` of ``evaluator/scanqa_eval.py``): the reported EM-R.

    A hit when, for some reference answer, the prediction equals it or, with all whitespace
    removed, one of the two is a substring of the other. Strings are cleaned first unless
    ``clean=False``. As in LEO, an empty prediction (or one that cleans to "", such as ``"..."``)
    is a substring of every answer and therefore a hit; so is any prediction when an answer cleans
    to "". :func:`refined_exact_match_strict` is the variant without those hits.
    """
    pred, refs = _cleaned_pair(pred, answers, clean)
    p = _squeeze(pred)
    for ref in refs:
        r = _squeeze(ref)
        if pred == ref or p in r or r in p:
            return True
    return False


def refined_exact_match_strict(pred: str, answers: str | Iterable[str], clean: bool = True) -> bool:
    """EM-R without LEO's empty-string hits (reported as ``EM-R-strict``).

    As :func:`refined_exact_match`, except that an empty string (after cleaning and whitespace
    removal) on either side only counts when the other side is exactly equal: an empty output
    is not rewarded.
    """
    pred, refs = _cleaned_pair(pred, answers, clean)
    if pred in refs:
        return True
    p = _squeeze(pred)
    if not p:
        return False
    for ref in refs:
        r = _squeeze(ref)
        if r and (p in r or r in p):
            return True
    return False


def is_empty_after_cleaning(pred: str) -> bool:
    """Whether ``pred`` is empty once cleaned and stripped of whitespace (an EM-R hit by LEO's rule)."""
    if not isinstance(pred, str):
        raise SR3DInputError(f"prediction must be a string, got {type(pred).__name__}: {pred!r}")
    return not _squeeze(_clean(pred))


# =========================================================================== SQA3D
def sqa3d_question_type(question: str) -> str:
    """SQA3D question bucket: what / is / how / can / which / others (SR3D-FACTS §8).

    As in the reference, the test is a case-insensitive *prefix* test on the question with leading
    whitespace removed, tried in the order what, is, how, can, which: "Isn't …" counts as "is",
    "However …" as "how".
    """
    if not isinstance(question, str):
        raise SR3DInputError(f"question must be a string, got {type(question).__name__}")
    head = question.lstrip()[:5].lower()
    for name in ("what", "is", "how", "can", "which"):
        if head.startswith(name):
            return name
    return "others"


# =========================================================================== Scan2Cap
#: candidate caption of an object without a usable prediction (official Scan2Cap placeholder)
SCAN2CAP_EMPTY_CAPTION = "sos eos"


def wrap_caption(text: str) -> str:
    """Scan2Cap corpus form: lowercase, "." and "," as separate tokens, ``"sos … eos"``.

    Tokens are joined by single spaces (as in the official corpus built from ScanRefer tokens), so
    ``"A chair, by the desk."`` → ``"sos a chair , by the desk . eos"`` and ``""`` → ``"sos eos"``.
    """
    if not isinstance(text, str):
        raise SR3DInputError(f"caption must be a string, got {type(text).__name__}: {text!r}")
    body = " ".join(text.lower().replace(".", " . ").replace(",", " , ").split())
    return f"sos {body} eos" if body else SCAN2CAP_EMPTY_CAPTION


def box_iou_3d(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU of two axis-aligned 3D boxes ``(cx, cy, cz, dx, dy, dz)`` (centre, full size; any unit).

    Returns 0 for disjoint boxes and for two empty boxes.
    """
    a = [float(v) for v in box_a]
    b = [float(v) for v in box_b]
    if len(a) != 6 or len(b) != 6:
        raise SR3DInputError(f"boxes must have 6 values (cx, cy, cz, dx, dy, dz), got {len(a)} and {len(b)}")
    inter = 1.0
    for k in range(3):
        lo = max(a[k] - a[k + 3] / 2, b[k] - b[k + 3] / 2)
        hi = min(a[k] + a[k + 3] / 2, b[k] + b[k + 3] / 2)
        inter *= max(hi - lo, 0.0)
    vol_a = a[3] * a[4] * a[5]
    vol_b = b[3] * b[4] * b[5]
    union = vol_a + vol_b - inter
    return inter / union if union > 0 else 0.0


# =========================================================================== VSI-Bench
#: θ ∈ {0.50, 0.55, …, 0.95}, built as lmms-eval builds it (so the float values are identical)
MRA_THRESHOLDS: np.ndarray = np.linspace(0.5, 0.95, 10)


def mean_relative_accuracy(pred: float | None, gt: float) -> float:
    """MRA = mean over θ ∈ {0.50, …, 0.95} of 1[|pred − gt| / gt ≤ 1 − θ], a fraction in [0, 1].

    ``pred`` None (unparsable answer) or NaN scores 0. ``gt`` must be a positive finite number.
    The comparison uses the same float arithmetic as lmms-eval, so boundary cases agree with it
    (e.g. a relative error of exactly 0.45 fails θ = 0.55 because 1 − 0.55 < 0.45 in binary).
    """
    if isinstance(gt, bool) or not isinstance(gt, (int, float)) or not math.isfinite(gt) or gt <= 0:
        raise SR3DInputError(f"mean_relative_accuracy needs a positive finite ground truth, got {gt!r}")
    if pred is None:
        return 0.0
    if isinstance(pred, bool) or not isinstance(pred, (int, float)):
        raise SR3DInputError(f"prediction must be a number or None, got {type(pred).__name__}: {pred!r}")
    rel = abs(float(pred) - float(gt)) / float(gt)
    return float(np.mean(rel <= 1 - MRA_THRESHOLDS))


def vsibench_choice(pred: str) -> str:
    """The option a multiple-choice answer picks: text before the first space, trailing "." removed.

    As lmms-eval: ``"B. the chair"`` → ``"B"``; a leading space gives an empty choice.
    """
    if not isinstance(pred, str):
        raise SR3DInputError(f"prediction must be a string, got {type(pred).__name__}: {pred!r}")
    return pred.split(" ")[0].rstrip(".").strip()


def vsibench_choice_correct(pred: str, gt: str) -> bool:
    """Case-insensitive equality of :func:`vsibench_choice` (pred) and the option letter."""
    return vsibench_choice(pred).lower() == str(gt).lower()


_RE_SIGNED_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_RE_ASCII_WORD = re.compile(r"[a-z]+")
_UNITS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)  # fmt: skip
_NUMBER_WORD_VALUES = {
    **{word: value for value, word in enumerate(_UNITS)},
    "thirty": 30,
    "forty": 40,
    "fifty": 50,
    "sixty": 60,
    "seventy": 70,
    "eighty": 80,
    "ninety": 90,
    "hundred": 100,
    "thousand": 1000,
}


def _first_number_lmms(text: str) -> float | None:
    s = text.strip().lower()
    if not s:
        return None
    digits = _RE_SIGNED_NUMBER.search(s)
    # the first run of number words ("and" may sit inside a run; other words end it)
    run: list[int] = []
    run_start: int | None = None
    for m in _RE_ASCII_WORD.finditer(s):
        word = m.group(0)
        if run_start is None:
            if word in _NUMBER_WORD_VALUES:
                run_start = m.start()
                run.append(_NUMBER_WORD_VALUES[word])
        elif word in _NUMBER_WORD_VALUES:
            run.append(_NUMBER_WORD_VALUES[word])
        elif word != "and":
            break
    if digits is not None and (run_start is None or digits.start() < run_start):
        return float(digits.group(0))
    if run_start is None:
        return None
    total = current = 0
    for value in run:
        if value == 100:
            current = max(current, 1) * 100
        elif value == 1000:
            total += max(current, 1) * 1000
            current = 0
        else:
            current += value
    return float(total + current)


def vsibench_parse_number(text: str, parser: str = "lmms_eval") -> float | None:
    """The number a numeric VSI-Bench answer states, or None.

    ``parser="lmms_eval"`` (lmms-eval 0.7.3): the first number in the text, digits (``-?\\d+(\\.\\d+)?``)
    or English number words ("three", "twenty-one", "three hundred and five"), whichever comes first.
    ``parser="first_token"`` (original VSI-Bench code): ``float()`` of :func:`vsibench_choice`'s token.
    """
    if not isinstance(text, str):
        raise SR3DInputError(f"prediction must be a string, got {type(text).__name__}: {text!r}")
    if parser == "lmms_eval":
        return _first_number_lmms(text)
    if parser == "first_token":
        try:
            return float(vsibench_choice(text))
        except ValueError:
            return None
    raise SR3DInputError(f"unknown VSI-Bench number parser {parser!r}; expected 'lmms_eval' or 'first_token'")


# =========================================================================== caption scorers
#: caption metric names, in report order
CAPTION_METRICS: tuple[str, ...] = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def _meteor_safe(s: str) -> str:
    # METEOR talks to Java one line per item with '|||' separators: a newline or '|||' inside a
    # string would desynchronise the protocol (and hang), so such characters become spaces.
    if "\n" in s or "\r" in s or "|||" in s:
        s = s.replace("\r", " ").replace("\n", " ").replace("|||", " ")
    return s


class CaptionScorers:
    """One set of pycocoevalcap scorers (BLEU-1..4, METEOR, ROUGE-L, CIDEr) for a scoring call.

    Creating it starts METEOR's Java process (it loads for ~2–10 s in the background); reuse one
    instance for every corpus of a scoring call and :meth:`close` it afterwards (or use ``with``).
    ``meteor=False`` skips Java entirely (METEOR is then reported as None). If Java is missing or
    METEOR fails, METEOR is None and the reason is in :attr:`errors`; the other metrics still run.
    """

    def __init__(self, meteor: bool = True) -> None:
        try:
            from pycocoevalcap.bleu.bleu import Bleu
            from pycocoevalcap.cider.cider import Cider
            from pycocoevalcap.rouge.rouge import Rouge
        except ImportError as exc:  # pragma: no cover - eval extra not installed
            raise SR3DConfigError("caption metrics need pycocoevalcap: pip install 'sr3d-plugin[eval]'") from exc
        self._bleu = Bleu(4)
        self._rouge = Rouge()
        self._cider = Cider()
        self._lock = threading.Lock()
        self.errors: list[str] = []
        self.meteor: Any = None
        #: whether METEOR was asked for (it may still be unavailable: see :attr:`errors`)
        self.use_meteor = bool(meteor)
        if meteor:
            self._start_meteor()

    # -- METEOR process management
    def _start_meteor(self) -> None:
        if shutil.which("java") is None:
            self.errors.append("METEOR unavailable: no 'java' on PATH (METEOR 1.5 runs on Java)")
            return
        try:
            from pycocoevalcap.meteor.meteor import Meteor

            self.meteor = Meteor()
        except (OSError, ImportError) as exc:
            self.meteor = None
            self.errors.append(f"METEOR unavailable: {exc}")

    def close(self) -> None:
        """Stop METEOR's Java process (idempotent)."""
        m, self.meteor = self.meteor, None
        if m is None:
            return
        # pycocoevalcap's Meteor keeps its lock when compute_score raises, and its __del__ then
        # blocks forever: release the lock and stop the Java process here.
        lock = getattr(m, "lock", None)
        if lock is not None and lock.locked():
            with contextlib.suppress(RuntimeError):
                lock.release()
        proc = getattr(m, "meteor_p", None)
        if proc is None:
            return
        with contextlib.suppress(Exception):
            proc.kill()
            proc.wait(timeout=30)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(Exception):
                if stream is not None:
                    stream.close()

    def __enter__(self) -> CaptionScorers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        # no module globals here: at interpreter exit they may already be None
        try:
            self.close()
        except Exception:
            pass

    # -- scoring
    def score(
        self,
        references: Mapping[Hashable, Sequence[str]],
        candidates: Mapping[Hashable, str],
        meteor: bool = True,
    ) -> dict[str, float | None]:
        """Corpus scores (×100) of ``candidates[k]`` against ``references[k]`` for every key.

        ``references`` and ``candidates`` must have the same keys; every reference list is
        non-empty. Strings are used as given (clean or wrap them first). Each metric is computed
        in one call over the whole corpus. ``meteor=False`` skips METEOR for this corpus.
        """
        keys = list(references)
        if set(keys) != set(candidates):
            missing = [k for k in keys if k not in candidates][:5]
            extra = [k for k in candidates if k not in references][:5]
            raise SR3DInputError(
                f"caption references and candidates must have the same keys (missing candidates {missing}, "
                f"unknown candidates {extra})"
            )
        if not keys:
            raise SR3DInputError("no captions to score")
        # pycocoevalcap wants {key: [strings]}; integer keys keep its asserts and dicts simple
        gts: dict[int, list[str]] = {}
        res: dict[int, list[str]] = {}
        for i, k in enumerate(keys):
            refs = references[k]
            cand = candidates[k]
            if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
                raise SR3DInputError(f"references of {k!r} must be a non-empty list of strings, got {refs!r}")
            if not isinstance(cand, str):
                raise SR3DInputError(f"candidate of {k!r} must be a string, got {type(cand).__name__}")
            gts[i] = list(refs)
            res[i] = [cand]

        out: dict[str, float | None] = {}
        with self._lock:
            bleu, _ = self._bleu.compute_score(gts, res, verbose=0)
            for n in range(4):
                out[f"BLEU-{n + 1}"] = 100.0 * float(bleu[n])
            out["ROUGE-L"] = 100.0 * float(self._rouge.compute_score(gts, res)[0])
            out["CIDEr"] = 100.0 * float(self._cider.compute_score(gts, res)[0])
            # last, so that the pure-Python metrics overlap METEOR's Java start-up
            out["METEOR"] = self._score_meteor(gts, res) if meteor else None
        return {name: out[name] for name in CAPTION_METRICS}

    def _score_meteor(self, gts: dict[int, list[str]], res: dict[int, list[str]]) -> float | None:
        if self.meteor is None:
            if not self.use_meteor:
                return None
            if not self.errors:
                self._start_meteor()
            if self.meteor is None:
                return None
        safe_gts = {k: [_meteor_safe(r) for r in v] for k, v in gts.items()}
        safe_res = {k: [_meteor_safe(v[0])] for k, v in res.items()}
        try:
            value, _ = self.meteor.compute_score(safe_gts, safe_res)
            return 100.0 * float(value)
        except Exception as exc:
            detail = ""
            proc = getattr(self.meteor, "meteor_p", None)
            if proc is not None and proc.poll() is not None and proc.stderr is not None:
                with contextlib.suppress(Exception):
                    detail = proc.stderr.read().decode(errors="replace").strip()[-300:]
            self.errors.append(f"METEOR failed: {type(exc).__name__}: {exc}" + (f" ({detail})" if detail else ""))
            self.close()
            return None
