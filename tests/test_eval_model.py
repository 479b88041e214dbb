"""The ``sr3d`` lmms-eval model class on a tiny random model: batching, log-likelihoods, multi-round, errors."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _eval_data import prepare_all, raw_releases, tiny_model_dir

from sr3d_plugin.errors import SR3DConfigError, SR3DInputError
from sr3d_plugin.evaluation import lmms_tasks as T
from sr3d_plugin.evaluation.schema import load_records

pytestmark = pytest.mark.usefixtures("one_thread")

pytest.importorskip("lmms_eval")

SPLITS = {"scanqa": "val", "sqa3d": "test", "scan2cap": "val", "vsibench": "test"}
GEN = {"max_new_tokens": 5, "temperature": 0, "do_sample": False, "until": ["\n\n"]}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    raw = raw_releases(tmp_path_factory)
    data = tmp_path_factory.mktemp("model-data")
    prepare_all(raw, data)
    docs = {}
    for task, split in SPLITS.items():
        recs = load_records(data / task / f"{split}.jsonl", task)
        docs[task] = {split: [{**r, T.DATA_DIR_FIELD: str(data)} for r in recs]}
    return {"raw": raw, "data": data, "docs": docs, "model_dir": tiny_model_dir(tmp_path_factory)}


def _model(env: dict[str, Any], **kwargs: Any) -> Any:
    from sr3d_plugin.evaluation.lmms_model import SR3DLmms

    args = {
        "pretrained": str(env["model_dir"]),
        "num_frames": 4,
        "device": "cpu",
        "pointmap_dir": str(env["raw"]["pointmaps"]),
    }
    args.update(kwargs)
    lm = SR3DLmms(**args)
    lm.task_dict = copy.deepcopy(env["docs"])
    return lm


def _requests(lm: Any, kinds: tuple[str, ...] = ("scanqa", "scan2cap", "vsibench"), per_task: int = 3) -> list[Any]:
    kwargs = {t: {"default": _kwargs(t)} for t in kinds}
    reqs = []
    for task in kinds:
        split = SPLITS[task]
        for doc_id, doc in enumerate(lm.task_dict[task][split][:per_task]):
            ctx = T.doc_to_text(task, doc, kwargs[task])
            reqs.append(_inst("generate_until", (ctx, dict(GEN), None, doc_id, task, split)))
    return reqs


def _inst(kind: str, args: tuple) -> Any:
    from lmms_eval.api.instance import Instance

    return Instance(kind, args, idx=0, metadata={"task": args[-2], "doc_id": args[-3], "repeats": 1})


def _kwargs(task: str) -> dict[str, str]:
    import yaml

    from sr3d_plugin.resources import eval_tasks_dir

    class L(yaml.SafeLoader):
        pass

    L.add_constructor("!function", lambda loader, node: None)
    name = f"sr3d_{task}"
    return yaml.load((eval_tasks_dir() / name / f"{name}.yaml").read_text(), Loader=L)["lmms_eval_specific_kwargs"][
        "default"
    ]


def test_manifest_and_entry_point() -> None:
    from importlib.metadata import entry_points

    from lmms_eval.models import get_model
    from lmms_eval.models.registry_v2 import ModelManifest

    from sr3d_plugin.evaluation.lmms_entry import manifests
    from sr3d_plugin.evaluation.lmms_model import MANIFEST, SR3DLmms

    eps = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "sr3d"]
    assert len(eps) == 1 and eps[0].load() is manifests
    (made,) = manifests()
    assert isinstance(made, ModelManifest) and made == MANIFEST and MANIFEST.chat_class_path is None
    assert get_model("sr3d") is SR3DLmms and SR3DLmms.is_simple is True


@pytest.mark.parametrize("first", ["sr3d_plugin.evaluation.lmms_model", "lmms_eval.models", "sr3d_plugin"])
def test_registry_finds_sr3d_whatever_is_imported_first(first: str) -> None:
    """Regression: the entry point used to live in the model module, which imports lmms_eval.models; importing
    our module first built the registry while it was half-initialised and `sr3d` went missing."""
    code = (
        f"import {first}\n"
        "from lmms_eval.models import get_model\n"
        "print(get_model('sr3d').__module__ + '.' + get_model('sr3d').__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "sr3d_plugin.evaluation.lmms_model.SR3DLmms"
    assert "Failed to load model entry-point" not in out.stderr


def test_batched_generation_equals_one_by_one(env: dict[str, Any]) -> None:
    one = _model(env, batch_size=1)
    many = _model(env, batch_size=4)
    reqs = _requests(one)
    a = one.generate_until(reqs)
    b = many.generate_until(_requests(many))
    assert a == b and len(a) == len(reqs) and all(isinstance(x, str) and x for x in a)
    assert not one.failures and not many.failures
    # the same answer as the inference pipeline gives for the same inputs
    doc = one.task_dict["scanqa"]["val"][0]
    visual = one.inputs.visual(doc)
    prompt = one.pipeline.processor.build_prompt(reqs[0].args[0], visual)
    batch = one._batch_to_device(one.processor(prompt, visual))
    out = one.model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=one.tokenizer.pad_token_id)
    assert a[0] == one.processor.decode_answer(out, batch["input_ids"].shape[1])[0].strip()
    # stop strings cut the answer; a max_new_tokens model argument overrides the task's
    assert one._cut("yes\n\nmore", ["\n\n"]) == "yes"
    short = _model(env, max_new_tokens=1)
    gen, _ = short._gen_kwargs(dict(GEN))
    assert gen["max_new_tokens"] == 1 and gen["do_sample"] is False


def test_regions_fall_back_to_the_3d_box_on_other_frames(env: dict[str, Any]) -> None:
    lm = _model(env, num_frames=8)  # scan2cap masks were prepared for 4 frames
    doc = lm.task_dict["scan2cap"]["val"][0]
    regions = lm.inputs.regions(doc, lm.inputs.geometry(doc).frames)
    assert len(regions) == 1 and regions[0].frames  # projected on the 8 sampled frames
    lm4 = _model(env)
    geo = lm4.inputs.geometry(doc)
    prepared = {m["frame"] for m in doc["regions"][0]["masks"]}
    got = lm4.inputs.regions(doc, geo.frames)[0]
    assert {f"@{geo.frames.frame_ids[k]}" for k in got.frames} == prepared


def test_loglikelihood(env: dict[str, Any]) -> None:
    lm = _model(env, batch_size=3)
    kw = _kwargs("scanqa")
    docs = lm.task_dict["scanqa"]["val"]
    reqs = []
    for i in range(3):
        ctx = T.doc_to_text("scanqa", docs[i], kw)
        reqs.append(_inst("loglikelihood", (ctx, docs[i]["answers"][0], None, i, "scanqa", "val")))
    # continuation given as lmms-eval's doc_to_target callable
    reqs.append(_inst("loglikelihood", (reqs[0].args[0], lambda d: d["answers"], None, 0, "scanqa", "val")))
    reqs.append(_inst("loglikelihood", (reqs[0].args[0], "", None, 0, "scanqa", "val")))
    res = lm.loglikelihood(reqs)
    assert res[4] == (0.0, True)
    assert res[3][0] == pytest.approx(res[0][0], abs=1e-4)
    for i in range(3):  # equals the pipeline's teacher-forced score (no padding, one prompt)
        visual = lm.inputs.visual(docs[i])
        prompt = lm.processor.build_prompt(reqs[i].args[0], visual)
        inputs = lm._batch_to_device(lm.processor(prompt, visual))
        expected, _ = lm.pipeline.answer_logprob(inputs, docs[i]["answers"][0])
        assert res[i][0] == pytest.approx(expected, abs=1e-3) and res[i][0] < 0
    # the greedy continuation is greedy
    visual = lm.inputs.visual(docs[0])
    inputs = lm._batch_to_device(lm.processor(lm.processor.build_prompt(reqs[0].args[0], visual), visual))
    out = lm.model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    ids = out[0, inputs["input_ids"].shape[1] :].tolist()
    prompt = lm._prompt(reqs[0].args[0], visual)
    ((lp, is_greedy),) = lm._loglik_batch([(0, prompt, visual, ids)]).values()
    assert is_greedy is True and lp < 0
    ((_, not_greedy),) = lm._loglik_batch([(0, prompt, visual, [ids[0], (ids[1] + 1) % 400, ids[2]])]).values()
    assert not_greedy is False


def test_multi_round(env: dict[str, Any]) -> None:
    lm = _model(env)
    seen: list[Any] = []

    def doc_to_text(doc: dict, previous_output: list[str], round_idx: int, previous_round_info: Any) -> tuple:
        seen.append((round_idx, list(previous_output), previous_round_info))
        if round_idx == 2:
            return None, None, True, ["final", *previous_output], None
        return None, f"Round {round_idx}: and then?", False, None, {"round": round_idx}

    req = _inst(
        "generate_until_multi_round", ("What is near the box?", dict(GEN), None, doc_to_text, 0, "scanqa", "val")
    )
    (out,) = lm.generate_until_multi_round([req])
    assert out[0] == "final" and len(out) == 3
    assert [s[0] for s in seen] == [1, 2] and len(seen[1][1]) == 2 and seen[1][2] == {"round": 1}
    # the conversation keeps the first turn with the frames, then the later turns
    visual = lm.inputs.visual(lm.task_dict["scanqa"]["val"][0])
    prompt = lm._prompt("Round 1: and then?", visual, [("What is near the box?", out[1])])
    assert prompt.count("<|im_start|>user") == 2 and prompt.count("<image>") == len(visual.images)


def test_bad_inputs_give_empty_answers_and_keep_the_others(env: dict[str, Any]) -> None:
    lm = _model(env, batch_size=2)
    docs = lm.task_dict["scanqa"]["val"]
    docs[1]["scene"] = "scenes/not_there"
    lm.task_dict["vsibench"]["test"][0]["video"] = "videos/none.mp4"
    reqs = _requests(lm, kinds=("scanqa", "vsibench"), per_task=3)
    out = lm.generate_until(reqs)
    assert out[1] == "" and out[3] == "" and all(out[i] for i in (0, 2, 4, 5))
    assert [(f[0], f[1], f[2]) for f in lm.failures] == [("scanqa", 1, docs[1]["question_id"]), ("vsibench", 0, "0")]
    assert "scene folder" in lm.failures[0][3] and "not found" in lm.failures[0][3]
    strict = _model(env, on_error="raise")
    strict.task_dict["scanqa"]["val"][0]["scene"] = "scenes/not_there"
    with pytest.raises(SR3DInputError, match="scene folder .*not_there.* not found"):
        strict.generate_until(_requests(strict, kinds=("scanqa",), per_task=1))
    # ground-truth depth asked for a video: no question could be answered, so the start-up check refuses
    # before any question (issue 13: never empty answers for a task that cannot run)
    gt = _model(env, depth_source="gt")
    with pytest.raises(SR3DInputError, match=r"no geometry source .*depth_source=gt_depth.* of: vsibench: video"):
        gt.generate_until(_requests(gt, kinds=("vsibench",), per_task=1))
    assert gt.failures == []


def test_depth_sources_for_videos(env: dict[str, Any], tmp_path: Path) -> None:
    from transformers import AutoModelForDepthEstimation, DepthAnythingConfig, Dinov2Config, DPTImageProcessor

    config = DepthAnythingConfig(
        backbone_config=Dinov2Config(
            hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, image_size=28,
            patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=False,
        ),
        reassemble_hidden_size=16, neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=8, head_hidden_size=8,
        patch_size=14,
    )  # fmt: skip
    torch.manual_seed(0)
    da = AutoModelForDepthEstimation.from_config(config)
    with torch.no_grad():
        da.head.conv3.bias.fill_(1.0)
    da.save_pretrained(tmp_path / "da")
    DPTImageProcessor(
        size={"height": 28, "width": 28}, keep_aspect_ratio=True, ensure_multiple_of=14, do_pad=False
    ).save_pretrained(tmp_path / "da")
    doc = env["docs"]["vsibench"]["test"][0]
    recon = _model(env).inputs.geometry(doc)
    assert recon.info["source"] == "reconstruction"
    est = _model(env, pointmap_dir=None, depth_model=str(tmp_path / "da")).inputs.geometry(doc)
    assert est.info["source"] == "depth_anything" and est.points.shape[0] == len(est.frames) == 4
    forced = _model(env, depth_source="depth_anything", depth_model=str(tmp_path / "da"))
    scene_doc = env["docs"]["scanqa"]["val"][0]
    assert forced.inputs.geometry(scene_doc).info["source"] == "depth_anything"
    assert _model(env).inputs.geometry(scene_doc).info["source"] == "gt_depth"
    none = _model(env, pointmap_dir=None, depth_source="reconstruction")
    with pytest.raises(SR3DInputError, match="depth_source=reconstruction but no point-map file was found"):
        none.inputs.geometry(doc)


def test_model_arguments(env: dict[str, Any]) -> None:
    with pytest.raises(SR3DConfigError, match=r"unknown sr3d model argument\(s\) \['colour'\]"):
        _model(env, colour="red")
    with pytest.raises(SR3DConfigError, match="depth_source='lidar'"):
        _model(env, depth_source="lidar")
    with pytest.raises(SR3DConfigError, match="needs pretrained"):
        _model(env, pretrained="")
    with pytest.raises(SR3DConfigError, match="batch_size=auto"):
        _model(env, batch_size="auto")
    lm = _model(env, batch_size="3", num_frames="2", load_in_4bit="false", max_batch_size=8)
    assert lm.batch_size == 3 and lm.inputs.num_frames == 2 and lm.rank == 0 and lm.world_size == 1
    assert str(lm.device) == "cpu"
    np.testing.assert_equal(json.loads(json.dumps(lm.failures)), [])
