"""Model builders: VILA/NVILA/SR-3D folders, transformers LLaVA folders, original LLaVA, scratch; convert-vila.

The foreign checkpoint folders are tiny STAND-INS written by ``sr3d_plugin.testing.write_tiny_*``: the
layout, file names, config keys and tensor names of the released checkpoints (SR3D-FACTS §1), with
tiny dimensions and random weights.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

from sr3d_plugin import Region, SR3DForConditionalGeneration, VisualInput, plugins
from sr3d_plugin.builders import convert_checkpoint, detect_builder, load_model
from sr3d_plugin.cli import main as cli_main
from sr3d_plugin.errors import SR3DConfigError, SR3DInputError
from sr3d_plugin.testing import (
    write_tiny_clip_vision,
    write_tiny_llava_hf,
    write_tiny_llava_original,
    write_tiny_vila_checkpoint,
)

PARTS = ("llm", "vision_tower", "mm_projector", "perception_encoder", "region_extractor")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    clip = write_tiny_clip_vision(root / "clip")
    return {
        "sr3d_release": write_tiny_vila_checkpoint(root / "sr3d_release"),
        "nvila_lite": write_tiny_vila_checkpoint(root / "nvila_lite", with_sr3d_parts=False, dtype="float32"),
        "llava": write_tiny_llava_hf(root / "llava", "llava"),
        "onevision": write_tiny_llava_hf(root / "onevision", "llava_onevision"),
        "clip": clip,
        "llava_original": write_tiny_llava_original(root / "llava_original", clip),
    }


def _image(w: int = 180, h: int = 100, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _visual(points: bool = True, regions: int = 1) -> VisualInput:
    img = _image()
    regs = [Region.from_box(0, (10 + 40 * k, 10, 60 + 40 * k, 70), img.size) for k in range(regions)]
    return VisualInput([img], points=torch.rand(1, 100, 180, 3) * 2 - 1 if points else None, regions=regs)


def _folder_tensors(root, part):
    with safe_open(str(root / part / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)


# ------------------------------------------------------------------------------------------------
# registry and detection
# ------------------------------------------------------------------------------------------------


def test_all_builders_registered_and_detected(folders, tmp_path) -> None:
    assert {"sr3d", "vila", "llava_hf", "llava_original", "scratch"} <= set(plugins.registry("model_builders"))
    assert detect_builder(folders["sr3d_release"]) == "vila"
    assert detect_builder(folders["nvila_lite"]) == "vila"
    assert detect_builder(folders["llava"]) == "llava_hf"
    assert detect_builder(folders["onevision"]) == "llava_hf"
    assert detect_builder(folders["llava_original"]) == "llava_original"
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(SR3DInputError, match=r"no model builder recognises .*'bert'.*registered builders"):
        detect_builder(odd)


# ------------------------------------------------------------------------------------------------
# VILA / SR-3D release layout
# ------------------------------------------------------------------------------------------------


def test_sr3d_release_folder_loads_every_tensor_unchanged(folders) -> None:
    root = folders["sr3d_release"]
    model, proc = load_model(root)  # default dtype: the folder's model_dtype string "torch.bfloat16"
    assert model.dtype == torch.bfloat16
    state = model.state_dict()
    count = 0
    for part in PARTS:
        for key, value in _folder_tensors(root, part).items():
            ours = f"{part}.{key.removeprefix('vision_model.')}" if part == "vision_tower" else f"{part}.{key}"
            assert key.startswith("vision_model.") or part != "vision_tower"  # stored with 4.x names
            assert ours in state, f"{part}/{key} has no place in the model"
            assert state[ours].dtype == value.dtype and torch.equal(state[ours], value), ours
            count += 1
    assert count == len(state)  # nothing in the model that the folder did not provide
    assert model.load_notes == []
    cfg = model.config
    assert (cfg.vision_feature_layer, cfg.vision_feature_select) == (-2, "cls_patch")
    assert (cfg.image_end_text, cfg.tile_separator, cfg.max_tiles, cfg.pe_num_freqs) == ("\n", "\n", 6, 8)
    assert cfg.projector_type == "mlp_downsample_3x3_fix" and cfg.tokens_per_tile == 4
    assert cfg.image_token_id == proc.tokenizer.convert_tokens_to_ids("<image>")
    assert cfg.mask_token_id == proc.tokenizer.convert_tokens_to_ids("<mask>")


def test_vila_folder_via_from_pretrained_and_convert_vila_give_identical_logits(folders, tmp_path, capsys) -> None:
    src = folders["sr3d_release"]
    direct = SR3DForConditionalGeneration.from_pretrained(str(src), dtype="float32")
    assert isinstance(direct, SR3DForConditionalGeneration) and direct.dtype == torch.float32
    dst = tmp_path / "converted"
    assert cli_main(["convert-vila", str(src), str(dst), "--dtype", "float32", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["builder"] == "vila" and summary["dtype"] == "float32"
    files = {p.name for p in dst.iterdir()}
    assert "model.safetensors" in files and not [f for f in files if f.endswith((".bin", ".pt"))]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".converted")]  # atomic: no leftovers
    loaded = AutoModelForImageTextToText.from_pretrained(dst)
    proc = AutoProcessor.from_pretrained(dst)
    vis = _visual(regions=2)
    batch = proc(proc.build_prompt("Is <mask> left of <mask>?", vis), vis)
    with torch.no_grad():
        a = direct(**batch).logits
        b = loaded(**batch).logits
    assert torch.equal(a, b)
    # a second conversion refuses to overwrite unless asked
    assert cli_main(["convert-vila", str(src), str(dst)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_nvila_lite_gets_fresh_sr3d_parts_and_a_mask_token(folders, caplog) -> None:
    root = folders["nvila_lite"]
    with caplog.at_level(logging.WARNING, logger="sr3d_plugin.builders"):
        model, proc = load_model(root)
    notes = " | ".join(model.load_notes)
    assert "perception_encoder" in notes and "region_extractor" in notes and "<mask>" in notes
    assert any("perception_encoder" in r.getMessage() for r in caplog.records)
    tok = proc.tokenizer
    mask_id = tok.convert_tokens_to_ids("<mask>")
    assert mask_id == len(tok) - 1 == model.config.mask_token_id
    stored = _folder_tensors(root, "llm")["model.embed_tokens.weight"]
    embed = model.get_input_embeddings().weight
    assert embed.shape[0] == stored.shape[0] + 1  # grown by exactly the added <mask>
    assert torch.equal(embed[: stored.shape[0]], stored)  # original rows untouched
    assert torch.allclose(embed[-1], stored.mean(0), atol=1e-6)
    pe_weight = model.perception_encoder.layers.position_embedding_head[0].weight
    assert pe_weight.abs().max() < 0.01  # xavier gain 0.001 (SR3D-FACTS §5), not a default init
    vis = _visual()
    out = model(**proc(proc.build_prompt("Where is <mask>?", vis), vis))
    assert torch.isfinite(out.logits).all()


def test_vila_config_strings_are_never_evaluated(folders, tmp_path) -> None:
    import shutil

    root = tmp_path / "evil"
    shutil.copytree(folders["sr3d_release"], root)
    cfg = json.loads((root / "config.json").read_text())
    cfg["model_dtype"] = "__import__('os').system('touch pwned')"
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SR3DConfigError, match=r"unsupported dtype .*__import__"):
        load_model(root)
    cfg["model_dtype"] = "torch.bfloat16"
    cfg["image_aspect_ratio"] = "dynamic_s2"
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SR3DConfigError, match=r"image_aspect_ratio='dynamic_s2'"):
        load_model(root)
    cfg["image_aspect_ratio"] = "dynamic"
    cfg["mm_hidden_size"] = 999
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SR3DConfigError, match=r"mm_hidden_size=999 but vision_tower/config.json has 32"):
        load_model(root)


def test_vila_folder_without_the_unused_siglip_head_loads_with_a_note(folders, tmp_path) -> None:
    import shutil

    from safetensors.torch import save_file

    root = tmp_path / "headless"
    shutil.copytree(folders["sr3d_release"], root)
    tensors = _folder_tensors(root, "vision_tower")
    save_file({k: v for k, v in tensors.items() if ".head." not in k}, str(root / "vision_tower" / "model.safetensors"))
    model, _ = load_model(root, dtype="float32")
    assert any("vision_tower.head" in n for n in model.load_notes)
    emb = tensors["vision_model.embeddings.patch_embedding.weight"]
    assert torch.equal(model.vision_tower.embeddings.patch_embedding.weight, emb.float())
    tensors.pop("vision_model.embeddings.patch_embedding.weight")
    save_file(tensors, str(root / "vision_tower" / "model.safetensors"))
    with pytest.raises(SR3DInputError, match=r"absent from the checkpoint.*patch_embedding"):
        load_model(root)


# ------------------------------------------------------------------------------------------------
# transformers LLaVA family
# ------------------------------------------------------------------------------------------------


def test_llava_hf_matches_transformers_llava_logits(folders) -> None:
    root = folders["llava"]
    ours, proc = load_model(root, dtype="float32", use_position_encoding=False)
    ref = AutoModelForImageTextToText.from_pretrained(root, dtype=torch.float32).eval()
    assert type(ref).__name__ == "LlavaForConditionalGeneration"
    assert ours.config.vision_feature_select == "patch" and ours.config.image_end_text is None
    assert "<mask>" in proc.tokenizer.get_vocab() and ours.region_extractor is not None
    vis = VisualInput([_image(90, 70)])
    batch = proc(proc.build_prompt("What is this?", vis), vis)
    assert int((batch["input_ids"] == ref.config.image_token_index).sum()) == ref.config.image_seq_length
    with torch.no_grad():
        a = ours(**batch).logits
        b = ref(
            input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"]
        ).logits
    vocab = b.shape[-1]
    assert a.shape[-1] == vocab + 1  # the added <mask>
    assert torch.allclose(a[..., :vocab], b, atol=1e-5)


def test_llava_onevision_reproduces_its_anyres_convention(folders) -> None:
    # was: "loads and says what is not reproduced" (SR-3D tiling replaced anyres); the folder's own
    # convention now wins: its image processor's patches, unpadding, image_newline (issue 9)
    from transformers import AutoImageProcessor

    root = folders["onevision"]
    model, proc = load_model(root, dtype="float32")
    ref = AutoModelForImageTextToText.from_pretrained(root, dtype=torch.float32).eval()
    assert torch.equal(
        model.mm_projector.layers[0].weight, ref.model.multi_modal_projector.linear_1.weight
    ) and torch.equal(model.llm.lm_head.weight[: ref.lm_head.weight.shape[0]], ref.lm_head.weight)
    assert torch.equal(model.image_newline, ref.model.image_newline)
    assert model.config.image_aspect_ratio == "native" and model.config.vision_feature_select == "full"
    vis = _visual()
    batch = proc(proc.build_prompt("<mask>?", vis), vis)
    hf = AutoImageProcessor.from_pretrained(root)(images=vis.images[0], return_tensors="pt")
    n_patches = hf["pixel_values"].shape[1]
    assert n_patches > 1 and batch["pixel_values"].shape[0] == n_patches  # base + anyres patches
    assert torch.equal(batch["pixel_values"], hf["pixel_values"][0])
    assert torch.equal(batch["image_sizes"], hf["image_sizes"])
    assert batch["tile_xyz"].shape[0] == n_patches and batch["region_weights"].shape[1] == n_patches
    assert torch.isfinite(model(**batch).logits).all()


def test_llava_hf_rejects_unsupported_shapes(folders, tmp_path) -> None:
    import shutil

    root = tmp_path / "relu"
    shutil.copytree(folders["llava"], root)
    cfg = json.loads((root / "config.json").read_text())
    cfg["projector_hidden_act"] = "relu"
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SR3DConfigError, match=r"projector_hidden_act='relu'.*expected 'gelu'"):
        load_model(root)
    cfg["projector_hidden_act"] = "gelu"
    cfg["vision_feature_layer"] = [-2, -5]
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SR3DConfigError, match=r"vision_feature_layer=\[-2, -5\]"):
        load_model(root)


# ------------------------------------------------------------------------------------------------
# original LLaVA code base
# ------------------------------------------------------------------------------------------------


def test_llava_original_matches_transformers_llava_with_the_same_weights(folders) -> None:
    from transformers import AutoConfig, CLIPVisionModel, LlavaForConditionalGeneration

    root, clip = folders["llava_original"], folders["clip"]
    ours, proc = load_model(root, dtype="float32", use_position_encoding=False)
    assert ours.config.vision_feature_select == "patch" and ours.config.projector_type == "mlp2x_gelu"
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == ours.config.image_token_id and ours.get_input_embeddings().weight.shape[0] % 64 == 0

    # reference: transformers' LLaVA holding the original weights, keys renamed independently here
    # (transformers' convert_llava_weights_to_hf.py rules: model.mm_projector.0/2 → linear_1/2, model.* → LM)
    original = torch.load(str(root / "pytorch_model.bin"), weights_only=True)
    raw = json.loads((root / "config.json").read_text())
    text = AutoConfig.for_model("llama", **{k: raw[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                                "num_attention_heads", "num_key_value_heads",
                                                                "max_position_embeddings", "vocab_size", "rms_norm_eps")})  # fmt: skip
    ref = LlavaForConditionalGeneration(
        AutoConfig.for_model(
            "llava",
            vision_config=AutoConfig.from_pretrained(clip).to_dict(),
            text_config=text.to_dict(),
            image_token_index=image_id,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    ).eval()
    ref.resize_token_embeddings(len(proc.tokenizer))
    with torch.no_grad():
        ref.model.vision_tower.load_state_dict(CLIPVisionModel.from_pretrained(clip).state_dict())
        ref.model.multi_modal_projector.linear_1.weight.copy_(original["model.mm_projector.0.weight"])
        ref.model.multi_modal_projector.linear_1.bias.copy_(original["model.mm_projector.0.bias"])
        ref.model.multi_modal_projector.linear_2.weight.copy_(original["model.mm_projector.2.weight"])
        ref.model.multi_modal_projector.linear_2.bias.copy_(original["model.mm_projector.2.bias"])
        lm = {k[len("model.") :]: v for k, v in original.items() if k.startswith("model.") and "mm_projector" not in k}
        embed = lm.pop("embed_tokens.weight")
        ref.model.language_model.load_state_dict(lm, strict=False)
        ref.model.language_model.embed_tokens.weight[: embed.shape[0]] = embed
        ref.lm_head.weight[: embed.shape[0]] = original["lm_head.weight"]
    vis = VisualInput([_image(60, 60)])
    batch = proc(proc.build_prompt("What is this?", vis), vis)
    with torch.no_grad():
        a = ours(**batch).logits
        b = ref(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    n = embed.shape[0]  # compare the original vocabulary (added rows are initialised differently)
    assert torch.allclose(a[..., :n], b[..., :n], atol=1e-5)


def test_llava_original_needs_a_local_vision_tower(folders, tmp_path) -> None:
    import shutil

    root = tmp_path / "orig"
    shutil.copytree(folders["llava_original"], root)
    cfg = json.loads((root / "config.json").read_text())
    cfg["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SR3DInputError, match=r"not a local folder.*vision_tower=DIR"):
        load_model(root)
    model, _ = load_model(root, vision_tower=folders["clip"], dtype="float32")  # the option overrides
    assert model.config.vision_config.model_type == "clip_vision_model"
    dst = tmp_path / "converted"
    args = ["convert", str(root), str(dst), "--vision-tower", str(folders["clip"]), "--dtype", "float32", "--json"]
    assert cli_main(args) == 0
    reloaded = AutoModelForImageTextToText.from_pretrained(dst)
    assert torch.equal(reloaded.mm_projector.layers[0].weight, model.mm_projector.layers[0].weight)


# ------------------------------------------------------------------------------------------------
# scratch
# ------------------------------------------------------------------------------------------------

_SCRATCH_YAML = """
tokenizer: tiny
seed: 3
tile_size: 56
max_tiles: 4
projector_type: mlp_downsample_3x3_fix
vision_config: {model_type: siglip_vision_model, hidden_size: 32, intermediate_size: 64,
                num_hidden_layers: 2, num_attention_heads: 2, image_size: 56, patch_size: 14}
