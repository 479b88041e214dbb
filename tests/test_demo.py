"""The demo's summary arithmetic, its picture's layout and its console output."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sr3d_plugin.cli import main
from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.experiments.demo import (
    demo_figure,
    demo_rows,
    render_demo_png,
    run_demo,
    summarise_rows,
    summary_lines,
)
from sr3d_plugin.synthetic.qa import ANSWER_CHOICES, DEPTH_FAMILIES, MULTI_VIEW_FAMILIES, scene_questions


def _wrong(sample: Any) -> str:
    """An answer to ``sample`` that is one of its family's choices but not the right one."""
    return next(c for c in ANSWER_CHOICES[sample.family] if c != sample.answer)


def test_summary_counts_a_wrong_answer_in_its_family_view_and_depth_figures() -> None:
    samples = scene_questions(0)
    wrong = {next(i for i, s in enumerate(samples) if s.family == "distance")}
    wrong.add(next(i for i, s in enumerate(samples) if s.family in MULTI_VIEW_FAMILIES))
    answers = [_wrong(s) if i in wrong else s.answer for i, s in enumerate(samples)]
    rows = demo_rows(samples, answers)
    assert [r["correct"] for r in rows] == [i not in wrong for i in range(len(samples))]

    summary = summarise_rows(rows)
    families = Counter(s.family for s in samples)
    wrong_by_family = Counter(samples[i].family for i in wrong)
    assert list(summary["per_family"]) == list(dict.fromkeys(s.family for s in samples))
    for fam, n in families.items():
        got = summary["per_family"][fam]
        assert (got["correct"], got["total"]) == (n - wrong_by_family[fam], n), fam
        assert got["accuracy"] == pytest.approx((n - wrong_by_family[fam]) / n)
        assert got["view"] == ("multi" if fam in MULTI_VIEW_FAMILIES else "single")
    n_multi = sum(s.family in MULTI_VIEW_FAMILIES for s in samples)
    n_single = len(samples) - n_multi
    assert summary["per_view"]["single"]["total"] == n_single
    assert summary["single_view_accuracy"] == pytest.approx((n_single - 1) / n_single)
    assert summary["cross_frame_accuracy"] == pytest.approx((n_multi - 1) / n_multi)
    n_depth = sum(s.family in DEPTH_FAMILIES for s in samples)
    # the complaint: "depth questions 100 %" next to a wrong distance answer
    assert summary["depth"] == {
        "correct": n_depth - 2,
        "total": n_depth,
        "accuracy": pytest.approx((n_depth - 2) / n_depth),
    }
    assert summary["accuracy"] == pytest.approx((len(samples) - 2) / len(samples))

    text = "\n".join(summary_lines(summary))
    assert f"distance {families['distance'] - 1}/{families['distance']}" in text
    assert f"single view: {n_single - 1}/{n_single}" in text
    assert f"cross-frame (multi-view): {n_multi - 1}/{n_multi}" in text
    assert f"depth-dependent families: {n_depth - 2}/{n_depth}" in text


def test_summary_takes_whatever_families_the_rows_have() -> None:
    rows = [
        {"family": "closer", "view": "single", "correct": True},
        {"family": "mv_same_object", "view": "multi", "correct": False},
        {"family": "mv_same_object", "view": "multi", "correct": True},
        {"family": "count", "view": "single", "correct": False},
    ]
    summary = summarise_rows(rows)
    assert summary["per_family"]["mv_same_object"] == {
        "correct": 1,
        "total": 2,
        "accuracy": 0.5,
        "view": "multi",
        "depth": "mv_same_object" in DEPTH_FAMILIES,
    }
    assert summary["per_view"]["multi"]["families"] == ["mv_same_object"]
    assert summary["per_view"]["single"]["families"] == ["closer", "count"]
    assert summary["depth"] == {"correct": 1, "total": 1, "accuracy": 1.0}  # only "closer" needs depth
    assert "cross-frame (multi-view): 1/2 (50 %) — mv_same_object 1/2" in summary_lines(summary)
    # no cross-frame questions at all: the figure is None and the text says so
    single_only = summarise_rows(rows[:1])
    assert single_only["cross_frame_accuracy"] is None
    assert "cross-frame (multi-view): no questions" in summary_lines(single_only)


