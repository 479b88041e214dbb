"""Resumable evaluation runs: the answer store, the model hook and a real kill mid-run."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from _eval_data import prepare_all, raw_releases, tiny_model_dir

from sr3d_plugin.errors import SR3DConfigError
from sr3d_plugin.evaluation.answer_store import AnswerStore, model_fingerprint, run_settings

pytestmark = pytest.mark.usefixtures("one_thread")
SPLITS = {"scanqa": "val", "sqa3d": "test", "scan2cap": "val", "vsibench": "test"}
GEN = {"max_new_tokens": 5, "temperature": 0, "do_sample": False, "until": ["\n\n"]}


# --------------------------------------------------------------------------- the store alone
def _key(store: AnswerStore, doc_id: int = 0, **over: Any) -> str:
    args = {
        "task": "sr3d_scanqa",
        "split": "val",
        "doc_id": doc_id,
        "doc": {"question_id": f"q{doc_id}", "question": "What?"},
        "prompt": "What?\nAnswer the question using a single word or phrase.",
        "generation": {"max_new_tokens": 8, "do_sample": False, "stop": []},
    }
    args.update(over)
    return store.key(**args)


def test_answers_survive_a_reopen_and_a_torn_last_line(tmp_path: Path) -> None:
    settings = run_settings(tmp_path / "no-model", num_frames=4)
    store = AnswerStore(tmp_path / "answers", settings)
    for i in range(3):
        store.put(_key(store, i), f"answer {i}\nwith a newline", task="sr3d_scanqa", split="val", doc_id=i)
    store.close()
    path = tmp_path / "answers" / "answers.rank0.jsonl"
    assert len(path.read_text().splitlines()) == 3
    # a kill in the middle of a write: half a line at the end
    with open(path, "ab") as fh:
        fh.write(b'{"v": 1, "key": "abc", "answ')
    again = AnswerStore(tmp_path / "answers", settings)
    assert len(again) == 3 and again.bad_lines == 1
    assert again.get(_key(again, 1)) == "answer 1\nwith a newline" and again.reused == 1
    assert path.read_bytes().endswith(b"\n")  # the torn tail was cut off before appending
    again.put(_key(again, 7), "seven", task="sr3d_scanqa", split="val", doc_id=7)
    again.close()
    third = AnswerStore(tmp_path / "answers", settings)
    assert len(third) == 4 and third.bad_lines == 0 and third.get(_key(third, 7)) == "seven"
    # another process's file in the same folder is read too (a rerun with other process counts)
    other = AnswerStore(tmp_path / "answers", settings, rank=1)
    other.put(_key(other, 9), "nine", task="sr3d_scanqa", split="val", doc_id=9)
    other.close()
    assert AnswerStore(tmp_path / "answers", settings).get(_key(third, 9)) == "nine"


def test_keys_cover_model_settings_record_prompt_and_generation(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    (model / "model.safetensors").write_bytes(b"0" * 10)
    base = AnswerStore(tmp_path / "s", run_settings(model, num_frames=4))
    k = _key(base)
    assert k == _key(AnswerStore(tmp_path / "s", run_settings(model, num_frames=4)))  # deterministic
    assert k != _key(AnswerStore(tmp_path / "s", run_settings(model, num_frames=8)))
    different = {
        "task": _key(base, task="sr3d_sqa3d"),
        "split": _key(base, split="test"),
        "doc_id": _key(base, 1),
        "record": _key(base, doc={"question_id": "q0", "question": "Where?"}),
        "prompt": _key(base, prompt="What?"),
        "generation": _key(base, generation={"max_new_tokens": 9, "do_sample": False, "stop": []}),
        "stops": _key(base, generation={"max_new_tokens": 8, "do_sample": False, "stop": ["\n"]}),
    }
    assert k not in different.values() and len(set(different.values())) == len(different)
    before = model_fingerprint(model)
    (model / "config.json").write_text('{"a": 2}')
    assert model_fingerprint(model) != before
    after_config = model_fingerprint(model)
    (model / "model.safetensors").write_bytes(b"1" * 11)
    assert model_fingerprint(model) != after_config
    assert model_fingerprint("org/some-hub-id") == {"name": "org/some-hub-id"}
    with pytest.raises(SR3DConfigError, match="answers_dir="):
        AnswerStore(model / "model.safetensors", {})
    with pytest.raises(SR3DConfigError, match="must be a string"):
        base.put(k, None, task="t", split="val", doc_id=0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the model hook


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from sr3d_plugin.evaluation import lmms_tasks as T
    from sr3d_plugin.evaluation.schema import load_records

    raw = raw_releases(tmp_path_factory)
    data = tmp_path_factory.mktemp("store-data")
    prepare_all(raw, data)
    docs = {}
    for task in ("scanqa", "sqa3d"):
        recs = load_records(data / task / f"{SPLITS[task]}.jsonl", task)
        docs[T.TASK_NAMES[task]] = {SPLITS[task]: [{**r, T.DATA_DIR_FIELD: str(data)} for r in recs]}
    return {"raw": raw, "data": data, "docs": docs, "model_dir": tiny_model_dir(tmp_path_factory)}


def _counting_model(env: dict[str, Any], **kwargs: Any) -> Any:
    pytest.importorskip("lmms_eval")
    from sr3d_plugin.evaluation.lmms_model import SR3DLmms

    class Counting(SR3DLmms):
        computed: list[int]

        def _generate_batch(self, prepared: list, gen: dict, stops: list) -> dict[int, str]:
            self.computed.extend(i for i, _, _ in prepared)
            return super()._generate_batch(prepared, gen, stops)

    args = {"pretrained": str(env["model_dir"]), "num_frames": 4, "device": "cpu", **kwargs}
    lm = Counting(**args)
    lm.computed = []
    lm.task_dict = copy.deepcopy(env["docs"])
    return lm


def _requests(lm: Any, gen: dict[str, Any] | None = None) -> list[Any]:
    from lmms_eval.api.instance import Instance

    from sr3d_plugin.evaluation import lmms_tasks as T
    from sr3d_plugin.evaluation.prompts import task_prompt_kwargs

    reqs = []
    for name, splits in lm.task_dict.items():
        task = next(t for t, n in T.TASK_NAMES.items() if n == name)
        for split, docs in splits.items():
            for doc_id, doc in enumerate(docs[:3]):
                ctx = T.doc_to_text(task, doc, task_prompt_kwargs(task))
                args = (ctx, dict(gen or GEN), None, doc_id, name, split)
                reqs.append(
                    Instance("generate_until", args, idx=0, metadata={"task": name, "doc_id": doc_id, "repeats": 1})
                )
    return reqs


def test_model_reuses_stored_answers_and_computes_only_the_rest(env: dict[str, Any], tmp_path: Path) -> None:
    answers = tmp_path / "answers"
    plain = _counting_model(env)
    reqs = _requests(plain)
    expected = plain.generate_until(reqs)
    assert len(plain.computed) == len(reqs) == 6 and plain.answer_store is None

    first = _counting_model(env, answers_dir=str(answers))
    assert first.generate_until(reqs[:4]) == expected[:4]  # "interrupted" after four answers
    assert len(first.computed) == 4
    lines = (answers / "answers.rank0.jsonl").read_text().splitlines()
    assert [json.loads(x)["doc_id"] for x in lines] == [0, 1, 2, 0]

    again = _counting_model(env, answers_dir=str(answers))
    assert again.generate_until(reqs) == expected  # the same answers as one uninterrupted run
    assert len(again.computed) == 2 and again.answer_store.reused == 4 and again.answer_store.written == 2
    done = _counting_model(env, answers_dir=str(answers))
    assert done.generate_until(reqs) == expected and done.computed == []

    # other generation settings or another record text: recomputed, not reused
    other = _counting_model(env, answers_dir=str(answers), max_new_tokens=3)
    other.generate_until(reqs)
    assert len(other.computed) == 6
    edited = _counting_model(env, answers_dir=str(answers))
    edited.task_dict["sr3d_scanqa"]["val"][0]["question"] = "A different question?"
    edited.generate_until(reqs)
    assert len(edited.computed) == 1


def test_failed_inputs_are_not_stored(env: dict[str, Any], tmp_path: Path) -> None:
    lm = _counting_model(env, answers_dir=str(tmp_path / "a"))
    lm.task_dict["sr3d_sqa3d"]["test"][1]["scene"] = "scenes/missing_scene"
    out = lm.generate_until(_requests(lm))
    assert out[4] == "" and len(lm.failures) == 1
    assert lm.answer_store.written == 5
    retry = _counting_model(env, answers_dir=str(tmp_path / "a"))
    retry.task_dict["sr3d_sqa3d"]["test"][1]["scene"] = "scenes/missing_scene"
    retry.generate_until(_requests(retry))
    assert len(retry.failures) == 1 and retry.answer_store.reused == 5  # the failed one is tried again


# --------------------------------------------------------------------------- a real kill mid-run
_LAUNCH = """
import os, sys, time
from sr3d_plugin.evaluation import lmms_model
_orig = lmms_model.SR3DLmms._generate_batch
def _slow(self, prepared, gen, stops):  # test harness only: slow answers so the kill lands mid-run
    time.sleep(float(os.environ.get("SR3D_TEST_ANSWER_DELAY", "0")))
    return _orig(self, prepared, gen, stops)
