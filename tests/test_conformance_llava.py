"""LLaVA conformance: recorded cases from the original code + live identity with transformers' own classes.

* the required recorded cases exist and replay from raw inputs with the original's prompt text,
  input ids (``tokenizer_image_token``), pixels, logits and greedy tokens;
* the PE-off identity for ``llava_hf`` (llava, llava_next, llava_onevision), checked live against
  transformers' own model + processor on other image shapes, seeds and pin-points than the recorded ones;
* the original-LLaVA conventions on other inputs: anyres pixels against transformers' PIL LLaVA-NeXT
  processor (same rule), feature unpadding against transformers' ``pack_image_features``,
  conversation templates, conversation-mode inference, the vision tower from ``mm_vision_tower``;
* the SR-3D additions (point maps, region masks) follow the pixels' geometry (pad, crop, anyres);
* conventions that cannot be reproduced raise errors that name them.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sr3d_plugin.builders import load_model
from sr3d_plugin.conformance import data_root, discover, load_case
from sr3d_plugin.conformance.llava import collapse_image_runs, replay_processor
from sr3d_plugin.errors import SR3DConfigError, SR3DInputError
from sr3d_plugin.modeling import llava_conventions as lc
from sr3d_plugin.modeling.inputs import Region, VisualInput

REQUIRED = {
    "llava_original_v15_pad",
    "llava_original_v16_anyres",
    "llava_hf_llava",
    "llava_hf_llava_next",
    "llava_hf_llava_onevision",
}
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------
# recorded cases
# ------------------------------------------------------------------------------------------------


def test_required_llava_cases_are_recorded() -> None:
    names = {c.name for c in discover()}
    assert names >= REQUIRED, f"missing recorded cases: {sorted(REQUIRED - names)}"
    for name in REQUIRED:
        meta = load_case(data_root() / name)
        assert meta["runner"] == "sr3d_plugin.conformance.llava:run"


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_recorded_case_replays_prompt_ids_pixels_and_logits(name: str) -> None:
    """PE off, no region: the host model's logits from the same raw inputs (llava_original: the
    recorded outputs of the original code)."""
    case_dir = data_root() / name
    result, model, _ = replay_processor(case_dir, load_case(case_dir))
    assert result.detail["prompt_equal"], "build_prompt must write the checkpoint's own conversation"
    assert result.detail["input_ids_equal"], "input ids must equal the original's"
    assert result.detail["pixel_max_abs_diff"] == 0.0
    assert result.passed, result.to_dict()
    assert model.perception_encoder is None


def test_original_llava_tower_comes_from_the_mm_vision_tower_folder() -> None:
    from safetensors.torch import load_file

    ckpt = data_root() / "llava_original_v15_pad" / "checkpoint"
    model, _ = load_model(ckpt / "llava-v1.5-tiny", dtype="float32", use_position_encoding=False)
    folder = load_file(str(ckpt / "clip-vit-tiny" / "model.safetensors"))
    stored = load_file(str(ckpt / "llava-v1.5-tiny" / "model.safetensors"))
    key = "embeddings.patch_embedding.weight"
    ours = model.vision_tower.state_dict()[key]
    folder_w = next(v for k, v in folder.items() if k.endswith(key))
    stored_w = next(v for k, v in stored.items() if k.endswith(key) and k.startswith("model.vision_tower."))
    assert torch.equal(ours, folder_w) and not torch.equal(ours, stored_w)
    assert any("tensors stored in the checkpoint are ignored" in n for n in model.load_notes)


def test_tokenizer_image_token_keeps_the_sentencepiece_piece_before_the_newline() -> None:
    _, proc = load_model(
        data_root() / "llava_original_v15_pad" / "checkpoint" / "llava-v1.5-tiny",
        dtype="float32",
        use_position_encoding=False,
    )
    tok = proc.tokenizer
    ids, _, positions = lc.split_at_images(tok, "USER: <image>\nWhat?", "<image>")
    after = tok.convert_ids_to_tokens(ids[positions[0] + 1 : positions[0] + 3])
    assert after == ["▁", "\n"] or after == ["▁", "<0x0A>"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert collapse_image_runs([5, 9, 9, 9, 6, 9], 9) == [5, -200, 6, -200]
    # tokenizer_image_token's output on further prompts, recorded from the original with its slow tokenizer
    probes = json.loads((data_root() / "llava_original_v15_pad" / "inputs" / "tokenizer_probes.json").read_text())
    image_id = tok.convert_tokens_to_ids("<image>")
    for probe in probes:
        ids, _, _ = lc.split_at_images(tok, probe["prompt"], "<image>")
        assert [-200 if t == image_id else t for t in ids] == probe["input_ids"], probe["prompt"]


# ------------------------------------------------------------------------------------------------
# transformers' LLaVA family, live
# ------------------------------------------------------------------------------------------------


def _bos_tokenizer():
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from sr3d_plugin.testing import SPECIAL_TOKENS, build_tiny_tokenizer

    base = build_tiny_tokenizer(without=("<mask>",))
    backend = base.backend_tokenizer
    backend.add_special_tokens(["<s>"])
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    extra = [t for t in SPECIAL_TOKENS[4:] if t != "<mask>"]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>", pad_token="[PAD]",
        additional_special_tokens=extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory) -> dict[str, Path]:
    """Tiny llava / llava_next / llava_onevision folders saved with transformers' own classes."""
    from transformers import (
        AutoConfig,
        AutoModelForImageTextToText,
        CLIPImageProcessor,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        LlavaProcessor,
    )  # fmt: skip

    from sr3d_plugin.testing import CHATML_TEMPLATE

    root = tmp_path_factory.mktemp("llava_hf")
    tok = _bos_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    text = {"vocab_size": len(tok), "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "initializer_range": 0.2}  # fmt: skip
    clip = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "image_size": 42, "patch_size": 14}  # fmt: skip
    mean = {"image_mean": [0.45, 0.5, 0.4], "image_std": [0.25, 0.3, 0.28]}
    pins = [[42, 84], [84, 42], [84, 84], [126, 42], [42, 126], [126, 126]]  # (height, width)
    out = {}
    for seed, kind in enumerate(("llava", "llava_next", "llava_onevision")):
        vision = dict(clip)
        if kind == "llava_onevision":
            vision["model_type"] = "siglip_vision_model"
        extra = {} if kind == "llava" else {"image_grid_pinpoints": pins}
        if kind == "llava_onevision":
            extra["vision_aspect_ratio"] = "anyres_max_4"
        cfg = AutoConfig.for_model(
            kind, vision_config=vision,
            text_config={"model_type": "qwen2" if kind == "llava_onevision" else "llama", **text},
            image_token_index=image_id, vision_feature_layer=-2 if kind != "llava_onevision" else -1,
            vision_feature_select_strategy="default" if kind != "llava_onevision" else "full", **extra,
        )  # fmt: skip
        torch.manual_seed(100 + seed)
        model = AutoModelForImageTextToText.from_config(cfg)
        if kind == "llava":
            ip = CLIPImageProcessor(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42}, **mean)
            proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, chat_template=LLAVA_HF_TEMPLATE,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1)  # fmt: skip
        elif kind == "llava_next":
            ip = LlavaNextImageProcessor(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42},
                                         image_grid_pinpoints=pins, **mean)  # fmt: skip
            proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14, chat_template=LLAVA_HF_TEMPLATE,
                                      vision_feature_select_strategy="default", num_additional_image_tokens=1)  # fmt: skip
        else:
            ip = LlavaOnevisionImageProcessor(size={"height": 42, "width": 42}, image_grid_pinpoints=pins, **mean)
            vp = LlavaOnevisionVideoProcessor(size={"height": 42, "width": 42}, **mean)
            template = CHATML_TEMPLATE.replace("message['content']", "(message['content'] | map(attribute='text') | "
                                               "select('defined') | join(''))")  # fmt: skip
            template = template.replace(
                "'\\n' + (", "'\\n' + ((message['content'] | selectattr('type', 'equalto', 'image') | list | length) * "
                "'<image>\\n') + ("
            )  # fmt: skip
            proc = LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, num_image_tokens=9,
                                           vision_feature_select_strategy="full", chat_template=template,
                                           vision_aspect_ratio="anyres_max_4")  # fmt: skip
        folder = root / kind
        model.save_pretrained(str(folder))
        proc.save_pretrained(str(folder))
        out[kind] = folder
    return out


