"""Batches and streams (issue 14 item 3): ``SR3DPipeline.ask`` with many questions over several scenes,
``sr3d ask --questions/--out`` (resume, bad lines) and ``--stream`` / ``ask_stream``, on the bundled tiny
model and synthetic scenes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from sr3d_plugin.cli import main
from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.inference import SR3DPipeline

pytestmark = pytest.mark.usefixtures("one_thread")

#: (question, regions) cycled over the scenes; boxes on frames, a 3D box, alias and <mask> references
QUESTIONS: list[tuple[str, list[str]]] = [
    ("What is in the room?", []),
    ("Is <mask> left of <mask>?", ["frame=1 box=10,20,80,90", "frame=3 box=30,30,100,110"]),
    ("How many chairs are there?", []),
    ("What colour is <region0>?", ["frame=2 box=50,10,150,100"]),
    ("Where is <mask>?", ["box3d=0,0,0.5,1.5,1.5,1.0"]),
    ("How far apart are <region0> and <region1>?", ["frame=0 box=0,0,60,60", "frame=2 box=80,40,150,110"]),
]
GEN = {"num_frames": 4, "max_new_tokens": 10}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from sr3d_plugin.synthetic import generate_scene, write_scannet_layout

    root = tmp_path_factory.mktemp("batch")
    return [
        write_scannet_layout(
            generate_scene(seed, num_frames=6, width=160, height=120, num_objects=3), root / f"scene000{seed}_00"
        )
        for seed in (0, 1, 2)
    ]


@pytest.fixture(scope="module")
def pipes() -> tuple[SR3DPipeline, SR3DPipeline]:
    """``(batched, single)``: the bundled tiny model with scene reuse, and a second copy without any reuse."""
    return SR3DPipeline.from_pretrained("tiny", device="cpu"), SR3DPipeline.from_pretrained(
        "tiny", device="cpu", reuse=False
    )


def _items(scenes: list[Path]) -> list[dict[str, Any]]:
    """16 questions over three scenes and one image (some with boxes, some scored, one with its own budget)."""
    items: list[dict[str, Any]] = []
    for k in range(15):
        q, regions = QUESTIONS[k % len(QUESTIONS)]
        items.append({"id": f"q{k}", "question": q, "scene": str(scenes[k % 3]), "regions": regions})
    items[4]["score_answer"] = "A red chair."
    items[9]["score_answer"] = "Two."
    items[7]["max_new_tokens"] = 3
    d = scenes[1]
    items.append(
        {
            "id": 15,
            "question": "What is <mask>?",
            "image": str(d / "color" / "0.png"),
            "depth": str(d / "depth" / "0.png"),
            "intrinsics": str(d / "intrinsic" / "intrinsic_depth.txt"),
            "regions": ["box=10,10,80,100"],
        }
    )
    return items


def _single(pipe: SR3DPipeline, item: dict[str, Any], **defaults: Any) -> dict[str, Any]:
    kwargs = {**defaults, **{k: v for k, v in item.items() if k not in ("id", "question")}}
    return pipe.ask(item["question"], **kwargs)


def _same(batched: dict[str, Any], single: dict[str, Any]) -> None:
    """Every field but the timings (and the echoed id) equal; log-probabilities to float tolerance."""
    a = {k: v for k, v in batched.items() if k not in ("timings", "id", "answer_logprob", "line", "question")}
    b = {k: v for k, v in single.items() if k not in ("timings", "answer_logprob")}
    assert a == b
    assert ("answer_logprob" in batched) == ("answer_logprob" in single)
    if "answer_logprob" in single:
        assert batched["answer_logprob"] == pytest.approx(single["answer_logprob"], abs=1e-4)


class _VisionCalls:
    """Counts forward calls of a model's vision tower."""

    def __init__(self, model: Any) -> None:
        self.calls = 0
        self._handle = model.vision_tower.register_forward_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.calls += 1

    def close(self) -> None:
        self._handle.remove()


