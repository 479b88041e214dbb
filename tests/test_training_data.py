"""Training data: records, augmentation (deterministic), supervised spans, collation, DataLoader workers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _training_helpers import toy_jsonl

from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.modeling.inputs import Region
from sr3d_plugin.records import load_records, record_messages, validate_record
from sr3d_plugin.testing import build_tiny_model
from sr3d_plugin.training.augment import frames_to_keep, mask_to_box, relabel_regions, sample_rng
from sr3d_plugin.training.data import EpochSampler, SR3DCollator, SR3DTrainDataset, load_training_source
from sr3d_plugin.training.recipe import load_recipe


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return toy_jsonl(tmp_path_factory)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model(seed=0)


def _dataset(toy: Path, tiny, **aug: float) -> SR3DTrainDataset:
    model, proc = tiny
    overrides = ["data.generator=null", f"data.train_file={toy}", "data.pointmap_cache=null", "data.num_frames=4"]
    overrides += [f"data.augment.{k}={v}" for k, v in aug.items()]
    recipe, _ = load_recipe("tiny-cpu", overrides)
    return SR3DTrainDataset(load_training_source(recipe.data), proc, model.config, recipe.data, seed=7)


def test_toy_data_uses_every_record_kind(toy: Path) -> None:
    records = load_records(toy)
    kinds = {next(k for k in ("image", "frames", "scene", "video") if k in r) for r in records}
    assert kinds == {"image", "frames", "scene"}
    region_kinds = {k for r in records for reg in r["regions"] for k in reg if k not in ("frame", "label")}
    assert region_kinds == {"box", "rle", "mask", "polygon", "box3d"}
    assert any(
        isinstance(reg.get("frame"), str) and reg["frame"].startswith("@") for r in records for reg in r["regions"]
    )


@pytest.mark.parametrize(
    ("record", "needle"),
    [
        ({"image": "a.png", "scene": "s", "conversations": [{"from": "gpt", "value": "x"}]}, "exactly one of"),
        ({"image": "a.png", "colour": 1, "conversations": [{"from": "gpt", "value": "x"}]}, "unknown keys ['colour']"),
        ({"image": "a.png", "conversations": [{"from": "human", "value": "x"}]}, "no gpt turn"),
        ({"image": "a.png", "conversations": [{"from": "bot", "value": "x"}]}, "from 'bot'"),
        ({"conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}]}, "no image"),
        ({"image": "a.png", "num_frames": 0, "conversations": [{"from": "gpt", "value": "x"}]}, "num_frames"),
    ],
)
def test_record_validation(record: dict, needle: str) -> None:
    with pytest.raises(SR3DInputError) as err:
        validate_record(record)
    assert needle in str(err.value)


def test_image_markers_are_inserted_once_per_frame() -> None:
    conv = [{"from": "human", "value": "<video>\nWhat is <mask>?"}, {"from": "gpt", "value": "A chair."}]
    msgs = record_messages({"conversations": conv}, 3, "sys")
    assert msgs[0] == {"role": "system", "content": "sys"}
    assert msgs[1]["content"] == "<image><image><image>What is <mask>?"
    plain = record_messages({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}, 2)
    assert plain[0]["content"] == "<image><image>Hi"
    per_frame = record_messages(
        {"conversations": [{"from": "human", "value": "<image>\n<image>\nHi"}, {"from": "gpt", "value": "Yo"}]}, 2
    )
    assert per_frame[0]["content"] == "<image><image>Hi"


def test_labels_cover_only_the_assistant_turns(toy: Path, tiny) -> None:
    ds = _dataset(toy, tiny)
    tok = ds.processor.tokenizer
    records = ds.source.records
    for i in range(6):
        s = ds[(0, i)]
        supervised = tok.decode(s["labels"][s["labels"] != -100])
        answer = next(t["value"] for t in records[i]["conversations"] if t["from"] == "gpt")
        assert supervised == answer + "<|im_end|>"
        assert s["pixel_values"].shape[0] == s["num_tiles"] == s["tile_xyz"].shape[0]


def test_augmentation_is_deterministic_per_seed_epoch_and_index(toy: Path, tiny) -> None:
    aug = {"mask_to_box_prob": 0.5, "frame_drop_prob": 0.5, "region_shuffle_prob": 0.5}
    a, b = _dataset(toy, tiny, **aug), _dataset(toy, tiny, **aug)
    differs = False
    for i in range(len(a)):
        x, y = a[(1, i)], b[(1, i)]
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k], (i, k)
        z = a[(2, i)]
        differs |= z["input_ids"].shape != x["input_ids"].shape or not torch.equal(z["input_ids"], x["input_ids"])
        differs |= "region_weights" in z and not torch.equal(z["region_weights"], x["region_weights"])
    assert differs, "another epoch should draw other augmentations"


def test_frame_dropping_keeps_region_frames(toy: Path, tiny) -> None:
    ds = _dataset(toy, tiny, frame_drop_prob=1.0, frame_drop_max_fraction=1.0)
    idx = next(i for i, r in enumerate(ds.source.records) if "scene" in r and "box3d" not in r["regions"][0])
    tiles = {ds[(e, idx)]["num_tiles"] for e in range(8)}
    assert max(tiles) < 4 and min(tiles) >= 1
    for e in range(8):
        s = ds[(e, idx)]
        # every region still has weight on some kept frame
        assert torch.all(s["region_weights"].sum(dim=(1, 2)) > 0.99)
    for seed in range(50):
        keep = frames_to_keep(6, {1, 4}, np.random.default_rng(seed), 1.0)
        assert keep is None or ({1, 4} <= set(keep) and len(keep) < 6)
        keep = frames_to_keep(5, set(), np.random.default_rng(seed), 1.0)
        assert keep is None or 1 <= len(keep) < 5


def test_region_shuffle_rewrites_every_reference_consistently() -> None:
    r0 = Region.from_box(0, (0, 0, 4, 4), (16, 16))
    r1 = Region.from_box(0, (8, 8, 12, 12), (16, 16))
    msgs = [
        {"role": "user", "content": "Which is closer, Region [0] <mask> or Region [1] <mask>?"},
        {"role": "assistant", "content": "Region [1]."},
    ]
    new_msgs, regions = relabel_regions(msgs, [r0, r1], [1, 0])
    assert new_msgs[0]["content"] == "Which is closer, Region [1] <region1> or Region [0] <region0>?"
    assert new_msgs[1]["content"] == "Region [0]."
    # the answer still names the physical region it named before (old region 1)
    assert regions[0] is r1 and regions[1] is r0
    aliased = [{"role": "user", "content": "Is <region1> left of <region0>? Region [2] stays."}]
    out, _ = relabel_regions(aliased, [r0, r1], [1, 0])
    assert out[0]["content"] == "Is <region0> left of <region1>? Region [2] stays."


def test_region_shuffle_leaves_answers_alone_that_name_regions_the_prompt_does_not() -> None:
    """The LLM sees ``<mask>`` embeddings, never indices: with no "Region [K]" in the prompt, the answer's
    index can only mean "the K-th mask of the question", so a relabelled answer would be label noise."""
    r0 = Region.from_box(0, (0, 0, 4, 4), (16, 16))
    r1 = Region.from_box(0, (8, 8, 12, 12), (16, 16))
    r2 = Region.from_box(0, (4, 4, 8, 8), (16, 16))
    msgs = [
        {"role": "user", "content": "Which is closer to <region2>, <region0> or <region1>?"},
        {"role": "assistant", "content": "Region [0]"},
    ]
    out, regions = relabel_regions(msgs, [r0, r1, r2], [2, 0, 1])
    assert out == msgs and regions == [r0, r1, r2]
    # answers that name no region are still shuffled (only the order of the masks changes)
    dist = [
        {"role": "user", "content": "How far apart are <region0> and <region1>?"},
        {"role": "assistant", "content": "Far"},
    ]
    out, regions = relabel_regions(dist, [r0, r1], [1, 0])
    assert out[0]["content"] == "How far apart are <region1> and <region0>?" and regions == [r1, r0]


def test_mask_to_box_and_sample_rng() -> None:
    m = np.zeros((10, 10), dtype=bool)
    m[2, 3] = m[6, 7] = True
    box = mask_to_box(Region({0: m}, label="x"))
    assert box.masks[0].sum() == 5 * 5 and box.masks[0][2:7, 3:8].all() and box.label == "x"
    assert sample_rng(1, 2, 3).random() == sample_rng(1, 2, 3).random() != sample_rng(1, 3, 3).random()


def test_collated_batch_equals_processor_batch(toy: Path, tiny) -> None:
    model, proc = tiny
    ds = _dataset(toy, tiny)
    samples = [ds[(0, i)] for i in range(3)]
    batch = SR3DCollator(proc.tokenizer.pad_token_id)(samples)
    total_tiles = sum(s["num_tiles"] for s in samples)
    assert batch["pixel_values"].shape[0] == total_tiles
    rw = batch["region_weights"]
    offset, r = 0, 0
    for s in samples:  # block diagonal: each region pools only its own sample's tiles
        n_r, t = s["region_weights"].shape[0], s["num_tiles"]
        assert torch.equal(rw[r : r + n_r, offset : offset + t], s["region_weights"])
        assert rw[r : r + n_r].sum() == pytest.approx(rw[r : r + n_r, offset : offset + t].sum())
        offset, r = offset + t, r + n_r
    model.train()
    torch.manual_seed(0)
    joint = model(**batch).loss
    one_by_one = []
    for s in samples:
        b1 = SR3DCollator(proc.tokenizer.pad_token_id)([s])
        n = int((b1["labels"][:, 1:] != -100).sum())
        one_by_one.append((model(**b1).loss * n, n))
    assert joint.item() == pytest.approx(sum(l for l, _ in one_by_one).item() / sum(n for _, n in one_by_one), rel=1e-4)


def test_dataloader_with_two_workers_matches_in_process(toy: Path, tiny) -> None:
    ds = _dataset(toy, tiny, mask_to_box_prob=0.5, region_shuffle_prob=0.5)
    col = SR3DCollator(ds.processor.tokenizer.pad_token_id)

    def batches(workers: int) -> list[dict]:
        sampler = EpochSampler(len(ds), seed=3)
        sampler.set_epoch(1)
        dl = torch.utils.data.DataLoader(ds, batch_size=3, sampler=sampler, collate_fn=col, num_workers=workers)
        return list(dl)

    a, b = batches(0), batches(2)
    assert len(a) == len(b) == -(-len(ds) // 3)
    for x, y in zip(a, b):
        for k in x:
            assert torch.equal(x[k], y[k]), k
    s = EpochSampler(10, seed=3)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    assert sorted(e0) == [(0, i) for i in range(10)] and [i for _, i in e0] != [i for _, i in s]


def test_generator_entry_points(tmp_path: Path) -> None:
    from sr3d_plugin.training.recipe import DataSection

    d = DataSection(generator="sr3d_plugin.synthetic.qa:SpatialQADataset", generator_args={"size": 4})
    src = load_training_source(d)
    assert src.samples is not None and len(src) == 4
    model, proc = build_tiny_model(seed=0)
    ds = SR3DTrainDataset(src, proc, model.config, d, seed=0)
    s = ds[(0, 0)]
    assert (s["labels"] != -100).any() and s["num_tiles"] >= 1
    d2 = DataSection(
        generator="sr3d_plugin.training.toy_data:region_qa", generator_args={"num_scenes": 1, "num_frames": 4}
    )
    src2 = load_training_source(d2, out_dir=tmp_path / "gen")
    assert src2.records and (tmp_path / "gen" / "train.jsonl").is_file()
    bad = DataSection(generator="sr3d_plugin.training.toy_data:nothing_here")
    from sr3d_plugin.errors import SR3DConfigError

    with pytest.raises(SR3DConfigError, match="cannot be imported"):
        load_training_source(bad)


def test_multi_frame_regions_skip_unsampled_frames(toy: Path, tiny) -> None:
    from sr3d_plugin.records import RecordReader, region_from_record

    model, _ = tiny
    rec = next(r for r in load_records(toy) if "scene" in r)
    reader = RecordReader(model.config, num_frames=4)
    frames = reader.frames(rec, toy.parent)
    ids = list(frames.frame_ids)
    missing = next(str(i) for i in range(10) if str(i) not in ids)
    item = {
        "masks": [{"frame": f"@{ids[0]}", "box": [1, 1, 20, 20]}, {"frame": f"@{missing}", "box": [1, 1, 9, 9]}],
        "label": "chair",
    }
    region = region_from_record(item, frames, toy.parent)
    assert region.frames == [0] and region.label == "chair"
    with pytest.raises(SR3DInputError, match="no box3d"):
        region_from_record({"masks": [{"frame": f"@{missing}", "box": [1, 1, 9, 9]}]}, frames, toy.parent)
    # an index past the sampled frames is skipped like an id that was not sampled
    past = {"masks": [{"frame": 0, "box": [1, 1, 20, 20]}, {"frame": len(ids), "box": [1, 1, 9, 9]}]}
    assert region_from_record(past, frames, toy.parent).frames == [0]
    # a mask that does not say its frame is an error, not a silently dropped mask
    with pytest.raises(SR3DInputError, match="does not say which frame"):
        region_from_record({"masks": [{"box": [1, 1, 9, 9]}], "box3d": [0, 0, 0, 1, 1, 1]}, frames, toy.parent)
