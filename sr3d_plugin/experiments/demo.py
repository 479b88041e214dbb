"""The embedded demo: a tiny SR-3D answers region questions about a fresh synthetic scene.

No download, no GPU: the tiny model ships with the package (``sr3d_plugin/assets/tiny-sr3d``,
trained from scratch on the CPU by ``recipes/tiny-synthetic.yaml``), scenes are rendered on the fly.

The pieces, each usable alone:

* :func:`demo_rows` — one JSON-ready row per question (answer, ground truth, correctness, view);
* :func:`summarise_rows` — accuracy overall, per family, single-view vs cross-frame and over the
  depth-dependent families, counted from the rows; :func:`summary_lines` words it;
* :func:`~sr3d_plugin.experiments.demo_figure.demo_figure` / :func:`render_demo_png` — the
  picture (module :mod:`~sr3d_plugin.experiments.demo_figure`, re-exported here).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.experiments.demo_figure import demo_figure, render_demo_png
from sr3d_plugin.experiments.demo_summary import demo_rows, summarise_rows, summary_lines
from sr3d_plugin.resources import package_dir

__all__ = [
    "default_model_path",
    "demo_figure",
    "demo_rows",
    "render_demo_png",
    "run_demo",
    "summarise_rows",
    "summary_lines",
]


def default_model_path() -> Path:
    """The bundled tiny model."""
    return package_dir() / "assets" / "tiny-sr3d"


def run_demo(
    model: str | Path | None = None, seed: int = 0, png: str | Path | None = "sr3d-demo.png"
) -> dict[str, Any]:
    """Ask the tiny model a handful of questions about one fresh single-view and one multi-view scene.

    Args:
        model: model folder (default: :func:`default_model_path`).
        seed: demo scene seed (>= 0); the scenes come from the demo seed range, which training,
            validation and test never use.
        png: picture to write (:func:`render_demo_png`), or ``None`` for none.

    Returns:
        A JSON-ready dict: ``questions`` (:func:`demo_rows`), the figures of
        :func:`summarise_rows` (``accuracy``, ``single_view_accuracy``, ``cross_frame_accuracy``,
        ``depth_accuracy``, ``per_family``, ``per_view``, ...), ``png`` (path written) and
        ``timings`` (seconds).
    """
    import torch

    from sr3d_plugin import _checks
    from sr3d_plugin.builders import load_model
    from sr3d_plugin.experiments.evaluate import answer_questions
    from sr3d_plugin.synthetic.qa import scene_questions

    seed = _checks.integer(seed, "seed", minimum=0)
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
    rows = demo_rows(samples, answers)
    result: dict[str, Any] = {"model": str(path), "seed": seed, "questions": rows, **summarise_rows(rows)}
    if png is not None:
        render_demo_png(samples, rows, png, title=f"SR-3D demo: {path.name}, seed {seed}")
        result["png"] = str(png)
    t_png = time.perf_counter()
    result["timings"] = {
        "load": round(t_load - t0, 3),
        "scenes": round(t_scene - t_load, 3),
        "answer": round(t_answer - t_scene, 3),
        "png": round(t_png - t_answer, 3),
        "total": round(time.perf_counter() - t0, 3),
    }
    return result