# ----------------------------------------------------------------------------------------------
# the Python API
# ----------------------------------------------------------------------------------------------


def test_a_16_question_batch_equals_16_single_calls(
    pipes: tuple[SR3DPipeline, SR3DPipeline], scenes: list[Path]
) -> None:
    batched, single = pipes
    items = _items(scenes)
    batched.clear_cache()
    counter = _VisionCalls(batched.model)
    try:
        got = batched.ask(items, batch_size=5, **GEN)  # a list: answered with ask_many
        assert counter.calls == 4  # three scenes and one image: each visual input encoded once
    finally:
        counter.close()
    assert [r["id"] for r in got] == [it["id"] for it in items]
    ref = [_single(single, it, **GEN) for it in items]
    for g, r in zip(got, ref):
        _same(g, r)
    assert len({r["answer"] for r in ref}) > 2  # the questions do change the answers
    assert ref[7]["generated_tokens"] <= 3 < max(r["generated_tokens"] for r in ref)
    assert got[15]["input"] == ref[15]["input"] and got[15]["geometry"]["source"] == "gt_depth"
    # a second batch on the same scenes reuses everything: no vision tower, no frame reading
    counter = _VisionCalls(batched.model)
    try:
        again = batched.ask_many(items[:6], batch_size=3, **GEN)
        assert counter.calls == 0
    finally:
        counter.close()
    assert [r["answer"] for r in again] == [r["answer"] for r in ref[:6]]
    assert all(r["timings"]["read"] == 0.0 and r["timings"]["geometry"] == 0.0 for r in again)


def test_list_of_questions_shares_the_other_arguments(
    pipes: tuple[SR3DPipeline, SR3DPipeline], scenes: list[Path]
) -> None:
    batched, single = pipes
    questions = ["What is <mask>?", "Where is <mask>?", "Is <region0> a table?"]
    region = ["frame=1 box=20,20,90,90"]
    got = batched.ask(questions, scene=scenes[2], regions=region, **GEN)
    assert isinstance(got, list) and len(got) == 3 and all("id" not in r for r in got)
    for q, g in zip(questions, got):
        _same(g, single.ask(q, scene=scenes[2], regions=region, **GEN))
    # an item with its own visual input takes none of the defaults' input or geometry
    d = scenes[0]
    own = {"question": "What is this?", "image": str(d / "color" / "1.png"), "depth_model": None}
    with pytest.raises(SR3DInputError, match="no depth source"):  # the scene default (and its depth) is dropped
        batched.ask_many([own], scene=scenes[2], **GEN)
    assert batched.ask([], scene=scenes[2]) == []


