"""The sr3d lmms-eval tasks: YAML, loading through lmms-eval's TaskManager, prompts, validation, aggregation."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from _eval_data import prepare_all, raw_releases

from sr3d_plugin.errors import SR3DConfigError, SR3DInputError
from sr3d_plugin.evaluation import lmms_tasks as T
from sr3d_plugin.evaluation.schema import TASKS, load_records
from sr3d_plugin.evaluation.scoring import score_task
from sr3d_plugin.resources import eval_tasks_dir

lmms_eval = pytest.importorskip("lmms_eval")

SPLITS = {"scanqa": "val", "sqa3d": "test", "scan2cap": "val", "vsibench": "test"}


class _Loader(yaml.SafeLoader):
    """Reads the task YAML with ``!function`` kept as a plain string."""


_Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def _raw_yaml(path: Path) -> dict[str, Any]:
    """One YAML file with its ``include:`` merged in (one level, as lmms-eval does), ``!function`` as text."""
    cfg = yaml.load(path.read_text(), Loader=_Loader)
    include = cfg.pop("include", None)
    if include is None:
        return cfg
    return {**_raw_yaml(path.parent / include), **cfg}


def _yaml(task: str) -> dict[str, Any]:
    name = T.TASK_NAMES[task]
    return _raw_yaml(eval_tasks_dir() / name / f"{name}.yaml")


def _loaded(task: str) -> dict[str, Any]:
    """The task config as lmms-eval itself loads it: includes merged, every ``!function`` imported."""
    from lmms_eval.utils import load_yaml_config

    name = T.TASK_NAMES[task]
    return load_yaml_config(str(eval_tasks_dir() / name / f"{name}.yaml"), mode="full")


def _aggregations(task: str) -> dict[str, Any]:
    """``{metric: the aggregation function lmms-eval would call}``, imported through the task's YAML."""
    return {m["metric"]: m["aggregation"] for m in _loaded(task)["metric_list"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tasks-data")
    prepare_all(raw_releases(tmp_path_factory), out)
    return out


@pytest.fixture
def sr3d_data(data: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SR3D_DATA", str(data))
    return data


def _manager() -> Any:
    from lmms_eval.tasks import TaskManager

    return TaskManager("WARNING", include_path=str(eval_tasks_dir()), include_defaults=False)


def test_yaml_metrics_prompts_and_versions() -> None:
    for task in TASKS:
        cfg = _yaml(task)
        name = T.TASK_NAMES[task]
        assert cfg["task"] == name and cfg["test_split"] == SPLITS[task]
        metrics = [m["metric"] for m in cfg["metric_list"]]
        assert metrics == list(T.metric_names(task))
        for m in cfg["metric_list"]:
            assert m["aggregation"] == f"!function utils.{T.metric_function_name(m['metric'])}"
        assert cfg["class"] == "!function utils.SR3DTaskClass"
        assert isinstance(cfg["metadata"]["version"], float) and cfg["metadata"]["prompt_version"].startswith(task)
        assert cfg["generation_kwargs"]["do_sample"] is False
        # hooks are named, greppable functions: `def aggregate_x` for `!function utils.aggregate_x`
        utils = (eval_tasks_dir() / name / "utils.py").read_text()
        assert "globals()" not in utils
        for m in cfg["metric_list"]:
            assert f"def {T.metric_function_name(m['metric'])}(" in utils
    group = yaml.safe_load((eval_tasks_dir() / "sr3d_3d.yaml").read_text())
    assert group["group"] == T.GROUP_NAME and group["task"] == list(T.TASK_NAMES.values())


def _function_tags(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [t for v in node.values() for t in _function_tags(v)]
    if isinstance(node, list):
        return [t for v in node for t in _function_tags(v)]
    return [node[len("!function ") :]] if isinstance(node, str) and node.startswith("!function ") else []


def test_every_function_tag_resolves() -> None:
    """Each ``!function`` of each task YAML (template included) imports, as lmms-eval resolves it."""
    for task in TASKS:
        raw = _yaml(task)
        tags = _function_tags(raw)
        assert "sr3d_plugin.evaluation.lmms_tasks.doc_to_visual" in tags  # from the shared template
        loaded = _loaded(task)
        top = [k for k, v in raw.items() if isinstance(v, str) and v.startswith("!function ")]
        assert {"class", "doc_to_visual", "doc_to_text", "process_results"} <= set(top)
        assert all(callable(loaded[k]) for k in top)
        assert len(tags) == len(top) + len(loaded["metric_list"])
        for m in loaded["metric_list"]:
            assert callable(m["aggregation"]) and m["aggregation"].__name__ == T.metric_function_name(m["metric"])
        assert loaded["class"].__name__ and isinstance(loaded["class"], type)
        assert loaded["doc_to_visual"] is T.doc_to_visual


def test_names_do_not_clash_with_builtin_tasks() -> None:
    """A built-in name would silently win over ours (SR3D-FACTS §9)."""
    builtin = Path(lmms_eval.__file__).parent / "tasks"
    names: set[str] = set()
    pattern = re.compile(r"^(?:task|group|tag):\s*['\"]?([A-Za-z0-9_.\-]+)", re.MULTILINE)
    for f in builtin.rglob("*.yaml"):
        names.update(pattern.findall(f.read_text(errors="replace")))
    assert "vsibench" in names  # the scan works
    ours = {*T.TASK_NAMES.values(), T.GROUP_NAME}
    assert not ours & names


def test_prompts(data: Path) -> None:
    kwargs = {t: _yaml(t)["lmms_eval_specific_kwargs"]["default"] for t in TASKS}
    recs = {t: load_records(data / t / f"{SPLITS[t]}.jsonl", t) for t in TASKS}
    q = recs["scanqa"][0]
    assert T.doc_to_text("scanqa", q, kwargs["scanqa"]) == (
        f"{q['question']}\nAnswer the question using a single word or phrase."
    )
    s = recs["sqa3d"][0]
    assert T.doc_to_text("sqa3d", s, kwargs["sqa3d"]) == (
        f"{s['situation']} {s['question']}\nAnswer the question using a single word or phrase."
    )
    c = recs["scan2cap"][0]
    assert T.doc_to_text("scan2cap", c, kwargs["scan2cap"]) == (
        "Describe the object <mask> in detail, including where it is in the room."
    )
    mc = next(r for r in recs["vsibench"] if r["options"])
    na = next(r for r in recs["vsibench"] if not r["options"])
    assert T.doc_to_text("vsibench", mc, kwargs["vsibench"]) == "\n".join(
        ["These are frames of a video.", mc["question"], "Options:", *mc["options"],
         "Answer with the option's letter from the given choices directly."]
    )  # fmt: skip
    assert T.doc_to_text("vsibench", na, kwargs["vsibench"]) == (
        f"These are frames of a video.\n{na['question']}\nPlease answer the question using a single word or phrase."
    )
    assert T.doc_to_text("scanqa", {**q, "prompt": "Ready prompt?"}, kwargs["scanqa"]) == "Ready prompt?"
    with pytest.raises(SR3DConfigError, match="post_prompt is missing"):
        T.doc_to_text("scanqa", q, {"pre_prompt": ""})
    # visuals for other lmms-eval models: sampled colour frames, or the video path
    frames = T.doc_to_visual({**q, T.DATA_DIR_FIELD: str(data)}, {"num_frames": 3})
    assert len(frames) == 3 and frames[0].size == (96, 72)
    assert T.doc_to_visual({**mc, T.DATA_DIR_FIELD: str(data)}) == [str(data / mc["video"])]


def test_tasks_load_through_lmms_eval(sr3d_data: Path) -> None:
    tm = _manager()
    assert set(tm.all_tasks) == {*T.TASK_NAMES.values(), T.GROUP_NAME}
    loaded = tm.load_task_or_group([T.GROUP_NAME])
    tasks = next(iter(loaded.values()))
    assert sorted(tasks) == sorted(T.TASK_NAMES.values())
    for task, name in T.TASK_NAMES.items():
        obj = tasks[name]
        path = sr3d_data / task / f"{SPLITS[task]}.jsonl"
        docs = obj.test_docs()
        assert len(docs) == len(load_records(path, task))
        doc = docs[0]
        assert doc[T.DATA_DIR_FIELD] == str(sr3d_data.resolve()) and doc[T.RECORDS_FIELD] == str(path.resolve())
        meta = obj.dump_config()["metadata"]
        assert meta["data_file"] == str(path.resolve()) and len(meta["data_sha256"]) == 64
        assert meta["prompt_version"] == _yaml(task)["metadata"]["prompt_version"] and obj.VERSION == 1.0
        assert obj.doc_to_text(doc) == T.doc_to_text(task, doc, _yaml(task)["lmms_eval_specific_kwargs"])


def test_task_loading_errors(sr3d_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tm = _manager()
    monkeypatch.delenv("SR3D_DATA")
    with pytest.raises(SR3DConfigError, match=r"set SR3D_DATA=<folder written by `sr3d prepare`>"):
        tm.load_task_or_group(["sr3d_scanqa"])
    # a scene folder that is missing: the error names the records that use it, before any inference
    bad = tmp_path / "data"
    shutil.copytree(sr3d_data, bad, symlinks=True)
    shutil.rmtree(bad / "scenes" / "scene0012_00")
    monkeypatch.setenv("SR3D_DATA", str(bad))
    with pytest.raises(
        SR3DInputError, match=r"scene '.*scene0012_00' \(used by record #3 \(question_id 'val-scene0012-0'\)"
    ):
        tm.load_task_or_group(["sr3d_scanqa"])
    # a region count that does not match the prompt
    path = bad / "scan2cap" / "val.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    recs[1]["regions"] = recs[1]["regions"] * 2
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(
        SR3DInputError, match=r"record #1 .*: the prompt has 1 <mask> token\(s\) but the record has 2 region"
    ):
        tm.load_task_or_group(["sr3d_scan2cap"])
    # a record that breaks the schema
    path = bad / "sqa3d" / "test.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    del recs[4]["answers"]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(SR3DInputError, match=r"record #4 \(question_id '220602000005'\): field 'answers': missing"):
        tm.load_task_or_group(["sr3d_sqa3d"])


def test_aggregation_equals_score_task_and_never_raises(data: Path) -> None:
    for task in TASKS:
        path = data / task / f"{SPLITS[task]}.jsonl"
        recs = load_records(path, task)
        preds: dict[str, Any] = {}
        for i, r in enumerate(recs):
            truth = r.get("answers", r.get("references", [r.get("ground_truth")]))[0]
            preds[r["question_id"]] = ["", None, truth, "something else"][i % 4]
        docs = [{**r, T.RECORDS_FIELD: str(path)} for r in recs]
        items = [T.process_results(task, d, [preds[d["question_id"]]]) for d in docs]
        aggs = _aggregations(task)
        assert list(aggs) == list(T.metric_names(task))
        got_all = {m: aggs[m]([it[m] for it in items]) for m in T.metric_names(task)}
        # the aggregation scored exactly these predictions and records (an identical call hits its cache);
        # `sr3d metrics` against fresh scoring is checked end to end in test_eval_e2e
        expected = score_task(task, preds, recs)
        for metric, got in got_all.items():
            if metric == T.EMPTY_METRIC:
                c = expected["counts"]
                assert got == c["empty"] + c["invalid"] > 0
            else:
                assert got == expected["scores"][metric], (task, metric)
    # an unknown question id is logged and reported as N/A, never raised (finished predictions survive)
    item = {"question_id": "nope", "prediction": "x", "records": str(data / "scanqa" / "val.jsonl")}
    em_1 = _aggregations("scanqa")["EM@1"]
    assert em_1([item]) is None
    assert em_1([{"bad": 1}]) is None
    with pytest.raises(SR3DConfigError, match="no metric 'EM@2'"):
        T.aggregate("scanqa", "EM@2", [item])


def test_tasks_path_command(capsys: pytest.CaptureFixture[str]) -> None:
    from sr3d_plugin.cli import main

    assert main(["tasks-path"]) == 0
    assert capsys.readouterr().out.strip() == str(eval_tasks_dir())
    assert main(["tasks-path", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["group"] == "sr3d_3d" and "sr3d_vsibench" in out["tasks"]


def test_optional_fields_missing_from_the_first_record_are_kept(
    sr3d_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    shutil.copytree(sr3d_data, data, symlinks=True)
    path = data / "scan2cap" / "val.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    del recs[0]["gt_box"], recs[0]["pred_box"]  # only its precomputed iou is left
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    monkeypatch.setenv("SR3D_DATA", str(data))
    docs = _manager().load_task_or_group(["sr3d_scan2cap"])["sr3d_scan2cap"].test_docs()
    assert docs[0]["pred_box"] is None and docs[1]["pred_box"] == recs[1]["pred_box"]
