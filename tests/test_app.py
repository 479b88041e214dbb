"""``sr3d app`` without a browser: the pure view functions, the backend and the command.

The page itself is driven in headless Chromium by tests/test_app_browser.py.
"""

from __future__ import annotations

import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from sr3d_plugin.app.views import (
    REGION_RGB,
    box_spec_from_corners,
    display_scale,
    draw_regions,
    region_reach,
    region_specs,
)
from sr3d_plugin.errors import SR3DDependencyError, SR3DInputError
from sr3d_plugin.regions import parse_region_spec

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# boxes from clicks, region text
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("first, second", [((10, 20), (40, 50)), ((40, 50), (10, 20)), ((40, 20), (10, 50))])
def test_two_corners_in_any_order_give_one_box_holding_both_clicked_pixels(first, second):
    spec = box_spec_from_corners(2, first, second, (64, 64))
    assert spec == "frame=2 box=10,20,41,51"
    parsed = parse_region_spec(spec)
    assert parsed.frame == 2 and parsed.values == (10, 20, 41, 51)


def test_fractional_clicks_fall_on_the_pixel_they_are_inside():
    assert box_spec_from_corners(0, (3.9, 4.2), (8.0, 9.99), (10, 10)) == "frame=0 box=3,4,9,10"


def test_corner_outside_the_frame_is_an_error_naming_it():
    with pytest.raises(SR3DInputError, match=r"second corner \(70, 5\) lies outside the 64×48 frame 1"):
        box_spec_from_corners(1, (3, 4), (70, 5), (64, 48))


def test_two_clicks_on_one_spot_are_not_a_box():
    with pytest.raises(SR3DInputError, match=r"span a box of 1×1 pixels"):
        box_spec_from_corners(0, (5, 5), (5, 5), (64, 48))


@pytest.mark.parametrize("size, factor", [((320, 240), 2), ((96, 72), 6), ((640, 480), 1), ((1920, 1080), 1)])
def test_frames_are_shown_enlarged_a_whole_number_of_times(size, factor):
    assert display_scale(size) == factor
    # a click anywhere on the enlarged picture maps back into the frame
    w, h = size
    assert (w * factor - 1) // factor == w - 1 and (h * factor - 1) // factor == h - 1


def test_region_text_skips_blank_and_comment_lines_and_names_a_bad_line():
    text = "frame=0 box=1,2,30,40\n\n# my chair\n  frame=3 box=5,5,9,9  \n"
    assert region_specs(text) == ["frame=0 box=1,2,30,40", "frame=3 box=5,5,9,9"]
    assert region_specs("") == [] and region_specs(None) == []
    with pytest.raises(SR3DInputError, match=r"regions line 2: .*box='1,2,3' has 3 numbers"):
        region_specs("frame=0 box=1,2,30,40\nframe=1 box=1,2,3")


# ----------------------------------------------------------------------------------------------
# region reach (lifting a region to 3D and finding it on the other frames)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene():
    from sr3d_plugin.synthetic import generate_scene

    return generate_scene(3, num_frames=6, width=96, height=72)


def _world_points(scene):
    import torch

    from sr3d_plugin.geometry import backproject

    k = torch.from_numpy(np.repeat(scene.intrinsics[None], scene.num_frames, 0))
    pts = backproject(torch.from_numpy(scene.depth), k, torch.from_numpy(scene.cam_to_world))
    return pts.numpy(), scene.depth > 0


def test_reach_finds_the_same_object_on_the_other_frames(scene):
    """An object's mask on frame 0, lifted through exact geometry, lands on that object in every other frame."""
    points, valid = _world_points(scene)
    ids, counts = np.unique(scene.instance[0], return_counts=True)
    counts = {int(i): int(c) for i, c in zip(ids, counts) if i != 0}
    visible = {int(i): [int((scene.instance[v] == i).sum()) for v in range(scene.num_frames)] for i in counts}
    # an object seen well on frame 0 and on at least two other frames
    oid = max(visible, key=lambda i: (sum(c >= 30 for c in visible[i][1:]), counts[i]))
    others = [v for v in range(1, scene.num_frames) if visible[oid][v] >= 30]
    assert len(others) >= 2, visible
    drawn = scene.instance[0] == oid
    reach = region_reach({0: drawn}, points, valid, voxel=0.05)  # metres: world coordinates here
    np.testing.assert_array_equal(reach[0], drawn | (reach[0] & drawn))
    assert reach[0][drawn].all()
    for v in others:
        obj = scene.instance[v] == oid
        hit = reach[v]
        precision = (hit & obj).sum() / max(hit.sum(), 1)
        recall = (hit & obj).sum() / obj.sum()
        # other views also see faces of the object that frame 0 does not: not all of it is reached
        assert precision > 0.9 and recall > 0.1 and hit.sum() >= 20, (v, precision, recall)
    # frames where the object is not seen get nothing (or almost nothing: touching surfaces)
    for v in range(scene.num_frames):
        if visible[oid][v] == 0:
            assert v not in reach or reach[v].sum() <= 5


