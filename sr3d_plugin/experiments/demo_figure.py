"""The picture of the embedded demo (``sr3d demo``'s PNG), drawn with matplotlib's Agg canvas.

Layout: one section per scene (the questions that share the same frames). Each frame is upscaled
with nearest neighbour and titled with its index and view; every region that any question refers
to is outlined and tinted on its frame(s) with a letter, and a legend lists which ``Q<i>
<regionK>`` each letter stands for; beside the frames the canonical point maps (xyz as RGB) with a
colour key; then the questions with the model's answer, the ground truth and ✓/✗; at the bottom
the summary of :func:`sr3d_plugin.experiments.demo_summary.summarise_rows`. All type is at least 10 pt and
wrapped to the picture (measured with the renderer, not guessed).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.experiments.demo_summary import summarise_rows, summary_lines

__all__ = ["demo_figure", "render_demo_png"]

#: region colours (distinct from each other; every region also gets a letter, so repeats stay readable)
_REGION_COLORS = (
    "#e6194b",
    "#3cb44b",
    "#4363d8",
    "#f58231",
    "#911eb4",
    "#42d4f4",
    "#f032e6",
    "#ffe119",
    "#9a6324",
    "#000075",
)
_DPI = 100
_BODY_PT = 11.0  # questions, legends, frame titles
_SMALL_PT = 10.0  # tick labels, notes: the smallest type in the picture
_HEAD_PT = 13.0
_TITLE_PT = 15.0
_MARGIN = 28  # px
_GAP = 18  # px between panels
_SINGLE_PX = 320  # long side of a single-view frame on the picture
_MULTI_PX = 256  # long side of a multi-view frame
_FRAMES_PER_ROW = 6
_LEFT_PX = 2 * _SINGLE_PX + _GAP  # width of the single-view frame + point map (and of the legend column)
_REGION_RE = re.compile(r"<region(\d+)>")
_ANSWER_REGION_RE = re.compile(r"region\s*\[(\d+)\]", re.IGNORECASE)


@dataclass
class _DrawnRegion:
    """A region as drawn: one letter and colour for every question reference to the same mask(s)."""

    tag: str
    color: str
    masks: dict[int, np.ndarray]
    refs: list[tuple[int, int]] = field(default_factory=list)  # (question index, k of <regionK>)


@dataclass
class _Scene:
    multi: bool
    images: list[Any]
    points: Any  # [V, H, W, 3] canonical or None
    questions: list[int] = field(default_factory=list)
    regions: list[_DrawnRegion] = field(default_factory=list)


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).tobytes() + str(a.shape).encode()).hexdigest()


def _tag_name(i: int) -> str:
    return chr(ord("A") + i % 26) + (str(i // 26) if i >= 26 else "")


def _scenes(samples: Sequence[Any]) -> tuple[list[_Scene], dict[int, list[str]]]:
    """Group the questions by scene (identical frames) and give every distinct region a letter.

    Returns the scenes in order of first appearance and, per question, the letter of each
    ``<regionK>`` (index k).
    """
    scenes: dict[tuple[str, ...], _Scene] = {}
    letters: dict[int, list[str]] = {}
    count = 0
    for qi, s in enumerate(samples):
        key = tuple(_digest(np.asarray(im)) for im in s.visual.images)
        scene = scenes.get(key)
        if scene is None:
            scene = scenes[key] = _Scene(bool(s.visual.multi_view), list(s.visual.images), s.visual.points)
        scene.questions.append(qi)
        by_masks = {tuple((f, _digest(r.masks[f])) for f in sorted(r.masks)): r for r in scene.regions}
        letters[qi] = []
        for k, region in enumerate(s.visual.regions):
            rkey = tuple((f, _digest(region.masks[f])) for f in region.frames)
            drawn = by_masks.get(rkey)
            if drawn is None:
                drawn = _DrawnRegion(_tag_name(count), _REGION_COLORS[count % len(_REGION_COLORS)], dict(region.masks))
                count += 1
                scene.regions.append(drawn)
                by_masks[rkey] = drawn
            drawn.refs.append((qi, k))
            letters[qi].append(drawn.tag)
    return list(scenes.values()), letters


def _outline(mask: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """``[N, 2, 2]`` pixel-edge segments around ``mask`` (``[h, w]`` bool), in image pixels of a
    frame ``sx``/``sy`` times the mask's size (pixel centres at integers)."""
    m = np.pad(mask.astype(bool), 1)
    ys, xs = np.nonzero(m[1:, 1:-1] != m[:-1, 1:-1])  # edge above row ys (mask rows), column xs
    horiz = np.stack([np.stack([xs - 0.5, ys - 0.5], -1), np.stack([xs + 0.5, ys - 0.5], -1)], 1)
    ys, xs = np.nonzero(m[1:-1, 1:] != m[1:-1, :-1])  # edge left of column xs, row ys
    vert = np.stack([np.stack([xs - 0.5, ys - 0.5], -1), np.stack([xs - 0.5, ys + 0.5], -1)], 1)
    segs = np.concatenate([horiz, vert]).astype(float)
    segs[..., 0] = (segs[..., 0] + 0.5) * sx - 0.5
    segs[..., 1] = (segs[..., 1] + 0.5) * sy - 0.5
    return segs


