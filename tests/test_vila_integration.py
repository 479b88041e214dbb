"""SR3DImageEncoder inside a VILA model, tested against a STAND-IN of VILA (``tests/_vila_standin.py``).

These tests need only the core and transformers ≥ 4.46 — CI runs them twice: in the project venv
(transformers 5) and in a second venv with VILA's pin, transformers 4.46.0, where the package is
installed as docs/vila.md says. The stand-in is built from plain transformers parts (no SR-3D model
class); the comparisons with ``SR3DForConditionalGeneration`` are in test_vila_integration_model.py,
and the real VILA is covered by the recorded case conformance/data/vila_sr3d_encoder_roundtrip.
"""

from __future__ import annotations

import json

import _vila_standin as vs
import numpy as np
import pytest
import torch
from PIL import Image

from sr3d_plugin.errors import SR3DConfigError, SR3DInputError
from sr3d_plugin.integrations.vila import MASK_MEDIA, SR3DRegionEncoder, pack_sample, pack_tiles
from sr3d_plugin.modeling.inputs import Region
from sr3d_plugin.pointmap import image_token_positions
from sr3d_plugin.tiling import plan_tiles

PROMPTS = ("Is <mask> left of <mask>?", "Where is <mask>?")


def _image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def vila():
    model = vs.build_standin_from_parts(seed=0)
    with torch.no_grad():  # a trained-looking PE, so that positions visibly matter
        for p in model.perception_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


def _samples(vila):
    """Two samples as a VILA data pipeline would pack them: (ids, media dict) each."""
    ip = vila.vision_tower.image_processor
    a = _image(180, 100, 0)  # 2×1 tiles + thumbnail
    pa = torch.rand(100, 180, 3) * 2 - 1
    ra = [Region.from_box(0, (10, 10, 50, 60), a.size), Region.from_box(0, (100, 20, 170, 90), a.size)]
    sa = pack_sample(vs.image_tiles(a, ip), pa, ra, image_size=a.size, max_tiles=6)
    b = _image(64, 48, 5)  # one tile
    sb = pack_sample(vs.image_tiles(b, ip), torch.rand(48, 64, 3) * 2 - 1, [Region.from_box(0, (5, 5, 30, 30), b.size)],
                     image_size=b.size, max_tiles=6)  # fmt: skip
    out = []
    for sample, question in zip((sa, sb), PROMPTS):
        text = (
            "<|im_start|>user\n" + "<image>\n" * len(sample["image"]) + question + "<|im_end|>\n<|im_start|>assistant\n"
        )
        out.append((torch.tensor(vila.tokenizer(text).input_ids), sample))
    return out, (a, pa)


def _forward(vila, ids, sample, **media_config):
    config = {"image": {"block_sizes": [None] * len(sample["image"]), **media_config}, "video": {}}
    media = {"image": sample["image"], MASK_MEDIA: sample[MASK_MEDIA]}
    with torch.no_grad():
        return vila(input_ids=ids[None], media=media, media_config=config).logits[0]


def test_encoder_adds_the_pe_before_the_projector_and_ends_every_tile_with_newline(vila) -> None:
    (pairs, (image, points)) = _samples(vila)
    tiles = pairs[0][1]["image"]
    assert len(tiles) == 3 and tiles[0].shape == (6, 56, 56)  # RGB + xyz travel together
    out = vila.encoders["image"](tiles, {"block_sizes": [None] * 3})
    rgb = torch.stack(tiles)[:, :3]
    feats = vila.vision_tower.vision_tower(rgb, output_hidden_states=True).hidden_states[-2]  # layer −2, all tokens
    xyz = image_token_positions(points, plan_tiles(*image.size, 1, 6, 56, True), grid=4)
    pe = vila.perception_encoder(xyz.reshape(3, -1, 3))
    newline = vila.llm.model.embed_tokens(torch.tensor(vila.tokenizer("\n", add_special_tokens=False).input_ids))
    with torch.no_grad():
        for t in range(3):
            want = torch.cat([vila.mm_projector((feats + pe)[t : t + 1])[0], newline])
            assert torch.allclose(out[t], want, atol=1e-5)
        # and the positions matter: other xyz, other tokens
        moved = [torch.cat([t[:3], t[3:].flip(-1)]) for t in tiles]
        assert not torch.allclose(vila.encoders["image"](moved, {})[0], out[0], atol=1e-3)


