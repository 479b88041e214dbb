"""The inference API (SR3DPipeline.ask) and region parsing on a tiny random model and a synthetic scene."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.geometry import backproject, canonicalize
from sr3d_plugin.inference import SR3DPipeline
from sr3d_plugin.modeling.inputs import Region, VisualInput
from sr3d_plugin.regions import (
    decode_coco_rle,
    encode_coco_rle,
    load_mask_image,
    parse_region_spec,
    polygon_mask,
)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from sr3d_plugin.synthetic import generate_scene, write_scannet_layout
    from sr3d_plugin.testing import build_tiny_model

    root = tmp_path_factory.mktemp("inference")
    model, processor = build_tiny_model(seed=0)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    scene = generate_scene(3, num_frames=8, width=160, height=120, num_objects=3)
    scene_dir = write_scannet_layout(scene, root / "scans")
    return {"root": root, "model_dir": root / "model", "scene": scene, "scene_dir": scene_dir}


@pytest.fixture(scope="module")
def pipe(workspace: dict) -> SR3DPipeline:
    return SR3DPipeline.from_pretrained(workspace["model_dir"], device="cpu")


# ----------------------------------------------------------------------------------------------
# region parsing and decoding
# ----------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_rle_builtin_decoder_agrees_with_pycocotools() -> None:
    mask_utils = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(1)
    for trial in range(30):
        h, w = (int(x) for x in rng.integers(1, 50, 2))
        m = rng.random((h, w)) < rng.random()
        if trial == 0:
            m[:] = True
        if trial == 1:
            m[:] = False
        ref = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        ours = encode_coco_rle(m)
        assert ours["counts"] == ref["counts"].decode("ascii")
        rle = {"size": [h, w], "counts": ref["counts"].decode("ascii")}
        assert np.array_equal(decode_coco_rle(rle, backend="builtin"), m)
        assert np.array_equal(decode_coco_rle(rle, backend="pycocotools"), m)
        raw = encode_coco_rle(m, compressed=False)
        coco_raw = mask_utils.decode(mask_utils.frPyObjects(raw, h, w)).astype(bool)
        assert np.array_equal(coco_raw, m)
        assert np.array_equal(decode_coco_rle(raw), m)


def test_rle_errors_name_the_problem() -> None:
    with pytest.raises(SR3DInputError, match=r"sum to 5; expected height × width = 2 × 3 = 6"):
        decode_coco_rle({"size": [2, 3], "counts": [2, 3]})
    with pytest.raises(SR3DInputError, match="'size' must be"):
        decode_coco_rle({"size": [0, 3], "counts": [0]})
    with pytest.raises(SR3DInputError, match="'counts' must be"):
        decode_coco_rle({"size": [1, 1], "counts": 3})


def test_region_spec_parsing() -> None:
    s = parse_region_spec("frame=2 box=1,2,30,40 label=chair")
    assert (s.kind, s.frame, s.values, s.label) == ("box", 2, (1.0, 2.0, 30.0, 40.0), "chair")
    s = parse_region_spec("frame=@000120 mask='my mask.png'")
    assert (s.kind, s.frame_id, s.path) == ("mask", "000120", "my mask.png")
    s = parse_region_spec("box3d=1,2,0.5,0.4,0.4,1,0.3")
    assert s.kind == "box3d" and len(s.values) == 7
    for bad, msg in [
        ("frame=0", "names 0 region kinds"),
        ("frame=0 box=1,2,3", "has 3 numbers; expected x0,y0,x1,y1"),
        ("frame=0 box=1,2,3,4 mask=a.png", "names 2 region kinds"),
        ("frame=x box=1,2,3,4", "must be a frame index"),
        ("frame=0 polygon=1,2,3,4", "at least 3 vertices"),
        ("frame=1 box3d=1,2,3,1,1,1", "drop frame=1"),
        ("box3d=1,2,3,1,0,1", "must be positive"),
        ("frame=0 colour=red box=1,2,3,4", "unknown key 'colour'"),
    ]:
        with pytest.raises(SR3DInputError, match=msg):
            parse_region_spec(bad)


def test_polygon_and_mask_image(tmp_path: Path) -> None:
    m = polygon_mask([2, 2, 10, 2, 10, 6, 2, 6], (16, 8))
    assert m.shape == (8, 16) and m[2:7, 2:11].all() and m.sum() == 5 * 9
    rgba = np.zeros((8, 16, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[1:3, 4:6, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "a.png")
    got = load_mask_image(tmp_path / "a.png")
    assert got.sum() == 4 and got[1:3, 4:6].all()


# ----------------------------------------------------------------------------------------------
# asking
# ----------------------------------------------------------------------------------------------


def test_single_image_with_metric_depth_and_answer_logprob(workspace: dict, pipe: SR3DPipeline) -> None:
    scene = workspace["scene"]
    image = Image.fromarray(scene.rgb[0])
    depth = scene.depth[0]
    k = scene.intrinsics
    question = "Which region is closer, <mask> or <mask>?"
    answer = "Region [0] is closer."
    boxes = [(10, 20, 70, 90), (90, 30, 150, 100)]
    out = pipe.ask(
        question,
        image=image,
        depth=depth,
        intrinsics=k,
        regions=[f"box={','.join(map(str, b))}" for b in boxes],
        score_answer=answer,
        max_new_tokens=6,
    )
    assert out["geometry"] == {"source": "gt_depth", "space": "world", "canonical_mode": "sr3d"}
    assert out["num_frames"] == 1 and out["num_tiles"] == pipe.processor.num_tiles(VisualInput([image]))
    assert [r["bbox"] for r in out["regions"]] == [[list(b)] for b in boxes]
    assert [r["pixel_area"] for r in out["regions"]] == [[60 * 70], [60 * 70]]

    # independent log p(answer | prompt): geometry by hand, the conversation tokenised in one piece
    proc, model = pipe.processor, pipe.model
    pts = canonicalize(backproject(torch.from_numpy(depth[None].astype(np.float64)), torch.from_numpy(k[None])))
    visual = VisualInput([image], points=pts.float(), regions=[Region.from_box(0, b, image.size) for b in boxes])
    gen_prompt = proc(proc.build_prompt(question, visual), visual)
    full = proc(proc.build_prompt(question, visual, answer=answer), visual)
    p = gen_prompt["input_ids"].shape[1]
    assert out["prompt_tokens"] == p
    ids = full["input_ids"][0]
    assert torch.equal(ids[:p], gen_prompt["input_ids"][0])
    end = ids.tolist().index(proc.tokenizer.convert_tokens_to_ids("<|im_end|>"), p)
    assert out["answer_tokens"] == end - p
    with torch.no_grad():
        logits = model(**full).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    expected = sum(float(logp[i - 1, ids[i]]) for i in range(p, end))
    assert out["answer_logprob"] == pytest.approx(expected, abs=1e-3)
    assert out["answer_logprob"] < 0


def test_single_image_depth_without_intrinsics_uses_relative_depth(workspace: dict, pipe: SR3DPipeline) -> None:
    scene = workspace["scene"]
    out = pipe.ask("What is this?", image=Image.fromarray(scene.rgb[1]), depth=scene.depth[1], max_new_tokens=2)
    assert out["geometry"]["source"] == "relative_depth" and out["geometry"]["space"] == "single_view"
    assert out["regions"] == []


def test_scene_with_box3d_region_matches_the_object(workspace: dict, pipe: SR3DPipeline) -> None:
    scene, scene_dir = workspace["scene"], workspace["scene_dir"]
    obj = scene.objects[0]
    spec = f"box3d={','.join(f'{v:.6f}' for v in [*obj.box.center.tolist(), *obj.box.size.tolist(), obj.yaw])} label={obj.label.replace(' ', '_')}"
    out = pipe.ask(
        "Where is <region1> relative to <region0>?",
        scene=scene_dir,
        regions=["frame=@4 box=20,20,60,60", spec],
        max_new_tokens=3,
        seed=1,
    )
    assert out["num_frames"] == 8 and out["num_tiles"] == 8
    assert out["geometry"]["source"] == "gt_depth"
    assert out["regions"][0]["frames"] == [4] and out["regions"][0]["frame_ids"] == ["4"]
    r = out["regions"][1]
    assert r["kind"] == "box3d" and r["frames"]
    # the projected, depth-tested box covers the object's own pixels in every frame where it is seen
    seen = [i for i in range(8) if (scene.instance[i] == obj.id).sum() > 20]
    assert set(seen) <= set(r["frames"])
    from sr3d_plugin.regions import resolve_regions

    fs = pipe.read_frames(scene=scene_dir)
    (region,) = resolve_regions([spec], fs)
    for i in seen:
        truth = scene.instance[i] == obj.id
        inter = (region.masks[i] & truth).sum()
        assert inter / truth.sum() > 0.9
        assert inter / region.masks[i].sum() > 0.8


def test_num_frames_sampling_and_frame_ids(workspace: dict, pipe: SR3DPipeline) -> None:
    out = pipe.ask(
        "Describe <mask>.",
        scene=workspace["scene_dir"],
        num_frames=3,
        regions=["frame=@7 box=0,0,40,40"],
        max_new_tokens=2,
    )
    assert out["frame_ids"] == ["0", "3", "7"]  # floor(linspace(0, 7, 3))
    assert out["regions"][0]["frames"] == [2]
    with pytest.raises(SR3DInputError, match=r"frame id '5'.*not among the 3 sampled"):
        pipe.ask("Describe <mask>.", scene=workspace["scene_dir"], num_frames=3, regions=["frame=@5 box=0,0,4,4"])


def test_in_memory_frames_with_points_array(workspace: dict, pipe: SR3DPipeline) -> None:
    scene = workspace["scene"]
    pts = backproject(
        torch.from_numpy(scene.depth.astype(np.float64)),
        torch.from_numpy(np.repeat(scene.intrinsics[None], 8, 0)),
        torch.from_numpy(scene.cam_to_world),
    ).numpy()
    pts[0, :5, :5] = np.nan  # invalid points are allowed
    frames = [Image.fromarray(x) for x in scene.rgb]
    out = pipe.ask(
        "Hi <mask>", frames=frames, points=pts, num_frames=4, regions=["frame=1 box=5,5,50,50"], max_new_tokens=2
    )
    assert out["geometry"]["source"] == "reconstruction" and out["geometry"]["canonical_mode"] == "robust"
    assert out["num_frames"] == 4  # the 8 point maps follow the sampled frames [0, 2, 4, 7]


def test_model_without_position_encoding_needs_no_depth() -> None:
    from sr3d_plugin.testing import build_tiny_model

    model, processor = build_tiny_model(seed=0, use_position_encoding=False)
    pipe = SR3DPipeline(model, processor)
    img = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    out = pipe.ask("What is <region0>?", image=img, regions=["polygon=5,5,40,5,20,30"], max_new_tokens=2)
    assert out["geometry"] == {"source": None}
    assert out["regions"][0]["kind"] == "polygon" and out["regions"][0]["pixel_area"][0] > 300


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


def test_bad_requests_raise_clear_errors(workspace: dict, pipe: SR3DPipeline, tmp_path: Path) -> None:
    scene, scene_dir = workspace["scene"], workspace["scene_dir"]
    img = Image.fromarray(scene.rgb[0])
    d, k = scene.depth[0], scene.intrinsics
    geo = {"image": img, "depth": d, "intrinsics": k}
    cases: list[tuple[dict, str]] = [
        ({"regions": ["box=1,1,9,9"], **geo}, r"2 <mask> token\(s\) but 1 region\(s\)"),
        ({"image": img, "regions": ["box=1,1,9,9", "box=2,2,9,9"]}, r"no depth source was given"),
        (
            {"scene": scene_dir, "regions": ["frame=8 box=1,1,9,9", "frame=0 box=1,1,9,9"]},
            r"on frame 8, but there are 8",
        ),
        (
            {"regions": ["box=200,10,260,50", "box=1,1,9,9"], **geo},
            r"box \(200, 10, 260, 50\) lies outside the 160×120",
        ),
        ({"regions": ["polygon=300,300,310,300,305,310", "box=1,1,9,9"], **geo}, r"polygon mask on frame 0 is empty"),
        ({"regions": [f"mask={tmp_path / 'none.png'}", "box=1,1,9,9"], **geo}, r"mask image not found"),
        (
            {"frames": [img] * 3, "depth": [d] * 2, "intrinsics": k, "regions": ["frame=0 box=1,1,9,9"] * 2},
            r"2 depth map\(s\) for 3 frame\(s\)",
        ),
        (
            {
                "frames": [img] * 3,
                "depth": [d] * 3,
                "poses": scene.cam_to_world[:4],
                "intrinsics": k,
                "regions": ["frame=0 box=1,1,9,9"] * 2,
            },
            r"4 pose\(s\) for 3 frame\(s\)",
        ),
        ({"regions": ["box3d=100,100,100,1,1,1", "box=1,1,9,9"], "scene": scene_dir}, r"not visible in any of the 8"),
        ({"regions": ["box3d=0,0,1,1,1,1", "box=1,1,9,9"], **geo}, r"box3d regions need camera poses"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(SR3DInputError, match=msg):
            pipe.ask("Is <mask> left of <mask>?", max_new_tokens=1, **kwargs)
    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros((120, 160), dtype=np.uint8)).save(empty)
    with pytest.raises(SR3DInputError, match=r"mask on frame 0 is empty"):
        pipe.ask("<mask>?", regions=[f"mask={empty}"], **geo)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(SR3DInputError, match=r"not a readable image"):
        pipe.ask("Hi", image=bad, depth=d, intrinsics=k)
    rle = tmp_path / "r.json"
    rle.write_text(json.dumps(encode_coco_rle(np.ones((30, 30), dtype=bool))))
    with pytest.raises(SR3DInputError, match=r"RLE mask .* is 30×30 but the frame is 160×120"):
        pipe.ask("<mask>?", regions=[f"rle={rle}"], **geo)
    with pytest.raises(SR3DInputError, match="exactly one visual input"):
        pipe.ask("Hi", image=img, scene=scene_dir)
    with pytest.raises(SR3DInputError, match=r"refers to <region2> but 2 region"):
        pipe.ask("<region2>?", regions=["box=1,1,9,9"] * 2, **geo)