text_config: {model_type: qwen2, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
              num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 10}
"""


def test_scratch_builder_from_yaml_file(tmp_path) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(_SCRATCH_YAML)
    assert detect_builder(path) == "scratch"
    model, proc = load_model(path)
    assert model.config.text_config.vocab_size == len(proc.tokenizer)  # raised from 10 to fit the tokenizer
    assert model.config.max_tiles == 4 and proc.max_tiles == 4
    assert model.perception_encoder.layers.position_embedding_head[0].weight.abs().max() < 0.01
    again, _ = load_model(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    vis = _visual()
    assert torch.isfinite(model(**proc(proc.build_prompt("<mask>?", vis), vis)).logits).all()
    evil = tmp_path / "evil.yaml"
    evil.write_text("tokenizer: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SR3DInputError, match="cannot parse"):
        load_model(evil)
    (tmp_path / "bad.yaml").write_text(_SCRATCH_YAML.replace("tokenizer: tiny", "tokenizer: /no/such/tokenizer"))
    with pytest.raises(SR3DInputError, match="tokenizer folder /no/such/tokenizer does not exist"):
        load_model(tmp_path / "bad.yaml")


def test_convert_refuses_quantised_output_and_same_folder(folders, tmp_path) -> None:
    with pytest.raises(SR3DConfigError, match="full-precision"):
        convert_checkpoint(folders["nvila_lite"], tmp_path / "q", load_in_4bit=True)
    with pytest.raises(SR3DInputError, match="already exists"):
        convert_checkpoint(folders["nvila_lite"], folders["nvila_lite"])


# ------------------------------------------------------------------------------------------------
# config without weights (the memory planner's view): one case per registered builder
# ------------------------------------------------------------------------------------------------

#: fields a load sets that are not part of what the model is (dtype, where it came from)
_LOADING_FIELDS = ("_name_or_path", "dtype", "torch_dtype")


def _what_the_model_is(config_dict: dict, planned: dict | None = None) -> dict:
    out = {}
    for key, value in config_dict.items():
        if key in _LOADING_FIELDS:
            continue
        if key == "image_seq_length" and planned is not None and planned.get(key) is None:
            continue  # derived from the projector by the model when the config leaves it open
        out[key] = _what_the_model_is(value) if isinstance(value, dict) else value
    return out


def _builder_case(name: str, folders, tmp_path):
    """``(path, options)`` for a registered builder on a tiny fixture folder."""
    from sr3d_plugin.presets import tiny_scratch_spec

    if name == "sr3d":
        model, proc = load_model(tiny_scratch_spec({"max_tiles": 5}), builder="scratch")
        model.save_pretrained(str(tmp_path / "native"))
        proc.save_pretrained(str(tmp_path / "native"))
        return tmp_path / "native", {}
    if name == "scratch":
        (tmp_path / "tiny.yaml").write_text(_SCRATCH_YAML)
        return tmp_path / "tiny.yaml", {"seed": 3}
    cases = {
        "vila": (folders["nvila_lite"], {}),
        "llava_hf": (folders["onevision"], {}),
        "llava_original": (folders["llava_original"], {"vision_tower": str(folders["clip"])}),
    }
    if name not in cases:
        pytest.fail(f"registered builder {name!r} has no tiny fixture in this test; add one")
    return cases[name]


@pytest.mark.parametrize("name", sorted(plugins.registry("model_builders")))
def test_each_builder_reports_the_loaded_config_without_reading_weights(name, folders, tmp_path, monkeypatch):
    import safetensors.torch
    from transformers import PreTrainedModel

    from sr3d_plugin.builders import model_config

    path, options = _builder_case(name, folders, tmp_path)
    assert detect_builder(path) == name
    model, _ = load_model(path, max_tiles=3, **options)

    def refuse(*args, **kwargs):
        raise AssertionError("config() read model weights")

    with monkeypatch.context() as mp:  # no tensor data may be read while planning
        mp.setattr(safetensors.torch, "load_file", refuse)
        mp.setattr(torch, "load", refuse)
        mp.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
        planned, used = model_config(path, max_tiles=3, dtype="bfloat16", **options)
    assert used == name
    assert planned.max_tiles == 3  # overrides apply as for load_model
    want = planned.to_dict()
    assert _what_the_model_is(want, want) == _what_the_model_is(model.config.to_dict(), want)
    assert planned.text_config.vocab_size == model.get_input_embeddings().weight.shape[0]


def test_model_config_for_goes_through_the_builders(folders, tmp_path) -> None:
    from sr3d_plugin.training.model_setup import build_model, model_config_for
    from sr3d_plugin.training.recipe import load_recipe

    recipe, _ = load_recipe({"model": {"path": str(folders["onevision"])}, "data": {"generator": "x:y"}}, [])
    config, source = model_config_for(recipe)
    assert source.startswith("llava_hf checkpoint") and config.image_aspect_ratio == "native"
    tiny, _ = load_recipe(
        {"model": {"preset": "tiny", "config_overrides": {"max_tiles": 2}}, "data": {"generator": "x:y"}}, []
    )
    config, source = model_config_for(tiny)
    model, _, _ = build_model(tiny)
    assert source == "preset tiny" and config.max_tiles == 2
    assert _what_the_model_is(config.to_dict(), config.to_dict()) == _what_the_model_is(
        model.config.to_dict(), config.to_dict()
    )
