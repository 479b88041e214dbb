"""Decoded-size limits: mask, image and array bombs are refused from their headers, before decoding."""

from __future__ import annotations

import io
import json
import struct
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sr3d_plugin import limits
from sr3d_plugin.cli import main
from sr3d_plugin.errors import SR3DConfigError, SR3DInputError, SR3DLimitError
from sr3d_plugin.masks import decode_coco_rle, encode_coco_rle, load_mask_image, load_rle_file
from sr3d_plugin.sources.files import load_depth_file, load_rgb, read_matrix
from sr3d_plugin.sources.reconstruction import load_reconstruction


@pytest.fixture(autouse=True)
def _default_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(limits.ENV_VAR, raising=False)
    monkeypatch.setattr(limits, "_override", limits._UNSET)


def _png_claiming(path: Path, width: int, height: int, mode: str = "RGB") -> Path:
    """A small PNG whose header claims ``width × height`` (the pixel data is a few bytes)."""
    buf = io.BytesIO()
    Image.new(mode, (4, 4)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.find(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


def _npy_claiming(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + b"\0" * 64


def test_a_47_byte_rle_bomb_is_refused_from_its_header(tmp_path: Path) -> None:
    f = tmp_path / "bomb.json"
    f.write_text(json.dumps({"size": [16000, 12000], "counts": "0"}, separators=(",", ":")))
    assert f.stat().st_size < 50
    t = time.perf_counter()
    with pytest.raises(SR3DLimitError) as err:
        load_rle_file(f)
    assert time.perf_counter() - t < 0.5
    msg = str(err.value)
    assert str(f) in msg and "16000 × 12000 = 192,000,000 pixels" in msg and "89,478,485" in msg
    assert isinstance(err.value, SR3DInputError)
    for counts in ("0", [192_000_000]):  # compressed and run-list counts, both backends
        with pytest.raises(SR3DLimitError):
            decode_coco_rle({"size": [16000, 12000], "counts": counts}, backend="builtin")


def test_the_limit_is_configurable_by_function_context_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rle = encode_coco_rle(np.eye(40, dtype=bool))
    assert limits.get_max_pixels() == limits.DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS
    with (
        limits.max_pixels_limit(1000),
        pytest.raises(SR3DLimitError, match="40 × 40 = 1,600 pixels, more than the limit of 1,000"),
    ):
        decode_coco_rle(rle)
    assert decode_coco_rle(rle).sum() == 40
    monkeypatch.setenv(limits.ENV_VAR, "1599")
    with pytest.raises(SR3DLimitError, match="SR3D_MAX_PIXELS"):
        decode_coco_rle(rle)
    monkeypatch.setenv(limits.ENV_VAR, "1600")
    assert decode_coco_rle(rle).shape == (40, 40)
    previous = limits.set_max_pixels(100)  # the function wins over the environment
    assert previous == 1600 and limits.get_max_pixels() == 100
    limits.set_max_pixels(None)
    assert limits.get_max_pixels() is None
    monkeypatch.setenv(limits.ENV_VAR, "lots")
    monkeypatch.setattr(limits, "_override", limits._UNSET)
    with pytest.raises(SR3DConfigError, match="environment variable SR3D_MAX_PIXELS .* got 'lots'"):
        limits.get_max_pixels()
    for bad in (-1, 2.5, True):
        with pytest.raises(SR3DConfigError, match="limit="):
            limits.set_max_pixels(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("w", "h"), [(20000, 20000), (10000, 9000)])  # over PIL's 2× error, between 1× and 2×
def test_image_bombs_are_refused_before_decoding(w: int, h: int, tmp_path: Path) -> None:
    f = _png_claiming(tmp_path / "big.png", w, h)
    want = f"{w} × {h} = {w * h:,} pixels, more than the limit of 89,478,485"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's warning is not what the user sees
        for reader in (load_rgb, load_mask_image, lambda p: load_depth_file(p)):
            with pytest.raises(SR3DLimitError) as err:
                reader(f)
            assert str(f) in str(err.value) and want in str(err.value)


def test_a_raised_limit_replaces_pils_own_check(tmp_path: Path) -> None:
    f = _png_claiming(tmp_path / "big.png", 20000, 20000)
    before = Image.MAX_IMAGE_PIXELS  # other imports (lmms-eval's) may have changed PIL's global
    with limits.max_pixels_limit(500_000_000), pytest.raises(SR3DInputError, match="is not a readable image") as err:
        load_rgb(f)  # past the limit check; the (truncated) data fails, not PIL's bomb check
    assert not isinstance(err.value, SR3DLimitError)
    assert before == Image.MAX_IMAGE_PIXELS  # PIL's global is restored
    ok = tmp_path / "ok.png"
    Image.new("RGB", (30, 20), (1, 2, 3)).save(ok)
    assert load_rgb(ok).size == (30, 20)


def test_array_bombs_are_refused_from_the_npy_header(tmp_path: Path) -> None:
    depth = tmp_path / "depth.npy"
    depth.write_bytes(_npy_claiming((20000, 20000)))
    with pytest.raises(SR3DLimitError, match=r"depth file .* 20000 × 20000 = 400,000,000 pixels"):
        load_depth_file(depth)
    k = tmp_path / "k.npy"
    k.write_bytes(_npy_claiming((100000, 100000), "<f8"))
    with pytest.raises(SR3DLimitError, match="intrinsics file"):
        read_matrix(k, "intrinsics")
    # a point map [V, H, W, 3] counts V·H·W pixels (the xyz axis is not a pixel)
    pm = tmp_path / "points.npz"
    with zipfile.ZipFile(pm, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("xyz.npy", _npy_claiming((40, 1500, 1500, 3)))
    with pytest.raises(SR3DLimitError, match=r"array 'xyz' .* 40 × 1500 × 1500 × 3 = 90,000,000 pixels"):
        load_reconstruction(pm)
    npy = tmp_path / "points.npy"
    npy.write_bytes(_npy_claiming((40, 1500, 1500, 3)))
    with pytest.raises(SR3DLimitError):
        load_reconstruction(npy)
    # within the limit: read as before
    np.savez(tmp_path / "small.npz", xyz=np.random.default_rng(0).normal(size=(1, 6, 8, 3)).astype(np.float32))
    assert load_reconstruction(tmp_path / "small.npz").xyz.shape == (1, 6, 8, 3)


def test_cli_bombs_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = _png_claiming(tmp_path / "big.png", 20000, 20000)
    assert main(["pointmap", "--image", str(img), "--no-cache", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "400,000,000 pixels" in err and str(img) in err and "\n" not in err


def test_video_frames_are_checked_from_the_stream_header(tmp_path: Path) -> None:
    import av

    from sr3d_plugin.sources.video import VideoReader

    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert len(VideoReader(num_frames=2).read(clip)) == 2
    with (
        limits.max_pixels_limit(3000),
        pytest.raises(SR3DLimitError, match=r"clip\.mp4' frame would decode to 64 × 48"),
    ):
        VideoReader(num_frames=2).read(clip)


def test_truncated_images_are_refused_even_when_pil_tolerates_them(tmp_path: Path, monkeypatch) -> None:
    """lmms-eval sets PIL's process-wide ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` on import; a cut-off
    frame must still be an error, not an image with grey rows."""
    from PIL import ImageFile

    good = tmp_path / "frame.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(SR3DInputError, match=r"cut\.png.*not a readable image"):
        load_rgb(cut)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored
    assert np.array_equal(np.asarray(load_rgb(good)), np.asarray(Image.open(good).convert("RGB")))
