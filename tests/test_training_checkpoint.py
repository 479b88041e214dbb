"""Checkpoint atomicity (a crash while saving leaves no checkpoint-N), resume lookup and CLI text output."""

from __future__ import annotations

import pytest
import torch

from sr3d_plugin.errors import SR3DConfigError
from sr3d_plugin.testing import build_tiny_model
from sr3d_plugin.training.model_setup import prepare_for_training
from sr3d_plugin.training.recipe import load_recipe
from sr3d_plugin.training.trainer import TrainState, _save_checkpoint, find_checkpoint, trained_weights_only


class _Boom(RuntimeError):
    pass


class _FailingProcessor:
    def save_pretrained(self, folder: str) -> None:
        raise _Boom("disk full")


def test_interrupted_save_leaves_no_checkpoint(tmp_path) -> None:
    from accelerate import Accelerator

    recipe, _ = load_recipe({"model": {"preset": "tiny", "dtype": "float32"}, "data": {"generator": "x:y"}})
    model, proc = build_tiny_model(seed=0)
    model, _ = prepare_for_training(model, recipe)
    acc = Accelerator(cpu=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model, opt = acc.prepare(model, opt)
    state = TrainState(global_step=3)
    acc.register_for_checkpointing(state)
    acc.register_save_state_pre_hook(trained_weights_only)
    with pytest.raises(_Boom):
        _save_checkpoint(acc, model, _FailingProcessor(), state, tmp_path, recipe, deepspeed=False)
    assert not (tmp_path / "checkpoint-3").exists()
    assert (tmp_path / ".checkpoint-3.tmp").is_dir()  # removed by the next run's start
    assert find_checkpoint(tmp_path) is None
    path = _save_checkpoint(acc, model, proc, state, tmp_path, recipe, deepspeed=False)
    assert path == tmp_path / "checkpoint-3" and find_checkpoint(tmp_path) == path
    assert not (tmp_path / ".checkpoint-3.tmp").exists()
    files = {p.name for p in path.iterdir()}
    assert {"trainer_state.json", "adapter", "model.safetensors", "optimizer.bin", "recipe.yaml"} <= files
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
    assert keys and all("lora_" in k or "modules_to_save" in k for k in keys)  # trained weights only
    with pytest.raises(SR3DConfigError, match="not a complete checkpoint"):
        find_checkpoint(tmp_path, str(tmp_path / "nothing"))


def test_text_events(capsys) -> None:
    from sr3d_plugin.cli.train_cmd import _print_event

    _print_event(
        {
            "event": "start",
            "device": "cpu",
            "processes": 1,
            "samples": 5,
            "total_steps": 2,
            "output_dir": "x",
            "trainable_params": 10,
            "frozen_params": 20,
            "groups": {"lora": 10},
            "trainable": [{"name": "llm.model.layers.0.self_attn.q_proj.lora_A.default.weight", "numel": 10}],
        }
    )
    _print_event({"event": "log", "step": 1, "epoch": 0.5, "loss": 2.0, "lr": 1e-3})
    out = capsys.readouterr().out
    assert "trainable parameters: 10 (frozen: 20)" in out and "q_proj.lora_A" in out and "loss 2.0000" in out
