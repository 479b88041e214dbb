"""SR-3D / VILA lineage conformance with the original SR-REAL code (conformance/sr_real, docs/conformance.md).

The recorded cases themselves are replayed by tests/test_conformance.py; here: the required cases
exist, the OpenCV conventions hold against the real cv2 on random sizes (not only the committed
ones), and the PE-off identity of the ``vila`` builder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sr3d_plugin.conformance import data_root, run_case
from sr3d_plugin.conformance.sr_real import collapse_image_ids
from sr3d_plugin.geometry import depth_image_to_relative, disparity_to_relative_depth
from sr3d_plugin.pointmap import frame_token_positions, image_token_positions
from sr3d_plugin.tiling import (
    TileLayout,
    cv2_area_matrices,
    plan_tiles,
    resize_area_cv2,
    tile_mask,
    tile_pointmap,
)

cv2 = pytest.importorskip("cv2", reason="opencv-python-headless is in the dev extra")

REQUIRED = (
    "sr3d_single_reldepth_box",
    "sr3d_single_depth_anything",
    "sr3d_multiview_rgbd_box",
    "sr3d_multiview_mask_two_regions",
    "sr3d_vila_host_pe_off",
)


@pytest.mark.parametrize("name", REQUIRED)
def test_required_case_is_recorded(name: str) -> None:
    case = data_root() / name
    meta = json.loads((case / "case.json").read_text())
    assert meta["runner"] == "sr3d_plugin.conformance.sr_real:run"
    assert meta["recorded_with"]["transformers"] == "4.46.0"
    assert (case / "expected.safetensors").is_file() and (case / "checkpoint" / "config.json").is_file()
    assert (case / "inputs" / "request.json").is_file()


def test_lmms_eval_path_is_covered() -> None:
    covered = [n for n in REQUIRED if "lmms-eval" in json.loads((data_root() / n / "case.json").read_text())["paths"]]
    assert covered, "at least one case must go through the lmms-eval model"


# ----------------------------------------------------------------------------------------------
# OpenCV INTER_AREA (point maps) and INTER_NEAREST (masks), on random sizes
# ----------------------------------------------------------------------------------------------


def _sizes(rng: np.random.Generator, n: int) -> list[tuple[int, int, int, int]]:
    out = []
    for _ in range(n):
        ih, iw = (int(v) for v in rng.integers(2, 160, 2))
        kind = rng.integers(0, 3)
        if kind == 0:  # both down
            oh, ow = int(rng.integers(1, ih + 1)), int(rng.integers(1, iw + 1))
        elif kind == 1:  # both up
            oh, ow = int(rng.integers(ih, 3 * ih)), int(rng.integers(iw, 3 * iw))
        else:  # mixed
            oh, ow = int(rng.integers(1, ih + 1)), int(rng.integers(iw, 3 * iw))
        out.append((ih, iw, oh, ow))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inter_area_equals_cv2_on_random_sizes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    fixed = [(480, 640, 448, 448), (968, 1296, 448, 448), (120, 340, 112, 336)] if seed == 0 else []
    for ih, iw, oh, ow in [*_sizes(rng, 25), *fixed]:
        x = rng.normal(size=(ih, iw, 3)) * 3.0
        ref = cv2.resize(x, (ow, oh), interpolation=cv2.INTER_AREA).reshape(oh, ow, 3)
        mine = resize_area_cv2(torch.from_numpy(x).permute(2, 0, 1), (oh, ow)).permute(1, 2, 0).numpy()
        assert np.abs(mine - ref).max() <= 1e-6, (ih, iw, oh, ow)


def test_inter_area_is_not_adaptive_average_pooling() -> None:
    """640 → 448 is not an integer factor: torch's adaptive average differs from OpenCV's fractional areas."""
    x = torch.from_numpy(np.random.default_rng(3).normal(size=(3, 480, 640)))
    ours = resize_area_cv2(x, (448, 448))
    torch_area = torch.nn.functional.interpolate(x[None], size=(448, 448), mode="area")[0]
    assert float((ours - torch_area).abs().max()) > 1e-3
    mh, mw = cv2_area_matrices((480, 640), (448, 448))
    assert torch.allclose(mh.sum(1), torch.ones(448, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(mw.sum(1), torch.ones(448, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_inter_nearest_masks_equal_cv2(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for ih, iw, oh, ow in _sizes(rng, 40):
        m = (rng.random((ih, iw)) > 0.6).astype(np.uint8)
        ref = cv2.resize(m, (ow, oh), interpolation=cv2.INTER_NEAREST)
        layout = TileLayout(1, 1, 8)
        # through the public tiler: one tile of side s = oh when square; check the resize itself otherwise
        if oh == ow:
            layout = TileLayout(1, 1, oh)
            assert np.array_equal(tile_mask(m.astype(bool), layout)[0].numpy(), ref.astype(bool))
        from sr3d_plugin.tiling import _resize_cv2

        got = _resize_cv2(torch.from_numpy(m)[None], (oh, ow), "cv2_nearest")[0].numpy()
        assert np.array_equal(got, ref), (ih, iw, oh, ow)


def _cv2_dynamic_tiles(arr: np.ndarray, layout: TileLayout, interpolation: int) -> list[np.ndarray]:
    """The reference tiling written with cv2 directly: resize to the grid, cut row-major, thumbnail last."""
    s = layout.tile_size
    big = cv2.resize(arr, (layout.cols * s, layout.rows * s), interpolation=interpolation)
    tiles = [big[r * s : (r + 1) * s, c * s : (c + 1) * s] for r in range(layout.rows) for c in range(layout.cols)]
    if layout.thumbnail:
        tiles.append(cv2.resize(arr, (s, s), interpolation=interpolation))
    return tiles


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_pointmap_and_mask_tiles_follow_cv2_dynamic_tiling(seed: int) -> None:
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(20, 400, 2))
    tile = int(rng.choice([28, 56, 112]))
    layout = plan_tiles(w, h, 1, 6, tile, True)
    pts = rng.normal(size=(h, w, 3))
    got, _ = tile_pointmap(torch.from_numpy(pts), layout)
    for t, ref in zip(got.numpy(), _cv2_dynamic_tiles(pts, layout, cv2.INTER_AREA)):
        assert np.abs(t - ref).max() <= 1e-6
    mask = (rng.random((h, w)) > 0.5).astype(np.uint8)
    mt = tile_mask(mask.astype(bool), layout).numpy()
    for t, ref in zip(mt, _cv2_dynamic_tiles(mask, layout, cv2.INTER_NEAREST)):
        assert np.array_equal(t, ref.astype(bool))
    # per-token positions: each cv2 tile area-pooled (exact blocks of patch 14) onto the token grid
    grid = tile // 14
    tok = image_token_positions(torch.from_numpy(pts), layout, grid=grid).numpy()
    for t, ref in zip(tok, _cv2_dynamic_tiles(pts, layout, cv2.INTER_AREA)):
        pooled = ref.reshape(grid, 14, grid, 14, 3).mean(axis=(1, 3))
        assert np.abs(t - pooled).max() <= 1e-5


def test_multiview_token_positions_follow_cv2() -> None:
    rng = np.random.default_rng(5)
    v, h, w, tile, grid = 2, 97, 131, 56, 4
    pts = rng.normal(size=(v, h, w, 3))
    tok = frame_token_positions(torch.from_numpy(pts), grid=grid, tile_size=tile).numpy()
    for k in range(v):
        ref = cv2.resize(pts[k], (tile, tile), interpolation=cv2.INTER_AREA)
        pooled = ref.reshape(grid, tile // grid, grid, tile // grid, 3).mean(axis=(1, 3))
        assert np.abs(tok[k] - pooled).max() <= 1e-6


# ----------------------------------------------------------------------------------------------
# single-view depth conventions
# ----------------------------------------------------------------------------------------------


def test_depth_image_reading_matches_process_depth() -> None:
    rng = np.random.default_rng(0)
    img8 = rng.integers(0, 200, size=(9, 7)).astype(np.uint8)
    np.testing.assert_array_equal(depth_image_to_relative(img8), img8 / 255.0)  # max < 255: still /255
    img16 = rng.integers(0, 5000, size=(9, 7)).astype(np.uint16)
    np.testing.assert_array_equal(depth_image_to_relative(img16), img16 / img16.max())


def test_depth_anything_quantisation_is_a_uint8_cast_of_one_minus_minmax() -> None:
    pred = torch.rand(37, 23, generator=torch.Generator().manual_seed(1)) * 7 + 2
    ours = disparity_to_relative_depth(pred, quantize=True).numpy()
    ref = ((1 - (pred - pred.min()) / (pred.max() - pred.min())) * 255.0).numpy().astype(np.uint8) / 255.0
    np.testing.assert_array_equal(ours, ref)


# ----------------------------------------------------------------------------------------------
# prompts, vocabulary, PE-off identity
# ----------------------------------------------------------------------------------------------


def _pipeline(case: str, **kwargs):
    from sr3d_plugin.inference import SR3DPipeline

    return SR3DPipeline.from_pretrained(data_root() / case / "checkpoint", dtype="float32", device="cpu", **kwargs)


def test_multiview_prompt_has_no_text_between_frames_and_single_image_tiles_do() -> None:
    from sr3d_plugin.modeling.inputs import VisualInput

    pipe = _pipeline("sr3d_multiview_rgbd_box")
    proc = pipe.processor
    frames = [Image.new("RGB", (64, 48), (i * 40, 0, 0)) for i in range(3)]
    multi = VisualInput(frames, points=torch.zeros(3, 48, 64, 3), multi_view=True)
    prompt = proc.build_prompt("  Q?  \n", multi)
    assert "<image><image><image>  Q?<|im_end|>" in prompt  # the message stripped at its ends, as tokenize_conversation
    # no system message is passed: the checkpoint's chat template (VILA's qwen2, saved by SR-REAL) adds
    # its own default, which has no final period
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant<|im_end|>")
    assert proc.build_prompt("Q?", multi, system="Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>")
    single = VisualInput([Image.new("RGB", (340, 120))], points=torch.zeros(1, 120, 340, 3))
    prompt1 = proc.build_prompt("Q?", single)
    ids = proc(prompt1, single)["input_ids"][0].tolist()
    collapsed = collapse_image_ids(ids, proc.image_token_id, proc.tokens_per_tile, proc._end_ids())
    assert collapsed.count(proc.image_token_id) == proc.num_tiles(single) == 4  # 3×1 tiles + thumbnail
    newline = proc._end_ids()
    first = collapsed.index(proc.image_token_id)
    assert collapsed[first + 1 : first + 1 + len(newline)] == newline  # "<image>\n" per tile in the text


def test_vila_builder_cuts_padded_vocab_unless_asked() -> None:
    pipe = _pipeline("sr3d_single_reldepth_box")
    n = len(pipe.processor.tokenizer)
    assert pipe.model.get_output_embeddings().weight.shape[0] == n == 424
    kept = _pipeline("sr3d_single_reldepth_box", keep_padded_vocab=True)
    assert kept.model.get_output_embeddings().weight.shape[0] == 512
    # generation stops at the chat template's stop token, as VILA's default_generation_config
    im_end = pipe.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert pipe.model.generation_config.eos_token_id == im_end


def _ask_logits(pipe, question: str, **kwargs) -> torch.Tensor:
    seen: dict[str, torch.Tensor] = {}
    original = type(pipe.model).generate

    def generate(self, *args, **kw):
        seen.update({k: v for k, v in kw.items() if isinstance(v, torch.Tensor)})
        return original(self, *args, **kw)

    type(pipe.model).generate = generate
    try:
        pipe.ask(question, max_new_tokens=1, **kwargs)
    finally:
        type(pipe.model).generate = original
    with torch.inference_mode():
        return pipe.model(**seen).logits[0, -1]


def test_pe_off_identity_of_the_vila_builder(tmp_path) -> None:
    """The full SR-3D checkpoint (PE and region extractor included) with the PE switched off gives the
    host model's logits, recorded by the original code from the same raw image and text without its
    perception encoder; with the PE on, the same input gives other logits (the identity is not vacuous)."""
    from safetensors.torch import load_file

    host = data_root() / "sr3d_vila_host_pe_off"
    expected = load_file(str(host / "expected.safetensors"))["last_logits"]
    req = json.loads((host / "inputs" / "request.json").read_text())
    image = str(host / "inputs" / req["image"])
    off = _pipeline("sr3d_single_reldepth_box", use_position_encoding=False)
    assert float((_ask_logits(off, req["question"], image=image) - expected).abs().max()) <= 1e-4
    width, height = Image.open(image).size
    depth = tmp_path / "depth.png"
    Image.fromarray(np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1))).save(depth)
    on = _pipeline("sr3d_single_reldepth_box")
    assert float((_ask_logits(on, req["question"], image=image, depth=str(depth)) - expected).abs().max()) > 1e-3


def test_replayed_prompt_ids_equal_the_original_ones() -> None:
    """Besides logits and tokens (tests/test_conformance.py), the prompt ids match the original's."""
    results = run_case(data_root() / "sr3d_vila_host_pe_off")
    assert results and all(r.passed and r.detail.get("input_ids_equal") for r in results), results


