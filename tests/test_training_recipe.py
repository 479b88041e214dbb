"""Recipe schema, validation, overrides, bundled recipes, CLI help and the memory planner's dry runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sr3d_plugin.cli import main
from sr3d_plugin.errors import SR3DConfigError
from sr3d_plugin.resources import recipes_dir
from sr3d_plugin.training.recipe import (
    SECTIONS,
    bundled_recipes,
    field_help,
    find_recipe,
    load_recipe,
    parse_overrides,
    resolve_path,
)

BUNDLED = sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def _write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _base(tmp_path: Path) -> str:
    data = tmp_path / "train.jsonl"
    data.write_text("")
    return f"model:\n  preset: tiny\ndata:\n  train_file: {data}\n"


def test_bundled_recipes_cover_the_issue_and_load() -> None:
    assert {"tiny-cpu", "qlora-8b", "lora-8b-bf16", "stage1-singleview", "stage2-multiview"} <= set(BUNDLED)
    assert any(r.startswith("lora-8b-zero") for r in BUNDLED) and any("fsdp" in r for r in BUNDLED)
    for name, desc, path in bundled_recipes():
        assert desc and not desc.startswith("(unreadable"), name
        recipe, _ = load_recipe(path, check_files=False)
        assert recipe.description == desc or recipe.description.startswith(desc)
    assert (recipes_dir() / "deepspeed" / "zero2.json").is_file() and (
        recipes_dir() / "deepspeed" / "zero3.json"
    ).is_file()
    for f in (recipes_dir() / "accelerate").glob("*.yaml"):
        import yaml

        assert yaml.safe_load(f.read_text())["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED")


def test_recipe_relative_paths_resolve_through_recipes_dir() -> None:
    recipe, _ = load_recipe("lora-8b-zero2", check_files=False)
    assert Path(recipe.training.deepspeed) == recipes_dir() / "deepspeed" / "zero2.json"
    assert Path(recipe.training.deepspeed).is_file()
    assert resolve_path("recipes/deepspeed/zero3.json") == str(recipes_dir() / "deepspeed" / "zero3.json")
    assert find_recipe("qlora-8b") == recipes_dir() / "qlora-8b.yaml"
    # extends: stage2 inherits stage 1's schedule and overrides frames
    s2, _ = load_recipe("stage2-multiview", check_files=False)
    s1, _ = load_recipe("stage1-singleview", check_files=False)
    assert s2.training.learning_rate == s1.training.learning_rate == 5e-5
    assert s2.training.lr_scheduler == "cosine" and s2.data.num_frames == 32 and s1.data.num_frames == 13
    assert s2.data.augment.frame_drop_prob > 0


def test_paper_schedule_settings() -> None:
    for name in ("stage1-singleview", "stage2-multiview"):
        r, _ = load_recipe(name, check_files=False)
        assert r.training.learning_rate == 5e-5 and r.training.lr_scheduler == "cosine"
        assert r.training.max_grad_norm == 1.0
        assert set(r.model.trained_modules) == {"perception_encoder", "mm_projector", "region_extractor"}
    q, _ = load_recipe("qlora-8b", check_files=False)
    assert q.quantization.load_in_4bit and q.quantization.quant_type == "nf4" and q.quantization.double_quant
    assert q.data.num_frames == 32 and q.lora.enabled


def test_overrides_are_typed_and_dotted(tmp_path: Path) -> None:
    p = _write(tmp_path, _base(tmp_path))
    r, _ = load_recipe(
        p,
        ["training.learning_rate=1e-4", "lora.r=16", "lora.target_modules=[q_proj,v_proj]", "data.system_prompt=null"],
    )
    assert r.training.learning_rate == pytest.approx(1e-4) and isinstance(r.training.learning_rate, float)
    assert r.lora.r == 16 and r.lora.target_modules == ["q_proj", "v_proj"] and r.data.system_prompt is None
    assert parse_overrides(["a.b.c=3"]) == {"a": {"b": {"c": 3}}}
    r3, _ = load_recipe(p, ["training.mixed_precision=no"])  # YAML reads `no` as False
    assert r3.training.mixed_precision == "no"
    # YAML reads 5e-5 as text: the schema still takes it as a float
    r2, _ = load_recipe(_write(tmp_path, _base(tmp_path) + "training:\n  learning_rate: 5e-5\n", "r2.yaml"))
    assert r2.training.learning_rate == pytest.approx(5e-5)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("training.learning_rat=1", "did you mean learning_rate"),
        ("trainng.seed=1", "did you mean training"),
        ("lora.r=abc", "'lora.r' has value 'abc' (str); expected int"),
        ("training.mixed_precision=fp8", "expected 'no' | 'bf16' | 'fp16'"),
        ("lora.enabled=maybe", "expected bool"),
        ("data.augment.mask_to_box_prob=1.5", "mask_to_box_prob=1.5; expected a finite number in [0, 1]"),
        ("training=3", "must be a mapping"),
        ("training.learning_rate", "KEY=VALUE"),
    ],
)
def test_bad_keys_and_types_fail_with_clear_messages(tmp_path: Path, override: str, needle: str) -> None:
    p = _write(tmp_path, _base(tmp_path))
    with pytest.raises(SR3DConfigError) as err:
        load_recipe(p, [override])
    assert needle in str(err.value)


def test_missing_files_fail_before_any_work(tmp_path: Path, capsys) -> None:
    p = _write(tmp_path, "model:\n  path: /nonexistent/ckpt\ndata:\n  train_file: /nonexistent/train.jsonl\n")
    with pytest.raises(SR3DConfigError, match="model.path='/nonexistent/ckpt' does not exist"):
        load_recipe(p)
    _, warnings = load_recipe(p, check_files=False)  # dry runs only warn
    assert any("train_file" in w for w in warnings)
    # the CLI reports it and exits 2 without training
    assert main(["train", str(p), f"training.output_dir={tmp_path / 'run'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SR3DConfigError, match="exactly one of data.train_file and data.generator"):
        load_recipe({"model": {"preset": "tiny"}})
    with pytest.raises(SR3DConfigError, match="vision_tower"):
        load_recipe(p, ["model.trained_modules=[vision_tower]"], check_files=False)


def test_help_documents_every_field(capsys) -> None:
    import dataclasses

    text = field_help()
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.type) or f.name == "augment":
                continue
            assert f"{section}.{f.name} (" in text, f"{section}.{f.name}"
    assert "data.augment.region_shuffle_prob (" in text
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "training.learning_rate (float, default 5e-05)" in out and "--dry-run" in out and "--resume" in out


def test_recipes_command_lists_bundled(capsys) -> None:
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in BUNDLED:
        assert name in out
    assert main(["recipes", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == set(BUNDLED) and all(r["description"] for r in rows)
    assert main(["recipes", "--show", "qlora-8b"]) == 0
    assert "load_in_4bit: true" in capsys.readouterr().out


def test_recipes_command_marks_what_was_executed(capsys) -> None:
    assert main(["recipes", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    sharding = {n: r["sharding"] for n, r in rows.items()}
    assert sharding["lora-8b-zero2"] == "zero2" and sharding["stage2-fsdp"] == "fsdp2"
    assert sharding["stage1-singleview"] == sharding["stage2-multiview"] == "zero3"
    for name in ("lora-8b-zero2", "stage1-singleview", "stage2-multiview", "stage2-fsdp", "qlora-8b"):
        assert rows[name]["executed"].startswith("unexecuted"), name
    assert "2 CPU processes" in rows["stage2-fsdp"]["executed"] and "never on GPUs" in rows["stage2-fsdp"]["executed"]
    assert rows["tiny-cpu"]["executed"].startswith("executed")
    assert main(["recipes"]) == 0
    assert "[zero3] unexecuted" in capsys.readouterr().out


@pytest.mark.parametrize("name", BUNDLED)
def test_dry_run_plans_every_recipe_without_weights(name: str, capsys) -> None:
    assert main(["train", name, "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["estimated_peak_gib"] > 0
    assert plan["params"]["trainable"] > 0 and plan["params"]["frozen"] > 0
    assert not any(k.startswith("weights.") and v < 0 for k, v in plan["breakdown_gib"].items())
    if name == "qlora-8b":
        assert plan["shapes"]["tiles_per_sample"] == 32
        assert plan["estimated_peak_gib"] <= 20.0
        assert plan["breakdown_gib"]["weights.llm_4bit"] < 4.0  # 4-bit LLM body of ~6.5 B weights
        assert plan["alternatives_gib"]["full_logits"] > plan["estimated_peak_gib"]
        assert plan["alternatives_gib"]["without_gradient_checkpointing"] > 30


def test_dry_run_text_output_and_late_overrides(capsys) -> None:
    assert main(["train", "qlora-8b", "--dry-run", "--tiles", "8"]) == 0
    out = capsys.readouterr().out
    assert "estimated peak GPU memory" in out and "tiles_per_sample=8" in out
    # KEY=VALUE may also follow the options
    assert main(["train", "qlora-8b", "--dry-run", "--json", "lora.r=16"]) == 0
    small = json.loads(capsys.readouterr().out)
    assert main(["train", "qlora-8b", "--dry-run", "--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert small["params"]["lora"] * 4 == default["params"]["lora"]