def test_regions_are_pooled_from_the_pe_augmented_tokens_of_their_own_sample(vila) -> None:
    (pairs, _) = _samples(vila)
    ids, sample = pairs[0]
    logits = _forward(vila, ids, sample)
    swapped = {**sample, MASK_MEDIA: sample[MASK_MEDIA][::-1]}
    assert not torch.allclose(_forward(vila, ids, swapped)[-1], logits[-1], atol=1e-4)
    # the region encoder's output is the projected, mask-weighted average of the image encoder's features
    from sr3d_plugin.modeling.region_extractor import mask_weights

    enc = vila._sr3d_image_encoder
    with enc.forward_pass([(0, 3), (0, 3)]) as state:
        vila.encoders["image"](sample["image"], {})
        got = vila.encoders[MASK_MEDIA](sample[MASK_MEDIA], {})
        feats = state.features
    w = mask_weights(sample[MASK_MEDIA][0].float().unsqueeze(1), 4)
    want = vila.region_extractor.projector(w @ feats.reshape(-1, feats.shape[-1]))
    assert torch.allclose(got[0], want, atol=1e-6)


def test_mask_is_a_media_token_and_modules_belong_to_the_parent(vila) -> None:
    tok = vila.tokenizer
    assert tok.media_tokens[MASK_MEDIA] == "<mask>" and tok.media_token_ids[MASK_MEDIA] == tok.convert_tokens_to_ids(
        "<mask>"
    )
    assert MASK_MEDIA not in vs.MEDIA_TOKENS  # VILA's module constant is left alone
    assert isinstance(vila.encoders[MASK_MEDIA], SR3DRegionEncoder)
    names = {n for n, _ in vila.named_parameters()}
    assert {"perception_encoder.layers.position_embedding_head.0.weight", "region_extractor.projector.weight"} <= names
    assert not any("encoders" in n or "_sr3d" in n for n in names)


def test_training_through_the_vila_collator_reaches_pe_and_regions(vila) -> None:
    (pairs, _) = _samples(vila)
    instances = [{"input_ids": ids, "labels": ids.clone(), **sample} for ids, sample in pairs]
    vila.tokenizer.padding_side = "right"
    collated = vs.collate(instances, vila.tokenizer)  # media_config only has "image" and "video", as in VILA
    assert set(collated["media_config"]) == {"image", "video"} and len(collated["media"][MASK_MEDIA]) == 3
    vila.train()
    try:
        vila.zero_grad()
        vila(**collated).loss.backward()
        assert vila.perception_encoder.layers.position_embedding_head[0].weight.grad.abs().sum() > 0
        assert vila.region_extractor.projector.weight.grad.abs().sum() > 0
        # a batch without regions still gives the region extractor a (zero) gradient: DDP needs all params
        vila.zero_grad()
        mask_id = vila.tokenizer.convert_tokens_to_ids("<mask>")
        plain = []
        for inst in instances:
            ids = inst["input_ids"].masked_fill(inst["input_ids"] == mask_id, 0)
            plain.append({**inst, "input_ids": ids, "labels": ids.clone(), MASK_MEDIA: []})
        vila(**vs.collate(plain, vila.tokenizer)).loss.backward()
        assert vila.region_extractor.projector.weight.grad is not None
    finally:
        vila.eval()
        vila.zero_grad()
        vila.tokenizer.padding_side = "left"


def test_vila_save_writes_the_released_layout_and_a_rebuilt_vila_loads_it(vila, tmp_path) -> None:
    from safetensors.torch import load_file

    vila.save_pretrained(str(tmp_path))
    assert {p.name for p in tmp_path.iterdir()} >= {"llm", "vision_tower", "mm_projector", "perception_encoder",
                                                     "region_extractor", "config.json"}  # fmt: skip
    pe = load_file(str(tmp_path / "perception_encoder" / "model.safetensors"))
    assert set(pe) == {f"layers.position_embedding_head.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")}
    assert set(load_file(str(tmp_path / "region_extractor" / "model.safetensors"))) == {
        "projector.weight",
        "projector.bias",
    }
    top = json.loads((tmp_path / "config.json").read_text())
    assert top["perception_encoder"] == "abs_mlp" and top["region_extractor"] == "regiongpt"
    again = vs.build_standin_from_parts(seed=1, root=str(tmp_path))  # weights_from="auto": found, not fresh
    for part in ("perception_encoder", "region_extractor"):
        for (k, a), (k2, b) in zip(getattr(again, part).state_dict().items(), getattr(vila, part).state_dict().items()):
            assert k == k2 and torch.equal(a, b)


