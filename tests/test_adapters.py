"""Adapters as models: a real tiny training run's adapter answers without merging, exactly like the
merged model (``sr3d merge``); the model cards of the adapter and merged folders; the adapter options
of ``sr3d ask``, ``sr3d eval`` and the lmms-eval model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _training_helpers import run_train, toy_jsonl

from sr3d_plugin.cli import main
from sr3d_plugin.errors import SR3DError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step tiny-cpu LoRA run (checkpoint at step 2) on the toy data."""
    toy = toy_jsonl(tmp_path_factory)
    out = tmp_path_factory.mktemp("adapters") / "run"
    proc = run_train(out, toy, "training.max_steps=3", "training.save_steps=2", "training.logging_steps=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def merged(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "merged"
    assert main(["merge", str(run / "adapter"), str(out), "--json"]) == 0
    return out


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sr3d_plugin.synthetic import generate_scene, write_scannet_layout

    return write_scannet_layout(generate_scene(3, num_frames=6, width=160, height=120), tmp_path_factory.mktemp("s"))


def _card(folder: Path) -> tuple[dict, str]:
    import yaml

    text = (folder / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    head, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(head), body


def _final_loss(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return next(r for r in rows if r["event"] == "end")["final_loss"]


def test_adapter_card_replaces_peft_template(run: Path) -> None:
    meta, body = _card(run / "adapter")
    facts = meta["sr3d"]
    base = str((run / "base-model").resolve())
    assert meta["base_model"] == base and facts["base_model"] == base and meta["library_name"] == "peft"
    assert facts["kind"] == "adapter" and facts["recipe"] == "tiny-cpu"
    assert facts["steps"] == 3 and facts["final_loss"] == pytest.approx(_final_loss(run), abs=1e-6)
    assert facts["data"].endswith(".jsonl") and Path(facts["data"]).is_file()
    assert set(facts["trained_modules"]) == {"perception_encoder", "mm_projector", "region_extractor"}
    assert facts["lora"]["r"] > 0
    # the modules the card names are the ones the adapter really saved
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert set(cfg["modules_to_save"]) == set(facts["trained_modules"])
    assert "[More Information Needed]" not in body  # peft's template is gone
    assert f"- Steps: 3\n- Final loss: {facts['final_loss']:.4f}" in body
    for module in facts["trained_modules"]:
        assert f"`{module}`" in body
    assert f'SR3DPipeline.from_pretrained("{run / "adapter"}")' in body and "sr3d ask --adapter" in body
    # the checkpoint's adapter has its own card, at its own step
    ck_meta, _ = _card(run / "checkpoint-2" / "adapter")
    assert ck_meta["sr3d"]["steps"] == 2 and ck_meta["sr3d"]["final_loss"] != facts["final_loss"]


def test_merged_card(run: Path, merged: Path) -> None:
    meta, body = _card(merged)
    facts, adapter_facts = meta["sr3d"], _card(run / "adapter")[0]["sr3d"]
    assert facts["kind"] == "merged" and meta["library_name"] == "transformers"
    assert facts["adapter"] == str((run / "adapter").resolve())
    for key in ("base_model", "recipe", "data", "steps", "final_loss", "trained_modules", "lora"):
        assert facts[key] == adapter_facts[key], key
    assert "(merged into the weights)" in body and "Merged from the adapter" in body


def test_adapter_answers_without_merging_like_the_merged_model(run: Path, merged: Path, scene: Path) -> None:
    from peft import PeftModel

    from sr3d_plugin.inference import SR3DPipeline

    pipes = {
        "adapter": SR3DPipeline.from_pretrained(run / "adapter", device="cpu", reuse=False),
        "run folder": SR3DPipeline.from_pretrained(run, device="cpu", reuse=False),
        "merged": SR3DPipeline.from_pretrained(merged, device="cpu", reuse=False),
        "base": SR3DPipeline.from_pretrained(run / "base-model", device="cpu", reuse=False),
    }
    assert isinstance(pipes["adapter"].model, PeftModel)  # not merged
    assert not isinstance(pipes["merged"].model, PeftModel)
    assert pipes["adapter"].processor.tokenizer.convert_tokens_to_ids("<mask>") is not None
    kwargs = {"scene": str(scene), "num_frames": 4, "regions": ["frame=1 box=10,10,90,100"], "max_new_tokens": 6}
    answers = {k: p.ask("What is <region0>?", score_answer="A red box.", **kwargs) for k, p in pipes.items()}
    assert answers["adapter"]["answer"] == answers["merged"]["answer"] == answers["run folder"]["answer"]
    assert answers["adapter"]["answer_logprob"] == pytest.approx(answers["merged"]["answer_logprob"], abs=1e-4)
    # scene reuse (cached features and prompt prefix) on the unmerged adapter: the second question is a cache hit
    reusing = SR3DPipeline.from_pretrained(run / "adapter", device="cpu")
    for _ in range(2):
        again = reusing.ask("What is <region0>?", score_answer="A red box.", **kwargs)
        assert again["answer"] == answers["merged"]["answer"]
        assert again["answer_logprob"] == pytest.approx(answers["merged"]["answer_logprob"], abs=1e-4)
    assert reusing.scene_cache is not None and reusing.scene_cache.stats.hits > 0
    # logits of one teacher-forced batch: the same visual input and prompt through each model
    from sr3d_plugin.visual_inputs import visual_input

    vis_kwargs = {"scene": str(scene), "num_frames": 4, "regions": ["frame=1 box=10,10,90,100"]}
    visual = visual_input(**vis_kwargs, canonical_mode=pipes["merged"].config.canonical_mode).visual
    logits = {}
    for k, p in pipes.items():
        prompt = p.processor.build_prompt("What is <region0>? A red box.", visual)
        with torch.no_grad():
            logits[k] = p.model(**p.encode([prompt], [visual])).logits
    diff = (logits["adapter"] - logits["merged"]).abs().max()
    assert logits["adapter"].shape == logits["merged"].shape and diff < 1e-4, diff
    # ... and the adapter really changed the model (the equality above is not the base's)
    assert (logits["adapter"] - logits["base"]).abs().max() > 1e-3


def test_ask_cli_with_adapter(run: Path, merged: Path, scene: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["--scene", str(scene), "--num-frames", "4", "--region", "frame=1 box=10,10,90,100"]
    args += ["--question", "What is <mask>?", "--max-new-tokens", "6", "--device", "cpu", "--json"]
    assert main(["ask", "--adapter", str(run / "adapter"), *args]) == 0
    via_adapter = json.loads(capsys.readouterr().out)
    # the base overridden explicitly (a copy elsewhere) gives the same answer
    base_copy = run.parent / "base-copy"
    if not base_copy.exists():
        shutil.copytree(run / "base-model", base_copy)
    assert main(["ask", "--adapter", str(run), "--model", str(base_copy), *args]) == 0
    via_override = json.loads(capsys.readouterr().out)
    assert main(["ask", "--model", str(run / "adapter"), *args]) == 0  # an adapter folder given as the model
    via_model = json.loads(capsys.readouterr().out)
    assert main(["ask", "--model", str(merged), *args]) == 0
    via_merged = json.loads(capsys.readouterr().out)
    assert via_adapter["answer"] == via_override["answer"] == via_model["answer"] == via_merged["answer"]
    # a folder without an adapter is refused naming the flag
    assert main(["ask", "--adapter", str(scene), *args]) == 2
    assert "--adapter" in capsys.readouterr().err


def test_adapter_errors(run: Path, tmp_path: Path) -> None:
    from sr3d_plugin.inference import SR3DPipeline
    from sr3d_plugin.training.merge import adapter_base

    moved = tmp_path / "adapter"
    shutil.copytree(run / "adapter", moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SR3DError, match="pass base="):
        SR3DPipeline.from_pretrained(moved, device="cpu")
    assert adapter_base(moved, base=run / "base-model") == run / "base-model"
    with pytest.raises(SR3DError, match="base=.*is not a folder"):
        adapter_base(moved, base=tmp_path / "nowhere")
    with pytest.raises(SR3DError, match="not an adapter folder"):
        SR3DPipeline.from_pretrained(run / "base-model", base=run / "base-model", device="cpu")


def test_eval_command_line_and_lmms_model_take_an_adapter(run: Path, tmp_path: Path) -> None:
    from sr3d_plugin.cli import build_parser
    from sr3d_plugin.cli.eval_cmd import build_command

    data = tmp_path / "data"
    data.mkdir()
    args = build_parser().parse_args(["eval", "--data", str(data), "--adapter", str(run / "adapter")])
    cmd, _ = build_command(args)
    model_args = cmd[cmd.index("--model_args") + 1]
    assert f"adapter={(run / 'adapter').resolve()}" in model_args.split(",")
    assert "pretrained=" not in model_args
    args = build_parser().parse_args(["eval", "--data", str(data), "--adapter", str(data)])
    with pytest.raises(SR3DError, match="--adapter"):
        build_command(args)

    from sr3d_plugin.evaluation.lmms_model import SR3DLmms

    lm = SR3DLmms(adapter=str(run / "adapter"), device="cpu", scene_cache="0")
    from peft import PeftModel

    assert isinstance(lm.pipeline.model, PeftModel)
    with pytest.raises(SR3DError, match="adapter="):
        SR3DLmms(adapter=str(data), device="cpu")


def test_lmms_eval_with_the_adapter_equals_the_merged_model(
    run: Path, merged: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through lmms-eval's own evaluator: model argument adapter= gives the merged model's answers."""
    pytest.importorskip("lmms_eval")
    from _eval_data import prepare_all, raw_releases
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from sr3d_plugin.resources import eval_tasks_dir

    raw = raw_releases(tmp_path_factory)
    data = tmp_path_factory.mktemp("adapter-eval-data")
    prepare_all(raw, data)
    monkeypatch.setenv("SR3D_DATA", str(data))
    common = f"num_frames=4,pointmap_dir={raw['pointmaps']},device=cpu,max_new_tokens=6,scene_cache=0"
    answers = {}
    models = {"adapter": f"adapter={run / 'adapter'}", "merged": f"pretrained={merged}"}
    models["base"] = f"pretrained={run / 'base-model'}"
    for name, model in models.items():
        tm = TaskManager("WARNING", include_path=str(eval_tasks_dir()), include_defaults=False)
        res = simple_evaluate(
            model="sr3d", model_args=f"{model},{common}", tasks=["sr3d_sqa3d"], task_manager=tm, limit=4,
            log_samples=True, bootstrap_iters=0, verbosity="WARNING",
        )  # fmt: skip
        answers[name] = [s["filtered_resps"] for s in res["samples"]["sr3d_sqa3d"]]
    assert len(answers["adapter"]) == 4 and answers["adapter"] == answers["merged"]
    assert answers["adapter"] != answers["base"]  # the adapter was applied (the base alone answers otherwise)