def test_in_memory_inputs_are_read_once_per_call(
    pipes: tuple[SR3DPipeline, SR3DPipeline], monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np
    from PIL import Image

    import sr3d_plugin.visual_inputs as vi
    from sr3d_plugin.synthetic import generate_scene

    batched, single = pipes
    scene = generate_scene(4, num_frames=6, width=160, height=120, num_objects=3)
    frames = [Image.fromarray(x) for x in scene.rgb]
    points = np.random.default_rng(0).normal(size=(6, 120, 160, 3)).astype(np.float32)
    items = [{"question": q, "regions": r} for q, r in QUESTIONS[:4]]
    reads: list[int] = []
    real = vi.visual_input

    def counted(**kwargs: object) -> object:
        reads.append(1)
        return real(**kwargs)

    monkeypatch.setattr(vi, "visual_input", counted)
    got = batched.ask_many(items, frames=frames, points=points, batch_size=2, **GEN)
    assert len(reads) == 1  # arrays and images are not cache keys; within one call the same objects are reused
    monkeypatch.setattr(vi, "visual_input", real)
    for g, it in zip(got, items):
        _same(g, single.ask(it["question"], frames=frames, points=points, regions=it["regions"], **GEN))
    assert got[0]["geometry"]["source"] == "reconstruction"


def test_bad_items_name_their_index_and_field(pipes: tuple[SR3DPipeline, SR3DPipeline], scenes: list[Path]) -> None:
    pipe = pipes[0]
    s = str(scenes[0])
    ok = {"question": "What is in the room?", "scene": s}
    cases = [
        ({"question": "What is <mask>?", "scene": s, "regions": 5}, "regions", "list of region specs"),
        ({"question": "What is <mask>?", "scene": s}, "question", "1 <mask> token"),
        ({"question": "Hi?", "scene": s, "colour": "red"}, "colour", "unknown field"),
        ({"question": "Hi?", "scene": s, "max_new_tokens": 0}, "max_new_tokens", "positive integer"),
        ({"question": "Hi?", "scene": s, "num_frames": "4"}, "num_frames", "positive integer"),
        ({"question": "Hi?", "scene": s, "image": "x.png"}, None, 'got "image" and "scene"'),
        ({"question": "Hi?"}, None, "got none"),
        ({"scene": s}, "question", "missing"),
        ({"question": "Hi?", "scene": s, "id": [1]}, "id", "text or an integer"),
        (42, None, "expected a question"),
    ]
    for bad, field, words in cases:
        with pytest.raises(SR3DInputError) as info:
            pipe.ask_many([ok, ok, bad], **GEN)
        err = info.value
        assert err.item_index == 2 and err.item_field == field, (bad, str(err))
        assert str(err).startswith("item 2" + ("" if field is None else f', "{field}"')) and words in str(err)
    with pytest.raises(SR3DInputError, match="unexpected default"):
        pipe.ask_many([ok], colour="red")
    with pytest.raises(SR3DInputError, match="batch_size"):
        pipe.ask_many([ok], batch_size=0)
    with pytest.raises(SR3DInputError, match="streams one answer"):
        pipe.ask([ok], streamer=object())
    # an input that fails while read comes after the answers of the batches before it
    results = pipe.ask_iter([ok, {"question": "Hi?", "scene": s + "-missing"}], batch_size=1, **GEN)
    assert next(results)["answer"]
    with pytest.raises(SR3DInputError) as info:
        next(results)
    assert info.value.item_index == 1 and "scene" in str(info.value) and "-missing" in str(info.value)


# ----------------------------------------------------------------------------------------------
# streaming
# ----------------------------------------------------------------------------------------------


class _Recorder:
    """A transformers streamer that records what ``generate`` hands it (the prompt first, then each new token)."""

    def __init__(self) -> None:
        self.puts: list[list[int]] = []
        self.ended = False

    def put(self, value: Any) -> None:
        self.puts.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.ended = True


def test_stream_pieces_concatenate_to_the_answer(pipes: tuple[SR3DPipeline, SR3DPipeline], scenes: list[Path]) -> None:
    from transformers.generation.streamers import BaseStreamer

    pipe, single = pipes
    q, regions = QUESTIONS[5]  # the bundled model answers it in several tokens ("Over 4 meters")
    kwargs = {"scene": scenes[1], "regions": regions, "score_answer": "Yes.", **GEN}
    ref = single.ask(q, **kwargs)
    recorder = type("Recorder", (_Recorder, BaseStreamer), {})()
    plain = pipe.ask(q, streamer=recorder, **kwargs)
    assert plain["answer"] == ref["answer"] and recorder.ended
    new = [t for put in recorder.puts[1:] for t in put]  # after the prompt: one put per generated token
    assert len(recorder.puts) - 1 == plain["generated_tokens"] + (plain["generated_tokens"] < GEN["max_new_tokens"])
    assert pipe.processor.tokenizer.decode(new, skip_special_tokens=True).strip() == ref["answer"]

    stream = pipe.ask_stream(q, timeout=60, **kwargs)
    pieces = list(stream)
    assert len(pieces) > 1 and all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces).strip() == ref["answer"]
    _same(stream.result, ref)
    assert list(stream) == []  # consumed once
    with pytest.raises(SR3DInputError, match="<mask>"):  # bad input raises at the call, not in the thread
        pipe.ask_stream("What is <mask>?", scene=scenes[1], **GEN)
    with pytest.raises(TypeError, match="colour"):
        pipe.ask_stream(q, colour="red", **kwargs)