SHAPES = [(97, 41), (40, 120), (42, 42), (150, 77), (23, 170)]


@pytest.mark.parametrize("kind", ["llava", "llava_next", "llava_onevision"])
def test_llava_hf_pe_off_identity_with_transformers(hf_folders, kind: str) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    root = hf_folders[kind]
    ref = AutoModelForImageTextToText.from_pretrained(root, dtype=torch.float32).eval()
    hf = AutoProcessor.from_pretrained(root)
    ours, proc = load_model(root, dtype="float32", use_position_encoding=False, use_region_extractor=False)
    vocab = ref.lm_head.weight.shape[0]
    for i, (w, h) in enumerate(SHAPES):
        image = _image(w, h, seed=i)
        question = "What is in the picture?"
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = hf.apply_chat_template(conv, add_generation_prompt=True)
        hb = hf(images=image, text=text, return_tensors="pt")
        vis = VisualInput([image])
        prompt = proc.build_prompt(question, vis)
        assert prompt == text
        batch = proc(prompt, vis)
        assert torch.equal(batch["input_ids"], hb["input_ids"]), (kind, (w, h))
        with torch.no_grad():
            a = ours(**batch).logits[0, -1, :vocab]
            b = ref(**hb).logits[0, -1]
            assert float((a - b).abs().max()) <= 1e-4, (kind, (w, h))
            ga = ours.generate(**batch, max_new_tokens=4, do_sample=False)[0, batch["input_ids"].shape[1] :]
            gb = ref.generate(**hb, max_new_tokens=4, do_sample=False)[0, hb["input_ids"].shape[1] :]
        assert ga.tolist() == gb.tolist(), (kind, (w, h))