def test_reach_without_valid_points_keeps_only_the_drawn_frame():
    points = np.full((3, 8, 8, 3), np.nan)
    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:5] = True
    reach = region_reach({1: mask}, points)
    assert list(reach) == [1] and np.array_equal(reach[1], mask)


def test_reach_uses_masks_at_the_image_size_on_a_smaller_point_map():
    """A mask at the image size (2× the point map) is brought to the point map's size."""
    points = np.zeros((2, 4, 6, 3))
    points[..., 0] = np.arange(6)[None, None, :]  # x = column, the same on both frames
    mask = np.zeros((8, 12), bool)
    mask[:, :4] = True  # columns 0-1 of the point map
    reach = region_reach({0: mask}, points, voxel=1.0)
    assert reach[1].shape == (4, 6)
    assert reach[1][:, :2].all() and not reach[1][:, 2:].any()


def test_reach_names_a_frame_the_point_map_lacks():
    with pytest.raises(SR3DInputError, match=r"masks has frame 4, but the point map has 2 frame\(s\)"):
        region_reach({4: np.ones((3, 3), bool)}, np.zeros((2, 3, 3, 3)))
    with pytest.raises(SR3DInputError, match=r"voxel"):
        region_reach({0: np.ones((3, 3), bool)}, np.zeros((2, 3, 3, 3)), voxel=0)


# ----------------------------------------------------------------------------------------------
# overlays
# ----------------------------------------------------------------------------------------------


def test_draw_regions_tints_inside_outlines_the_box_and_leaves_the_rest():
    image = Image.new("RGB", (40, 30), (100, 100, 100))
    mask = np.zeros((30, 40), bool)
    mask[10:20, 12:30] = True
    out = np.asarray(draw_regions(image, [(1, mask)], drawn=[1], alpha=0.5))
    assert out.shape == (30, 40, 3)
    expected = np.round(0.5 * np.array([100, 100, 100]) + 0.5 * np.array(REGION_RGB[1])).astype(np.uint8)
    np.testing.assert_array_equal(out[15, 20], expected)  # inside, away from the outline and the label
    np.testing.assert_array_equal(out[10, 20], REGION_RGB[1])  # on the outline
    np.testing.assert_array_equal(out[2, 2], [100, 100, 100])  # outside
    np.testing.assert_array_equal(out[25, 35], [100, 100, 100])
    with pytest.raises(SR3DInputError, match=r"alpha"):
        draw_regions(image, [(0, mask)], alpha=1.5)


# ----------------------------------------------------------------------------------------------
# the backend: inputs and answers
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    from sr3d_plugin.app.backend import AppBackend

    b = AppBackend("tiny", device="cpu", max_new_tokens=8, work_dir=tmp_path_factory.mktemp("app-work"))
    yield b
    b.close()


def test_bad_kinds_and_missing_files_are_named(backend):
    with pytest.raises(SR3DInputError, match=r"kind='photo'; expected one of synthetic, image, video, scan"):
        backend.load("photo")
    with pytest.raises(SR3DInputError, match=r"kind='image' needs image="):
        backend.load("image")
    with pytest.raises(SR3DInputError, match=r"no input is loaded"):
        backend.get("nothing")


def test_image_with_depth_answers_as_the_pipeline_does(backend, scene, tmp_path):
    """The "image (+ depth map)" input: the backend's answer is SR3DPipeline.ask's on the same files."""
    from sr3d_plugin.synthetic import depth_to_millimetres

    img = tmp_path / "room.png"
    dep = tmp_path / "room_depth.png"
    Image.fromarray(scene.rgb[0]).save(img)
    Image.fromarray(depth_to_millimetres(scene.depth[:1])[0]).save(dep)
    loaded = backend.load("image", image=img, depth=dep)
    assert loaded.num_frames == 1 and loaded.points is not None and loaded.points.shape[-1] == 3
    spec = box_spec_from_corners(0, (10, 10), (50, 40), loaded.frames.images[0].size)
    result = backend.ask(loaded, "What is <mask>?", [spec])
    direct = backend.pipeline.ask("What is <mask>?", image=str(img), depth=str(dep), regions=[spec], max_new_tokens=8)
    assert result["answer"] == direct["answer"] and result["answer"].strip()
    assert list(result["reach"][0]) == [0] and result["reach"][0][0][20, 30]
    assert len(loaded.pointmap_images()) == 1 and loaded.pointmap_images()[0].dtype == np.uint8


