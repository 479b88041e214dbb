"""Conformance with the original implementations, replayed from recorded data.

The scripts under the repository's ``conformance/`` folder run the ORIGINAL code (SR-REAL's VILA
fork, NVlabs/VILA, haotian-liu/LLaVA, transformers' LLaVA family) in venvs of their own, let it
build and save tiny random checkpoints, and record its outputs for fixed raw inputs. Only data is
committed: one folder per case,

.. code-block:: text

    conformance/data/<case>/
        case.json              {"name", "lineage", "runner": "sr3d_plugin.conformance.<module>:<function>",
                                "recorded_with": {...versions...}, "description", ...runner-specific keys}
        checkpoint/            the tiny checkpoint, saved by the original code's save_pretrained
        inputs/                raw inputs (images, depth PNGs, poses, masks, prompts as JSON)
        expected.safetensors   what the original produced: input ids, intermediates, last-position
                               logits, greedy tokens

A case's runner feeds the raw inputs through this package's default user paths and compares.
Runners live in this package (``sr3d_plugin.conformance.*``); ``case.json`` may only name those, so a
data folder never makes us import anything else.

``python -m sr3d_plugin.conformance`` and ``sr3d conformance`` print the table; the test suite runs
the same cases.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sr3d_plugin.errors import SR3DInputError

__all__ = [
    "LOGIT_TOLERANCE",
    "CaseResult",
    "data_root",
    "discover",
    "format_table",
    "load_case",
    "run_all",
    "run_case",
]

#: fp32 CPU tolerance on last-position logits (the issue's acceptance bound)
LOGIT_TOLERANCE = 1e-4
_RUNNER_PREFIX = "sr3d_plugin.conformance."


@dataclass(frozen=True)
class CaseResult:
    """One comparison: a case replayed through one user path.

    Attributes:
        case: case folder name.
        path: the user path exercised (e.g. ``"processor"``, ``"pipeline.ask"``, ``"cli ask"``, ``"lmms-eval"``).
        max_abs_logit_diff: max |Δ| over the last-position logits (fp32), ``nan`` when not compared.
        tokens_equal: greedy tokens identical to the recorded ones.
        detail: extra figures (intermediate diffs, lengths) for the table's JSON form.
    """

    case: str
    path: str
    max_abs_logit_diff: float
    tokens_equal: bool
    tolerance: float = LOGIT_TOLERANCE
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return (
            self.tokens_equal and math.isfinite(self.max_abs_logit_diff) and self.max_abs_logit_diff <= self.tolerance
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "path": self.path,
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "tokens_equal": self.tokens_equal,
            "tolerance": self.tolerance,
            "passed": self.passed,
            "detail": self.detail,
        }


def data_root() -> Path:
    """The folder of recorded cases: ``$SR3D_CONFORMANCE_DATA``, else ``conformance/data`` of the checkout."""
    env = os.environ.get("SR3D_CONFORMANCE_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "conformance" / "data"


def discover(root: str | Path | None = None) -> list[Path]:
    """Case folders (those holding a ``case.json``) under ``root``, sorted by name."""
    base = Path(root) if root is not None else data_root()
    if not base.is_dir():
        raise SR3DInputError(
            f"conformance data folder {str(base)!r} does not exist; expected the recorded cases "
            "(conformance/data in a source checkout, or set SR3D_CONFORMANCE_DATA)"
        )
    return sorted(p.parent for p in base.glob("*/case.json"))


def load_case(case_dir: str | Path) -> dict[str, Any]:
    """Read and check ``case.json``."""
    path = Path(case_dir) / "case.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SR3DInputError(f"cannot read conformance case file {str(path)!r}: {exc}") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("runner"), str):
        raise SR3DInputError(f"{str(path)!r} must be a JSON object with a 'runner' string")
    return meta


def _runner(spec: str) -> Callable[[Path, dict[str, Any]], list[CaseResult]]:
    module, _, func = spec.partition(":")
    if not module.startswith(_RUNNER_PREFIX) or not func:
        raise SR3DInputError(
            f"conformance runner {spec!r} is not allowed; expected 'sr3d_plugin.conformance.<module>:<function>'"
        )
    return getattr(importlib.import_module(module), func)


def run_case(case_dir: str | Path) -> list[CaseResult]:
    """Replay one recorded case through every user path its runner covers."""
    case_dir = Path(case_dir)
    meta = load_case(case_dir)
    return _runner(meta["runner"])(case_dir, meta)


def run_all(root: str | Path | None = None, select: Sequence[str] | None = None) -> list[CaseResult]:
    """Run every case under ``root`` (or those named in ``select``)."""
    cases = discover(root)
    if select:
        known = {c.name for c in cases}
        missing = [s for s in select if s not in known]
        if missing:
            raise SR3DInputError(f"unknown conformance case(s) {missing}; recorded: {sorted(known)}")
        cases = [c for c in cases if c.name in set(select)]
    results: list[CaseResult] = []
    for case in cases:
        results.extend(run_case(case))
    return results


def format_table(results: Iterable[CaseResult]) -> str:
    """A plain-text table: case, path, max |Δlogit|, tokens equal, verdict."""
    rows = [("case", "path", "max |Δlogit|", "tokens equal", "ok")]
    for r in results:
        rows.append(
            (
                r.case,
                r.path,
                f"{r.max_abs_logit_diff:.2e}",
                "yes" if r.tokens_equal else "NO",
                "ok" if r.passed else "FAIL",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