def test_stream_hands_a_generation_error_to_the_reader(
    pipes: tuple[SR3DPipeline, SR3DPipeline], scenes: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = pipes[0]

    def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("generation failed on purpose")

    monkeypatch.setattr(pipe, "generate", broken)
    stream = pipe.ask_stream("What is in the room?", scene=scenes[0], timeout=60, **GEN)
    with pytest.raises(RuntimeError, match="on purpose"):
        list(stream)
    with pytest.raises(RuntimeError, match="on purpose"):
        _ = stream.result


# ----------------------------------------------------------------------------------------------
# sr3d ask --questions / --out / --stream
# ----------------------------------------------------------------------------------------------


def _write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    rc = main(["ask", "--model", "tiny", "--num-frames", "4", "--max-new-tokens", "10", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _cli_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    rc, out, err = _cli(capsys, *argv)
    assert rc == 2 and out == "", err
    return [line for line in err.splitlines() if line.strip()][-1]


def test_questions_file_round_trip_with_resume(
    pipes: tuple[SR3DPipeline, SR3DPipeline],
    scenes: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    single = pipes[1]
    lines: list[Any] = [
        {"id": "a", "question": QUESTIONS[0][0]},
        {"question": QUESTIONS[1][0], "regions": QUESTIONS[1][1]},  # id: its line number
        "",
        {"id": "c", "question": QUESTIONS[3][0], "regions": QUESTIONS[3][1], "scene": str(scenes[1])},
        {"id": 9, "question": QUESTIONS[4][0], "regions": QUESTIONS[4][1], "score_answer": "A bed."},
        {"id": "e", "question": QUESTIONS[5][0], "regions": QUESTIONS[5][1], "scene": str(scenes[2])},
        {"id": "f", "question": QUESTIONS[2][0], "max_new_tokens": 4},
    ]
    qfile = _write_lines(tmp_path / "questions.jsonl", lines)
    out = tmp_path / "answers.jsonl"
    flags = ["--scene", str(scenes[0]), "--questions", str(qfile), "--out", str(out), "--batch-size", "4"]
    rc, stdout, err = _cli(capsys, *flags)
    assert rc == 0 and stdout == "" and "6 answer(s) to" in err
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["id"] for a in answers] == ["a", 2, "c", 9, "e", "f"]
    assert [a["line"] for a in answers] == [1, 2, 4, 5, 6, 7]
    for a, line in zip(answers, [x for x in lines if x]):
        kwargs = {k: v for k, v in line.items() if k not in ("id", "question")}
        ref = single.ask(line["question"], **{"scene": scenes[0], **GEN, **kwargs})
        assert a["question"] == line["question"]
        _same(a, ref)

    # killed after two answers and half of the third: the rerun keeps two, cuts the torn line, asks four
    kept = out.read_text().splitlines(keepends=True)
    out.write_text("".join(kept[:2]) + kept[2][:40])
    rc, stdout, err = _cli(capsys, *flags, "--json")
    assert rc == 0 and json.loads(stdout) | {"seconds": 0} == {
        "questions": 6,
        "answered": 4,
        "resumed": 2,
        "out": str(out),
        "seconds": 0,
    }
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert again[:2] == answers[:2]  # untouched
    assert [a["id"] for a in again] == ["a", 2, "c", 9, "e", "f"]
    assert [a["answer"] for a in again] == [a["answer"] for a in answers]
    with out.open("a") as fh:  # an answer to a question the file no longer has: kept, not counted
        fh.write(json.dumps({"id": "gone", "question": "Old?", "answer": "x"}) + "\n")
    rc, stdout, _ = _cli(capsys, *flags, "--json")
    assert rc == 0 and (json.loads(stdout)["answered"], json.loads(stdout)["resumed"]) == (0, 6)
    assert len(out.read_text().splitlines()) == 7

    # an id of --out answered for another question is refused (before the model loads)
    changed = [dict(x, question="Is it dark?") if isinstance(x, dict) and x.get("id") == "c" else x for x in lines]
    message = _cli_error(
        capsys, *flags[:2], "--questions", str(_write_lines(tmp_path / "q2.jsonl", changed)), *flags[4:]
    )
    assert 'already answers id "c" for another question' in message and str(out) in message

    # without --out the answer lines go to stdout; on a terminal a progress bar runs on stderr
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    rc, stdout, err = _cli(capsys, *flags[:4])
    assert rc == 0 and [json.loads(x)["answer"] for x in stdout.splitlines()] == [a["answer"] for a in answers]
    assert "sr3d ask" in err and "6/6" in err and "6 answer(s) to stdout" in err


def test_bad_question_lines_name_the_line(scenes: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = {"question": "What is in the room?"}
    flags = ["--scene", str(scenes[0])]
    cases = [
        ([good, "", "{not json"], "line 3: not JSON"),
        ([good, ["a list"]], "line 2: expected a JSON object"),
        ([good, {"question": "Hi?", "colour": 1}], 'line 2, "colour": unknown field'),
        ([{"id": "x", **good}, {"id": "x", **good}], 'line 2: id "x" is also the id of line 1'),
        ([good, {"id": [1], **good}], 'line 2, "id": expected text or an integer'),
        ([good, {"question": "What is <mask>?", "regions": 5}], 'line 2, "regions": expected a list'),
        ([good, good, {"question": "Where?", "scene": str(scenes[0]) + "-missing"}], "line 3:"),
    ]
    for k, (lines, words) in enumerate(cases):
        qfile = _write_lines(tmp_path / f"bad{k}.jsonl", lines)
        out = tmp_path / f"out{k}.jsonl"
        message = _cli_error(capsys, *flags, "--questions", str(qfile), "--out", str(out), "--batch-size", "1")
        assert message.startswith(f"sr3d ask: error: {qfile} ") and words in message, message
        if k < 5:  # caught before the model loads: nothing written
            assert not out.exists()
    assert "2 answer(s) before it are in" in message  # the last case failed after two batches
    assert len(out.read_text().splitlines()) == 2
    empty = _write_lines(tmp_path / "empty.jsonl", [""])
    assert "holds no questions" in _cli_error(capsys, *flags, "--questions", str(empty))
    assert "--out applies to --questions" in _cli_error(capsys, *flags, "--question", "Hi?", "--out", "x.jsonl")
    assert "--stream prints one answer" in _cli_error(capsys, *flags, "--questions", str(empty), "--stream")
    assert "give the visual input" in _cli_error(capsys, "--question", "Hi?")


def test_stream_flag_prints_pieces(
    pipes: tuple[SR3DPipeline, SR3DPipeline], scenes: list[Path], capsys: pytest.CaptureFixture
) -> None:
    q, regions = QUESTIONS[5]  # several tokens
    ref = pipes[1].ask(q, scene=scenes[0], regions=regions, **GEN)
    argv = ["--scene", str(scenes[0]), "--question", q, "--region", regions[0], "--region", regions[1]]
    rc, stdout, err = _cli(capsys, *argv, "--stream")
    assert rc == 0 and stdout == ref["answer"] + "\n" and "prompt tokens" in err
    rc, stdout, _ = _cli(capsys, *argv, "--stream", "--json")
    events = [json.loads(line) for line in stdout.splitlines()]
    texts = [e["text"] for e in events[:-1]]
    assert rc == 0 and len(texts) > 1 and all(e["event"] == "text" for e in events[:-1])
    assert "".join(texts).strip() == ref["answer"]
    assert events[-1]["event"] == "result"
    _same({k: v for k, v in events[-1].items() if k != "event"}, ref)
