"""The paper's Table 8 in miniature: 3D PE off / on × single-view pre-training off / on.

Four tiny SR-3D models are trained from scratch on the CPU with the bundled recipes and scored on
held-out synthetic scenes (test-split seeds, never used in training), per question family:

* **PT on**: ``tiny-synthetic`` (stage 1, single-view questions) then ``tiny-synthetic-stage2``
  (multi-view cross-frame questions with single-view replay);
* **PT off**: ``tiny-synthetic-stage2`` from scratch, the same stage-2 steps (stage 1 skipped);
* **PE off**: the same recipes with ``use_position_encoding=false``.

Results go to ``<out>/results.json``, ``<out>/README.md`` (a Markdown table) and
``<out>/ablation.png``. The accuracy of the obvious 2D heuristics on the same test questions is
reported beside them, so the gap between the columns means something.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sr3d_plugin.errors import SR3DInputError

__all__ = ["CELLS", "AblationJob", "best_seed", "run_ablation", "write_report"]

#: the question families the tiny-synthetic recipes train on (and the ablation scores)
TRAINED_FAMILIES = (
    "closer",
    "front_behind",
    "distance",
    "closer_to_third",
    "mv_distance",
    "mv_closer_to_third",
    "mv_closest_of_three",
)

#: (name, position encoding, single-view pre-training)
CELLS: tuple[tuple[str, bool, bool], ...] = (
    ("no PE, no PT", False, False),
    ("PT only", False, True),
    ("3D PE only", True, False),
    ("3D PE + PT", True, True),
)


@dataclass
class AblationJob:
    name: str
    recipe: str
    overrides: list[str]
    output_dir: Path
    after: list[str] = field(default_factory=list)

    @property
    def model_dir(self) -> Path:
        return self.output_dir / "model"


def _jobs(
    work: Path,
    stage1_steps: int,
    stage2_steps: int,
    seed: int,
    extra: list[str] | None = None,
    scratch_steps: int | None = None,
) -> list[AblationJob]:
    jobs = []
    for pe in (True, False):
        tag = "pe" if pe else "nope"
        pe_override = [f"model.config_overrides.use_position_encoding={'true' if pe else 'false'}"]
        common = [f"training.seed={seed}", "logging.report_to=[]", *(extra or [])]
        s1 = AblationJob(
            f"{tag}-stage1",
            "tiny-synthetic",
            [
                *pe_override,
                *common,
                f"training.max_steps={stage1_steps}",
                f"training.output_dir={work / f'{tag}-stage1'}",
            ],
            work / f"{tag}-stage1",
        )
        s2 = AblationJob(
            f"{tag}-pt",
            "tiny-synthetic-stage2",
            [
                *common,
                f"model.path={s1.model_dir}",
                f"training.max_steps={stage2_steps}",
                f"training.output_dir={work / f'{tag}-pt'}",
            ],
            work / f"{tag}-pt",
            after=[s1.name],
        )
        scratch = AblationJob(
            f"{tag}-nopt",
            "tiny-synthetic-stage2",
            [
                *pe_override,
                *common,
                "model.path=null",
                "training.learning_rate=1.0e-3",
                f"training.max_steps={scratch_steps or stage2_steps}",
                f"training.output_dir={work / f'{tag}-nopt'}",
            ],
            work / f"{tag}-nopt",
        )
        jobs += [s1, scratch, s2]
    return jobs


def _recipe_batch(name: str) -> int:
    """``training.per_device_batch_size`` of a bundled recipe (after ``extends``)."""
    from sr3d_plugin.training.recipe import load_recipe

    return int(load_recipe(name, check_files=False)[0].training.per_device_batch_size)


def _batch_text(batch: int | dict[str, int]) -> str:
    if isinstance(batch, dict):  # {"stage1": 16, "stage2": 8}
        return ", ".join(f"{k.replace('stage', 'stage ')} {v}" for k, v in batch.items())
    return str(batch)  # reports written before the stages differed


def _run_job(job: AblationJob, threads: int, log_dir: Path) -> float:
    if (job.model_dir / "config.json").is_file():
        return 0.0  # finished in an earlier invocation (resumable)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    log = log_dir / f"{job.name}.log"
    from sr3d_plugin.training.trainer import find_checkpoint

    # an interrupted job continues from its last complete checkpoint (same weights as an uninterrupted run)
    resume = ["--resume"] if find_checkpoint(job.output_dir) is not None else []
    start = time.perf_counter()
    with open(log, "a" if resume else "w") as fh:
        proc = subprocess.run(
            [sys.executable, "-m", "sr3d_plugin.training", job.recipe, *job.overrides, *resume],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            check=False,
        )
    if proc.returncode != 0:
        raise SR3DInputError(f"ablation job {job.name} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - start


def _trainer_time(run_dir: Path) -> dict[str, Any]:
    """Training time of one job by the trainer's own clock (``log.jsonl``), in seconds.

    A job resumed from a checkpoint only timed its last invocation; its full-run time is
    extrapolated from that invocation's steps per second (``resumed_from`` says from which step).
    """
    resumed_from, end, threads = 0, None, None
    log = run_dir / "log.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            event = json.loads(line)
            if event.get("event") == "resume":  # logged just before its invocation's "start"
                resumed_from = int(event.get("global_step", 0))
            elif event.get("event") == "start":
                threads = event.get("cpu_threads")  # torch threads of the run (trainers since training.cpu_threads)
            elif event.get("event") == "end":
                end = event
    if end is None or not end.get("seconds"):
        return {"seconds": None, "steps_per_s": None, "resumed_from": resumed_from, "cpu_threads": threads}
    rate = (int(end["steps"]) - resumed_from) / float(end["seconds"])
    full = int(end["steps"]) / rate if rate > 0 else None
    return {
        "seconds": round(full, 1) if full else None,
        "steps_per_s": round(rate, 2),
        "resumed_from": resumed_from,
        "cpu_threads": threads,
    }


def run_ablation(
    out_dir: str | Path = "docs/ablation",
    work_dir: str | Path = "runs/ablation",
    stage1_steps: int = 3500,
    stage2_steps: int = 8000,
    per_family: int = 100,
    parallel: int = 2,
    seeds: Sequence[int] = (0, 1),
    export_demo: str | Path | None = None,
    extra_overrides: list[str] | None = None,
    scratch_steps: int | None = None,
    shortcut_train: int = 2000,
    score_only: bool = False,
) -> dict[str, Any]:
    """Train the four cells for every seed (resumable: finished runs are reused), score them, write the report.

    Args:
        out_dir: where ``results.json``, ``README.md`` and ``ablation.png`` go.
        work_dir: run folders, ``<work_dir>/seed-<s>/<job>`` (six training jobs per seed).
        stage1_steps, stage2_steps: the budget of the two stages.
        per_family: test questions per family (held-out scenes; the same questions for every model).
        parallel: training jobs at once (each gets ``cpu_count // parallel`` threads, unless its recipe
            pins ``training.cpu_threads``, as the tiny-synthetic recipes do).
        seeds: training seeds (weights, data order and training questions all follow the seed).
        export_demo: copy the "3D PE + PT" model of the seed with the higher mean cross-frame accuracy
            here (the bundled demo model; :func:`best_seed`).
        extra_overrides: recipe overrides applied to every job (e.g. a smaller data size in tests).
        scratch_steps: steps of the PT-off cells (default ``stage2_steps``: stage 2 without stage 1,
            as the paper's ablation skips pre-training; ``stage1_steps + stage2_steps`` gives them
            as many optimizer steps as PT on, at about 1.3× the time).
        shortcut_train: training questions per cross-frame family for the 2D-shortcut MLP.
        score_only: train nothing; score the (cell, seed) models that exist (the others are
            reported as not run).
    """
    import shutil

    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise SR3DInputError(f"seeds must be distinct integers, at least one; got {seeds}")
    work, out = Path(work_dir), Path(out_dir)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    jobs: list[AblationJob] = []
    for seed in seeds:
        for job in _jobs(work / f"seed-{seed}", stage1_steps, stage2_steps, seed, extra_overrides, scratch_steps):
            job.name, job.after = f"s{seed}-{job.name}", [f"s{seed}-{a}" for a in job.after]
            jobs.append(job)
    # the pre-training chains seed by seed (stage 1, then stage 2), the cells without pre-training last
    rank = {"stage1": 0, "pt": 1, "nopt": 2}

    def order(job: AblationJob) -> tuple[int, int, int]:
        seed, stage = int(job.name.split("-", 1)[0][1:]), job.name.rsplit("-", 1)[1]
        return (stage == "nopt", seeds.index(seed), rank[stage])

    jobs.sort(key=order)
    threads = max(1, (os.cpu_count() or 2) // max(1, parallel))
    durations: dict[str, float] = {}
    done: set[str] = set()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        pending = [] if score_only else list(jobs)
        running: dict[Any, AblationJob] = {}
        while pending or running:
            for job in list(pending):
                if len(running) < parallel and all(a in done for a in job.after):
                    pending.remove(job)
                    running[pool.submit(_run_job, job, threads, logs)] = job
            finished = next(iter(f for f in list(running) if f.done()), None)
            if finished is None:
                time.sleep(2)
                continue
            job = running.pop(finished)
            durations[job.name] = round(finished.result(), 1)
            done.add(job.name)
            print(f"ablation: {job.name} done ({durations[job.name]:.0f} s)", file=sys.stderr, flush=True)
    train_wall = time.perf_counter() - t0

    cell_dirs = {"no PE, no PT": "nope-nopt", "PT only": "nope-pt", "3D PE only": "pe-nopt", "3D PE + PT": "pe-pt"}
    models = {(name, seed): work / f"seed-{seed}" / d / "model" for seed in seeds for name, d in cell_dirs.items()}
    missing = [f"{name} (seed {seed})" for (name, seed), path in models.items() if not (path / "config.json").is_file()]
    if missing and not score_only:
        raise SR3DInputError(f"ablation models missing after training: {missing}")
    models = {key: path for key, path in models.items() if (path / "config.json").is_file()}
    if not models:
        raise SR3DInputError(f"no trained ablation model under {work}; run without score_only first")
    results = evaluate_models(models, per_family=per_family, shortcut_train=shortcut_train)
    results["not_run"] = missing
    results["exported_demo"] = str(export_demo) if export_demo is not None else None
    results["exported_seed"] = best_seed(results, "3D PE + PT") if export_demo is not None else None
    trainer_time = {job.name: _trainer_time(job.output_dir) for job in jobs if job.model_dir.is_dir()}
    # the recipes pin torch's threads (training.cpu_threads); runs logged before that record none
    recorded = {t["cpu_threads"] for t in trainer_time.values() if t.get("cpu_threads")}
    results["budget"] = {
        "stage1_steps": stage1_steps,
        "stage2_steps": stage2_steps,
        "scratch_steps": scratch_steps or stage2_steps,
        "batch_size": {"stage1": _recipe_batch("tiny-synthetic"), "stage2": _recipe_batch("tiny-synthetic-stage2")},
        "seeds": seeds,
        "train_wall_s": round(train_wall, 1),
        "job_seconds": durations,
        "trainer_time": trainer_time,
        "parallel_jobs": parallel,
        "threads_per_job": recorded.pop() if len(recorded) == 1 else threads,
    }
    write_report(results, out)
    if export_demo is not None:
        dest = Path(export_demo)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(models[("3D PE + PT", results["exported_seed"])], dest)
    return results


def best_seed(results: dict[str, Any], cell: str) -> int:
    """The seed whose ``cell`` model has the highest mean cross-frame accuracy (the first seed on a tie,
    or when the cell has no cross-frame family): the one ``run_ablation`` exports as the demo model."""
    from sr3d_plugin.synthetic.qa import MULTI_VIEW_FAMILIES

    per_seed = results["cells"][cell]["per_seed"]
    if not per_seed:
        raise SR3DInputError(f"cell {cell!r} has no scored seed")

    def cross(seed: str) -> float:
        fams = [f for f in per_seed[seed] if f in MULTI_VIEW_FAMILIES]
        return sum(per_seed[seed][f] for f in fams) / len(fams) if fams else 0.0

    return int(max(per_seed, key=cross))  # max keeps the first of equal keys


def evaluate_models(
    models: dict[tuple[str, int], Path], per_family: int = 100, shortcut_train: int = 2000
) -> dict[str, Any]:
    """Score each (cell, seed) model on the same held-out test questions; add the 2D shortcuts' accuracy.

    Returns ``cells`` (cell → ``per_family`` mean over seeds, ``per_seed`` {seed: per-family},
    ``accuracy``, ``depth_accuracy``, ``single_view_accuracy``, ``cross_frame_accuracy``, means over
    seeds), ``chance``, ``heuristics`` (single-view 2D rules), ``shortcuts_2d`` (an MLP on the
    cross-frame questions' 2D facts, :mod:`sr3d_plugin.synthetic.shortcuts`) and the test set's size.
    """
    import torch

    from sr3d_plugin.builders import load_model
    from sr3d_plugin.experiments.evaluate import CHANCE, answer_questions, score_answers
    from sr3d_plugin.synthetic.qa import MULTI_VIEW_FAMILIES, heuristic_baselines, training_samples
    from sr3d_plugin.synthetic.shortcuts import shortcut_report

    torch.manual_seed(0)
    first = next(iter(models.values()))
    _, processor = load_model(first)
    size = processor.tile_size
    families = TRAINED_FAMILIES
    test = training_samples(per_family * len(families), list(families), split="test", image_size=size)
    per_seed: dict[str, dict[int, dict[str, Any]]] = {}
    for (name, seed), path in models.items():
        model, proc = load_model(path)
        answers = answer_questions(model, proc, test, batch_size=32)
        per_seed.setdefault(name, {})[seed] = score_answers(test, answers)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    cells = {}
    for name, by_seed in per_seed.items():
        fams = list(next(iter(by_seed.values()))["per_family"])
        fam_mean = {f: mean([r["per_family"][f] for r in by_seed.values()]) for f in fams}
        cross = [f for f in fams if f in MULTI_VIEW_FAMILIES]
        single = [f for f in fams if f not in MULTI_VIEW_FAMILIES]
        cells[name] = {
            "per_family": fam_mean,
            "per_seed": {str(seed): r["per_family"] for seed, r in by_seed.items()},
            "accuracy": mean([r["accuracy"] for r in by_seed.values()]),
            "depth_accuracy": mean([r["depth_accuracy"] for r in by_seed.values()]),
            "single_view_accuracy": mean([fam_mean[f] for f in single]) if single else None,
            "cross_frame_accuracy": mean([fam_mean[f] for f in cross]) if cross else None,
        }
    return {
        "cells": cells,
        "chance": {f: CHANCE[f] for f in families},
        "heuristics": heuristic_baselines(test),
        "shortcuts_2d": shortcut_report(test, train_per_family=shortcut_train, image_size=size),
        "test_questions": len(test),
        "per_family": per_family,
        "test_split": "test (scene seeds 3,000,000+, disjoint from training's 1,000,000+)",
    }


def write_report(results: dict[str, Any], out_dir: str | Path) -> None:
    """``results.json``, a Markdown table (``README.md``) and a bar chart (``ablation.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sr3d_plugin.io_utils import atomic_path, atomic_write_json, atomic_write_text
    from sr3d_plugin.synthetic.qa import DEPTH_FAMILIES, MULTI_VIEW_FAMILIES

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    cells = results["cells"]
    names = list(cells)
    families = list(results["chance"])
    seeds = results.get("budget", {}).get("seeds") or sorted({int(k) for c in cells.values() for k in c["per_seed"]})

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{100 * x:.0f}"

    def by_seed(cell: dict[str, Any], fam: str) -> str:
        return " / ".join(pct(cell["per_seed"].get(str(s), {}).get(fam)) for s in seeds)

    seed_txt = " / ".join(f"seed {s}" for s in seeds)
    lines = [
        "# 3D PE × single-view pre-training on synthetic spatial QA (the paper's Table 8 in miniature)",
        "",
        "Regenerate with `sr3d ablation` (trains 4 tiny SR-3D models per seed from scratch on the CPU with the "
        "`tiny-synthetic` recipes, then scores them on held-out test scenes). Exact-match accuracy (%) of "
        f"greedy text answers, {seed_txt}; ✱ = needs depth; ⇄ = cross-frame (each region on its own frame, "
        "objects never seen together in any frame).",
        "",
        "| family | chance | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for fam in families:
        mark = " ⇄" if fam in MULTI_VIEW_FAMILIES else (" ✱" if fam in DEPTH_FAMILIES else "")
        row = [f"{fam}{mark}", pct(results["chance"][fam])]
        row += [by_seed(cells[n], fam) for n in names]
        lines.append("| " + " | ".join(row) + " |")
    for key, label in (("single_view_accuracy", "single-view mean"), ("cross_frame_accuracy", "cross-frame mean ⇄")):
        lines.append(
            f"| **{label}** (seeds averaged) | | " + " | ".join(f"**{pct(cells[n].get(key))}**" for n in names) + " |"
        )
    if results.get("not_run"):
        lines += ["", "Not run (– in the table): " + ", ".join(results["not_run"]) + "."]
    lines += ["", "2D shortcuts on the same test questions (accuracy %):", ""]
    for fam, r in results.get("shortcuts_2d", {}).items():
        lines.append(
            f"- `{fam}`: an MLP on frame index, centroid, box size, area and region order, fitted on "
            f"{r.get('train_questions', 2000):,} training questions: **{pct(r['mlp'])}** (chance {pct(results['chance'][fam])}; its own training fit {pct(r['train_accuracy'])})"
        )
    lines += [f"- `{k}`: {pct(v)}" for k, v in results["heuristics"].items()]
    b = results.get("budget", {})
    if "stage1_steps" in b:
        lines += [
            "",
            f"Budget: stage 1 {b['stage1_steps']} steps + stage 2 {b['stage2_steps']} steps (PT off: "
            f"{b.get('scratch_steps') or b['stage2_steps']} steps on stage-2 data from scratch), "
            f"batch {_batch_text(b['batch_size'])}; "
            f"{results['test_questions']} test questions ({results['per_family']} per family), the same for every model.",
        ]
        if results.get("exported_demo"):
            lines += [
                "",
                f"The seed-{results.get('exported_seed', seeds[0])} 3D PE + PT model (the seed with the higher mean "
                f"cross-frame accuracy) is the bundled demo model (`{results['exported_demo']}`).",
            ]
        times = b.get("trainer_time", {})
        if times and all(t.get("seconds") for t in times.values()):
            total = sum(t["seconds"] for t in times.values())
            longest = max(times.items(), key=lambda kv: kv[1]["seconds"])
            lines += [
                "",
                f"Training time (trainer's clock, {b['threads_per_job']} thread(s) per job, {b['parallel_jobs']} jobs at "
                f"a time): longest job {longest[0]} {longest[1]['seconds'] / 60:.1f} min; "
                + ", ".join(f"{name} {t['seconds'] / 60:.1f}" for name, t in times.items())
                + f" min; {total / 60:.0f} min of job time in all.",
            ]
    atomic_write_text(out / "README.md", "\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(12, 4.2))
    width = 0.8 / (len(names) + 1)
    xs = range(len(families))
    for i, n in enumerate(names):
        vals = [100 * cells[n]["per_family"].get(f, 0.0) for f in families]
        ax.bar([x + i * width for x in xs], vals, width, label=f"{n} (mean of seeds)")
        for s in [s for s in seeds if str(s) in cells[n]["per_seed"]]:  # each seed as a dot on its bar
            pts = [100 * cells[n]["per_seed"][str(s)].get(f, 0.0) for f in families]
            ax.plot([x + i * width for x in xs], pts, "k.", markersize=3)
    ax.bar(
        [x + len(names) * width for x in xs],
        [100 * results["chance"][f] for f in families],
        width,
        label="chance",
        color="lightgray",
    )
    ax.set_xticks([x + 0.4 - width / 2 for x in xs])
    ax.set_xticklabels(
        [f + (" ⇄" if f in MULTI_VIEW_FAMILIES else " ✱") for f in families], rotation=25, ha="right", fontsize=8
    )
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Tiny SR-3D on held-out synthetic scenes: 3D PE × single-view pre-training (⇄ = cross-frame)")
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.28))
    fig.tight_layout()
    with atomic_path(out / "ablation.png", suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
