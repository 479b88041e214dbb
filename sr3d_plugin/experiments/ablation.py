"""The paper's Table 8 in miniature: 3D PE off / on × single-view pre-training off / on, same budget.

Four tiny SR-3D models are trained from scratch on the CPU with the bundled recipes and scored on
held-out synthetic scenes (test-split seeds, never used in training), per question family:

* **PT on**: ``tiny-synthetic`` (stage 1, single-view questions) then ``tiny-synthetic-stage2``
  (multi-view cross-frame questions with single-view replay);
* **PT off**: ``tiny-synthetic-stage2`` from scratch for the same total number of steps;
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sr3d_plugin.errors import SR3DInputError

__all__ = ["CELLS", "AblationJob", "run_ablation", "write_report"]

#: the question families the tiny-synthetic recipes train on (and the ablation scores)
TRAINED_FAMILIES = ("closer", "front_behind", "distance", "mv_distance", "mv_closer_to_third")

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
    work: Path, stage1_steps: int, stage2_steps: int, seed: int, extra: list[str] | None = None
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
                f"training.max_steps={stage1_steps + stage2_steps}",
                f"training.output_dir={work / f'{tag}-nopt'}",
            ],
            work / f"{tag}-nopt",
        )
        jobs += [s1, scratch, s2]
    return jobs


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
    resumed_from, end = 0, None
    log = run_dir / "log.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            event = json.loads(line)
            if event.get("event") == "resume":  # logged just before its invocation's "start"
                resumed_from = int(event.get("global_step", 0))
            elif event.get("event") == "end":
                end = event
    if end is None or not end.get("seconds"):
        return {"seconds": None, "steps_per_s": None, "resumed_from": resumed_from}
    rate = (int(end["steps"]) - resumed_from) / float(end["seconds"])
    full = int(end["steps"]) / rate if rate > 0 else None
    return {"seconds": round(full, 1) if full else None, "steps_per_s": round(rate, 2), "resumed_from": resumed_from}


def run_ablation(
    out_dir: str | Path = "docs/ablation",
    work_dir: str | Path = "runs/ablation",
    stage1_steps: int = 2000,
    stage2_steps: int = 1200,
    per_family: int = 100,
    parallel: int = 2,
    seed: int = 0,
    export_demo: str | Path | None = None,
    extra_overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Train the four cells (resumable: finished runs are reused), score them, write the report.

    Args:
        out_dir: where ``results.json``, ``README.md`` and ``ablation.png`` go.
        work_dir: run folders of the eight training jobs.
        stage1_steps, stage2_steps: the budget (PT off trains ``stage1 + stage2`` steps on stage-2 data).
        per_family: test questions per family (held-out scenes).
        parallel: training jobs at once (each gets ``cpu_count // parallel`` threads).
        seed: training seed.
        export_demo: copy the "3D PE + PT" model here (the bundled demo model).
        extra_overrides: recipe overrides applied to every job (e.g. a smaller data size in tests).
    """
    import shutil

    work, out = Path(work_dir), Path(out_dir)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    jobs = _jobs(work, stage1_steps, stage2_steps, seed, extra_overrides)
    threads = max(1, (os.cpu_count() or 2) // max(1, parallel))
    durations: dict[str, float] = {}
    done: set[str] = set()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        pending = list(jobs)
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

    models = {
        "no PE, no PT": work / "nope-nopt" / "model",
        "PT only": work / "nope-pt" / "model",
        "3D PE only": work / "pe-nopt" / "model",
        "3D PE + PT": work / "pe-pt" / "model",
    }
    results = evaluate_models(models, per_family=per_family)
    results["exported_demo"] = str(export_demo) if export_demo is not None else None
    results["budget"] = {
        "stage1_steps": stage1_steps,
        "stage2_steps": stage2_steps,
        "batch_size": 16,
        "seed": seed,
        "train_wall_s": round(train_wall, 1),
        "job_seconds": durations,
        "trainer_time": {job.name: _trainer_time(job.output_dir) for job in jobs},
        "parallel_jobs": parallel,
        "threads_per_job": threads,
    }
    write_report(results, out)
    if export_demo is not None:
        dest = Path(export_demo)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(models["3D PE + PT"], dest)
    return results


def evaluate_models(models: dict[str, Path], per_family: int = 100) -> dict[str, Any]:
    """Score each model on the same held-out test questions; add the 2D heuristics' accuracy."""
    import torch

    from sr3d_plugin.builders import load_model
    from sr3d_plugin.experiments.evaluate import CHANCE, answer_questions, score_answers
    from sr3d_plugin.synthetic.qa import heuristic_baselines, training_samples

    torch.manual_seed(0)
    first = next(iter(models.values()))
    _, processor = load_model(first)
    size = processor.tile_size
    families = TRAINED_FAMILIES
    test = training_samples(per_family * len(families), list(families), split="test", image_size=size, scenes=100)
    scores = {}
    for name, path in models.items():
        model, proc = load_model(path)
        answers = answer_questions(model, proc, test, batch_size=32)
        scores[name] = score_answers(test, answers)
    return {
        "cells": scores,
        "chance": {f: CHANCE[f] for f in families},
        "heuristics": heuristic_baselines(test),
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
    from sr3d_plugin.synthetic.qa import DEPTH_FAMILIES

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    cells = results["cells"]
    names = list(cells)
    families = list(results["chance"])
    lines = [
        "# 3D PE × single-view pre-training on synthetic spatial QA (the paper's Table 8 in miniature)",
        "",
        "Regenerate with `sr3d ablation` (trains 4 tiny SR-3D models from scratch on the CPU with the "
        "`tiny-synthetic` recipes, then scores them on held-out test scenes). Exact-match accuracy (%) of "
        "greedy text answers; ✱ = depth-dependent family (de-biased: image position and apparent size carry "
        "no depth information).",
        "",
        "| family | chance | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for fam in families:
        star = " ✱" if fam in DEPTH_FAMILIES else ""
        row = [f"{fam}{star}", f"{100 * results['chance'][fam]:.0f}"]
        row += [f"{100 * cells[n]['per_family'].get(fam, float('nan')):.1f}" for n in names]
        lines.append("| " + " | ".join(row) + " |")
    lines.append(
        "| **depth families ✱** | | " + " | ".join(f"**{100 * cells[n]['depth_accuracy']:.1f}**" for n in names) + " |"
    )
    lines.append("| all families | | " + " | ".join(f"{100 * cells[n]['accuracy']:.1f}" for n in names) + " |")
    lines += ["", "2D heuristics on the same test questions (accuracy %):", ""]
    lines += [f"- `{k}`: {100 * v:.1f}" for k, v in results["heuristics"].items()]
    b = results.get("budget", {})
    if b:
        lines += [
            "",
            f"Budget: stage 1 {b['stage1_steps']} steps + stage 2 {b['stage2_steps']} steps (PT off: "
            f"{b['stage1_steps'] + b['stage2_steps']} steps on stage-2 data), batch {b['batch_size']}, seed {b['seed']}; "
            f"{results['test_questions']} test questions ({results['per_family']} per family).",
        ]
        if results.get("exported_demo"):
            lines += ["", f"The 3D PE + PT model of this run is the bundled demo model (`{results['exported_demo']}`)."]
        times = b.get("trainer_time", {})
        if times and all(t.get("seconds") for t in times.values()):
            total = sum(t["seconds"] for t in times.values())
            lines += [
                "",
                "Training time per job (trainer's clock, "
                f"{b['threads_per_job']} thread(s) each, {b['parallel_jobs']} jobs at a time): "
                + ", ".join(
                    f"{name} {t['seconds'] / 60:.1f} min" + (" (resumed, extrapolated)" if t["resumed_from"] else "")
                    for name, t in times.items()
                )
                + f"; {total / 60:.0f} min of job time in all.",
            ]
    atomic_write_text(out / "README.md", "\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(12, 4.2))
    width = 0.8 / (len(names) + 1)
    xs = range(len(families))
    for i, n in enumerate(names):
        vals = [100 * cells[n]["per_family"].get(f, 0.0) for f in families]
        ax.bar([x + i * width for x in xs], vals, width, label=n)
    ax.bar(
        [x + len(names) * width for x in xs],
        [100 * results["chance"][f] for f in families],
        width,
        label="chance",
        color="lightgray",
    )
    ax.set_xticks([x + 0.4 - width / 2 for x in xs])
    ax.set_xticklabels(
        [f + (" ✱" if f in DEPTH_FAMILIES else "") for f in families], rotation=25, ha="right", fontsize=8
    )
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Tiny SR-3D on held-out synthetic scenes: 3D PE × single-view pre-training (✱ = needs depth)")
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.28))
    fig.tight_layout()
    with atomic_path(out / "ablation.png", suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
