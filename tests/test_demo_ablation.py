"""The embedded demo (bundled tiny model) and the PE × pre-training ablation runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sr3d_plugin.cli import main
from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.experiments import ablation
from sr3d_plugin.experiments.demo import default_model_path
from sr3d_plugin.experiments.evaluate import answer_questions, score_answers
from sr3d_plugin.synthetic.qa import training_samples


def test_bundled_model_is_small_and_loads() -> None:
    path = default_model_path()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 30 * 2**20, size
    assert not list(path.glob("*.bin"))


def test_demo_json_answers_depth_questions_well_above_chance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "demo.png"
    assert main(["demo", "--json", "--out", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert png.is_file() and png.stat().st_size > 10_000
    assert {"questions", "accuracy", "depth_accuracy", "timings", "png"} <= set(out)
    for view, key in (("single", "single_view_accuracy"), ("multi", "cross_frame_accuracy")):
        mine = [q["correct"] for q in out["questions"] if q["view"] == view]
        assert out[key] == pytest.approx(sum(mine) / len(mine))
    views = {q["view"] for q in out["questions"]}
    assert views == {"single", "multi"}
    for q in out["questions"]:
        assert {"question", "answer", "ground_truth", "correct", "family"} <= set(q)
    assert 0.0 <= out["accuracy"] <= 1.0
    # one scene is a handful of questions; the claim "well above chance" is checked on held-out scenes:
    from sr3d_plugin.builders import load_model

    model, processor = load_model(default_model_path())
    test = training_samples(60, ["closer", "front_behind"], split="test", image_size=processor.tile_size)
    scores = score_answers(test, answer_questions(model, processor, test, batch_size=30))
    assert scores["depth_accuracy"] >= 0.75, scores


def test_bundled_model_answers_cross_frame_questions_well_above_chance() -> None:
    """The headline claim on held-out scenes: a region on one frame related to objects no frame shows with it."""
    from sr3d_plugin.builders import load_model

    model, processor = load_model(default_model_path())
    test = training_samples(200, ["mv_closer_to_third", "mv_distance"], split="test", image_size=processor.tile_size)
    scores = score_answers(test, answer_questions(model, processor, test, batch_size=25))["per_family"]
    # measured on these 100 + 100 questions: 90 % and 65 % (chance 50 % and 25 %); the thresholds are issue
    # 16's targets (75 % and 45 %), which the bundled model must keep (docs/ablation/what-mattered.md)
    assert scores["mv_closer_to_third"] >= 0.75 and scores["mv_distance"] >= 0.45, scores


def test_demo_without_a_model_says_how_to_get_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--model", str(tmp_path / "nothing")]) == 2
    assert "sr3d train" in capsys.readouterr().err


def test_ablation_job_graph_has_equal_budgets() -> None:
    jobs = {j.name: j for j in ablation._jobs(Path("w"), 30, 20, seed=3)}
    assert set(jobs) == {"pe-stage1", "pe-pt", "pe-nopt", "nope-stage1", "nope-pt", "nope-nopt"}
    steps = {
        n: next(int(o.split("=")[1]) for o in j.overrides if o.startswith("training.max_steps="))
        for n, j in jobs.items()
    }
    assert steps["pe-stage1"] == 30 and steps["pe-pt"] == steps["pe-nopt"] == 20  # PT off: stage 2 alone
    assert (
        jobs["pe-pt"].after == ["pe-stage1"]
        and f"model.path={Path('w') / 'pe-stage1' / 'model'}" in jobs["pe-pt"].overrides
    )
    assert "model.config_overrides.use_position_encoding=false" in jobs["nope-stage1"].overrides
    assert all("training.seed=3" in j.overrides for j in jobs.values())
    cheaper = {j.name: j for j in ablation._jobs(Path("w"), 30, 20, seed=3, scratch_steps=35)}
    assert "training.max_steps=35" in cheaper["pe-nopt"].overrides


def test_report_shows_every_seed_and_the_cross_frame_mean(tmp_path: Path) -> None:
    fams = {"closer": 0.9, "mv_distance": 0.5, "mv_closer_to_third": 0.8}
    cells = {}
    for n, (name, _, _) in enumerate(ablation.CELLS):
        per_seed = {
            "0": {f: v - 0.1 * n for f, v in fams.items()},
            "1": {f: v - 0.1 * n - 0.02 for f, v in fams.items()},
        }
        mean = {f: (per_seed["0"][f] + per_seed["1"][f]) / 2 for f in fams}
        cells[name] = {
            "per_family": mean,
            "per_seed": per_seed,
            "accuracy": 0.5,
            "depth_accuracy": 0.5,
            "single_view_accuracy": mean["closer"],
            "cross_frame_accuracy": (mean["mv_distance"] + mean["mv_closer_to_third"]) / 2,
        }
    results = {
        "cells": cells,
        "chance": {"closer": 0.5, "mv_distance": 0.25, "mv_closer_to_third": 0.5},
        "heuristics": {"closer/bigger_is_closer": 0.5},
        "shortcuts_2d": {"mv_distance": {"mlp": 0.27, "train_accuracy": 0.3, "val_accuracy": 0.28, "majority": 0.25}},
        "test_questions": 300,
        "per_family": 100,
        "budget": {"seeds": [0, 1]},
    }
    ablation.write_report(results, tmp_path)
    table = (tmp_path / "README.md").read_text()
    assert "| mv_closer_to_third ⇄ | 50 | 80 / 78 | 70 / 68 | 60 / 58 | 50 / 48 |" in table
    assert "| **cross-frame mean ⇄** (seeds averaged) | | **64** |" in table
    assert "`mv_distance`: an MLP on frame index" in table and "**27**" in table
    assert (tmp_path / "ablation.png").stat().st_size > 10_000
    with pytest.raises(SR3DInputError, match="seeds must be distinct"):
        ablation.run_ablation(out_dir=tmp_path, work_dir=tmp_path / "w", seeds=(1, 1))


@pytest.mark.slow
def test_ablation_end_to_end_writes_table_and_plot(tmp_path: Path) -> None:
    small = ["data.generator_args.size=32", "data.generator_args.scenes=4", "training.save_steps=1000"]
    results = ablation.run_ablation(
        out_dir=tmp_path / "out",
        work_dir=tmp_path / "work",
        stage1_steps=4,
        stage2_steps=2,
        per_family=2,
        parallel=2,
        seeds=(3,),
        shortcut_train=40,
        extra_overrides=small,
        export_demo=tmp_path / "demo",
    )
    assert set(results["cells"]) == {name for name, _, _ in ablation.CELLS}
    table = (tmp_path / "out" / "README.md").read_text()
    assert "| closer ✱ | 50 |" in table and "2D shortcuts" in table
    assert (tmp_path / "out" / "ablation.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "out" / "results.json").read_text())["budget"]["stage1_steps"] == 4
    assert (tmp_path / "demo" / "config.json").is_file() and results["exported_seed"] == 3
    # resumable: a second call reuses the finished runs
    again = ablation.run_ablation(
        out_dir=tmp_path / "out2",
        work_dir=tmp_path / "work",
        stage1_steps=4,
        stage2_steps=2,
        per_family=2,
        seeds=(3,),
        shortcut_train=40,
        extra_overrides=small,
    )
    assert all(v == 0.0 for v in again["budget"]["job_seconds"].values())


def test_the_exported_demo_model_is_the_seed_with_the_better_cross_frame_accuracy() -> None:
    def cell(*seeds: tuple[str, float, float, float]) -> dict:
        return {
            "per_seed": {s: {"closer": closer, "mv_distance": d, "mv_closer_to_third": c} for s, closer, d, c in seeds}
        }

    # seed 1 answers single-view questions worse but cross-frame ones better: it is exported
    results = {"cells": {"3D PE + PT": cell(("0", 0.99, 0.46, 0.77), ("1", 0.95, 0.65, 0.90))}}
    assert ablation.best_seed(results, "3D PE + PT") == 1
    tie = {"cells": {"3D PE + PT": cell(("4", 0.5, 0.5, 0.5), ("2", 0.9, 0.5, 0.5))}}
    assert ablation.best_seed(tie, "3D PE + PT") == 4  # a tie keeps the first seed
    with pytest.raises(SR3DInputError, match="no scored seed"):
        ablation.best_seed({"cells": {"3D PE + PT": {"per_seed": {}}}}, "3D PE + PT")


def test_trainer_time_extrapolates_a_resumed_job(tmp_path: Path) -> None:
    events = [
        {"event": "start", "total_steps": 100},
        {"event": "resume", "global_step": 40},
        {"event": "start", "total_steps": 100, "cpu_threads": 1},
        {"event": "end", "steps": 100, "seconds": 30.0},
    ]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")
    t = ablation._trainer_time(tmp_path)
    # 60 steps in 30 s -> 100 steps in 50 s; the run's own thread count is reported
    assert t == {"seconds": 50.0, "steps_per_s": 2.0, "resumed_from": 40, "cpu_threads": 1}
    (tmp_path / "log.jsonl").write_text(json.dumps({"event": "end", "steps": 10, "seconds": 5.0}) + "\n")
    assert ablation._trainer_time(tmp_path)["seconds"] == 5.0
    assert ablation._trainer_time(tmp_path / "missing")["seconds"] is None
