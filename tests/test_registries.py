"""Every REGISTERED component, exercised on tiny fixtures (timm's ``tests/test_models.py`` pattern).

The tests are parametrised over ``plugins.registry(kind)`` at collection time, so a component
registered later (built in or by an installed plugin) is picked up automatically. Each kind has a
dict of fixtures keyed by component name; a registered name without one FAILS (the per-name test
raises on the missing key, and :func:`test_every_registered_component_has_a_fixture` says which),
it is never skipped. Sizes are tiny and the expensive fixtures module-scoped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sr3d_plugin import Region, VisualInput, plugins
from sr3d_plugin.sources.base import FrameSet, PointMaps
from sr3d_plugin.synthetic import SyntheticScene, generate_scene, write_scannet_layout


def registered(kind: str) -> list[str]:
    return sorted(plugins.registry(kind))


def case(fixtures: dict[str, Any], kind: str, name: str) -> Any:
    """The fixture of a registered component; a component without one fails (never skips)."""
    assert name in fixtures, f"registered {kind} {name!r} has no fixture in tests/test_registries.py; add one"
    return fixtures[name]


# ----------------------------------------------------------------------------------------------
# shared tiny fixtures
# ----------------------------------------------------------------------------------------------

V, W, H = 3, 32, 24  # frames, image width, height


@pytest.fixture(scope="module")
def scene() -> SyntheticScene:
    return generate_scene(5, num_frames=V, width=W, height=H, num_objects=2, scene_id="scene0005_00")


@pytest.fixture(scope="module")
def frames(scene: SyntheticScene) -> FrameSet:
    return scene.to_frame_set()


@pytest.fixture(scope="module")
def tiny_depth_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Depth Anything (DINOv2 backbone) folder built from a config."""
    from sr3d_plugin.testing import write_tiny_depth_anything

    return write_tiny_depth_anything(tmp_path_factory.mktemp("tiny-depth-anything"))


# ----------------------------------------------------------------------------------------------
# projectors: [N, g², C] → [N, tokens, H]
# ----------------------------------------------------------------------------------------------

C_VIS, C_LLM, GRID = 8, 16, 5  # a 5×5 grid: the k×k downsamples pad it (⌈5/3⌉ = 2, ⌈5/2⌉ = 3)

#: name → (llm width, output tokens per tile for a 5×5 grid: ⌈g/k⌉² with k the documented downsample)
PROJECTORS: dict[str, tuple[int, int]] = {
    "mlp_downsample_3x3_fix": (C_LLM, 4),
    "mlp_downsample_2x2_fix": (C_LLM, 9),
    "mlp_downsample": (C_LLM, 9),
    "linear": (C_LLM, 25),
    "mlp2x_gelu": (C_LLM, 25),
    "identity": (C_VIS, 25),  # keeps width and tokens: needs equal widths
}


@pytest.mark.parametrize("name", registered("projectors"))
def test_projector(name: str) -> None:
    llm, tokens = case(PROJECTORS, "projectors", name)
    proj = plugins.create("projectors", name, C_VIS, llm)
    x = torch.randn(2, GRID * GRID, C_VIS, requires_grad=True)
    out = proj(x)
    assert tuple(out.shape) == (2, tokens, llm)
    assert torch.isfinite(out).all()
    if hasattr(proj, "tokens_out"):  # the projector's own count agrees with the output
        assert proj.tokens_out(GRID * GRID) == tokens
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for pname, p in proj.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    # tiles are independent: changing tile 1 leaves tile 0's tokens alone
    with torch.no_grad():
        y = x.detach().clone()
        y[1] += 1.0
        assert torch.equal(proj(y)[0], out[0].detach())


# ----------------------------------------------------------------------------------------------
# position encoders: [..., 3] → [..., C], a near no-op when fresh
# ----------------------------------------------------------------------------------------------

#: name → (hidden size, factory options, largest |output| of a fresh encoder on xyz in [−1, 1]³)
POSITION_ENCODERS: dict[str, tuple[int, dict[str, Any], float]] = {
    "abs_mlp": (16, {}, 0.01),  # xavier gain 0.001 (SR3D-FACTS §5)
}


@pytest.mark.parametrize("name", registered("position_encoders"))
def test_position_encoder(name: str) -> None:
    hidden, options, near_zero = case(POSITION_ENCODERS, "position_encoders", name)
    pe = plugins.create("position_encoders", name, hidden, **options)
    xyz = (torch.rand(2, 4, 6, 3) * 2 - 1).requires_grad_(True)
    out = pe(xyz)
    assert tuple(out.shape) == (2, 4, 6, hidden)
    assert torch.isfinite(out).all()
    assert float(out.detach().abs().max()) < near_zero  # starts near zero: adding it leaves a pretrained VLM alone
    assert not torch.allclose(out[0, 0, 0], out[1, 3, 5])  # but it does depend on the position
    out.sum().backward()
    assert all(p.grad is not None for p in pe.parameters())


