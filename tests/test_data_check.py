"""The data check before work starts: `sr3d validate-data`, `check_records`, record-size limits, skip_invalid,
and training refusing bad records before the model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from sr3d_plugin.cli import main
from sr3d_plugin.data_check import check_records
from sr3d_plugin.errors import SR3DDataError, SR3DInputError
from sr3d_plugin.limits import iter_json_records
from sr3d_plugin.records import load_records, record_messages

TOY_ARGS = {"num_scenes": 1, "num_frames": 6, "sampled_frames": 4, "questions_per_scene": 8, "seed": 0}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """One rendered room (ScanNet layout) with region questions, plus an image folder for frame lists."""
    from sr3d_plugin.training.toy_data import region_qa

    root = tmp_path_factory.mktemp("datacheck")
    path = region_qa(root, **TOY_ARGS)
    img = root / "images"
    img.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 60, 3), 40 * i, np.uint8)).save(img / f"{i:06d}.png")
        np.save(img / f"{i:06d}_depth.npy", np.ones((40, 60), np.float32))
    (img / "broken.png").write_bytes(b"not a png at all")
    Image.fromarray(np.pad(np.ones((10, 10), np.uint8) * 255, ((5, 25), (5, 45)))).save(img / "mask.png")
    return path


def _conv(question: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": "yes"}]


def _good(toy: Path) -> list[dict]:
    return [json.loads(line) for line in toy.read_text().splitlines() if line.strip()]


def _bad_records(toy: Path) -> list[tuple[dict | str, str]]:
    """(record or raw line, a phrase its problem must contain)."""
    scene = _good(toy)[0]
    frames = ["images/000000.png", "images/000001.png", "images/000002.png"]
    return [
        ({**scene, "id": "box-out", "regions": [{"frame": 0, "box": [500, 500, 600, 600]}]}, "lies outside"),
        ({"id": "no-image", "image": "images/nope.png", "conversations": _conv("What?")}, "does not exist"),
        ({"id": "undecodable", "image": "images/broken.png", "conversations": _conv("What?")}, "cannot be decoded"),
        ({**scene, "id": "mask-count", "conversations": _conv("Is <mask> near <mask>?")}, "2 <mask> token(s)"),
        ({**scene, "id": "alias", "conversations": _conv("Is <region3> big?")}, "<region3>"),
        ({**scene, "id": "unsampled-id", "regions": [{"frame": "@99", "box": [2, 2, 20, 20]}]}, "'99'"),
        ({**scene, "id": "frame-index", "regions": [{"frame": 7, "box": [2, 2, 20, 20]}]}, "frame 7"),
        ({**scene, "id": "no-scene", "scene": "scenes/missing"}, "does not exist"),
        (
            {"id": "depth-count", "frames": frames, "depth": ["images/000000_depth.npy"], "conversations": _conv("Q")},
            "1 depth entr(ies) for 3 frame(s)",
        ),
        (
            {"id": "depth-missing", "frames": frames, "depth": ["images/x.npy"] * 3, "conversations": _conv("Q")},
            "does not exist",
        ),
        ({"id": "typo", "imagee": "images/000000.png", "conversations": _conv("Q")}, "unknown keys ['imagee']"),
        ({**scene, "id": "box3d", "regions": [{"box3d": [0, 0, 0, -1, 1, 1]}]}, "positive sizes"),
        (
            {"id": "mask-file", "image": "images/000000.png", "regions": [{"mask": "images/none.png"}],
             "conversations": _conv("What is <mask>?")},
            "none.png",
        ),
        ({**scene, "id": "many-frames", "num_frames": 10**9}, "at most 1024"),
        ({"id": "no-answer", "image": frames[0], "conversations": [{"from": "human", "value": "Q"}]}, "no gpt turn"),
        ({"id": "depth-scale", "image": frames[0], "depth_scale": None, "conversations": _conv("Q")}, "depth_scale=None"),
        ({"id": "image-list", "image": frames[:1], "conversations": _conv("Q")}, "expected a file path"),
        ("{not json", "not valid JSON"),
        ({"id": "huge", "image": frames[0], "conversations": _conv("Q" * 5000)}, "max_record_bytes=4096"),
    ]  # fmt: skip


def _write_mixed(toy: Path, name: str = "mixed.jsonl") -> tuple[Path, dict[int, str], int]:
    """Good and bad records interleaved; returns (file, {line: phrase} of the bad ones, good count)."""
    good = _good(toy)
    lines, bad_lines = [], {}
    for i, (rec, phrase) in enumerate(_bad_records(toy)):
        lines.append(json.dumps(good[i % len(good)]))
        lines.append(rec if isinstance(rec, str) else json.dumps(rec))
        bad_lines[len(lines)] = phrase
    path = toy.parent / name
    path.write_text("\n".join(lines) + "\n")
    return path, bad_lines, len(lines) - len(bad_lines)


def test_good_records_pass(toy: Path) -> None:
    report = check_records(toy, num_frames=4)
    assert report.ok and report.num_valid == report.total == len(_good(toy))


def test_every_bad_record_is_reported_with_file_line_and_id_in_one_message(toy: Path) -> None:
    path, bad, n_good = _write_mixed(toy)
    report = check_records(path, num_frames=4, max_record_bytes=4096)
    by_line = {p.line: p for p in report.problems}
    assert sorted(by_line) == sorted(bad), [str(p) for p in report.problems]
    for line, phrase in bad.items():
        assert phrase in by_line[line].message, str(by_line[line])
    assert report.num_valid == n_good and report.num_invalid == len(bad)
    with pytest.raises(SR3DDataError) as err:
        report.raise_if_invalid()
    message = str(err.value)
    for line in bad:
        assert f"{path}:{line}" in message
    assert f"{path}:1 " not in message  # a good record is not listed
    assert "(id 'box-out')" in message and "(id 'mask-count')" in message
    assert err.value.report is report


def test_check_agrees_with_the_training_reader(toy: Path) -> None:
    """A record passes the check exactly when the training reader (frames, regions, processor's <mask>
    rule) reads it: the check is the reader's own rules at header level, not a second opinion (one
    deliberate extra: a record's num_frames above MAX_NUM_FRAMES)."""
    from sr3d_plugin.records import RecordReader
    from sr3d_plugin.regions import check_question

    path, bad, _ = _write_mixed(toy, "agree.jsonl")
    report = check_records(path, num_frames=4, max_record_bytes=4096)
    flagged = {p.line for p in report.problems}
    assert flagged == set(bad)
    reader = RecordReader(SimpleNamespace(use_position_encoding=False, num_video_frames=4), num_frames=4)
    base = path.parent
    for line, rec, problem in iter_json_records(path, 4096):
        if problem is not None:
            assert line in flagged
            continue
        try:
            from sr3d_plugin.records import validate_record

            validate_record(rec)
            frames = reader.frames(rec, base)
            regions = reader.regions(rec, frames, base)
            text = "".join(m["content"] for m in record_messages(rec, 0))
            check_question(text, len(regions))
            readable = True
        except Exception:  # SR3DInputError, or the raw TypeError of depth_scale=None the check prevents
            readable = False
        if rec.get("id") == "many-frames":  # the one deliberate extra: num_frames above MAX_NUM_FRAMES
            assert readable and line in flagged
            continue
        assert readable == (line not in flagged), (line, rec.get("id"))