def test_llava_next_needs_its_own_image_processor(hf_folders, tmp_path) -> None:
    from transformers import CLIPImageProcessor

    root = tmp_path / "next"
    shutil.copytree(hf_folders["llava_next"], root)
    cfg = json.loads((root / "processor_config.json").read_text())
    cfg.pop("image_processor", None)
    (root / "processor_config.json").write_text(json.dumps(cfg))
    CLIPImageProcessor(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42}).save_pretrained(root)
    with pytest.raises(SR3DConfigError, match=r"any-resolution patches.*no image_grid_pinpoints"):
        load_model(root)


# ------------------------------------------------------------------------------------------------
# original-LLaVA conventions on other inputs
# ------------------------------------------------------------------------------------------------


def test_anyres_pixels_equal_transformers_pil_llava_next_processor() -> None:
    """The original's anyres rule (select_best_resolution, aspect-preserving resize, black padding,
    patches, squashed base) and transformers' PIL LLaVA-NeXT processor are the same rule."""
    from transformers import CLIPImageProcessorPil, LlavaNextImageProcessorPil

    pins_wh = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168], [168, 168]]
    hf = LlavaNextImageProcessorPil(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
        image_grid_pinpoints=[[h, w] for w, h in pins_wh], image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )  # fmt: skip
    clip = CLIPImageProcessorPil(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    for i, (w, h) in enumerate([(97, 41), (40, 120), (64, 64), (150, 77), (33, 170), (200, 199)]):
        image = _image(w, h, seed=10 + i)
        a = hf(images=image, return_tensors="pt")["pixel_values"][0]
        b = clip(images=lc.anyres_tiles(image, pins_wh, 56), return_tensors="pt")["pixel_values"]
        assert a.shape == b.shape and torch.equal(a, b), (w, h)
        layout = lc.anyres_layout((w, h), pins_wh, 56, 4, "spatial_unpad", True, "floor", None)
        assert layout.num_tiles == a.shape[0]


@pytest.mark.parametrize("max_patches", [None, 2])
def test_feature_merge_equals_transformers_pack_image_features(max_patches) -> None:
    from transformers import AutoConfig, LlavaNextModel, LlavaOnevisionModel

    side, tile, hidden = 3, 42, 8
    pins_hw = [[42, 84], [84, 42], [84, 84], [126, 42], [42, 126], [126, 126]]
    kind = "llava_next" if max_patches is None else "llava_onevision"
    cfg = AutoConfig.for_model(
        kind,
        vision_config={"model_type": "clip_vision_model", "hidden_size": 8, "intermediate_size": 16,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": tile, "patch_size": 14},
        text_config={"model_type": "llama", "hidden_size": hidden, "intermediate_size": 16, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "vocab_size": 32},
        image_grid_pinpoints=pins_hw, **({} if max_patches is None else {"vision_aspect_ratio": f"anyres_max_{max_patches}"}),
    )  # fmt: skip
    ref = (LlavaNextModel if max_patches is None else LlavaOnevisionModel)(cfg).eval()
    newline = torch.randn(hidden)
    pins_wh = [[w, h] for h, w in pins_hw]
    for w, h in [(97, 41), (40, 120), (42, 42), (150, 77), (23, 170), (125, 126)]:
        rows, cols = lc.anyres_grid((w, h), pins_wh, tile)
        feats = torch.randn(1 + rows * cols, side * side, hidden)
        ours = lc.merge_anyres_features(
            feats, (w, h), (rows, cols), side, "spatial_unpad", newline, "round", max_patches
        )
        kwargs = {} if max_patches is None else {"vision_aspect_ratio": f"anyres_max_{max_patches}"}
        if max_patches is None:
            kwargs["vision_feature_select_strategy"] = "default"
        theirs, lens = ref.pack_image_features([feats], torch.tensor([[h, w]]), image_newline=newline, **kwargs)
        assert torch.allclose(ours, theirs[0], atol=1e-6), (w, h)
        count = lc.anyres_token_count((w, h), (rows, cols), side, "spatial_unpad", True, "round", max_patches)
        assert count == ours.shape[0] == int(lens[0])


def test_unpad_rounding_floor_is_the_originals_int() -> None:
    # original LLaVA unpad_image: int(h * scale) (floor); transformers: int(round(x, 7)); they part
    # where the scaled side lands just below an integer
    assert lc.unpadded_grid((100, 30), 6, 12, "floor") == (1, 5, 0, 12)  # int(30*12/100)=3 → pad 1
    assert lc.unpadded_grid((3, 1), 2, 2, "floor")[:2] == lc.unpadded_grid((3, 1), 2, 2, "round")[:2]


def test_conversation_templates_render_like_the_original() -> None:
    q = "<image>\nWhat is it?"
    user = [{"role": "user", "content": q}]
    assert lc.render_conversation("llava_v1", user, True) == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nWhat is it? ASSISTANT:"
    )
    two = [*user, {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Colour?"}]
    assert lc.render_conversation("vicuna_v1", [{"role": "system", "content": "S."}, *two], True) == (
        "S. USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Colour? ASSISTANT:"
    )
    assert lc.render_conversation("llava_v0", user, True).endswith(
        "questions.###Human: <image>\nWhat is it?###Assistant:"
    )
    assert lc.render_conversation("mistral_instruct", user, True) == "[INST] <image>\nWhat is it? [/INST]"
    assert lc.render_conversation("llava_llama_2", two[:2]).startswith("[INST] <<SYS>>\nYou are a helpful")
    assert lc.render_conversation("llava_llama_2", two[:2]).endswith(
        "\n<</SYS>>\n\n<image>\nWhat is it? [/INST] A cat. </s>"
    )
    assert lc.render_conversation("chatml_direct", user, True) == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is it?<|im_end|>"
        "<|im_start|>assistant\n"
    )
    with pytest.raises(SR3DConfigError, match="conv_mode='nope'"):
        lc.render_conversation("nope", user)


@pytest.mark.parametrize(
    ("path", "mode"),
    [
        ("liuhaotian/llava-v1.5-7b", "llava_v1"),
        ("/models/llava-v1.6-mistral-7b/", "mistral_instruct"),
        ("llava-v1.6-34b", "chatml_direct"),
        ("llava-llama-2-13b-chat", "llava_llama_2"),
        ("runs/llava-v1.5-13b-lora/checkpoint-500", "llava_v1"),
        ("my-llava", "llava_v0"),
    ],
)
def test_conversation_mode_is_inferred_from_the_folder_name(path: str, mode: str) -> None:
    assert lc.conv_mode_for_model_name(lc.model_name_from_path(path)) == mode


def test_conv_mode_option_and_errors_for_unreproducible_folders(tmp_path) -> None:
    src = data_root() / "llava_original_v15_pad" / "checkpoint"
    root = tmp_path / "ckpt"
    shutil.copytree(src, root)
    folder = root / "llava-v1.5-tiny"
    _, proc = load_model(folder, dtype="float32", use_position_encoding=False, conv_mode="llava_v0")
    assert proc.build_prompt("Hi?", VisualInput([_image(30, 20)])).endswith("###Human: <image>\nHi?###Assistant:")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "mm_use_im_start_end": True}))
    with pytest.raises(SR3DConfigError, match="mm_use_im_start_end"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "image_aspect_ratio": "anyres"}))
    with pytest.raises(SR3DConfigError, match="image_grid_pinpoints"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "mm_vision_select_feature": "cls_patch"}))
    with pytest.raises(SR3DConfigError, match="cls_patch.*CLS token"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "s2": True}))
    with pytest.raises(SR3DConfigError, match="s2=true"):
        load_model(folder)