# ----------------------------------------------------------------------------------------------
# region extractors: pool mask regions of [T, g², C] tokens into [M, H]
# ----------------------------------------------------------------------------------------------

#: name → factory options
REGION_EXTRACTORS: dict[str, dict[str, Any]] = {"regiongpt": {}}


@pytest.mark.parametrize("name", registered("region_extractors"))
def test_region_extractor(name: str) -> None:
    ext = plugins.create("region_extractors", name, C_VIS, C_LLM, **case(REGION_EXTRACTORS, "region_extractors", name))
    g, s = 4, 8  # 4×4 tokens per tile, 8×8 masks: each token is a 2×2 mask cell
    feats = torch.randn(2, g * g, C_VIS)
    masks = torch.zeros(2, 2, s, s, dtype=torch.bool)
    masks[0, 0, :4, :4] = True  # region 0: the top-left 2×2 tokens of tile 0
    masks[1, 1] = True  # region 1: all of tile 1
    out = ext(feats, masks)
    assert tuple(out.shape) == (2, C_LLM) and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])
    # a region sees only the tokens under its mask
    inside = torch.zeros(2, g, g, dtype=torch.bool)
    inside[0, :2, :2] = True
    outside = feats.clone()
    outside[~inside.reshape(2, -1)] += 5.0
    moved = ext(outside, masks)
    torch.testing.assert_close(moved[0], out[0])
    assert not torch.allclose(moved[1], out[1])
    changed = feats.clone()
    changed[0, 0] += 5.0  # a token inside region 0
    assert not torch.allclose(ext(changed, masks)[0], out[0])


# ----------------------------------------------------------------------------------------------
# depth estimators: images → [V, H, W] relative depth in [0, 1]
# ----------------------------------------------------------------------------------------------

DEPTH_ESTIMATORS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "depth_anything_v2": lambda model: {"model": str(model), "device": "cpu"},
}


@pytest.mark.parametrize("name", registered("depth_estimators"))
def test_depth_estimator(name: str, frames: FrameSet, tiny_depth_model: Path) -> None:
    est = plugins.create("depth_estimators", name, **case(DEPTH_ESTIMATORS, "depth_estimators", name)(tiny_depth_model))
    depth = np.asarray(est.estimate(frames.images))
    assert depth.shape == (V, H, W)
    assert np.isfinite(depth).all() and depth.min() >= 0.0 and depth.max() <= 1.0
    assert depth.std() > 0  # not a constant map


# ----------------------------------------------------------------------------------------------
# point-map sources: FrameSet → finite [V, H, W, 3] points + valid
# ----------------------------------------------------------------------------------------------


def _reconstruction(tmp: Path, frames: FrameSet, tiny_depth_model: Path) -> dict[str, Any]:
    """A reconstruction file of the scene's exact points, frames in reverse order (matched by id)."""
    pm = plugins.create("pointmap_sources", "gt_depth").pointmaps(frames)
    path = tmp / "recon.npz"
    np.savez(
        path,
        xyz=pm.xyz.numpy()[::-1],
        valid=pm.valid.numpy()[::-1],
        frame_ids=np.array(frames.frame_ids[::-1]),
    )
    return {"path": path}


#: name → options factory(tmp folder, frames, tiny depth model folder)
POINTMAP_SOURCES: dict[str, Callable[[Path, FrameSet, Path], dict[str, Any]]] = {
    "gt_depth": lambda tmp, frames, model: {},
    "relative_depth": lambda tmp, frames, model: {},
    "depth_anything": lambda tmp, frames, model: {"model": str(model), "device": "cpu"},
    "reconstruction": _reconstruction,
}


