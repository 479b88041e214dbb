"""The real-VILA case: a folder NVlabs/VILA trained and saved with SR3DImageEncoder loads here and agrees.

The data was recorded by conformance/vila/record_roundtrip.py from the real VILA (see its README);
tests/test_conformance.py replays every case, this file pins what this case must contain.
"""

from __future__ import annotations

import json

import pytest
import torch

from sr3d_plugin.conformance import LOGIT_TOLERANCE, data_root, load_case, run_case

CASE = "vila_sr3d_encoder_roundtrip"


@pytest.fixture(scope="module")
def case_dir():
    folder = data_root() / CASE
    assert (folder / "case.json").is_file(), f"required conformance case {CASE} is not recorded"
    return folder


def test_case_is_a_vila_saved_folder_with_the_sr3d_encoder(case_dir) -> None:
    meta = load_case(case_dir)
    assert meta["runner"] == "sr3d_plugin.conformance.vila_real:run"
    assert meta["recorded_with"]["transformers"].startswith("4.46")
    ckpt = case_dir / "checkpoint"
    assert {p.name for p in ckpt.iterdir()} >= {"llm", "vision_tower", "mm_projector", "perception_encoder",
                                                "region_extractor", "config.json"}  # fmt: skip
    top = json.loads((ckpt / "config.json").read_text())
    assert top["model_type"] == "llava_llama" and top["architectures"] == ["LlavaLlamaModel"]  # VILA's own
    encoder = top["image_encoder"] if isinstance(top["image_encoder"], dict) else json.loads(top["image_encoder"])
    assert encoder["_target_"] == "sr3d_plugin.integrations.vila.SR3DImageEncoder"
    assert meta["vila_reload_max_abs_logit_diff"] <= 1e-6  # VILA rebuilt its own folder faithfully
    # VILA's find_all_linear_names (--lora_enable) wraps the SR-3D Linear layers too (docs/vila.md §2.3)
    assert {"perception_encoder.layers.position_embedding_head.0", "region_extractor.projector"} <= set(
        meta["vila_lora_targets_in_sr3d_parts"]
    )


def test_vila_builder_replays_both_requests(case_dir) -> None:
    results = run_case(case_dir)
    assert [r.detail["tiles"] for r in results] == [9, 3]  # a dynamically tiled image, three frames
    for r in results:
        assert r.detail["input_ids_equal"], r.path
        assert r.tokens_equal and r.max_abs_logit_diff <= LOGIT_TOLERANCE, (r.path, r.max_abs_logit_diff)


def test_the_recorded_logits_depend_on_the_trained_sr3d_parts(case_dir) -> None:
    """The comparison can fail: without the folder's PE (or with the regions swapped) the logits move."""
    from safetensors.torch import load_file

    from sr3d_plugin.builders import load_model
    from sr3d_plugin.conformance.vila_real import _visual

    model, processor = load_model(case_dir / "checkpoint", dtype="float32")
    want = load_file(str(case_dir / "expected.safetensors"))["request0.all_logits"]
    req = json.loads((case_dir / "inputs" / "requests.json").read_text())[0]
    visual = _visual(req, case_dir / "inputs")
    batch = processor(processor.build_prompt(req["question"], visual), visual)
    swapped = dict(batch)
    swapped["region_weights"] = batch["region_weights"].flip(0)
    with torch.no_grad():
        assert (model(**batch).logits[0] - want).abs().max() <= LOGIT_TOLERANCE
        assert (model(**swapped).logits[0] - want).abs().max() > 100 * LOGIT_TOLERANCE
        for p in model.perception_encoder.parameters():
            p.zero_()
        without_pe = model(**batch).logits[0]
    assert (without_pe - want).abs().max() > 100 * LOGIT_TOLERANCE
