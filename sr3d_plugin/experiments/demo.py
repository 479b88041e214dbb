"""The embedded demo: a tiny SR-3D answers region questions about a fresh synthetic scene.

No download, no GPU: the tiny model ships with the package (``sr3d_plugin/assets/tiny-sr3d``,
trained from scratch on the CPU by ``recipes/tiny-synthetic.yaml``), scenes are rendered on the fly.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.resources import package_dir

__all__ = ["default_model_path", "render_demo_png", "run_demo"]

_REGION_COLORS = ["#ff3b30", "#34c759", "#007aff", "#ffcc00", "#af52de"]


def default_model_path() -> Path:
    """The bundled tiny model."""
    return package_dir() / "assets" / "tiny-sr3d"


def run_demo(
    model: str | Path | None = None, seed: int = 0, png: str | Path | None = "sr3d-demo.png"
) -> dict[str, Any]:
    """Ask the tiny model a handful of questions about one fresh single-view and one multi-view scene.

    Returns a JSON-ready dict: the questions with answer / ground truth / correctness, ``accuracy``
    over all questions, ``depth_accuracy`` over the depth two-choice questions (closer, front/behind),
    ``png`` (path written) and ``timings`` (seconds).
    """
    import torch

    from sr3d_plugin.builders import load_model
    from sr3d_plugin.experiments.evaluate import answer_questions, normalise_answer
    from sr3d_plugin.synthetic.qa import scene_questions

    t0 = time.perf_counter()
    path = Path(model) if model is not None else default_model_path()
    if not (path / "config.json").is_file():
        raise SR3DInputError(
            f"no model at {path}; train the tiny model with `sr3d train recipes/tiny-synthetic.yaml` "
            "or pass model= (a model folder)"
        )
    torch.manual_seed(seed)
    net, processor = load_model(path)
    t_load = time.perf_counter()
    samples = scene_questions(seed)
    t_scene = time.perf_counter()
    answers = answer_questions(net, processor, samples)
    t_answer = time.perf_counter()
    rows = []
    for s, a in zip(samples, answers, strict=True):
        rows.append(
            {
                "family": s.family,
                "view": "multi" if s.visual.multi_view else "single",
                "question": s.question,
                "answer": a,
                "ground_truth": s.answer,
                "correct": normalise_answer(a) == normalise_answer(s.answer),
                "region_frames": [r.frames for r in s.visual.regions],
            }
        )
    depth_rows = [r for r in rows if r["family"] in ("closer", "front_behind")]
    result: dict[str, Any] = {
        "model": str(path),
        "seed": seed,
        "questions": rows,
        "accuracy": sum(r["correct"] for r in rows) / len(rows),
        "depth_accuracy": (sum(r["correct"] for r in depth_rows) / len(depth_rows)) if depth_rows else None,
    }
    if png is not None:
        render_demo_png(samples, rows, png)
        result["png"] = str(png)
    result["timings"] = {
        "load": round(t_load - t0, 3),
        "scenes": round(t_scene - t_load, 3),
        "answer": round(t_answer - t_scene, 3),
        "total": round(time.perf_counter() - t0, 3),
    }
    return result


def render_demo_png(samples: list, rows: list[dict[str, Any]], path: str | Path) -> None:
    """Frames with the region boxes, the coloured canonical point maps and the answers, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from sr3d_plugin.pointmap import colour_pointmap

    single = next((s for s in samples if not s.visual.multi_view), None)
    multi = next((s for s in samples if s.visual.multi_view), None)
    n_frames = len(multi.visual.images) if multi is not None else 0
    cols = max(2, n_frames)
    fig = plt.figure(figsize=(2.2 * cols, 8.2))
    grid = fig.add_gridspec(4, cols, height_ratios=[1, 1, 1, 1.3])

    def draw_regions(ax: Any, sample: Any, frame: int) -> None:
        for k, region in enumerate(sample.visual.regions):
            if frame in region.masks:
                x0, y0, x1, y1 = region.bbox(frame)
                color = _REGION_COLORS[k % len(_REGION_COLORS)]
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1.5, ec=color))
                ax.text(x0, y0 - 1, f"R{k}", color=color, fontsize=7, va="bottom")

    if single is not None:
        ax = fig.add_subplot(grid[0, 0])
        ax.imshow(single.visual.images[0])
        draw_regions(ax, single, 0)
        ax.set_title("single view (regions of Q1)", fontsize=8)
        ax.axis("off")
        ax = fig.add_subplot(grid[0, 1])
        ax.imshow(colour_pointmap(single.visual.points[0]))
        ax.set_title("canonical xyz → RGB", fontsize=8)
        ax.axis("off")
    if multi is not None:
        for f in range(n_frames):
            ax = fig.add_subplot(grid[1, f])
            ax.imshow(multi.visual.images[f])
            draw_regions(ax, multi, f)
            ax.set_title(f"frame {f}", fontsize=8)
            ax.axis("off")
            ax = fig.add_subplot(grid[2, f])
            ax.imshow(colour_pointmap(multi.visual.points[f]))
            ax.axis("off")
    ax = fig.add_subplot(grid[3, :])
    ax.axis("off")
    lines = []
    for i, r in enumerate(rows):
        mark = "✓" if r["correct"] else "✗"
        lines.append(f"Q{i + 1} [{r['view']}] {r['question']}  →  {r['answer']!r}  (truth: {r['ground_truth']}) {mark}")
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize=7, family="monospace")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