def test_a_new_family_is_placed_by_its_visual_input() -> None:
    samples = scene_questions(0)[:1] + scene_questions(0)[-1:]
    for s in samples:
        s.family = "some_new_family"
    rows = demo_rows(samples, [s.answer for s in samples])
    assert [r["view"] for r in rows] == ["single", "multi"]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "rows is empty"),
        ([{"family": "closer", "view": "both", "correct": True}], "rows[0]['view'] is 'both'"),
        ([{"family": "closer", "view": "single", "correct": "yes"}], "rows[0]['correct'] is"),
        ([{"family": "closer", "view": "single"}], "rows[0] is"),
    ],
)
def test_summary_rejects_bad_rows(rows: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(SR3DInputError) as err:
        summarise_rows(rows)
    assert message in str(err.value)


def test_rows_need_one_answer_per_question() -> None:
    samples = scene_questions(0)
    with pytest.raises(SR3DInputError, match=f"got {len(samples)} samples but 1 answers"):
        demo_rows(samples, ["Region [0]"])


def test_negative_seed_is_refused_before_loading(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SR3DInputError, match="seed=-3 is out of range"):
        run_demo(seed=-3, png=None)
    assert main(["demo", "--seed", "-3", "--no-png"]) == 2
    assert "--seed -3 is out of range" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# the picture
# ----------------------------------------------------------------------------------------------


def _drawn_texts(fig: Any) -> list[Any]:
    """Every text the picture shows: sheet text, axes text and titles, and the ticks and labels of
    the axes that are drawn (image panels have theirs switched off)."""
    texts = list(fig.texts)
    for ax in fig.axes:
        texts += [*ax.texts, ax.title, ax._left_title, ax._right_title]
        if ax.axison:
            texts += [*ax.get_xticklabels(), *ax.get_yticklabels(), ax.xaxis.label, ax.yaxis.label]
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def _frame_axes(fig: Any, frame: int, multi: bool) -> Any:
    title = f"frame {frame} · {'multi-view' if multi else 'single view'}"
    found = [ax for ax in fig.axes if ax.get_title() == title]
    assert len(found) == 1, (title, [ax.get_title() for ax in fig.axes])
    return found[0]


@pytest.mark.parametrize("seed", [0, 5])
def test_picture_draws_every_asked_region_on_its_frame_in_readable_type(seed: int, tmp_path: Path) -> None:
    samples = scene_questions(seed)
    answers = [s.answer for s in samples]
    answers[0] = _wrong(samples[0])
    answers[-1] = "$x^{ " + "a very long rambling answer that must wrap " * 6  # mathtext and wrapping
    rows = demo_rows(samples, answers)
    fig = demo_figure(samples, rows, title="test")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height

    texts = _drawn_texts(fig)
    for t in texts:
        assert t.get_fontsize() >= 10, (t.get_text(), t.get_fontsize())
        box = t.get_window_extent(renderer)
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, (t.get_text(), box)
    # text placed on the sheet never overlaps other such text (line heights and columns add up)
    sheet = [(t.get_text(), t.get_window_extent(renderer)) for t in fig.texts if t.get_text().strip()]
    for i, (a, ba) in enumerate(sheet):
        for b, bb in sheet[i + 1 :]:
            overlap = min(ba.x1, bb.x1) - max(ba.x0, bb.x0), min(ba.y1, bb.y1) - max(ba.y0, bb.y0)
            assert min(overlap) <= 0.5, (a, b)
    # the whole long answer is on the picture, wrapped
    joined = " ".join(t.get_text() for t in fig.texts)
    assert "a very long rambling answer that must wrap " * 5 in re.sub(r"\s+", " ", joined) + " "

    for qi, s in enumerate(samples):
        for k, region in enumerate(s.visual.regions):
            # the question names the letter drawn for <regionK>, and the legend lists the reference
            m = re.search(rf"<region{k}> \((\w+)\)", joined.split(f"Q{qi + 1} · {s.family}", 1)[1])
            assert m, (qi, k)
            tag = m.group(1)
            assert re.search(rf"frame [\d, ]+: [^\n]*\bQ{qi + 1} <region{k}>", joined), (qi, k)
            for f in region.frames:
                ax = _frame_axes(fig, f, bool(s.visual.multi_view))
                assert ax.get_window_extent(renderer).width >= 255.5  # ≥ 256 px, up to float rounding
                tags = [t for t in ax.texts if t.get_gid() == f"tag-{tag}"]
                assert len(tags) == 1 and tags[0].get_text() == tag
                assert ax.get_window_extent(renderer).contains(*tags[0].get_window_extent(renderer).p0)
                assert ax.get_window_extent(renderer).contains(*tags[0].get_window_extent(renderer).p1)
                outline = [c for c in ax.collections if c.get_gid() == f"region-{tag}"]
                assert len(outline) == 1
                segs = np.concatenate(outline[0].get_segments())
                ys, xs = np.nonzero(region.masks[f])
                assert segs[:, 0].min() == pytest.approx(xs.min() - 0.5)
                assert segs[:, 0].max() == pytest.approx(xs.max() + 0.5)
                assert segs[:, 1].min() == pytest.approx(ys.min() - 0.5)
                assert segs[:, 1].max() == pytest.approx(ys.max() + 0.5)
    # every frame has its point map; the colour key names the axes and the unit
    for s in samples:
        for f in range(len(s.visual.images)):
            _frame_axes(fig, f, bool(s.visual.multi_view))
            if s.visual.multi_view:
                assert sum(ax.get_title() == f"frame {f} · point map" for ax in fig.axes) == 1
    keys = [ax for ax in fig.axes if ax.get_title().startswith("point-map colours")]
    assert keys
    for ax in keys:
        assert [t.get_text() for t in ax.get_yticklabels()] == ["x → red", "y → green", "z → blue"]
        assert "unitless" in ax.get_xlabel()
    assert "✗" in joined and "✓" in joined
    for line in summary_lines(summarise_rows(rows)):
        assert line in joined

    png = tmp_path / "demo.png"
    render_demo_png(samples, rows, png)
    with Image.open(png) as im:
        assert im.size == (round(width), round(height))
        assert im.size[0] >= 1500 and im.size[1] >= 1000


def test_console_figures_add_up(capsys: pytest.CaptureFixture[str]) -> None:
    """The bundled model, seed 1: the printed accuracy lines agree with the printed verdicts."""
    assert main(["demo", "--seed", "1", "--no-png"]) == 0
    out = capsys.readouterr().out
    verdicts = re.findall(r"^Q\d+ \[(single|multi)-view, (\w+)\].*\n.*\((right|wrong)\)$", out, re.M)
    assert verdicts
    for view, name in (("single", "single view"), ("multi", r"cross-frame \(multi-view\)")):
        mine = [v for v in verdicts if v[0] == view]
        if mine:
            right = sum(v[2] == "right" for v in mine)
            assert re.search(rf"^{name}: {right}/{len(mine)} \(", out, re.M), out
    for fam in {v[1] for v in verdicts}:
        mine = [v for v in verdicts if v[1] == fam]
        assert f"{fam} {sum(v[2] == 'right' for v in mine)}/{len(mine)}" in out
    right = sum(v[2] == "right" for v in verdicts)
    assert f"all questions: {right}/{len(verdicts)} (" in out