@pytest.mark.parametrize("name", registered("pointmap_sources"))
def test_pointmap_source(
    name: str, frames: FrameSet, scene: SyntheticScene, tiny_depth_model: Path, tmp_path: Path
) -> None:
    source = plugins.create(
        "pointmap_sources", name, **case(POINTMAP_SOURCES, "pointmap_sources", name)(tmp_path, frames, tiny_depth_model)
    )
    pm = source.pointmaps(frames)
    assert isinstance(pm, PointMaps)
    v, h, w, three = pm.xyz.shape
    assert (v, three) == (V, 3) and h * W == w * H  # one map per frame, the frames' aspect ratio
    assert tuple(pm.valid.shape) == (v, h, w) and pm.valid.dtype == torch.bool
    assert torch.isfinite(pm.xyz).all() and bool(pm.valid.any())
    can = pm.canonical()
    assert tuple(can.shape) == tuple(pm.xyz.shape)
    assert float(can[pm.valid].abs().max()) <= 1.0 + 1e-5  # canonical space is [−1, 1]³
    if pm.space == "world":  # metric sources of an exact scene: every valid point lies inside the room
        pts = pm.xyz[pm.valid].double().numpy()
        assert (pts >= scene.room.lower - 1e-3).all() and (pts <= scene.room.upper + 1e-3).all()


def test_reconstruction_source_returns_the_file_points_by_frame_id(frames: FrameSet, tmp_path: Path) -> None:
    """The fixture above is a permuted copy of the exact points; matching by id undoes the permutation."""
    exact = plugins.create("pointmap_sources", "gt_depth").pointmaps(frames)
    opts = _reconstruction(tmp_path, frames, tmp_path)
    got = plugins.create("pointmap_sources", "reconstruction", **opts).pointmaps(frames)
    torch.testing.assert_close(got.xyz, exact.xyz)
    assert torch.equal(got.valid, exact.valid)


# ----------------------------------------------------------------------------------------------
# frame readers: a tiny fixture of each layout → FrameSet
# ----------------------------------------------------------------------------------------------


def _image_case(tmp: Path, scene: SyntheticScene) -> tuple[dict, Any, int]:
    path = tmp / "one.png"
    Image.fromarray(scene.rgb[0]).save(path)
    return {}, path, 1


def _frames_case(tmp: Path, scene: SyntheticScene) -> tuple[dict, Any, int]:
    folder = tmp / "frames"
    folder.mkdir()
    for i in range(V):
        Image.fromarray(scene.rgb[i]).save(folder / f"{i:03d}.png")
    return {}, sorted(folder.iterdir()), V


def _video_case(tmp: Path, scene: SyntheticScene) -> tuple[dict, Any, int]:
    import av

    path = tmp / "clip.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for i in range(V):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(scene.rgb[i]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return {"num_frames": 2}, path, 2


def _scannet_case(tmp: Path, scene: SyntheticScene) -> tuple[dict, Any, int]:
    return {"num_frames": None}, write_scannet_layout(scene, tmp / "scans"), V


#: name → case(tmp folder, scene) -> (factory options, what to read, expected frame count)
FRAME_READERS: dict[str, Callable[[Path, SyntheticScene], tuple[dict, Any, int]]] = {
    "image": _image_case,
    "frames": _frames_case,
    "video": _video_case,
    "scannet": _scannet_case,
}


@pytest.mark.parametrize("name", registered("frame_readers"))
def test_frame_reader(name: str, scene: SyntheticScene, tmp_path: Path) -> None:
    options, target, count = case(FRAME_READERS, "frame_readers", name)(tmp_path, scene)
    fs = plugins.create("frame_readers", name, **options).read(target)
    assert isinstance(fs, FrameSet) and len(fs) == count == len(fs.frame_ids)
    assert all(im.mode == "RGB" and im.size == (W, H) for im in fs.images)
    first = np.asarray(fs.images[0], dtype=np.float64)
    assert np.abs(first - scene.rgb[0]).mean() < 12  # the pixels of frame 0 (a lossy codec for videos)
    if fs.depth is not None:  # the ScanNet layout keeps the exact geometry (depth in mm, aligned poses)
        np.testing.assert_allclose(fs.depth, scene.depth, atol=1e-3)
        np.testing.assert_allclose(fs.cam_to_world, scene.cam_to_world, atol=1e-6)
        assert fs.has_metric_geometry


# ----------------------------------------------------------------------------------------------
# model builders: a tiny folder of each layout → load → forward
# ----------------------------------------------------------------------------------------------


def _native(root: Path) -> Path:
    from sr3d_plugin.testing import build_tiny_model

    model, processor = build_tiny_model(seed=0)
    model.save_pretrained(root / "native")
    processor.save_pretrained(root / "native")
    return root / "native"


def _vila(root: Path) -> Path:
    from sr3d_plugin.testing import write_tiny_vila_checkpoint

    return write_tiny_vila_checkpoint(root / "vila", dtype="float32")


def _llava_hf(root: Path) -> Path:
    from sr3d_plugin.testing import write_tiny_llava_hf

    return write_tiny_llava_hf(root / "llava_hf", "llava")


