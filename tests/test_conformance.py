"""Every recorded original-code case replays through our default paths: tokens equal, logits within 1e-4.

The data under conformance/data was recorded from the original implementations (see conformance/README.md);
each lineage's own test module lists the cases it requires, so a missing folder fails rather than skips.
"""

from __future__ import annotations

import json

import pytest

from sr3d_plugin.cli import main as cli_main
from sr3d_plugin.conformance import LOGIT_TOLERANCE, discover, format_table, run_case
from sr3d_plugin.errors import SR3DInputError

CASES = discover()


def test_cases_are_recorded() -> None:
    assert CASES, "conformance/data holds no recorded case"


@pytest.mark.parametrize("case_dir", CASES, ids=[c.name for c in CASES])
def test_case_matches_original(case_dir) -> None:
    results = run_case(case_dir)
    assert results, f"{case_dir.name}: the runner compared nothing"
    table = format_table(results)
    for r in results:
        assert r.tokens_equal, f"{r.case} via {r.path}: greedy tokens differ\n{table}"
        assert r.max_abs_logit_diff <= LOGIT_TOLERANCE, f"{r.case} via {r.path}: logits differ\n{table}"


def test_runner_outside_the_package_is_refused(tmp_path) -> None:
    case = tmp_path / "evil"
    case.mkdir()
    (case / "case.json").write_text(json.dumps({"runner": "os:system"}))
    with pytest.raises(SR3DInputError, match="not allowed"):
        run_case(case)


def test_cli_unknown_case_is_a_clear_error(capsys) -> None:
    assert cli_main(["conformance", "--case", "no-such-case"]) == 2
    assert "unknown conformance case" in capsys.readouterr().err
