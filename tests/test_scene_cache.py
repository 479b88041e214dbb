"""Scene-level reuse (sr3d_plugin.scene_cache): visual features and prompt-prefix KV computed once per scene,
answers identical to the uncached path (model, pipeline, lmms-eval model and lmms-eval's evaluator)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from sr3d_plugin.errors import SR3DConfigError, SR3DInputError
from sr3d_plugin.inference import SR3DPipeline
from sr3d_plugin.scene_cache import SceneCache, prefix_length, visual_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = [
    ("What is on the table?", []),
    ("Is <mask> left of <mask>?", ["frame=1 box=10,20,80,90", "frame=3 box=30,30,100,110"]),
    ("Describe <region0> in a few words.", ["frame=0 box=0,0,60,60"]),
    ("How many chairs are there in the room?", []),
    ("What colour is <mask>?", ["frame=2 box=50,10,150,100"]),
]


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    from sr3d_plugin.testing import build_tiny_model

    return build_tiny_model(seed=0)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from sr3d_plugin.synthetic import generate_scene, write_scannet_layout

    root = tmp_path_factory.mktemp("reuse")
    return [
        write_scannet_layout(
            generate_scene(seed, num_frames=6, width=160, height=120, num_objects=3), root / f"s{seed}"
        )
        for seed in (3, 4)
    ]


class _Counter:
    """Counts vision-tower calls and records the sequence length of every forward of the LLM's decoder."""

    def __init__(self, model: Any) -> None:
        self.vision = 0
        self.llm_lengths: list[int] = []
        self._handles = [
            model.vision_tower.register_forward_hook(self._on_vision),
            model.llm.get_decoder().register_forward_pre_hook(self._on_llm, with_kwargs=True),
        ]

    def _on_vision(self, *_: Any) -> None:
        self.vision += 1

    def _on_llm(self, _module: Any, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids", args[0] if args else None)
        self.llm_lengths.append(int(x.shape[1]))

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _visuals(processor: Any, scene: Path, questions: list[tuple[str, list[str]]]) -> tuple[list[str], list[Any]]:
    from sr3d_plugin.visual_inputs import visual_input

    prompts, visuals = [], []
    for q, regions in questions:
        v = visual_input(scene=scene, regions=regions, num_frames=4).visual
        prompts.append(processor.build_prompt(q, v))
        visuals.append(v)
    return prompts, visuals


# ----------------------------------------------------------------------------------------------
# model and processor API
# ----------------------------------------------------------------------------------------------


def test_encode_visual_features_replace_pixel_values(tiny: tuple[Any, Any], scenes: list[Path]) -> None:
    model, processor = tiny
    prompts, visuals = _visuals(processor, scenes[0], QUESTIONS[1:3])
    full = processor(prompts, visuals, padding_side="left")
    bare = processor(prompts, visuals, padding_side="left", return_visual_tensors=False)
    assert "pixel_values" in full and "tile_xyz" in full
    assert "pixel_values" not in bare and "tile_xyz" not in bare
    for key in ("input_ids", "attention_mask", "num_tiles", "region_weights"):
        assert torch.equal(full[key], bare[key]), key
    with torch.inference_mode():
        feats = model.encode_visual(full["pixel_values"], full["tile_xyz"])
        assert feats.features.shape == (8, model.config.grid_size**2, model.config.vision_hidden_size)
        assert feats.embeddings.shape[0] == int((full["input_ids"] == model.config.image_token_id).sum())
        ref, ref_feats, ref_regions = model.build_inputs_embeds(
            full["input_ids"], full["pixel_values"], full["tile_xyz"], full["region_weights"]
        )
        got, got_feats, got_regions = model.build_inputs_embeds(
            bare["input_ids"], region_weights=bare["region_weights"], visual_features=feats
        )
        assert torch.equal(ref, got) and torch.equal(ref_feats, got_feats) and torch.equal(ref_regions, got_regions)
        a = model(**full).logits
        b = model(
            input_ids=bare["input_ids"],
            attention_mask=bare["attention_mask"],
            region_weights=bare["region_weights"],
            visual_features=feats,
        ).logits
        assert torch.equal(a, b)
        gen = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": processor.tokenizer.pad_token_id}
        plain = model.generate(**full, **gen)
        given = model.generate(
            input_ids=bare["input_ids"], attention_mask=bare["attention_mask"], inputs_embeds=got, **gen
        )
        assert torch.equal(plain, given) and plain.shape[1] == full["input_ids"].shape[1] + 4
        with pytest.raises(SR3DInputError, match="inputs_embeds are used as given"):
            model.generate(input_ids=full["input_ids"], inputs_embeds=got, pixel_values=full["pixel_values"])
        with pytest.raises(SR3DInputError, match=r"inputs_embeds cover \(2, 5\) positions"):
            model.generate(input_ids=full["input_ids"], inputs_embeds=got[:, :5])
    with pytest.raises(SR3DInputError, match="either pixel_values or visual_features"):
        model.build_inputs_embeds(full["input_ids"], full["pixel_values"], full["tile_xyz"], visual_features=feats)
    with pytest.raises(SR3DInputError, match="image placeholder tokens but 4 tile"):
        half = type(feats)(feats.features[:4], feats.embeddings[: feats.embeddings.shape[0] // 2])
        model.build_inputs_embeds(full["input_ids"], visual_features=half)


def test_prefix_ends_after_the_last_frame_and_before_the_question(tiny: tuple[Any, Any], scenes: list[Path]) -> None:
    model, processor = tiny
    prompts, visuals = _visuals(processor, scenes[0], QUESTIONS[:2])
    image_id, mask_id = model.config.image_token_id, model.config.mask_token_id
    end = processor._end_ids()
    lengths = []
    for p, v in zip(prompts, visuals):
        ids = processor(p, v)["input_ids"][0].tolist()
        n = prefix_length(ids, image_id, end, mask_id)
        lengths.append(n)
        last = max(i for i, t in enumerate(ids) if t == image_id)
        assert n == last + 1 + len(end) and ids[last + 1 : n] == end
        assert mask_id not in ids[:n] and image_id not in ids[n:]
        text = processor.tokenizer.decode([t for t in ids[:n] if t != image_id])
        assert text.startswith("<|im_start|>system") and text.rstrip().endswith("user")
        assert processor.tokenizer.decode(ids[n:]).startswith(QUESTIONS[len(lengths) - 1][0][:6])
    assert lengths[0] == lengths[1]  # the same prefix for both questions
    a, b = 101, 102
    assert a not in (image_id, mask_id) and b not in (image_id, mask_id)
    assert prefix_length([a, b, a], image_id, end, mask_id) == 0  # text only
    assert prefix_length([a, image_id, b], image_id, [], mask_id) == 2
    assert prefix_length([a, image_id], image_id, [], mask_id) == 0  # nothing left to prefill
    assert prefix_length([mask_id, image_id, b], image_id, [], mask_id) == 0  # a <mask> before the frames


def test_lru_byte_budget_and_settings() -> None:
    cache = SceneCache(max_bytes=1000)
    cache.put(("visual", 1), torch.zeros(100, dtype=torch.float32))  # 400 bytes
    cache.put(("visual", 2), torch.zeros(100, dtype=torch.float32))
    assert cache.nbytes == 800 and len(cache) == 2
    assert cache.get(("visual", 1)) is not None  # 1 is now the most recent
    cache.put(("prefix", 3), torch.zeros(100, dtype=torch.float32))  # over budget: 2 goes
    assert ("visual", 2) not in cache and ("visual", 1) in cache and cache.stats.evictions == 1
    assert cache.kinds() == {"visual": 1, "prefix": 1}
    cache.put(("visual", 4), torch.zeros(1000, dtype=torch.float32))  # larger than the whole budget
    assert ("visual", 4) not in cache and cache.stats.skipped == 1 and cache.nbytes == 800
    capped = SceneCache(max_bytes=10**6, max_entries=1)
    capped.put("a", torch.zeros(1))
    capped.put("b", torch.zeros(1))
    assert "a" not in capped and "b" in capped
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0
    assert SceneCache.from_mib(0) is None and SceneCache.from_mib(1.5).max_bytes == int(1.5 * 2**20)
    for bad in (-1, "lots", float("nan")):
        with pytest.raises(SR3DConfigError, match="scene_cache="):
            SceneCache.from_mib(bad)
    with pytest.raises(SR3DConfigError, match="max_bytes=0"):
        SceneCache(0)
    # input keys: paths and plain values only
    assert SceneCache.input_key(scene="a/b", num_frames=4) == SceneCache.input_key(num_frames=4, scene="a/../a/b")
    assert SceneCache.input_key(scene="a/b", num_frames=4) != SceneCache.input_key(scene="a/b", num_frames=8)
    assert SceneCache.input_key(frames=[torch.zeros(1)]) is None


def test_fingerprint_follows_content_not_objects(tiny: tuple[Any, Any], scenes: list[Path]) -> None:
    _, processor = tiny
    _, (a, b) = _visuals(processor, scenes[0], QUESTIONS[:2])  # read twice: other objects, same content
    _, (c,) = _visuals(processor, scenes[1], QUESTIONS[:1])
    assert a.images[0] is not b.images[0]
    assert visual_fingerprint(a) == visual_fingerprint(b) != visual_fingerprint(c)
    moved = copy.copy(a)
    moved.points = a.points + 0.01
    assert visual_fingerprint(moved) != visual_fingerprint(a)


# ----------------------------------------------------------------------------------------------
# the pipeline: identical answers, work done once
# ----------------------------------------------------------------------------------------------


def test_pipeline_ask_reuses_a_scene_with_identical_answers(tiny: tuple[Any, Any], scenes: list[Path]) -> None:
    model, processor = tiny
    off = SR3DPipeline(model, processor, device="cpu", reuse=False)
    on = SR3DPipeline(model, processor, device="cpu")
    assert off.scene_cache is None and on.scene_cache is not None
    counter = _Counter(model)
    try:
        ref = [off.ask(q, scene=scenes[0], regions=r, num_frames=4, max_new_tokens=6) for q, r in QUESTIONS]
        assert counter.vision == len(QUESTIONS)
        counter.vision, counter.llm_lengths = 0, []
        got = [on.ask(q, scene=scenes[0], regions=r, num_frames=4, max_new_tokens=6) for q, r in QUESTIONS]
        assert counter.vision == 1  # frames encoded once for the five questions
    finally:
        counter.close()
    for a, b in zip(ref, got):
        assert a["answer"] == b["answer"]
        assert a["generated_tokens"] == b["generated_tokens"] and a["prompt_tokens"] == b["prompt_tokens"]
        assert a["regions"] == b["regions"] and a["frame_ids"] == b["frame_ids"] and a["geometry"] == b["geometry"]
    assert len({a["answer"] for a in ref}) > 1  # the questions do change the answers
    # the prefix (system + 4 frames) was prefilled once; every question prefilled only its own tokens
    prompt_lengths = [a["prompt_tokens"] for a in ref]
    prefills = [n for n in counter.llm_lengths if n > 1]
    assert max(prefills) < min(prompt_lengths) and len(prefills) == len(QUESTIONS) + 1
    assert prefills[0] > 4 * processor.tokens_per_tile  # the shared prefix holds every frame's tokens
    assert prefills[1:] == [n - prefills[0] for n in prompt_lengths]  # exactly each question's own tokens
    assert got[1]["timings"]["read"] == 0.0 and got[1]["timings"]["geometry"] == 0.0
    assert on.scene_cache.kinds() == {"input": 1, "visual": 1, "prefix": 1}
    on.clear_cache()
    assert len(on.scene_cache) == 0


def test_batched_generation_over_two_scenes_equals_the_uncached_path(tiny: tuple[Any, Any], scenes: list[Path]) -> None:
    model, processor = tiny
    p0, v0 = _visuals(processor, scenes[0], QUESTIONS)
    p1, v1 = _visuals(processor, scenes[1], QUESTIONS[:3])
    prompts = [p0[0], p1[0], p0[1], p1[1], p0[2], p1[2], p0[3], p0[4]]
    visuals = [v0[0], v1[0], v0[1], v1[1], v0[2], v1[2], v0[3], v0[4]]
    off = SR3DPipeline(model, processor, device="cpu", reuse=False)
    on = SR3DPipeline(model, processor, device="cpu")
    ref = off.generate(prompts, visuals, max_new_tokens=6, do_sample=False, return_details=True)
    counter = _Counter(model)
    try:
        first = on.generate(prompts[:5], visuals[:5], max_new_tokens=6, do_sample=False, return_details=True)
        rest = on.generate(prompts[5:], visuals[5:], max_new_tokens=6, do_sample=False, return_details=True)
        assert counter.vision == 2  # one encoding per scene, the second batch reuses both
    finally:
        counter.close()
    for a, b in zip(ref, first + rest):
        assert (a["text"], a["generated_tokens"], a["prompt_tokens"], a["num_tiles"]) == (
            b["text"],
            b["generated_tokens"],
            b["prompt_tokens"],
            b["num_tiles"],
        )
    assert on.scene_cache.kinds() == {"visual": 2, "prefix": 2}
    # beam search keeps the visual features but not the prefix; still the same answers
    beams_off = off.generate(prompts[:3], visuals[:3], max_new_tokens=4, num_beams=2, do_sample=False)
    beams_on = on.generate(prompts[:3], visuals[:3], max_new_tokens=4, num_beams=2, do_sample=False)
    assert beams_on == beams_off


def test_a_small_budget_evicts_and_still_answers_the_same(tiny: tuple[Any, Any], scenes: list[Path]) -> None:
    model, processor = tiny
    off = SR3DPipeline(model, processor, device="cpu", reuse=False)
    small = SR3DPipeline(model, processor, device="cpu", scene_cache_mib=0.05)  # ~52 kB: one scene at most
    order = [(scenes[i % 2], q, r) for i, (q, r) in enumerate(QUESTIONS)]
    ref = [off.ask(q, scene=s, regions=r, num_frames=4, max_new_tokens=5)["answer"] for s, q, r in order]
    got = [small.ask(q, scene=s, regions=r, num_frames=4, max_new_tokens=5)["answer"] for s, q, r in order]
    assert ref == got
    cache = small.scene_cache
    assert cache.nbytes <= cache.max_bytes and (cache.stats.evictions + cache.stats.skipped) > 0


# ----------------------------------------------------------------------------------------------
# lmms-eval
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("lmms_eval")
    from _eval_data import prepare_all, raw_releases, tiny_model_dir

    raw = raw_releases(tmp_path_factory)
    data = tmp_path_factory.mktemp("reuse-data")
    prepare_all(raw, data)
    return {"raw": raw, "data": data, "model_dir": tiny_model_dir(tmp_path_factory)}


def test_lmms_model_argument_scene_cache(eval_env: dict[str, Any]) -> None:
    from sr3d_plugin.evaluation.lmms_model import SR3DLmms

    base = {"pretrained": str(eval_env["model_dir"]), "device": "cpu", "num_frames": 4}
    assert SR3DLmms(**base, scene_cache=0).pipeline.scene_cache is None
    assert SR3DLmms(**base, scene_cache="64").pipeline.scene_cache.max_bytes == 64 * 2**20
    assert SR3DLmms(**base).pipeline.scene_cache is not None  # on by default
    with pytest.raises(SR3DConfigError, match=r"scene_cache='-1' must be a number of MiB >= 0"):
        SR3DLmms(**base, scene_cache="-1")


@pytest.mark.slow
def test_lmms_eval_evaluator_gives_the_same_predictions_with_and_without_reuse(
    eval_env: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through lmms-eval's own ``simple_evaluate``: ScanQA (plain questions) and Scan2Cap (a region per question)."""
    import json

    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from sr3d_plugin.resources import eval_tasks_dir

    monkeypatch.setenv("SR3D_DATA", str(eval_env["data"]))
    from sr3d_plugin.evaluation.lmms_model import SR3DLmms

    tm = TaskManager("WARNING", include_path=str(eval_tasks_dir()), include_defaults=False)
    args = {
        "pretrained": str(eval_env["model_dir"]),
        "num_frames": 4,
        "pointmap_dir": str(eval_env["raw"]["pointmaps"]),
        "device": "cpu",
        "max_new_tokens": 6,
        "batch_size": 2,
    }
    runs, models = {}, {}
    for name, extra in (("off", {"scene_cache": 0}), ("on", {})):
        models[name] = SR3DLmms(**args, **extra)
        runs[name] = simple_evaluate(
            model=models[name], tasks=["sr3d_scanqa", "sr3d_scan2cap"], task_manager=tm, log_samples=True,
            bootstrap_iters=0, verbosity="WARNING", limit=6,
        )  # fmt: skip
    stats = models["on"].pipeline.scene_cache.stats
    assert models["off"].pipeline.scene_cache is None and stats.hits > 0 and stats.misses > 0
    for task in ("sr3d_scanqa", "sr3d_scan2cap"):
        preds = {
            name: {s["doc_id"]: json.dumps(s["filtered_resps"]) for s in res["samples"][task]}
            for name, res in runs.items()
        }
        assert preds["on"] == preds["off"] and len(preds["on"]) > 1
        assert runs["on"]["results"][task] == runs["off"]["results"][task]
    docs = runs["on"]["samples"]["sr3d_scan2cap"]
    assert any("<mask>" in json.dumps(s["arguments"]) for s in docs)  # region questions went through the cache