def test_unreproducible_pad_convention_is_a_clear_error(tmp_path) -> None:
    import shutil

    from sr3d_plugin.errors import SR3DConfigError

    folder = tmp_path / "ckpt"
    shutil.copytree(data_root() / "sr3d_vila_host_pe_off" / "checkpoint", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["image_aspect_ratio"] = "pad"
    (folder / "config.json").write_text(json.dumps(cfg))
    from sr3d_plugin.builders import load_model

    with pytest.raises(SR3DConfigError, match="image_aspect_ratio='pad'"):
        load_model(folder, dtype="float32")
    _, proc = load_model(folder, dtype="float32", image_aspect_ratio="resize")
    assert proc.image_aspect_ratio == "resize"


def test_convert_vila_round_trip_keeps_the_original_answers(tmp_path) -> None:
    """``sr3d convert-vila`` writes our standard folder; the case replays from it unchanged (stop tokens included)."""
    import shutil

    from sr3d_plugin.cli import main as cli_main

    src = data_root() / "sr3d_single_reldepth_box"
    case = tmp_path / src.name
    shutil.copytree(src, case, ignore=shutil.ignore_patterns("checkpoint"))
    assert cli_main(["convert-vila", str(src / "checkpoint"), str(case / "checkpoint")]) == 0
    results = run_case(case)
    assert results and all(r.passed for r in results), results
