"""Model set-up for training: LoRA only on the LLM, trained SR-3D modules, QLoRA on the CPU, the
memory-saving loss, and the memory planner checked against a measured peak."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sr3d_plugin.modeling.inputs import Region, VisualInput
from sr3d_plugin.testing import build_tiny_model
from sr3d_plugin.training.memory import measure_training_step
from sr3d_plugin.training.model_setup import build_model, optimizer_groups, prepare_for_training
from sr3d_plugin.training.recipe import load_recipe


def _recipe(*overrides: str):
    recipe, _ = load_recipe(
        {"model": {"preset": "tiny", "dtype": "float32"}, "data": {"generator": "x:y"}},
        ["training.gradient_checkpointing=true", *overrides],
    )
    return recipe


def _batch(proc, frames: int = 3, size: int = 64, answer: str = "A wooden table next to the wall.") -> dict:
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(frames)]
    regions = [Region.from_box(1, (4, 4, 40, 40), (size, size)), Region.from_box(0, (20, 10, 60, 50), (size, size))]
    vis = VisualInput(imgs, points=torch.rand(frames, size, size, 3) * 2 - 1, regions=regions)
    msgs = [
        {"role": "user", "content": "<image>" * frames + "Is <mask> left of <mask>?"},
        {"role": "assistant", "content": answer},
    ]
    text, spans = proc.assistant_spans(msgs)
    short = [
        {"role": "user", "content": "<image>" * frames + "What is <mask> and <mask>?"},
        {"role": "assistant", "content": "No."},
    ]
    text2, spans2 = proc.assistant_spans(short)
    return proc([text, text2], [vis, vis], supervised_spans=[spans, spans2], padding_side="right")


def _is_peft_layer(module: torch.nn.Module) -> bool:
    return hasattr(module, "lora_A") or type(module).__module__.startswith("peft.tuners")


def test_lora_targets_the_llm_only_even_with_vision_layer_names() -> None:
    # q_proj/k_proj/v_proj/out_proj/fc1/fc2 all exist in SigLIP's attention and MLP
    recipe = _recipe("lora.target_modules=[q_proj,k_proj,v_proj,out_proj,fc1,fc2,o_proj]")
    model, _, _ = build_model(recipe)
    model, report = prepare_for_training(model, recipe)
    wrapped = [n for n, m in model.named_modules() if _is_peft_layer(m) and hasattr(m, "lora_A")]
    assert wrapped and all(".llm." in n for n in wrapped)
    assert not any("vision_tower" in n for n, m in model.named_modules() if _is_peft_layer(m))
    names = [n for n, _ in report.trainable]
    assert not any("vision_tower" in n for n in names)
    assert any(n.startswith("llm.") and "lora_A" in n for n in names)
    for mod in ("perception_encoder", "mm_projector", "region_extractor"):
        assert any(n.startswith(mod + ".") for n in names), mod
    assert set(report.groups) == {"lora", "perception_encoder", "mm_projector", "region_extractor"}
    # the trap this avoids: a bare name list also adapts the vision tower
    from peft import LoraConfig, get_peft_model

    naive, _ = build_tiny_model(seed=0)
    naive = get_peft_model(naive, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert any("vision_tower" in n for n, m in naive.named_modules() if hasattr(m, "lora_A"))


def test_frozen_vision_tower_keeps_no_activations() -> None:
    recipe = _recipe()
    model, proc, _ = build_model(recipe)
    model, _ = prepare_for_training(model, recipe)
    model.train()
    batch = _batch(proc)
    vt = model.get_base_model().vision_tower
    out = vt(batch["pixel_values"], output_hidden_states=True)
    assert not out.last_hidden_state.requires_grad  # transformers' input-require-grads hook was removed
    loss = model(**batch).loss
    loss.backward()
    assert all(p.grad is None for p in vt.parameters())
    pe = model.get_base_model().perception_encoder
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pe.parameters())


def test_label_position_loss_equals_full_loss() -> None:
    model, proc = build_tiny_model(seed=1)
    batch = _batch(proc)
    model.train()
    n_items = torch.tensor(7.0)  # gradient-accumulation normalisation is honoured too
    results = []
    for keep in (False, True):
        for extra in ({}, {"num_items_in_batch": n_items}):
            model.zero_grad()
            out = model(**batch, loss_on_label_positions=keep, **extra)
            out.loss.backward()
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            results.append((out.loss.detach(), grads, out.logits.shape))
    for i in (0, 1):
        full, lean = results[i], results[i + 2]
        assert torch.allclose(full[0], lean[0], atol=1e-6)
        assert len(full[1]) == len(lean[1])
        for a, b in zip(full[1], lean[1]):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    assert results[0][2] == (*batch["input_ids"].shape, model.config.text_config.vocab_size)
    assert results[2][2] == (supervised, model.config.text_config.vocab_size)
    model.eval()  # evaluation keeps full logits unless asked otherwise
    with torch.no_grad():
        assert model(**batch).logits.shape[:2] == batch["input_ids"].shape


def test_optimizer_groups_split_lora_and_modules() -> None:
    recipe = _recipe("training.learning_rate=1e-4", "training.modules_learning_rate=3e-5", "training.weight_decay=0.1")
    model, _, _ = build_model(recipe)
    model, report = prepare_for_training(model, recipe)
    groups = optimizer_groups(model, recipe)
    assert sum(p.numel() for g in groups for p in g["params"]) == report.trainable_params
    assert {(g["lr"], g["weight_decay"]) for g in groups} >= {(1e-4, 0.1), (3e-5, 0.1), (3e-5, 0.0)}


def test_qlora_on_cpu_trains_lora_and_survives_an_inference_repack(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    recipe = _recipe("quantization.load_in_4bit=true", "quantization.compute_dtype=float32", "lora.dropout=0")
    model, proc, _ = build_model(recipe, base_dir=tmp_path / "base")
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["llm.model.layers.0.mlp.down_proj"] == "Linear4bit"
    assert not any(v == "Linear4bit" for n, v in kinds.items() if not n.startswith("llm.model."))
    batch = _batch(proc)

    def lora_b_grads(m) -> dict[str, torch.Tensor]:
        m.train()
        m.zero_grad()
        m(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if "lora_B" in n}

    torch.manual_seed(0)  # same LoRA initialisation for both models
    ref_model, _ = prepare_for_training(model, recipe)
    ref = lora_b_grads(ref_model)
    assert len(ref) == 2 * 7 and all(g.abs().sum() > 0 for g in ref.values())

    # the trap: a no-grad eval pass on an AVX512-BF16 CPU repacks every 4-bit weight in place (we apply
    # bitsandbytes' own conversion, as that pass would); prepare_for_training must undo it
    model2, _, _ = build_model(recipe, base_dir=tmp_path / "base")
    packed = 0
    for m in model2.modules():
        if type(m).__name__ == "Linear4bit":
            m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)
            packed += 1
    assert packed == 14
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        model2, _ = prepare_for_training(model2, recipe)
    assert any("repacked" in str(w.message) for w in caught)
    assert not any(
        getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
        for m in model2.modules()
    )
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model2.modules())
    got = lora_b_grads(model2)
    assert got.keys() == ref.keys()
    for name, g in got.items():
        assert g.abs().sum() > 0, name
        # the inverse repacking re-quantises the absmax constants: close to, not exactly, the original weights
        assert (g - ref[name]).abs().max() <= 0.02 * ref[name].abs().max(), name
    shutil.rmtree(tmp_path / "base")


@pytest.mark.parametrize(("checkpointing", "frames"), [(True, 16), (False, 16), (True, 32)])
def test_memory_plan_matches_measured_peak(checkpointing: bool, frames: int) -> None:
    """The planner's allocated-bytes estimate vs the measured peak of live tensor storages on the CPU.

    Measured: :class:`LiveTensorMeter` tracks every tensor storage torch allocates during a full
    training step (forward, backward, optimizer step) plus the weights, optimizer states and inputs
    already alive — the CPU analogue of ``torch.cuda.max_memory_allocated``.
    """
    recipe = _recipe(
        f"training.gradient_checkpointing={str(checkpointing).lower()}",
        "lora.r=8",
        "lora.dropout=0.05",
        f"data.num_frames={frames}",
    )
    recipe.model.config_overrides = {"tile_size": 112, "llm_hidden": 128, "llm_layers": 4, "vision_hidden": 64}
    plan, peak = measure_training_step(recipe, frames)
    ratio = plan.allocated_peak_bytes / peak
    assert 0.85 < ratio < 1.15, (plan.to_dict(), peak)
