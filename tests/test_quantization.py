"""Quantised (bitsandbytes, CPU) and mixed-precision loading through every builder.

Tiny models whose LLM linear layers are at least 64 wide (narrower ones fail at the first 4-bit
inference on CPU, SR3D-FACTS §9).
"""

from __future__ import annotations

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sr3d_plugin import Region, SR3DForConditionalGeneration, VisualInput
from sr3d_plugin.builders import load_model
from sr3d_plugin.builders import quantization as q
from sr3d_plugin.errors import SR3DConfigError
from sr3d_plugin.testing import (
    build_tiny_model,
    write_tiny_clip_vision,
    write_tiny_llava_hf,
    write_tiny_llava_original,
    write_tiny_vila_checkpoint,
)

_SCRATCH = """
tokenizer: tiny
tile_size: 56
vision_config: {model_type: siglip_vision_model, hidden_size: 32, intermediate_size: 64,
                num_hidden_layers: 1, num_attention_heads: 2, image_size: 56, patch_size: 14}
text_config: {model_type: qwen2, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
              num_attention_heads: 4, num_key_value_heads: 4}
"""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    model, proc = build_tiny_model(seed=1)
    model.save_pretrained(root / "native")
    proc.save_pretrained(root / "native")
    (root / "scratch.yaml").write_text(_SCRATCH)
    clip = write_tiny_clip_vision(root / "clip")
    return {
        "sr3d": root / "native",
        "vila": write_tiny_vila_checkpoint(root / "vila", dtype="float32"),
        "llava_hf": write_tiny_llava_hf(root / "llava", "llava"),
        "llava_original": write_tiny_llava_original(root / "orig", clip, weights="safetensors"),
        "scratch": root / "scratch.yaml",
    }


def _batch(proc):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 180, 3), dtype=np.uint8))
    vis = VisualInput(
        [img], points=torch.rand(1, 100, 180, 3) * 2 - 1, regions=[Region.from_box(0, (10, 10, 60, 60), img.size)]
    )
    return proc(proc.build_prompt("Where is <mask>?", vis), vis)


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("builder", ["sr3d", "vila", "llava_hf", "llava_original", "scratch"])
def test_4bit_quantises_the_llm_only_for_every_builder(folders, builder) -> None:
    path = folders[builder]
    model, proc = load_model(path, builder=builder, load_in_4bit=True, dtype="float32")
    linears = _linears(model)
    body = {n: m for n, m in linears.items() if n.startswith("llm.model.")}
    rest = {n: m for n, m in linears.items() if not n.startswith("llm.model.")}
    assert body and all(isinstance(m, bnb.nn.Linear4bit) for m in body.values())
    assert {n.split(".")[0] for n in rest} >= {"vision_tower", "mm_projector", "perception_encoder", "region_extractor"}
    assert "llm.lm_head" in rest
    for name, module in rest.items():
        assert not isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)), name
        assert module.weight.dtype == torch.float32, name
    qc = model.config.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    assert qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"] is True
    if builder in ("vila", "sr3d"):  # compare with the full-precision model of the same folder
        full, _ = load_model(path, builder=builder, dtype="float32")
        batch = _batch(proc)
        with torch.no_grad():
            a = full(**batch).logits.flatten()
            b = model(**batch).logits.flatten()
        assert torch.isfinite(b).all()
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.97
        assert (a - b).norm() < 0.25 * a.norm()


def test_8bit_on_cpu_and_from_pretrained_routing(folders) -> None:
    q.check_bitsandbytes(8, "cpu")  # bitsandbytes 0.50 runs LLM.int8 on CPU
    model = SR3DForConditionalGeneration.from_pretrained(str(folders["vila"]), load_in_8bit=True, dtype="float32")
    assert all(isinstance(m, bnb.nn.Linear8bitLt) for n, m in _linears(model).items() if n.startswith("llm.model."))
    assert type(model.mm_projector.layers[2]) is nn.Linear
    full, proc = load_model(folders["vila"], dtype="float32")
    batch = _batch(proc)
    with torch.no_grad():
        a = full(**batch).logits.flatten()
        b = model(**batch).logits.flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99


def test_missing_or_broken_bitsandbytes_is_a_clear_error(monkeypatch, folders) -> None:
    import sys

    q._probe.cache_clear()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # "not installed"
    try:
        with pytest.raises(SR3DConfigError, match=r"load_in_8bit=True needs bitsandbytes with 8-bit support on cpu"):
            load_model(folders["vila"], load_in_8bit=True)
    finally:
        q._probe.cache_clear()
    with pytest.raises(SR3DConfigError, match="both set"):
        load_model(folders["vila"], load_in_4bit=True, load_in_8bit=True)


def test_user_quantization_config_gets_the_skip_list_and_dtypes_are_applied(folders) -> None:
    from transformers import BitsAndBytesConfig

    model, _ = load_model(folders["vila"], quantization_config=BitsAndBytesConfig(load_in_4bit=True), dtype="float32")
    assert type(model.perception_encoder.layers.position_embedding_head[0]) is nn.Linear
    assert isinstance(model.llm.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    half, _ = load_model(folders["vila"], dtype="float16")
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    default, _ = load_model(folders["llava_hf"])  # the checkpoint's own dtype
    assert default.dtype == torch.float32
    with pytest.raises(SR3DConfigError, match=r"unsupported dtype 'float8'"):
        load_model(folders["vila"], dtype="float8")


def test_device_placement_is_decided_in_one_place() -> None:
    from sr3d_plugin.devices import device_of, placement_map, resolve_device

    auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == auto and resolve_device("auto").type == auto
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(SR3DConfigError, match=r"unknown device 'gpu'"):
        resolve_device("gpu")
    assert placement_map("cpu") == {"": "cpu"}
    assert placement_map("cuda") == {"": 0} and placement_map(torch.device("cuda", 2)) == {"": 2}
    assert device_of(placement_map("cuda:3")) == "cuda:3" and device_of(placement_map("cpu")) == "cpu"
    assert device_of(None) == "cpu" and device_of("auto") == auto and device_of("cuda:1") == "cuda:1"
