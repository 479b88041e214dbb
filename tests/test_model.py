"""SR3DForConditionalGeneration + SR3DProcessor on a tiny random model (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from sr3d_plugin import Region, SR3DConfig, SR3DForConditionalGeneration, VisualInput, hookimpl, plugins
from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.testing import build_tiny_model, build_tiny_tokenizer, tiny_sr3d_config


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny_model(seed=0)
    return model, processor


def _image(w: int = 180, h: int = 100, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _single(regions: int = 1, w: int = 180, h: int = 100) -> VisualInput:
    img = _image(w, h)
    regs = [Region.from_box(0, (10 + 30 * k, 10, 50 + 30 * k, 60), img.size) for k in range(regions)]
    return VisualInput([img], points=torch.rand(1, h, w, 3) * 2 - 1, regions=regs)


def _frames(v: int = 4) -> VisualInput:
    imgs = [_image(64, 48, seed=s) for s in range(v)]
    region = Region.from_box(2, (5, 5, 30, 30), imgs[0].size)
    return VisualInput(imgs, points=torch.rand(v, 48, 64, 3) * 2 - 1, regions=[region])


def test_token_accounting_and_vila_layout(tiny) -> None:
    model, proc = tiny
    vis = _single(regions=0)
    batch = proc(proc.build_prompt("What is this?", vis), vis)
    tiles = proc.num_tiles(vis)
    assert tiles == 3  # 2×1 grid + thumbnail for a 180×100 image at tile 56
    ids = batch["input_ids"][0].tolist()
    image_id = proc.image_token_id
    n = model.config.tokens_per_tile
    assert ids.count(image_id) == tiles * n
    assert batch["pixel_values"].shape[0] == tiles and batch["tile_xyz"].shape == (tiles, 4, 4, 3)
    # every tile: N placeholders, then the encoder's end-of-tile "\n", then the prompt's "\n"
    nl = proc.tokenizer("\n", add_special_tokens=False)["input_ids"]
    first = ids.index(image_id)
    for t in range(tiles):
        start = first + t * (n + 2 * len(nl))
        assert ids[start : start + n] == [image_id] * n
        assert ids[start + n : start + n + 2 * len(nl)] == nl + nl
    after = first + tiles * (n + 2 * len(nl))
    assert proc.tokenizer.decode(ids[after:]).startswith("What is this?")
    out = model(**batch)
    assert out.image_features.shape == (tiles, 16, model.config.vision_hidden_size)


def test_multiview_frames_are_one_tile_each_and_region_spans_frames(tiny) -> None:
    model, proc = tiny
    vis = _frames(4)
    batch = proc(proc.build_prompt("Where is <mask>?", vis), vis)
    assert proc.num_tiles(vis) == 4
    assert batch["pixel_values"].shape[0] == 4
    w = batch["region_weights"]
    assert w.shape == (1, 4, 16)
    assert torch.allclose(w.sum(), torch.tensor(1.0), atol=1e-5)
    assert w[0, [0, 1, 3]].abs().sum() == 0 and w[0, 2].sum() > 0.99  # only frame 2 carries the box
    out = model(**batch)
    expected = model.region_extractor.projector((w[0] * 1.0).reshape(-1) @ out.image_features.reshape(-1, 32))
    assert torch.allclose(out.region_embeddings[0], expected, atol=1e-5)


def test_region_aliases_select_regions_in_order(tiny) -> None:
    _, proc = tiny
    vis = _single(regions=2)
    b_alias = proc(proc.build_prompt("Is <region1> left of <region0>?", vis), vis)
    b_plain = proc(proc.build_prompt("Is <mask> left of <mask>?", vis), vis)
    assert torch.equal(b_alias["region_weights"][0], b_plain["region_weights"][1])
    assert torch.equal(b_alias["region_weights"][1], b_plain["region_weights"][0])
    assert torch.equal(b_alias["input_ids"], b_plain["input_ids"])


def test_batched_left_padding_matches_single_requests(tiny) -> None:
    model, proc = tiny
    a, b = _single(1), _frames(3)
    pa, pb = proc.build_prompt("Is <mask> red?", a), proc.build_prompt("Describe <mask> in detail please.", b)
    both = proc([pa, pb], [a, b], padding_side="left")
    one_a, one_b = proc(pa, a), proc(pb, b)
    with torch.no_grad():
        la = model(**both).logits
        ra, rb = model(**one_a).logits, model(**one_b).logits
    assert torch.allclose(la[0, -1], ra[0, -1], atol=1e-4)
    assert torch.allclose(la[1, -1], rb[0, -1], atol=1e-4)
    gen = model.generate(**both, max_new_tokens=4, do_sample=False)
    gen_a = model.generate(**one_a, max_new_tokens=4, do_sample=False)
    assert gen[0, -4:].tolist() == gen_a[0, -4:].tolist()


def test_position_encoding_changes_features_only_through_positions(tiny) -> None:
    model, proc = tiny
    vis = _single(regions=0)
    batch = proc(proc.build_prompt("Hi", vis), vis)
    with torch.no_grad():
        base = model.get_vision_features(batch["pixel_values"], batch["tile_xyz"])
        moved = model.get_vision_features(batch["pixel_values"], batch["tile_xyz"] + 0.5)
        plain = model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states[-2]
        pe = model.perception_encoder(batch["tile_xyz"].reshape(3, -1, 3))
    assert torch.allclose(base, plain + pe, atol=1e-6)
    assert not torch.allclose(base, moved)


def test_errors_for_bad_requests(tiny) -> None:
    _, proc = tiny
    vis = _single(regions=1)
    with pytest.raises(SR3DInputError, match=r"2 <mask> token\(s\) but 1 region"):
        proc(proc.build_prompt("<mask> or <mask>?", vis), vis)
    with pytest.raises(SR3DInputError, match="refers to <region3>"):
        proc(proc.build_prompt("<region3>?", vis), vis)
    img = _image()
    with pytest.raises(SR3DInputError, match="frame 5"):
        VisualInput([img], points=torch.zeros(1, 100, 180, 3), regions=[Region({5: np.ones((100, 180), bool)})])
    with pytest.raises(SR3DInputError, match="empty mask"):
        Region({0: np.zeros((100, 180), bool)})
    with pytest.raises(SR3DInputError, match="outside"):
        Region.from_box(0, (500, 10, 600, 50), img.size)
    with pytest.raises(SR3DInputError, match="no 3D positions"):
        no_points = VisualInput([img])
        proc(proc.build_prompt("Hi", no_points), no_points)
    with pytest.raises(SR3DInputError, match="marker"):
        proc("<image><image> two markers", _single(regions=0))


def test_model_checks_placeholder_counts(tiny) -> None:
    model, proc = tiny
    vis = _single(regions=0)
    batch = proc(proc.build_prompt("Hi", vis), vis)
    ids = batch["input_ids"].clone()
    slots = (ids == proc.image_token_id).nonzero()
    ids[slots[0, 0], slots[0, 1]] = 0  # one image placeholder too few
    with pytest.raises(SR3DInputError, match="image placeholder"):
        model(input_ids=ids, pixel_values=batch["pixel_values"], tile_xyz=batch["tile_xyz"])
    with pytest.raises(SR3DInputError, match="3D positions"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])


def test_save_load_roundtrip_with_auto_classes(tiny, tmp_path) -> None:
    model, proc = tiny
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    assert AutoConfig.from_pretrained(tmp_path).model_type == "sr3d"
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    loaded_proc = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, SR3DForConditionalGeneration)
    assert loaded_proc.tokens_per_tile == proc.tokens_per_tile and loaded_proc.tile_size == proc.tile_size
    vis = _frames(3)
    prompt = proc.build_prompt("Where is <mask>?", vis)
    b1, b2 = proc(prompt, vis), loaded_proc(prompt, vis)
    assert all(torch.equal(b1[k], b2[k]) for k in b1)
    with torch.no_grad():
        assert torch.allclose(model(**b1).logits, loaded(**b2).logits, atol=1e-5)


def test_training_forward_has_gradients_everywhere_without_regions(tiny) -> None:
    model, proc = tiny
    vis = _single(regions=0)
    text, spans = proc.assistant_spans(
        [{"role": "user", "content": proc.user_content("What?", vis)}, {"role": "assistant", "content": "Left."}]
    )
    batch = proc(text, vis, supervised_spans=[spans])
    labelled = [t for t in batch["labels"][0].tolist() if t != -100]
    assert proc.tokenizer.decode(labelled).startswith("Left.")
    model.train()
    try:
        model.zero_grad()
        model(**batch).loss.backward()
        assert model.region_extractor.projector.weight.grad is not None
        assert model.perception_encoder.layers.position_embedding_head[0].weight.grad is not None
    finally:
        model.eval()
        model.zero_grad()


def test_third_party_projector_selected_by_name_in_config() -> None:
    class Doubling(torch.nn.Module):
        def __init__(self, c: int, h: int) -> None:
            super().__init__()
            self.layers = torch.nn.Linear(c, h)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * self.layers(x)

    class Plugin:
        @hookimpl
        def register_projectors(self, register):
            register("doubling_linear", Doubling)

    name = plugins.register_plugin(Plugin(), name="doubling-test")
    try:
        tok = build_tiny_tokenizer()
        config = tiny_sr3d_config(tok, projector_type="doubling_linear")
        model = SR3DForConditionalGeneration(config)
        assert isinstance(model.mm_projector, Doubling)
        assert config.tokens_per_tile == 16  # inferred by probing the unknown projector
        assert isinstance(SR3DConfig.from_dict(config.to_dict()), SR3DConfig)
    finally:
        plugins.unregister_plugin(name)


def test_fresh_position_encoder_uses_xavier_gain_from_config() -> None:
    model, _ = build_tiny_model(seed=1)
    c = model.config.vision_hidden_size
    bound = model.config.pe_init_gain * (6 / (51 + c)) ** 0.5
    first = model.perception_encoder.layers.position_embedding_head[0].weight.detach()
    assert float(first.abs().max()) <= bound + 1e-12
    assert float(first.abs().max()) > bound / 2  # initialised, not zero


@pytest.mark.parametrize("kind", ["single_tile", "grid_with_thumbnail", "multi_view"])
def test_processor_positions_come_from_the_pixels_under_each_token(tiny, kind: str) -> None:
    """PE alignment end to end: a point map holding pixel coordinates goes through SR3DProcessor; the
    position given to vision token (r, c) of every tile must be the centre of the pixels under it."""
    _, proc = tiny
    s, g = proc.tile_size, proc.grid_size
    sizes = {"single_tile": [(56, 56)], "grid_with_thumbnail": [(170, 60)], "multi_view": [(64, 48)] * 3}[kind]
    images = [_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    points = []
    for w, h in sizes:
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
        )
        points.append(torch.stack([xs, ys, torch.zeros_like(xs)], -1))
    visual = VisualInput(images, points=torch.stack(points))
    layouts = proc.layouts(visual)
    xyz = proc(proc.build_prompt("Hi", visual), visual)["tile_xyz"]
    assert xyz.shape == (sum(lay.num_tiles for lay in layouts), g, g, 3)
    t = 0
    centers = torch.arange(g, dtype=torch.float32) * (s / g) + (s / g) / 2
    for (w, h), lay in zip(sizes, layouts):
        if kind == "grid_with_thumbnail":
            assert lay.cols * lay.rows > 1 and lay.thumbnail and lay.cols != lay.rows
        for k in range(lay.num_tiles):
            thumb = lay.thumbnail and k == lay.num_tiles - 1
            cols, rows = (1, 1) if thumb else (lay.cols, lay.rows)
            r, c = (0, 0) if thumb else divmod(k, lay.cols)
            sx, sy = w / (s * cols), h / (s * rows)
            ex, ey = (c * s + centers) * sx - 0.5, (r * s + centers) * sy - 0.5
            tol = max(sx, sy) + 1e-4
            assert torch.allclose(xyz[t, 0, :, 0], ex, atol=tol), (kind, k)
            assert torch.allclose(xyz[t, :, 0, 1], ey, atol=tol), (kind, k)
            t += 1
