"""Typed ranges of the recipe schema, YAML alias limits, and a nan learning rate failing before any model loads."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import pytest

from sr3d_plugin.cli import main
from sr3d_plugin.errors import SR3DConfigError, SR3DInputError
from sr3d_plugin.limits import safe_yaml
from sr3d_plugin.training.recipe import (
    MAX_NUM_FRAMES,
    SECTIONS,
    Recipe,
    TrainingSection,
    field_help,
    load_recipe,
    parse_overrides,
)


def _recipe_file(tmp_path: Path, extra: str = "") -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text('{"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}\n')
    p = tmp_path / "r.yaml"
    p.write_text(f"model:\n  preset: tiny\ndata:\n  train_file: {data}\n{extra}")
    return p


# the 17 values the reliability probe found accepted (issue 12), each with the interval the error must name
PROBE = [
    ("training.learning_rate=nan", "training.learning_rate=nan", "(0, inf)"),
    ("training.learning_rate=.inf", "training.learning_rate=inf", "(0, inf)"),
    ("training.max_grad_norm=nan", "training.max_grad_norm=nan", "(0, inf)"),
    ("training.max_grad_norm=-1", "training.max_grad_norm=-1.0", "(0, inf)"),
    ("training.weight_decay=nan", "training.weight_decay=nan", "[0, inf)"),
    ("training.adam_beta1=1.5", "training.adam_beta1=1.5", "[0, 1)"),
    ("training.adam_epsilon=0", "training.adam_epsilon=0.0", "(0, inf)"),
    ("lora.dropout=2", "lora.dropout=2.0", "[0, 1)"),
    ("lora.alpha=-8", "lora.alpha=-8", "(0, inf)"),
    ("training.save_total_limit=0", "training.save_total_limit=0", "[1, inf)"),
    ("data.max_length=-5", "data.max_length=-5", "[1, inf)"),
    ("training.modules_learning_rate=-1", "training.modules_learning_rate=-1.0", "(0, inf)"),
    ("training.num_epochs=nan", "training.num_epochs=nan", "[0, inf)"),
    ("training.seed=-1", "training.seed=-1", "[0, 4294967295]"),
    ("data.num_frames=1e9", "data.num_frames=1000000000", f"[1, {MAX_NUM_FRAMES}]"),
    ("model.config_overrides={llm_hidden: -64}", "model.config_overrides.llm_hidden=-64", "positive integer"),
    ("model.config_overrides={tile_size: -448}", "model.config_overrides.tile_size=-448", "positive integer"),
]


@pytest.mark.parametrize(("override", "named", "interval"), PROBE, ids=[p[0] for p in PROBE])
def test_probe_values_are_refused_naming_key_value_and_range(
    tmp_path: Path, override: str, named: str, interval: str
) -> None:
    with pytest.raises(SR3DConfigError) as err:
        load_recipe(_recipe_file(tmp_path), [override])
    message = str(err.value)
    assert named in message and interval in message, message


@pytest.mark.parametrize(
    "override",
    [
        "training.learning_rate=1e-4",
        "training.max_grad_norm=null",
        "training.modules_learning_rate=null",
        "training.save_total_limit=null",
        "training.max_steps=-1",
        "training.seed=0",
        "lora.dropout=0",
        f"data.num_frames={MAX_NUM_FRAMES}",
        "model.config_overrides={llm_hidden: 32, rope_theta: 10000.0}",
    ],
)
def test_values_at_the_edges_of_their_ranges_are_accepted(tmp_path: Path, override: str) -> None:
    recipe, _ = load_recipe(_recipe_file(tmp_path), [override])
    assert isinstance(recipe, Recipe)


def test_ranges_also_hold_for_recipes_built_in_python() -> None:
    recipe = Recipe(training=TrainingSection(learning_rate=math.nan))
    with pytest.raises(SR3DConfigError, match=r"training\.learning_rate=nan; expected a finite number in \(0, inf\)"):
        recipe.validate(check_files=False)


def test_every_float_field_refuses_nan_and_every_range_is_shown_in_the_help(tmp_path: Path) -> None:
    help_text = field_help()
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.type in ("float", "float | None"):
                with pytest.raises(SR3DConfigError, match=rf"{section}\.{f.name}=nan"):
                    load_recipe(_recipe_file(tmp_path), [f"{section}.{f.name}=.nan"])
            if "range" in f.metadata:
                line = next(ln for ln in help_text.splitlines() if f"{section}.{f.name} (" in ln)
                assert " range " in line, line


def test_train_help_prints_the_ranges(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "training.learning_rate (float, default 5e-05) range (0, inf), finite" in out
    assert f"data.num_frames (int, default 32) range [1, {MAX_NUM_FRAMES}]" in out
    assert main(["recipes", "--keys"]) == 0
    assert "training.adam_beta1 (float, default 0.9) range [0, 1), finite" in capsys.readouterr().out


def test_nan_learning_rate_is_a_one_line_cli_error_before_the_model_loads(tmp_path: Path, capsys) -> None:
    out_dir = tmp_path / "run"
    code = main(["train", str(_recipe_file(tmp_path)), "training.learning_rate=nan", f"training.output_dir={out_dir}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == "sr3d train: error: training.learning_rate=nan; expected a finite number in (0, inf)"
    assert not out_dir.exists()  # nothing was written, no model was built


def _bomb(levels: int, width: int = 10) -> str:
    lines = ["a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + f"\nmodel:\n  config_overrides: {{b: *a{levels - 1}}}\n"


def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    p = _recipe_file(tmp_path)
    p.write_text(_bomb(9) + "data:\n  train_file: x\n")
    assert p.stat().st_size < 700  # 10**9 nodes once expanded
    start = time.perf_counter()
    with pytest.raises(SR3DConfigError, match="expands to more than 10000 nodes"):
        load_recipe(p, check_files=False)
    assert time.perf_counter() - start < 2.0
    p.write_text("model: &m {config_overrides: {x: *m}}\n")
    with pytest.raises(SR3DConfigError, match="refers to itself"):
        load_recipe(p, check_files=False)
    with pytest.raises(SR3DConfigError, match="expands to more than"):
        parse_overrides(["model.config_overrides=" + _flow_bomb(6)])


def _flow_bomb(levels: int) -> str:
    items = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    items += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "{" + ", ".join(items) + "}"


def test_scratch_builder_config_files_have_the_same_limit(tmp_path: Path) -> None:
    from sr3d_plugin.builders.scratch import read_config_file

    p = tmp_path / "config.yaml"
    p.write_text(_bomb(9))
    with pytest.raises(SR3DInputError, match="expands to more than"):
        read_config_file(p)


def test_small_anchors_still_work() -> None:
    data = safe_yaml("base: &b {r: 8, alpha: 16}\nlora: *b\n", "test")
    assert data["lora"] == {"r": 8, "alpha": 16}
    with pytest.raises(SR3DConfigError, match="is not valid YAML"):
        safe_yaml("a: [1, 2", "test")
