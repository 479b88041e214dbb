"""transformers-native use of SR3DProcessor: ``images=`` / ``videos=`` / 3D keywords, chat messages with
image / video / region parts, and transformers' own ``pipeline("image-text-to-text")``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.modeling.inputs import Region, VisualInput
from sr3d_plugin.modeling.processing_sr3d import SR3DProcessor
from sr3d_plugin.testing import build_tiny_model, write_tiny_depth_anything
from sr3d_plugin.visual_inputs import visual_input


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, proc = build_tiny_model(seed=0)
    depth_dir = write_tiny_depth_anything(tmp_path_factory.mktemp("depth"))
    proc.depth_model = str(depth_dir)
    return model, proc


@pytest.fixture(scope="module")
def pipe(tiny):
    model, proc = tiny
    return pipeline("image-text-to-text", model=model, processor=proc)


def _photo(seed: int = 0, size: tuple[int, int] = (80, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


RED = Image.new("RGB", (80, 64), (255, 0, 0))


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "num_tiles"}).logits[0, -1]


def test_images_keyword_keeps_the_image(tiny):
    model, proc = tiny
    batch = proc(images=_photo(), text="What is it?")
    assert batch["pixel_values"].shape == (1, 3, proc.tile_size, proc.tile_size)
    assert batch["tile_xyz"].shape == (1, proc.grid_size, proc.grid_size, 3)
    assert int((batch["input_ids"] == proc.image_token_id).sum()) == proc.tokens_per_tile
    # a bare question becomes build_prompt's chat prompt with the image marker
    visual = VisualInput([_photo()], points=torch.zeros(1, 64, 80, 3))
    expected = proc._encode(proc.build_prompt("What is it?", visual), visual, None, None, None, True)
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    # different images: different pixels, positions and logits
    other = proc(images=RED, text="What is it?")
    assert not torch.equal(batch["pixel_values"], other["pixel_values"])
    assert not torch.allclose(_logits(model, batch), _logits(model, other))
    # transformers' positional order (images, text) means the same
    swapped = proc(_photo(), "What is it?")
    assert torch.equal(swapped["input_ids"], batch["input_ids"])
    assert torch.equal(swapped["pixel_values"], batch["pixel_values"])


def test_depth_keywords_match_the_visual_input_path(tiny):
    _, proc = tiny
    image = _photo(1)
    depth = np.linspace(1.0, 3.0, 64 * 80, dtype=np.float32).reshape(64, 80)
    k = np.array([[60.0, 0, 40], [0, 60.0, 32], [0, 0, 1]])
    bundle = visual_input(image=image, depth=depth, intrinsics=k, canonical_mode=proc.canonical_mode)
    prompt = proc.build_prompt("How far?", bundle.visual)
    expected = proc(prompt, bundle.visual)
    got = proc(images=image, text="How far?", depth=depth, intrinsics=k, depth_model=None)
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.allclose(got["tile_xyz"], expected["tile_xyz"])
    # reconstruction points are canonicalised as visual_input does (not re-estimated from the image)
    pts = np.random.default_rng(2).random((1, 64, 80, 3)).astype(np.float32)
    with_points = proc(images=image, text="How far?", points=pts)
    direct = visual_input(image=image, points=pts, canonical_mode=proc.canonical_mode)
    assert direct.geometry["source"] == "reconstruction"
    assert torch.allclose(with_points["tile_xyz"], proc(prompt, direct.visual)["tile_xyz"])


def test_regions_keyword_and_batches(tiny):
    _, proc = tiny
    box = {"frame": 0, "box": [0, 0, 40, 32]}
    batch = proc(images=_photo(), text="Where is <mask>?", regions=[box])
    weights = batch["region_weights"]
    g = proc.grid_size
    assert weights.shape == (1, batch["num_tiles"].item(), g * g)
    grid = weights[0].sum(0).reshape(g, g)
    assert grid[: g // 2, : g // 2].sum() > 0.99 and grid[g // 2 :, g // 2 :].sum() == 0
    region = Region.from_box(0, (0, 0, 40, 32), (80, 64))
    same = proc(images=_photo(), text="Where is <mask>?", regions=[region])
    assert torch.equal(same["region_weights"], weights)
    two = proc(images=[_photo(), RED], text=["Q one?", "Q two?"], padding_side="left")
    assert two["input_ids"].shape[0] == 2 and two["pixel_values"].shape[0] == int(two["num_tiles"].sum())
    with pytest.raises(SR3DInputError, match="one entry per prompt"):
        proc(images=_photo(), text=["a", "b"])
    with pytest.raises(SR3DInputError, match="1 region"):
        proc(images=_photo(), text="Where is it?", regions=[box])


def test_videos_as_frame_lists_are_multi_view(tiny):
    _, proc = tiny
    frames = [_photo(s) for s in range(3)]
    batch = proc(videos=frames, text="What happens?")
    assert batch["num_tiles"].tolist() == [3]
    assert batch["tile_xyz"].shape[0] == 3


def test_unknown_keywords_and_missing_geometry_raise(tiny):
    model, proc = tiny
    with pytest.raises(SR3DInputError, match="unknown keyword argument.*bogus"):
        proc(images=_photo(), text="q", bogus=1)
    with pytest.raises(SR3DInputError, match="depth given without images"):
        proc(text="q", depth=np.ones((4, 4)))
    bare = SR3DProcessor.from_model_config(model.config, proc.image_processor, proc.tokenizer)
    assert bare.depth_model is None
    with pytest.raises(SR3DInputError, match="depth_model"):
        bare(images=_photo(), text="q")


def test_chat_template_with_parts(tiny):
    _, proc = tiny
    image = _photo()
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    visual = VisualInput([image], points=torch.zeros(1, 64, 80, 3))
    assert proc.apply_chat_template(messages, add_generation_prompt=True) == proc.build_prompt("What?", visual)
    region_msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "text", "text": "Where is "},
                {"type": "region", "frame": 0, "box": [40, 32, 80, 64]},
                {"type": "text", "text": "?"},
            ],
        }
    ]
    prompt = proc.apply_chat_template(region_msgs, add_generation_prompt=True)
    assert prompt.count(proc.mask_token) == 1 and prompt.count(proc.image_token) == 1
    out = proc.apply_chat_template(region_msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert out["region_weights"].shape[0] == 1 and "pixel_values" in out
    with pytest.raises(SR3DInputError, match="content part"):
        proc.apply_chat_template([{"role": "user", "content": [{"type": "audio"}]}])
    with pytest.raises(SR3DInputError, match="unknown keyword"):
        proc.apply_chat_template(region_msgs, tokenize=True, return_dict=True, bogus=True)


def test_pipeline_answers_depend_on_the_image(pipe):
    answers = [
        pipe(images=im, text="What is it?", max_new_tokens=6, return_full_text=False)[0]["generated_text"]
        for im in (_photo(), RED)
    ]
    assert answers[0] != answers[1]


def test_pipeline_with_chat_messages_and_regions(tiny, pipe):
    model, proc = tiny
    image = _photo()

    def chat(box):
        return [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": image},
                    {"type": "text", "text": "What is "},
                    {"type": "region", "frame": 0, "box": box},
                    {"type": "text", "text": "?"},
                ],
            }
        ]

    out = pipe(text=chat([0, 0, 40, 32]), max_new_tokens=4)
    assert out[0]["generated_text"][-1]["role"] == "assistant"
    assert isinstance(out[0]["generated_text"][-1]["content"], str)
    # the region reaches the model: another box gives other logits
    a = proc.apply_chat_template(chat([0, 0, 40, 32]), add_generation_prompt=True, tokenize=True, return_dict=True)
    b = proc.apply_chat_template(chat([40, 32, 80, 64]), add_generation_prompt=True, tokenize=True, return_dict=True)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.allclose(_logits(model, a), _logits(model, b))


def test_pipeline_keywords_reach_the_processor(tiny, pipe):
    model, proc = tiny
    with pytest.raises(SR3DInputError, match="bogus"):
        pipe(images=_photo(), text="q", bogus=1, max_new_tokens=2)
    # explicit depth goes through the pipeline, no depth model needed
    bare = SR3DProcessor.from_model_config(model.config, proc.image_processor, proc.tokenizer)
    bare_pipe = pipeline("image-text-to-text", model=model, processor=bare)
    with pytest.raises(SR3DInputError, match="depth_model"):
        bare_pipe(images=_photo(), text="q", max_new_tokens=2)
    depth = np.full((64, 80), 2.0, dtype=np.float32)
    k = np.array([[60.0, 0, 40], [0, 60.0, 32], [0, 0, 1]])
    out = bare_pipe(images=_photo(), text="q", depth=depth, intrinsics=k, max_new_tokens=2)
    assert isinstance(out[0]["generated_text"], str)


def test_depth_model_survives_save_and_load(tiny, tmp_path):
    _, proc = tiny
    proc.save_pretrained(tmp_path)
    loaded = SR3DProcessor.from_pretrained(tmp_path)
    assert loaded.depth_model == proc.depth_model
    assert loaded.canonical_mode == proc.canonical_mode


def test_chat_parts_under_a_llava_folder_match_build_prompt(tmp_path):
    from sr3d_plugin.builders import load_model
    from sr3d_plugin.testing import write_tiny_llava_hf

    _, proc = load_model(write_tiny_llava_hf(tmp_path / "llava"))
    image = Image.new("RGB", (80, 64), (0, 128, 0))
    visual = VisualInput([image], points=torch.zeros(1, 64, 80, 3))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    assert proc.apply_chat_template(messages, add_generation_prompt=True) == proc.build_prompt("What?", visual)