def _text_colour(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "white"


def _with_letters(question: str, letters: list[str]) -> str:
    """``"<region0> or <region1>"`` → ``"<region0> (A) or <region1> (B)"``."""

    def sub(m: re.Match[str]) -> str:
        k = int(m.group(1))
        return f"{m.group(0)} ({letters[k]})" if k < len(letters) else m.group(0)

    return _REGION_RE.sub(sub, question)


def _answer_text(answer: str, letters: list[str]) -> str:
    """The answer in quotes, with the letter of the region it names (``"Region [1]" = B``)."""
    m = _ANSWER_REGION_RE.fullmatch(answer.strip())
    shown = f"“{answer}”"
    if m and int(m.group(1)) < len(letters):
        shown += f" = {letters[int(m.group(1))]}"
    return shown


class _Sheet:
    """Places text and axes in pixels from the figure's top-left corner; the height is set at the end."""

    def __init__(self, width: int) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.width = width
        self.fig = Figure(figsize=(width / _DPI, 4), dpi=_DPI)
        FigureCanvasAgg(self.fig)
        self._renderer = self.fig.canvas.get_renderer()
        self._ops: list[Callable[[float], None]] = []

    @staticmethod
    def line_height(size: float) -> float:
        return 1.45 * size * _DPI / 72

    def measure(self, text: str, size: float, weight: str = "normal") -> float:
        """Width of ``text`` in pixels."""
        from matplotlib.font_manager import FontProperties

        w, _h, _d = self._renderer.get_text_width_height_descent(text, FontProperties(size=size, weight=weight), False)
        return float(w)

    def wrap(self, text: str, width: float, size: float, weight: str = "normal") -> list[str]:
        """Greedy word wrap to ``width`` pixels (measured with the renderer); over-long words are cut."""
        lines: list[str] = []
        for paragraph in text.split("\n"):
            line = ""
            for word in paragraph.split(" "):
                trial = f"{line} {word}" if line else word
                if self.measure(trial, size, weight) <= width:
                    line = trial
                    continue
                if line:
                    lines.append(line)
                while self.measure(word, size, weight) > width and len(word) > 1:
                    cut = len(word) - 1
                    while cut > 1 and self.measure(word[:cut], size, weight) > width:
                        cut -= 1
                    lines.append(word[:cut])
                    word = word[cut:]
                line = word
            lines.append(line)
        return lines

    def text(self, x: float, y: float, s: str, size: float, **kw: Any) -> None:
        """``s`` with its top-left corner at (``x``, ``y``) px."""

        def op(height: float) -> None:
            self.fig.text(x / self.width, 1 - y / height, s, fontsize=size, va="top", ha="left", parse_math=False, **kw)

        self._ops.append(op)

    def lines(self, x: float, y: float, text: str, width: float, size: float, **kw: Any) -> float:
        """Wrapped ``text`` from (``x``, ``y``); returns the y below it."""
        for line in self.wrap(text, width, size, kw.get("weight", "normal")):
            self.text(x, y, line, size, **kw)
            y += self.line_height(size)
        return y

    def axes(self, x: float, y: float, w: float, h: float, draw: Callable[[Any], None]) -> None:
        """An axes in the rectangle (``x``, ``y``, ``w``, ``h``) px, filled by ``draw(ax)``."""

        def op(height: float) -> None:
            draw(self.fig.add_axes((x / self.width, 1 - (y + h) / height, w / self.width, h / height)))

        self._ops.append(op)

    def finish(self, height: float) -> Any:
        self.fig.set_size_inches(self.width / _DPI, height / _DPI)
        for op in self._ops:
            op(height)
        return self.fig


def _display_size(image: Any, target: int) -> tuple[int, int]:
    """On-picture (width, height) px: small frames upscaled by a whole factor, large ones shrunk."""
    w, h = image.size
    scale = max(1, round(target / max(w, h))) if max(w, h) <= target else target / max(w, h)
    return round(w * scale), round(h * scale)


def _place_tag(
    box: tuple[float, float, float, float],
    tw: float,
    th: float,
    gap: float,
    image: tuple[int, int],
    obstacles: list[tuple[float, float, float, float]],
) -> tuple[float, float]:
    """Top-left corner of a ``tw`` × ``th`` letter next to ``box`` (``x0, y0, x1, y1``), inside the
    image: the first spot (above, below, right, left of the box, then inside it) that overlaps no
    obstacle box; the first spot inside the image when every one does."""
    x0, y0, x1, y1 = box
    w, h = image
    spots = [
        (x0, y0 - gap - th),
        (x1 - tw, y0 - gap - th),
        (x0, y1 + gap),
        (x1 - tw, y1 + gap),
        (x1 + gap, y0),
        (x0 - gap - tw, y0),
        (x1 + gap, y1 - th),
        (x0 - gap - tw, y1 - th),
        (x0 + gap, y0 + gap),
    ]
    inside = [(x, y) for x, y in spots if x >= -0.5 and y >= -0.5 and x + tw <= w - 0.5 and y + th <= h - 0.5]
    for x, y in inside:
        if not any(x < b[2] and b[0] < x + tw and y < b[3] and b[1] < y + th for b in obstacles):
            return x, y
    if inside:
        return inside[0]
    return min(max(x0, -0.5), w - 0.5 - tw), min(max(y0, -0.5), h - 0.5 - th)


def _draw_frame(
    ax: Any, image: Any, frame: int, regions: list[_DrawnRegion], size: tuple[int, int], title: str
) -> None:
    """A frame (nearest-neighbour upscaled) with the outline, tint and letter of each region on it."""
    from matplotlib.collections import LineCollection
    from matplotlib.colors import to_rgba
    from matplotlib.patheffects import Normal, Stroke

    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    ax.imshow(rgb, interpolation="nearest")
    data_per_px = w / size[0]
    on_frame = [reg for reg in regions if frame in reg.masks]
    boxes = {}
    for reg in on_frame:
        mask = reg.masks[frame]
        sx, sy = w / mask.shape[1], h / mask.shape[0]
        tint = np.zeros((*mask.shape, 4))
        tint[mask] = to_rgba(reg.color, 0.3)
        ax.imshow(tint, interpolation="nearest", extent=(-0.5, w - 0.5, h - 0.5, -0.5))
        lines = LineCollection(_outline(mask, sx, sy), colors=reg.color, linewidths=2.0, capstyle="projecting")
        lines.set_path_effects([Stroke(linewidth=4.0, foreground="white"), Normal()])
        lines.set_gid(f"region-{reg.tag}")
        ax.add_collection(lines)
        ys, xs = np.nonzero(mask)
        boxes[reg.tag] = (
            xs.min() * sx - 0.5,
            ys.min() * sy - 0.5,
            (xs.max() + 1) * sx - 0.5,
            (ys.max() + 1) * sy - 0.5,
        )
    placed: list[tuple[float, float, float, float]] = []
    for reg in on_frame:
        tw = (10 + 9 * len(reg.tag)) * data_per_px
        th = (_Sheet.line_height(_BODY_PT) + 2) * data_per_px
        x, y = _place_tag(boxes[reg.tag], tw, th, 3 * data_per_px, (w, h), list(boxes.values()) + placed)
        placed.append((x, y, x + tw, y + th))
        ax.text(
            x + tw / 2,
            y + th / 2,
            reg.tag,
            ha="center",
            va="center",
            fontsize=_BODY_PT,
            fontweight="bold",
            family="monospace",
            color=_text_colour(reg.color),
            bbox={"boxstyle": "round,pad=0.2", "facecolor": reg.color, "edgecolor": "white", "linewidth": 1.0},
            parse_math=False,
            gid=f"tag-{reg.tag}",
        )
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_title(title, fontsize=_BODY_PT, pad=4, parse_math=False)
    ax.set_axis_off()


def _draw_pointmap(ax: Any, points: Any, title: str) -> None:
    from sr3d_plugin.pointmap import colour_pointmap

    ax.imshow(colour_pointmap(points), interpolation="nearest")
    ax.set_title(title, fontsize=_BODY_PT, pad=4, parse_math=False)
    ax.set_axis_off()


def _draw_colour_key(ax: Any, xlabel: str) -> None:
    """The point-map colour key: red / green / blue = canonical x / y / z, −1 → dark, +1 → full."""
    ramp = np.zeros((3, 256, 3))
    for c in range(3):
        ramp[c, :, c] = np.linspace(0.0, 1.0, 256)
    ax.imshow(ramp, aspect="auto", extent=(-1.0, 1.0, 2.5, -0.5), interpolation="nearest")
    ax.set_yticks([0, 1, 2], ["x → red", "y → green", "z → blue"], fontsize=_SMALL_PT)
    ax.set_xticks([-1.0, -0.5, 0.0, 0.5, 1.0], ["−1", "−0.5", "0", "0.5", "+1"], fontsize=_SMALL_PT)
    ax.set_xlabel(xlabel, fontsize=_SMALL_PT, parse_math=False)
    ax.set_title("point-map colours (canonical xyz)", fontsize=_BODY_PT, pad=4, parse_math=False)


def demo_figure(samples: Sequence[Any], rows: Sequence[dict[str, Any]], title: str | None = None) -> Any:
    """The demo picture as a matplotlib ``Figure`` (Agg canvas, not registered with pyplot).

    One section per scene (questions sharing the same frames): every frame upscaled with nearest
    neighbour (single view ≥ 320 px, multi-view ≥ 256 px on the long side, at most 6 frames a row)
    and titled with its index and view; each region referenced by any question outlined on its
    frame(s) with a letter, the letters listed with the ``Q<i> <regionK>`` references they stand
    for; the canonical point map of every frame as RGB with a colour key; the questions with
    answer, ground truth and ✓/✗; at the bottom the :func:`~sr3d_plugin.experiments.demo_summary.summary_lines` of the rows. All type is
    at least 10 pt and wrapped to the picture.

    Args:
        samples: the :class:`~sr3d_plugin.synthetic.qa.QASample` questions.
        rows: their answered rows (:func:`demo_rows`), in the same order.
        title: heading of the picture.
    """
    if len(samples) != len(rows):
        raise SR3DInputError(f"got {len(samples)} samples but {len(rows)} rows; expected one row per sample")
    summary = summarise_rows(rows)
    scenes, letters = _scenes(samples)
    widest = max((min(len(s.images), _FRAMES_PER_ROW) for s in scenes if s.multi), default=0)
    width = max(2 * _MARGIN + widest * (_MULTI_PX + _GAP) - _GAP, 1500)
    sheet = _Sheet(width)
    right_edge = width - _MARGIN
    title_h = _Sheet.line_height(_BODY_PT) + 6
    y = float(_MARGIN)
    y = sheet.lines(_MARGIN, y, title or "SR-3D demo", right_edge - _MARGIN, _TITLE_PT, weight="bold") + 2
    intro = (
        "Region questions about freshly rendered synthetic scenes. Every region a question refers to is outlined "
        "on its frame with a letter; the letters stand for the questions' <regionK>. Answers are exact-match "
        "scored against the ground truth computed from the scene's geometry."
    )
    y = sheet.lines(_MARGIN, y, intro, right_edge - _MARGIN, _BODY_PT) + 6

    def questions_block(x: float, y: float, scene: _Scene, width: float) -> float:
        """Region legend and questions of ``scene`` in a column at ``x`` of ``width`` px."""
        y = sheet.lines(x, y, "Regions drawn on the frames", width, _BODY_PT, weight="bold")
        for reg in scene.regions:
            sheet.text(
                x,
                y,
                reg.tag,
                _BODY_PT,
                weight="bold",
                color=_text_colour(reg.color),
                family="monospace",
                bbox={"boxstyle": "round,pad=0.2", "facecolor": reg.color, "edgecolor": "white"},
            )
            refs = ", ".join(f"Q{qi + 1} <region{k}>" for qi, k in reg.refs)
            where = ", ".join(str(f) for f in sorted(reg.masks))
            y = sheet.lines(x + 34, y, f"frame {where}: {refs}", width - 34, _BODY_PT)
        y += 8
        y = sheet.lines(x, y, "Questions (answer of the model, ground truth)", width, _BODY_PT, weight="bold")
        for qi in scene.questions:
            row, tags = rows[qi], letters[qi]
            ok = bool(row["correct"])
            sheet.text(x, y - 2, "✓" if ok else "✗", _HEAD_PT, weight="bold", color="#1a7f37" if ok else "#c62828")
            y = sheet.lines(
                x + 26, y, f"Q{qi + 1} · {row['family']} ({row['view']} view)", width - 26, _BODY_PT, weight="bold"
            )
            y = sheet.lines(x + 26, y, _with_letters(row["question"], tags), width - 26, _BODY_PT)
            verdict = (
                f"answer {_answer_text(row['answer'], tags)}   ·   truth {_answer_text(row['ground_truth'], tags)}"
            )
            y = sheet.lines(x + 26, y, verdict, width - 26, _BODY_PT, color="#1a7f37" if ok else "#c62828") + 6
        return y

    def colour_key(x: float, y: float, note: str | None) -> float:
        """The point-map colour key under (x, y) in a column of ``_LEFT_PX`` px; returns the y below it."""
        label_w = 80  # tick labels left of the key
        key_w = _LEFT_PX - label_w - 10
        xlabel = "\n".join(
            sheet.wrap("canonical coordinate, unitless: per axis, scene minimum = −1, maximum = +1", key_w, _SMALL_PT)
        )
        key_y = y + title_h
        sheet.axes(x + label_w, key_y, key_w, 54, lambda ax: _draw_colour_key(ax, xlabel))
        y = key_y + 54 + 22 + _Sheet.line_height(_SMALL_PT) * (xlabel.count("\n") + 1) + 6
        if note:
            y = sheet.lines(x, y, note, _LEFT_PX, _SMALL_PT, style="italic")
        return y + 4

    for n, scene in enumerate(scenes, 1):
        y += 10
        qs = f"Q{scene.questions[0] + 1}" + (f"–Q{scene.questions[-1] + 1}" if len(scene.questions) > 1 else "")
        frames = f"{len(scene.images)} frame" + ("s" if len(scene.images) > 1 else "")
        if scene.multi:
            head = f"Scene {n}: multi-view, {frames}, {qs} (cross-frame: a question's regions lie on different frames)"
        else:
            head = f"Scene {n}: single view, {frames}, {qs}"
        y = sheet.lines(_MARGIN, y, head, right_edge - _MARGIN, _HEAD_PT, weight="bold") + 4
        view = "multi-view" if scene.multi else "single view"
        if not scene.multi:
            dw, dh = _display_size(scene.images[0], _SINGLE_PX)
            top = y
            sheet.axes(
                _MARGIN,
                top + title_h,
                dw,
                dh,
                lambda ax, s=scene, d=(dw, dh), v=view: _draw_frame(ax, s.images[0], 0, s.regions, d, f"frame 0 · {v}"),
            )
            if scene.points is not None:
                sheet.axes(
                    _MARGIN + dw + _GAP,
                    top + title_h,
                    dw,
                    dh,
                    lambda ax, s=scene: _draw_pointmap(ax, s.points[0], "frame 0 · canonical point map"),
                )
            y_left = top + title_h + dh + 12
            if scene.points is not None:
                note = "Synthetic single view (camera frame, SR3D-FACTS §3): x grows down the image, y towards the camera, z to the left."
                y_left = colour_key(_MARGIN, y_left, note)
            x_right = _MARGIN + _LEFT_PX + 2 * _GAP
            y_right = questions_block(x_right, top, scene, right_edge - x_right)
            y = max(y_left, y_right)
        else:
            for start in range(0, len(scene.images), _FRAMES_PER_ROW):
                chunk = range(start, min(start + _FRAMES_PER_ROW, len(scene.images)))
                dw, dh = _display_size(scene.images[start], _MULTI_PX)
                for col, f in enumerate(chunk):
                    x = _MARGIN + col * (dw + _GAP)
                    sheet.axes(
                        x,
                        y + title_h,
                        dw,
                        dh,
                        lambda ax, s=scene, f=f, d=(dw, dh), v=view: _draw_frame(
                            ax, s.images[f], f, s.regions, d, f"frame {f} · {v}"
                        ),
                    )
                    if scene.points is not None:
                        sheet.axes(
                            x,
                            y + 2 * title_h + dh + 4,
                            dw,
                            dh,
                            lambda ax, s=scene, f=f: _draw_pointmap(ax, s.points[f], f"frame {f} · point map"),
                        )
                y += title_h + dh + 4 + ((title_h + dh) if scene.points is not None else 0) + 12
            top = y
            y_left = (
                colour_key(_MARGIN, top, "All frames share one canonical space.") if scene.points is not None else top
            )
            x_right = _MARGIN + _LEFT_PX + 2 * _GAP
            y = max(y_left, questions_block(x_right, top, scene, right_edge - x_right))
    y += 10
    y = sheet.lines(_MARGIN, y, "Summary (counted from the rows above)", right_edge - _MARGIN, _HEAD_PT, weight="bold")
    for line in summary_lines(summary):
        y = sheet.lines(_MARGIN, y, line, right_edge - _MARGIN, _BODY_PT)
    return sheet.finish(math.ceil(y + _MARGIN))


def render_demo_png(
    samples: Sequence[Any], rows: Sequence[dict[str, Any]], path: str | Path, title: str | None = None
) -> None:
    """Write :func:`demo_figure` to ``path`` as a PNG (atomically, 100 dpi)."""
    from sr3d_plugin.io_utils import atomic_path

    fig = demo_figure(samples, rows, title)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=_DPI, format="png")
