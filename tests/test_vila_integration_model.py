"""A VILA model with SR3DImageEncoder equals our SR3DForConditionalGeneration (transformers 5 only).

Tested against a STAND-IN of VILA (``tests/_vila_standin.py``) that shares the LLM, tower and projector
of a tiny SR-3D model. The behaviour of the integration on its own (any transformers ≥ 4.46) is in
test_vila_integration.py; the real VILA is covered by conformance/data/vila_sr3d_encoder_roundtrip.
"""

from __future__ import annotations

import _vila_standin as vs
import numpy as np
import pytest
import torch
from PIL import Image

from sr3d_plugin import Region, VisualInput
from sr3d_plugin.builders import load_model
from sr3d_plugin.errors import SR3DConfigError, SR3DInputError
from sr3d_plugin.integrations.vila import MASK_MEDIA, to_vila_inputs
from sr3d_plugin.testing import build_tiny_model


def _image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pair():
    """Our tiny SR-3D model and a stand-in VILA model sharing its LLM, tower, projector, PE and regions."""
    model, proc = build_tiny_model(seed=0)
    with torch.no_grad():  # a trained-looking PE, so that positions visibly matter
        for p in model.perception_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    vila = vs.build_standin(model, proc)
    vila.perception_encoder.load_state_dict(model.perception_encoder.state_dict())
    vila.region_extractor.load_state_dict(model.region_extractor.state_dict())
    return model, proc, vila.eval()


def _batch(proc):
    a = _image(180, 100, 0)  # 2×1 tiles + thumbnail
    va = VisualInput(
        [a],
        points=torch.rand(1, 100, 180, 3) * 2 - 1,
        regions=[Region.from_box(0, (10, 10, 50, 60), a.size), Region.from_box(0, (100, 20, 170, 90), a.size)],
    )
    frames = [_image(64, 48, s) for s in range(3)]  # multi-view: one tile per frame
    vb = VisualInput(
        frames, points=torch.rand(3, 48, 64, 3) * 2 - 1, regions=[Region.from_box(1, (5, 5, 30, 30), (64, 48))]
    )
    prompts = [proc.build_prompt("Is <mask> left of <mask>?", va), proc.build_prompt("Where is <mask>?", vb)]
    return proc(prompts, [va, vb])


def test_vila_with_sr3d_encoder_reproduces_the_sr3d_model(pair) -> None:
    model, proc, vila = pair
    batch = _batch(proc)
    v = to_vila_inputs(batch, proc)
    assert int((v["input_ids"] == proc.image_token_id).sum()) == batch["pixel_values"].shape[0] == 6
    assert [tuple(m.shape) for m in v["media"][MASK_MEDIA]] == [(3, 4, 4), (3, 4, 4), (3, 4, 4)]
    assert v["media"]["image"][0].shape == (6, 56, 56)  # RGB + xyz travel together
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = vila(input_ids=v["input_ids"], media=v["media"], media_config=v["media_config"],
                      attention_mask=v["attention_mask"]).logits  # fmt: skip
    for b in range(2):
        a = ours[b][batch["attention_mask"][b].bool()]
        assert torch.allclose(a, theirs[b][-a.shape[0] :], atol=1e-4)  # tiles, PE, "\n" ends and regions align
    # the regions matter: swapping the two masks of sample 0 changes its answer logits
    swapped = dict(v["media"])
    swapped[MASK_MEDIA] = [v["media"][MASK_MEDIA][1], v["media"][MASK_MEDIA][0], v["media"][MASK_MEDIA][2]]
    with torch.no_grad():
        other = vila(input_ids=v["input_ids"], media=swapped, media_config=v["media_config"],
                     attention_mask=v["attention_mask"]).logits  # fmt: skip
    assert not torch.allclose(other[0, -1], theirs[0, -1], atol=1e-4)


def test_vila_save_writes_released_layout_that_our_builder_loads(pair, tmp_path) -> None:
    model, proc, vila = pair
    vila.save_pretrained(str(tmp_path))
    assert {p.name for p in tmp_path.iterdir()} >= {"llm", "vision_tower", "mm_projector", "perception_encoder",
                                                     "region_extractor", "config.json"}  # fmt: skip
    loaded, _ = load_model(tmp_path, dtype="float32")
    assert loaded.load_notes == []  # nothing fresh, nothing added: the saved folder is complete
    for part in ("perception_encoder", "region_extractor", "mm_projector"):
        for (k, a), (k2, b) in zip(
            getattr(loaded, part).state_dict().items(), getattr(model, part).state_dict().items()
        ):
            assert k == k2 and torch.equal(a, b)
    batch = _batch(proc)
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, model(**batch).logits, atol=1e-5)
    # a VILA model built from that folder finds its SR-3D parts again (weights_from="auto")
    again = vs.build_standin(model, proc, root=str(tmp_path))
    assert torch.equal(again.perception_encoder.layers.position_embedding_head[3].weight,
                       model.perception_encoder.layers.position_embedding_head[3].weight)  # fmt: skip


def test_errors_name_the_problem(pair) -> None:
    _, proc, vila = pair
    batch = _batch(proc)
    v = to_vila_inputs(batch, proc)
    fewer = {**v["media"], MASK_MEDIA: v["media"][MASK_MEDIA][:2]}
    with pytest.raises(SR3DInputError, match=r"3 <mask> token\(s\) but 2 region mask"):
        vila(input_ids=v["input_ids"], media=fewer, media_config=v["media_config"], attention_mask=v["attention_mask"])
    wrong = {**v["media"], MASK_MEDIA: [m[:2] for m in v["media"][MASK_MEDIA]]}
    with pytest.raises(SR3DInputError, match=r"region 0 covers 2 tile\(s\) but its sample has 3"):
        vila(input_ids=v["input_ids"], media=wrong, media_config=v["media_config"], attention_mask=v["attention_mask"])
    rgb_only = {**v["media"], "image": [t[:3] for t in v["media"]["image"]]}
    with pytest.raises(SR3DInputError, match="carry no positions"):
        vila(
            input_ids=v["input_ids"], media=rgb_only, media_config=v["media_config"], attention_mask=v["attention_mask"]
        )
    s2 = {"image": {"block_sizes": [(2, 1)] + [None] * 5}, "video": {}}
    with pytest.raises(SR3DConfigError, match="dynamic_s2"):
        vila(input_ids=v["input_ids"], media=v["media"], media_config=s2, attention_mask=v["attention_mask"])
    # positions may also come as media_config["image"]["tile_xyz"] with RGB-only tiles
    side = {"image": {"block_sizes": [None] * 6, "tile_xyz": batch["tile_xyz"]}, "video": {}}
    with torch.no_grad():
        a = vila(input_ids=v["input_ids"], media=rgb_only, media_config=side, attention_mask=v["attention_mask"]).logits
        b = vila(input_ids=v["input_ids"], media=v["media"], media_config=v["media_config"],
                 attention_mask=v["attention_mask"]).logits  # fmt: skip
    assert torch.allclose(a, b, atol=1e-5)