def test_json_list_files_report_the_line_of_each_element(toy: Path) -> None:
    good = _good(toy)[:2]
    bad = {**good[0], "id": "bad", "regions": [{"frame": 0, "box": [900, 900, 950, 950]}]}
    path = toy.parent / "list.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r, indent=1) for r in (good[0], bad, good[1])) + "\n]\n")
    report = check_records(path, num_frames=4)
    (problem,) = report.problems
    assert problem.id == "bad" and path.read_text().splitlines()[problem.line - 1].strip() == "{"
    assert problem.line > 3 and report.num_valid == 2


def test_record_size_limit_is_clear_and_never_reads_past_it(toy: Path, tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    good = json.dumps(_good(toy)[0])
    path.write_text(good + "\n" + '{"id": "x", "meta": "' + "a" * 200_000 + '"}\n' + good + "\n")
    with pytest.raises(
        SR3DInputError, match=r"big.jsonl:2: record of 200\d+ bytes; expected at most max_record_bytes=1000"
    ):
        load_records(path, max_record_bytes=1000)
    lines = [(n, p) for n, _, p in iter_json_records(path, 1000)]
    assert [n for n, _ in lines] == [1, 2, 3] and lines[0][1] is None and lines[2][1] is None
    with pytest.raises(SR3DInputError, match="max_record_bytes=0"):
        list(iter_json_records(path, 0))


def test_validate_data_cli(toy: Path, capsys) -> None:
    assert main(["validate-data", str(toy), "--num-frames", "4"]) == 0
    assert "0 invalid" in capsys.readouterr().out
    path, bad, _ = _write_mixed(toy, "cli.jsonl")
    assert main(["validate-data", str(path), "--num-frames", "4", "--max-record-bytes", "4096"]) == 1
    out = capsys.readouterr().out
    assert f"{len(bad)} invalid" in out and all(f"{path}:{line}" in out for line in bad)
    assert "raise it with --max-record-bytes" in out
    assert "num_frames=1000000000" in out  # a record's field keeps its name (not the --num-frames flag)
    assert main(["validate-data", str(path), "--json", "--num-frames", "4", "--max-record-bytes", "4096"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["invalid"] == len(bad) and {p["line"] for p in data["problems"]} == set(bad)
    assert main(["validate-data", str(toy.parent / "absent.jsonl")]) == 1
    assert "does not exist" in capsys.readouterr().out
    assert main(["validate-data", str(toy), "--num-frames", "0"]) == 2


def _data_section(path: Path, skip: bool) -> SimpleNamespace:
    return SimpleNamespace(train_file=str(path), generator=None, num_frames=4, max_record_bytes=4096, skip_invalid=skip)


def test_training_source_refuses_or_skips_bad_records(toy: Path) -> None:
    from sr3d_plugin.training.data import load_training_source

    path, bad, n_good = _write_mixed(toy, "train-mixed.jsonl")
    with pytest.raises(SR3DDataError, match="data.skip_invalid=true") as err:
        load_training_source(_data_section(path, skip=False))
    assert all(f"{path}:{line}" in str(err.value) for line in bad)
    source = load_training_source(_data_section(path, skip=True))
    assert len(source) == n_good and source.skipped == len(bad)
    assert all(r.get("id") not in {"box-out", "mask-count"} for r in source.records)
    only_bad = toy.parent / "only-bad.jsonl"
    only_bad.write_text(json.dumps(_bad_records(toy)[0][0]) + "\n")
    with pytest.raises(Exception, match="no valid record left"):
        load_training_source(_data_section(only_bad, skip=True))


def test_sr3d_train_stops_before_the_model_loads(toy: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import sr3d_plugin.training.model_setup as model_setup

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the data check")

    monkeypatch.setattr(model_setup, "build_model", no_model)
    path, bad, _ = _write_mixed(toy, "train-cli.jsonl")
    out = tmp_path / "run"
    code = main(
        ["train", "tiny-cpu", "data.generator=null", f"data.train_file={path}", "data.num_frames=4",
         "data.max_record_bytes=4096", f"training.output_dir={out}", "logging.report_to=[]"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("sr3d train: error: ")
    assert all(f"{path}:{line}" in err for line in bad) and "data.skip_invalid=true" in err
    assert not out.exists()


def test_mask_count_error_inside_the_dataset_names_the_record(toy: Path) -> None:
    from sr3d_plugin.training.data import SR3DTrainDataset, TrainingSource

    rec = {**_good(toy)[0], "id": "wrong-count", "conversations": _conv("Is <mask> near <mask>?")}

    class Processor:
        def assistant_spans(self, messages):
            return "text", []

        def __call__(self, *args, **kwargs):
            raise SR3DInputError("prompt 0 has 2 <mask> token(s) but 1 region(s) were given")

    data = SimpleNamespace(num_frames=4, depth_source="auto", pointmap_cache=None, system_prompt=None,
                           augment=SimpleNamespace(mask_to_box_prob=0, frame_drop_prob=0, region_shuffle_prob=0,
                                                   frame_drop_max_fraction=0.5))  # fmt: skip
    config = SimpleNamespace(use_position_encoding=False, num_video_frames=4)
    ds = SR3DTrainDataset(TrainingSource(records=[rec], base=toy.parent), Processor(), config, data)
    with pytest.raises(SR3DInputError, match=r"training record 0 \(id 'wrong-count'\): prompt 0 has 2 <mask>"):
        ds[0]


def test_scene_problems_are_found_once_per_scene(toy: Path, tmp_path: Path) -> None:
    scene = tmp_path / "scenes" / "s"
    shutil.copytree(toy.parent / "scenes" / _good(toy)[0]["scene"].split("/")[-1], scene)
    (scene / "pose" / "0.txt").unlink()
    recs = [{**r, "scene": str(scene)} for r in _good(toy) if r.get("scene")]
    assert len(recs) >= 2
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    report = check_records(path, num_frames=4)
    assert report.num_invalid == len(recs) and all(
        "no pose file for colour frame(s) [0]" in p.message for p in report.problems
    )


def test_skip_invalid_reports_the_count_in_the_run_log(toy: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """`data.skip_invalid: true` in a real `sr3d train`: the count and the records are reported (stdout and
    log.jsonl) before the model is built (stopped there to keep the test short; the records that are
    left are checked in test_training_source_refuses_or_skips_bad_records)."""
    import sr3d_plugin.training.model_setup as model_setup
    from sr3d_plugin.errors import SR3DConfigError

    def stop(*args, **kwargs):
        raise SR3DConfigError("stopped before the model (test)")

    monkeypatch.setattr(model_setup, "build_model", stop)
    path, bad, _ = _write_mixed(toy, "train-skip.jsonl")
    out = tmp_path / "run"
    code = main(
        ["train", "tiny-cpu", "data.generator=null", f"data.train_file={path}", "data.num_frames=4",
         "data.max_record_bytes=4096", "data.skip_invalid=true", f"training.output_dir={out}",
         "logging.report_to=[]", "--json"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2 and "stopped before the model (test)" in captured.err
    events = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    (warning,) = [e for e in events if e["event"] == "warning" and "skip_invalid" in e["message"]]
    assert warning["skipped_records"] == len(bad) and f"{path}:{min(bad)}" in warning["message"]
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(e.get("skipped_records") == len(bad) for e in logged)


def test_prepared_evaluation_records_have_the_same_size_limit(tmp_path: Path, monkeypatch) -> None:
    import sr3d_plugin.limits as limits
    from sr3d_plugin.evaluation.schema import load_records as load_eval_records

    monkeypatch.setattr(limits, "MAX_RECORD_BYTES", 1000)
    path = tmp_path / "scanqa" / "val.jsonl"
    path.parent.mkdir()
    small = {"question_id": "q0", "scene_id": "scene0000_00", "question": "What?", "answers": ["a"], "scene": "s"}
    path.write_text(json.dumps(small) + "\n" + json.dumps({**small, "question_id": "q1", "meta": "x" * 5000}) + "\n")
    with pytest.raises(
        SR3DInputError, match=r"val.jsonl:2: record of 5\d+ bytes; expected at most max_record_bytes=1000"
    ):
        load_eval_records(path, "scanqa")


def test_long_reports_are_shortened_in_messages_but_kept_whole() -> None:
    from sr3d_plugin.data_check import SHOWN_PROBLEMS, DataReport, RecordProblem

    problems = [RecordProblem("a.jsonl", i, f"r{i}", "bad") for i in range(1, SHOWN_PROBLEMS + 11)]
    report = DataReport(files=["a.jsonl"], total=len(problems), problems=problems)
    lines = report.message().splitlines()
    assert len(lines) == SHOWN_PROBLEMS + 2 and "… and 10 more problem(s)" in lines[-1]
    assert "`sr3d validate-data a.jsonl`" in lines[-1] and report.num_invalid == len(problems)
    assert len(report.message(shown=len(problems)).splitlines()) == len(problems) + 1