lmms_model.SR3DLmms._generate_batch = _slow
from lmms_eval.__main__ import cli_evaluate
cli_evaluate()
"""


def _eval_command(env: dict[str, Any], out: Path, *extra: str) -> tuple[list[str], dict[str, str]]:
    from sr3d_plugin.cli import build_parser
    from sr3d_plugin.cli.eval_cmd import build_command

    argv = ["eval", "--data", str(env["data"]), "--model", str(env["model_dir"]), "--tasks", "sr3d_sqa3d",
            "--model-args", "num_frames=4,device=cpu,max_new_tokens=4", "--output-path", str(out), *extra]  # fmt: skip
    cmd, env_add = build_command(build_parser().parse_args(argv))
    assert cmd[1:3] == ["-m", "lmms_eval"]
    run_env = {**os.environ, **env_add, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return [cmd[0], "-c", _LAUNCH, *cmd[3:]], run_env


def _scores(results: dict[str, Any]) -> dict[str, Any]:
    got = results["results"]["sr3d_sqa3d"]
    return {k: v for k, v in got.items() if k != "alias" and "_stderr" not in k}


def _cli_scores(out: Path) -> dict[str, Any]:
    return _scores(json.loads(max(out.rglob("*_results.json"), key=lambda p: p.stat().st_mtime).read_text()))


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_scores(
    env: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("lmms_eval")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from sr3d_plugin.resources import eval_tasks_dir

    # a run of `sr3d eval`'s command, SIGKILLed once 4 answers are on disk
    out = tmp_path / "run"
    cmd, run_env = _eval_command(env, out)
    store = out / "sr3d-answers" / "answers.rank0.jsonl"
    proc = subprocess.Popen(
        cmd, env={**run_env, "SR3D_TEST_ANSWER_DELAY": "0.4"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if store.is_file() and len(store.read_bytes().splitlines()) >= 4:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    stored = len(AnswerStore(out / "sr3d-answers", {}).answers)  # readable lines (a torn one is cut off)
    assert 4 <= stored < 12 and not list(out.rglob("*_results.json"))

    # rerun the same command (in the background) ...
    log_file = tmp_path / "rerun.log"
    with open(log_file, "wb") as log_fh:
        rerun = subprocess.Popen(cmd, env=run_env, stdout=log_fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # ... while the reference, one uninterrupted run without an answer store, runs in this process
        model_args = cmd[cmd.index("--model_args") + 1]
        plain_args = ",".join(a for a in model_args.split(",") if not a.startswith("answers_dir="))
        assert plain_args != model_args  # sr3d eval turned the store on by default
        monkeypatch.setenv("SR3D_DATA", str(env["data"]))
        tm = TaskManager("WARNING", include_path=str(eval_tasks_dir()), include_defaults=False)
        res = simple_evaluate(
            model="sr3d", model_args=plain_args, tasks=["sr3d_sqa3d"], task_manager=tm, verbosity="WARNING"
        )
        reference = _scores(res)
        assert reference["EM,none"] is not None
        code = rerun.wait(timeout=300)
    finally:
        if rerun.poll() is None:
            os.killpg(rerun.pid, signal.SIGKILL)
            rerun.wait(timeout=30)
    log = log_file.read_text(errors="replace")
    assert code == 0, log[-3000:]
    # only the missing answers were computed, and the scores are the uninterrupted run's
    assert len(AnswerStore(out / "sr3d-answers", {}).answers) == 12
    assert f"{stored} of 12 answer(s) reused, {12 - stored} to compute" in log
    lines = [json.loads(x) for x in store.read_text().splitlines() if x.strip()]
    assert len(lines) == 12  # nothing computed twice
    assert sorted(x["doc_id"] for x in lines) == list(range(12))
    assert _cli_scores(out) == reference


def test_eval_command_sets_the_answer_folder(env: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    from sr3d_plugin.cli import main

    base = ["eval", "--data", str(env["data"]), "--model", str(env["model_dir"]), "--dry-run"]
    assert main([*base, "--output-path", str(tmp_path / "o")]) == 0
    assert f"answers_dir={(tmp_path / 'o' / 'sr3d-answers').resolve()}" in capsys.readouterr().out
    assert main([*base, "--answers-dir", str(tmp_path / "a")]) == 0
    assert f"answers_dir={(tmp_path / 'a').resolve()}" in capsys.readouterr().out
    assert main([*base, "--no-resume"]) == 0
    assert "answers_dir" not in capsys.readouterr().out
    assert main([*base, "--model-args", f"answers_dir={tmp_path / 'm'}"]) == 0
    line = capsys.readouterr().out
    assert line.count("answers_dir=") == 1 and f"answers_dir={tmp_path / 'm'}" in line
    assert main([*base, "--no-resume", "--answers-dir", str(tmp_path / "a")]) == 2
    assert "--no-resume contradicts" in capsys.readouterr().err
    assert main([*base, "--answers-dir", str(tmp_path / "a"), "--model-args", "answers_dir=x"]) == 2
    assert "either with --answers-dir or as the answers_dir model argument" in capsys.readouterr().err