def _llava_original(root: Path) -> Path:
    from sr3d_plugin.testing import write_tiny_clip_vision, write_tiny_llava_original

    return write_tiny_llava_original(root / "llava_original", write_tiny_clip_vision(root / "clip"), weights="st")


def _scratch(root: Path) -> Path:
    path = root / "scratch.json"
    cfg = {
        "tokenizer": "tiny",
        "tile_size": 56,
        "max_tiles": 2,
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 56,
            "patch_size": 14,
        },
        "text_config": {
            "model_type": "qwen2",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 10,
        },
    }
    path.write_text(json.dumps(cfg))
    return path


#: name → writer of a tiny fixture in that builder's layout
MODEL_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "sr3d": _native,
    "vila": _vila,
    "llava_hf": _llava_hf,
    "llava_original": _llava_original,
    "scratch": _scratch,
}


@pytest.fixture(scope="module")
def builder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("builders")


@pytest.mark.parametrize("name", registered("model_builders"))
def test_model_builder(name: str, builder_root: Path) -> None:
    from sr3d_plugin.builders import detect_builder, load_model

    path = case(MODEL_BUILDERS, "model_builders", name)(builder_root)
    assert detect_builder(path) == name  # the layout is recognised by its own builder
    model, processor = load_model(path, builder=name, dtype="float32")
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    vis = VisualInput(
        [img], points=torch.rand(1, 40, 60, 3) * 2 - 1, regions=[Region.from_box(0, (5, 5, 30, 30), img.size)]
    )
    batch = processor(processor.build_prompt("Where is <mask>?", vis), vis)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and logits.shape[-1] >= len(processor.tokenizer)
    assert torch.isfinite(logits).all()


# ----------------------------------------------------------------------------------------------
# dataset converters: the tiny official-format raw releases of tests/_eval_data.py
# ----------------------------------------------------------------------------------------------

#: name → (raw key of write_raw_releases, converter options from the raw info, the summary's count key)
DATASET_CONVERTERS: dict[str, tuple[str, Callable[[dict[str, Any]], dict[str, Any]], str]] = {
    "scannet": ("scans", lambda raw: {}, "prepared"),
    "scanqa": ("scanqa", lambda raw: {}, "records"),
    "sqa3d": ("sqa3d", lambda raw: {}, "records"),
    "scan2cap": (
        "scanrefer",
        lambda raw: {"boxes": str(raw["boxes"]), "proposals": str(raw["proposals"]), "num_frames": 2},
        "records",
    ),
    "vsibench": ("vsibench", lambda raw: {}, "records"),
}


@pytest.fixture(scope="module")
def raw_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """The raw releases and a folder with their scenes prepared (the QA converters look scenes up there)."""
    from _eval_data import raw_releases

    raw = raw_releases(tmp_path_factory)
    out = tmp_path_factory.mktemp("prepared-registries")
    plugins.create("dataset_converters", "scannet").convert(raw["scans"], out, progress=False)
    return raw, out


@pytest.mark.parametrize("name", registered("dataset_converters"))
def test_dataset_converter(name: str, raw_data: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    raw, prepared = raw_data
    key, options, count = case(DATASET_CONVERTERS, "dataset_converters", name)
    conv = plugins.create("dataset_converters", name)
    assert getattr(conv, "name", name) == name
    out = tmp_path / "out" if name == "scannet" else prepared
    summary = conv.convert(raw[key], out, progress=False, overwrite=True, **options(raw))
    assert summary[count] > 0
    if "written" in summary:
        lines = Path(summary["written"]).read_text(encoding="utf-8").splitlines()
        assert len(lines) == summary[count] and all(json.loads(line) for line in lines)


# ----------------------------------------------------------------------------------------------
# coverage: every registered name has a fixture
# ----------------------------------------------------------------------------------------------

FIXTURES: dict[str, dict[str, Any]] = {
    "projectors": PROJECTORS,
    "position_encoders": POSITION_ENCODERS,
    "region_extractors": REGION_EXTRACTORS,
    "depth_estimators": DEPTH_ESTIMATORS,
    "pointmap_sources": POINTMAP_SOURCES,
    "frame_readers": FRAME_READERS,
    "model_builders": MODEL_BUILDERS,
    "dataset_converters": DATASET_CONVERTERS,
}


def test_every_kind_is_covered() -> None:
    assert set(FIXTURES) == set(plugins.KINDS)


@pytest.mark.parametrize("kind", sorted(plugins.KINDS))
def test_every_registered_component_has_a_fixture(kind: str) -> None:
    missing = sorted(set(registered(kind)) - set(FIXTURES[kind]))
    assert not missing, f"registered {kind} without a fixture in tests/test_registries.py: {missing}"