def test_sentencepiece_tokenizer_needs_a_clear_dependency(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    folder = data_root() / "llava_original_v15_pad" / "checkpoint" / "llava-v1.5-tiny"
    with pytest.raises(SR3DInputError, match=r"sentencepiece.*sr3d-plugin\[llava\]"):
        load_model(folder)


# ------------------------------------------------------------------------------------------------
# SR-3D additions follow the pixels' geometry
# ------------------------------------------------------------------------------------------------


def _coords(w: int, h: int, scale: int = 1) -> torch.Tensor:
    """A point map whose x, y are the source-pixel coordinates of each pixel centre (z = 1)."""
    ys, xs = torch.meshgrid(torch.arange(h * scale), torch.arange(w * scale), indexing="ij")
    return torch.stack([(xs + 0.5) / scale, (ys + 0.5) / scale, torch.ones_like(xs, dtype=torch.float32)], -1).float()


def test_point_maps_follow_pad_crop_and_anyres_geometry() -> None:
    g = 4
    # pad: 80×50 → square 80 with 15 px above; token rows are 20 px tall
    pos = lc.host_token_positions(_coords(80, 50), lc.pad_layout((80, 50), 16), g)
    assert pos.shape == (1, g, g, 3)
    assert torch.allclose(pos[0, 0, :, 1], torch.full((g,), 2.5))  # row 0 sees y ∈ [0, 5]
    assert torch.allclose(pos[0, 1, 0, :2], torch.tensor([10.0, 15.0]))  # row 1: y ∈ [5, 25]
    # a point map at twice the resolution gives the same positions (scale is taken from the image size)
    pos2 = lc.host_token_positions(_coords(80, 50, 2), lc.pad_layout((80, 50), 16), g)
    assert torch.allclose(pos, pos2, atol=1e-5)
    # a tall image: the padding columns see no geometry → position 0
    pos = lc.host_token_positions(_coords(20, 80), lc.pad_layout((20, 80), 16), g)
    assert torch.equal(pos[0, :, 0], torch.zeros(g, 3)) and torch.equal(pos[0, :, 3], torch.zeros(g, 3))
    # centre crop of 90×45 at 45: the middle 45 px from x = round(22.5) = 22 (torchvision's offset)
    pos = lc.host_token_positions(_coords(90, 45, 8), lc.centre_crop_layout((90, 45), 45, 45, 16), g)
    assert torch.allclose(pos[0, 0, :, 0], torch.tensor([22 + 45 / 8 * (2 * k + 1) for k in range(g)]), atol=0.02)
    pil = lc.host_token_positions(_coords(91, 45, 8), lc.centre_crop_layout((91, 45), 45, 45, 16, "floor"), g)
    assert abs(float(pil[0, 0, 0, 0]) - (23 + 45 / 8)) < 0.02  # PIL backend: (91 - 45) // 2 = 23
    # anyres: base tile spans the whole image; the patch tiles cover the resized + padded canvas
    layout = lc.anyres_layout((60, 130), [[56, 168], [56, 112]], 56, g, "spatial_unpad", True, "floor", None)
    pos = lc.host_token_positions(_coords(60, 130, 8), layout, g)
    assert pos.shape == (4, g, g, 3)
    assert torch.allclose(pos[0, :, :, 0].mean(), torch.tensor(30.0), atol=1e-4)
    valid = pos[1:, ..., 2] > 0  # z = 1 where a token sees the image, 0 where it sees only padding
    # the image is resized to 56×122 and pasted 23 px down a 56×168 canvas: the first patch's top token
    # row (canvas y 0..14) and the last patch's bottom row (154..168) see only padding
    assert not valid[0, 0].any() and valid[0, 2:].all() and valid[1].all() and not valid[2, -1].any()
    assert torch.allclose(pos[1, 1, :, 1], torch.full((g,), (28 - 23) / 2 * 130 / 122), atol=0.01)


def test_region_masks_follow_pad_and_anyres_geometry() -> None:
    mask = np.zeros((50, 80), bool)
    mask[0:10, 0:20] = True  # top-left corner of the image
    tiles = lc.host_tile_masks(mask, lc.pad_layout((80, 50), 16), 80)
    assert tiles.shape == (1, 80, 80)
    ys, xs = torch.nonzero(tiles[0], as_tuple=True)
    assert int(ys.min()) == 15 and int(ys.max()) == 24 and int(xs.min()) == 0 and int(xs.max()) == 19
    # a 1-pixel region on a large image still reaches a tile pixel
    big = np.zeros((400, 600), bool)
    big[200, 300] = True
    assert lc.host_tile_masks(big, lc.pad_layout((600, 400), 16), 8).any()


def test_pe_on_batch_follows_the_host_tiles() -> None:
    folder = data_root() / "llava_original_v16_anyres" / "checkpoint" / "llava-v1.6-vicuna-tiny"
    model, proc = load_model(folder, dtype="float32")
    image = _image(70, 33)
    vis = VisualInput(
        [image], points=torch.rand(1, 33, 70, 3), regions=[Region.from_box(0, (5, 5, 30, 20), image.size)]
    )
    batch = proc(proc.build_prompt("Where is <mask>?", vis), vis)
    n = batch["pixel_values"].shape[0]
    assert batch["tile_xyz"].shape[:2] == (n, 4) and batch["region_weights"].shape[1] == n
    assert (
        int((batch["input_ids"] == model.config.image_token_id).sum())
        == lc.anyres_layout(
            image.size, model.config.image_grid_pinpoints, 56, 4, "spatial_unpad", True, "floor", None
        ).num_tokens
    )
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_anyres_batches_and_frames_splice_every_image_in_order() -> None:
    """Variable tokens per image: a batch of two prompts (different image shapes) gives each row the
    logits it gets alone, and several frames in one prompt get one anyres block each."""
    folder = data_root() / "llava_original_v16_anyres" / "checkpoint" / "llava-v1.6-vicuna-tiny"
    model, proc = load_model(folder, dtype="float32", use_position_encoding=False, use_region_extractor=False)
    visuals = [VisualInput([_image(150, 40, 1)]), VisualInput([_image(45, 100, 2)])]
    prompts = [proc.build_prompt("Left?", visuals[0]), proc.build_prompt("What is on the right side?", visuals[1])]
    batch = proc(prompts, visuals, padding_side="right")
    with torch.no_grad():
        both = model(**batch).logits
        for b, (prompt, vis) in enumerate(zip(prompts, visuals)):
            alone = proc(prompt, vis)
            last = int(batch["attention_mask"][b].sum()) - 1
            ref = model(**alone).logits[0, -1]
            assert float((both[b, last] - ref).abs().max()) < 1e-4
    frames = VisualInput([_image(150, 40, 1), _image(45, 100, 2)], multi_view=True)
    batch = proc(proc.build_prompt("Same scene?", frames), frames)
    counts = [layout.num_tokens for layout in proc.layouts(frames)]
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == sum(counts)
    assert batch["image_sizes"].tolist() == [[40, 150], [100, 45]]
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


@pytest.mark.parametrize("name", ["llava_original_v15_pad", "llava_original_v16_anyres"])
def test_original_llava_on_further_image_shapes(name: str) -> None:
    """The same prompt on other image shapes (portrait, square, extreme), recorded from the original:
    image-token count and last-position logits."""
    from safetensors.torch import load_file

    case_dir = data_root() / name
    meta = load_case(case_dir)
    probes = load_file(str(case_dir / "probes.safetensors"))
    model, proc = load_model(case_dir / meta["model"], dtype="float32", use_position_encoding=False)
    question = json.loads((case_dir / "inputs" / "prompt.json").read_text())["question"]
    assert len(meta["probes"]) >= 5
    for probe in meta["probes"]:
        image = Image.open(case_dir / probe["image"]).convert("RGB")
        vis = VisualInput([image])
        batch = proc(proc.build_prompt(question, vis), vis)
        assert int((batch["input_ids"] == model.config.image_token_id).sum()) == probe["num_image_tokens"], probe
        ref = probes[f"logits_{image.size[0]}x{image.size[1]}"]
        with torch.no_grad():
            logits = model(**batch).logits[0, -1, : ref.shape[0]]
        assert float((logits - ref).abs().max()) <= 1e-4, probe


def test_converted_llava_folder_keeps_the_conventions(tmp_path) -> None:
    """``sr3d convert`` of an original LLaVA-1.6 folder: the SR-3D folder answers like the original."""
    from safetensors.torch import load_file

    from sr3d_plugin.builders import convert_checkpoint
    from sr3d_plugin.modeling import SR3DProcessor

    case_dir = data_root() / "llava_original_v16_anyres"
    meta = load_case(case_dir)
    expected = load_file(str(case_dir / "expected.safetensors"))
    dst = tmp_path / "converted"
    convert_checkpoint(case_dir / meta["model"], dst, dtype="float32", use_position_encoding=False)
    model, proc = load_model(dst)
    assert isinstance(proc, SR3DProcessor) and type(proc.image_processor).__name__ == "CLIPImageProcessorPil"
    assert (proc.conv_mode, proc.tokenize_image_chunks, proc.image_aspect_ratio) == ("llava_v1", True, "anyres")
    vis = VisualInput([Image.open(case_dir / "inputs" / "image.png").convert("RGB")])
    question = json.loads((case_dir / "inputs" / "prompt.json").read_text())["question"]
    prompt = proc.build_prompt(question, vis)
    assert prompt == meta["prompt"]
    with torch.no_grad():
        logits = model(**proc(prompt, vis)).logits[0, -1, : expected["last_logits"].shape[0]]
    assert float((logits - expected["last_logits"]).abs().max()) <= 1e-4


def test_unfreeze_mm_vision_tower_uses_the_stored_tower_and_deviations_stay_available(tmp_path) -> None:
    from safetensors.torch import load_file

    src = data_root() / "llava_original_v16_anyres" / "checkpoint"
    root = tmp_path / "ckpt"
    shutil.copytree(src, root)
    folder = root / "llava-v1.6-vicuna-tiny"
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "unfreeze_mm_vision_tower": True}))
    model, _ = load_model(folder, dtype="float32", use_position_encoding=False)
    stored = load_file(str(folder / "model.safetensors"))
    key = "embeddings.patch_embedding.weight"
    want = next(v for k, v in stored.items() if k.endswith(key) and k.startswith("model.vision_tower."))
    assert torch.equal(model.vision_tower.state_dict()[key], want)
    # the named deviations: squash to one tile, or SR-3D's dynamic tiles (no image_newline then)
    image = _image(90, 40)
    for mode, tiles in (("resize", 1), ("dynamic", 2)):  # dynamic: a 2×1 grid (no thumbnail unless asked)
        model, proc = load_model(src / "llava-v1.6-vicuna-tiny", dtype="float32", image_aspect_ratio=mode)
        assert model.config.mm_patch_merge_type == "flat"
        vis = VisualInput([image], points=torch.rand(1, 40, 90, 3))
        batch = proc(proc.build_prompt("What?", vis), vis)
        assert batch["pixel_values"].shape[0] == tiles
        with torch.no_grad():
            assert torch.isfinite(model(**batch).logits).all()