def test_errors_name_the_problem(vila) -> None:
    (pairs, _) = _samples(vila)
    ids, sample = pairs[0]
    with pytest.raises(SR3DInputError, match=r"2 <mask> token\(s\) but 1 region mask"):
        _forward(vila, ids, {**sample, MASK_MEDIA: sample[MASK_MEDIA][:1]})
    with pytest.raises(SR3DInputError, match=r"region 0 covers 2 tile\(s\) but its sample has 3"):
        _forward(vila, ids, {**sample, MASK_MEDIA: [m[:2] for m in sample[MASK_MEDIA]]})
    rgb_only = {**sample, "image": [t[:3] for t in sample["image"]]}
    with pytest.raises(SR3DInputError, match="carry no positions"):
        _forward(vila, ids, rgb_only)
    with pytest.raises(SR3DConfigError, match="dynamic_s2"):
        vila(input_ids=ids[None], media={"image": sample["image"], MASK_MEDIA: sample[MASK_MEDIA]},
             media_config={"image": {"block_sizes": [(2, 1), None, None]}, "video": {}})  # fmt: skip
    with pytest.raises(SR3DConfigError, match=r"encoder\(images, config\)"):  # the SR-3D fork's call
        vila.encoders["image"](sample["image"], torch.rand(3, 4, 4, 3), sample[MASK_MEDIA], {})
    # positions may also come as media_config["image"]["tile_xyz"] with RGB-only tiles
    xyz = torch.stack([t[3:6, ::14, ::14].permute(1, 2, 0) for t in sample["image"]])
    assert torch.allclose(_forward(vila, ids, rgb_only, tile_xyz=xyz), _forward(vila, ids, sample), atol=1e-6)


def test_pack_tiles_roundtrips_grid_positions() -> None:
    pv = torch.randn(2, 3, 56, 56)
    xyz = torch.rand(2, 4, 4, 3)
    packed = pack_tiles(pv, xyz)
    assert packed.shape == (2, 6, 56, 56) and torch.equal(packed[:, :3], pv)
    pooled = torch.nn.functional.adaptive_avg_pool2d(packed[:, 3:], 4).permute(0, 2, 3, 1)
    assert torch.allclose(pooled, xyz, atol=1e-6)
    with pytest.raises(SR3DInputError, match="tile_xyz must be"):
        pack_tiles(pv, torch.rand(3, 4, 4, 3))


def test_pack_sample_checks_the_tile_plan_and_regions() -> None:
    tiles = torch.randn(3, 3, 56, 56)
    points = torch.rand(100, 180, 3)
    with pytest.raises(SR3DInputError, match=r"3 RGB tile\(s\) but a 180×100 image makes 1 tile"):
        pack_sample(tiles, points, image_size=(180, 100), max_tiles=1)
    far = Region(masks={1: np.ones((100, 180), dtype=bool)})  # a region on a frame this image does not have
    with pytest.raises(SR3DInputError, match="region 0 covers no pixel"):
        pack_sample(tiles, points, [far], image_size=(180, 100), max_tiles=6)
    frames = pack_sample(torch.randn(2, 3, 56, 56), torch.rand(2, 48, 64, 3), [far], multi_view=True)
    assert [tuple(m.shape) for m in frames[MASK_MEDIA]] == [(2, 56, 56)]
    assert not frames[MASK_MEDIA][0][0].any() and frames[MASK_MEDIA][0][1].all()  # zeros on the other frame


def test_fresh_parts_are_initialised_even_under_vila_no_init_weights(monkeypatch) -> None:
    """VILA builds models under transformers' no_init_weights, which makes torch.nn.init a no-op."""
    sentinel = float("nan")

    def poisoned(tensor, *args, **kwargs):  # what a skipped init leaves: whatever memory held
        with torch.no_grad():
            return tensor.fill_(sentinel)

    for name in ("xavier_uniform_", "kaiming_uniform_", "uniform_", "zeros_", "ones_", "normal_"):
        monkeypatch.setattr(torch.nn.init, name, poisoned)
    model = vs.build_standin_from_parts(seed=0, weights_from=None)
    monkeypatch.undo()
    pe = model.perception_encoder.layers.position_embedding_head
    assert torch.isfinite(pe[0].weight).all() and 0 < pe[0].weight.abs().max() < 0.01  # xavier gain 0.001
    assert torch.equal(pe[1].weight, torch.ones_like(pe[1].weight)) and not pe[0].bias.any()
    assert torch.isfinite(model.region_extractor.projector.weight).all()


def test_fresh_parts_are_the_same_in_every_process() -> None:
    """VILA's LoRA loader rebuilds the base and adds the deltas: a fresh PE must not depend on the global RNG."""
    torch.manual_seed(1)
    a = vs.build_standin_from_parts(seed=0, weights_from=None)
    torch.manual_seed(2)
    b = vs.build_standin_from_parts(seed=0, weights_from=None)
    for part in ("perception_encoder", "region_extractor"):
        for x, y in zip(getattr(a, part).state_dict().values(), getattr(b, part).state_dict().values()):
            assert torch.equal(x, y)
    assert a.region_extractor.projector.weight.std() > 0  # and not constant