def test_video_with_point_maps_answers_as_the_pipeline_does(backend, scene, tmp_path):
    """The "video (+ point maps)" input: frames from the video, geometry from the reconstruction file."""
    from _eval_data import _write_video

    video = tmp_path / "walk.mp4"
    _write_video(video, scene.rgb)
    xyz, _ = _world_points(scene)
    npz = tmp_path / "walk.npz"
    np.savez(npz, xyz=xyz.astype(np.float32), frame_ids=np.array([str(i) for i in range(scene.num_frames)]))
    loaded = backend.load("video", video=video, points=npz)
    assert loaded.num_frames == scene.num_frames and loaded.geometry["source"] == "reconstruction"
    spec = "frame=2 box=5,5,60,50"
    result = backend.ask(loaded, "What is <region0>?", [spec])
    direct = backend.pipeline.ask(
        "What is <region0>?", video=str(video), points=str(npz), regions=[spec], max_new_tokens=8
    )
    assert result["answer"] == direct["answer"]
    assert 2 in result["reach"][0] and len(result["reach"][0]) >= 2  # seen again on other frames
    with pytest.raises(SR3DInputError, match=r"kind='video' needs video="):
        backend.load("video", points=npz)


def test_image_alone_takes_its_depth_from_the_depth_model(scene, tmp_path):
    """A plain image with a local Depth Anything folder (depth_model=): geometry estimated, the pipeline's answer."""
    from sr3d_plugin.app.backend import AppBackend
    from sr3d_plugin.testing import write_tiny_depth_anything

    img = tmp_path / "photo.png"
    Image.fromarray(scene.rgb[1]).save(img)
    depth_model = write_tiny_depth_anything(tmp_path / "tiny-da", seed=1)
    b = AppBackend("tiny", device="cpu", depth_model=depth_model, max_new_tokens=6, work_dir=tmp_path / "work")
    try:
        loaded = b.load("image", image=img)
        assert loaded.geometry["source"] == "depth_anything" and loaded.points.shape[0] == 1
        result = b.ask(loaded, "What is <mask>?", ["box=4,4,40,30"])
        direct = b.pipeline.ask("What is <mask>?", image=str(img), regions=["box=4,4,40,30"], max_new_tokens=6)
        assert result["answer"] == direct["answer"]
    finally:
        b.close()


def test_image_alone_without_a_depth_model_says_what_is_missing(backend, scene, tmp_path):
    img = tmp_path / "photo.png"
    Image.fromarray(scene.rgb[1]).save(img)
    with pytest.raises(SR3DInputError, match=r"no depth source was given"):
        backend.load("image", image=img)


def _zip_folder(folder, archive, top):
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, f"{top}/{path.relative_to(folder)}" if top else str(path.relative_to(folder)))


@pytest.mark.parametrize("top", ["scene0007_00", ""])
def test_scan_zip_is_unpacked_and_read_like_its_folder(backend, scene, tmp_path, top):
    from sr3d_plugin.synthetic import write_scannet_layout

    folder = write_scannet_layout(scene, tmp_path / "scans", scene_id="scene0007_00")
    archive = tmp_path / "scan.zip"
    _zip_folder(folder, archive, top)
    loaded = backend.load("scan", scan=archive)
    assert loaded.num_frames == scene.num_frames
    assert loaded.geometry["source"] == "gt_depth"
    np.testing.assert_array_equal(np.asarray(loaded.frames.images[2]), scene.rgb[2])
    by_folder = backend.load("scan", scan=folder)
    np.testing.assert_allclose(by_folder.points, loaded.points)


def test_scan_zip_without_a_scene_is_refused(backend, tmp_path):
    archive = tmp_path / "notes.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("notes/readme.txt", "hello")
    with pytest.raises(SR3DInputError, match=r"holds no color/ folder"):
        backend.load("scan", scan=archive)
    with pytest.raises(SR3DInputError, match=r"neither a scene folder nor a \.zip"):
        backend.load("scan", scan=tmp_path / "missing")


# ----------------------------------------------------------------------------------------------
# the command and the optional dependency
# ----------------------------------------------------------------------------------------------


def test_missing_gradio_is_a_dependency_error_naming_the_extra(monkeypatch, capsys):
    from sr3d_plugin.app.ui import require_gradio
    from sr3d_plugin.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio → ImportError
    with pytest.raises(SR3DDependencyError, match=r"pip install 'sr3d-plugin\[app\]'"):
        require_gradio()
    assert main(["app", "--port", "7999"]) == 2
    assert "pip install 'sr3d-plugin[app]'" in capsys.readouterr().err


def test_cli_checks_speak_in_flags(capsys):
    from sr3d_plugin.cli import build_parser, main

    assert main(["app", "--port", "0"]) == 2
    assert "--port 0: expected a TCP port in 1..65535" in capsys.readouterr().err
    assert main(["app", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["app", "--share", "always"])
    assert "app" in build_parser().format_help()
