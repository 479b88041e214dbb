"""Official ScanNet mask archives in ``sr3d prepare scannet``, and hostile zip archives refused."""

from __future__ import annotations

import contextlib
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sr3d_plugin import plugins
from sr3d_plugin.archives import check_zip, extract_members
from sr3d_plugin.cli import main
from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.sources.scannet import ScanNetReader
from sr3d_plugin.synthetic import generate_scene, write_scannet_layout


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    return write_scannet_layout(generate_scene(3, num_frames=6, width=64, height=48), root)


def _zip_folder(folder: Path, archive: Path, arcdir: str) -> None:
    """Zip ``folder/*.png`` as ``arcdir/<name>`` (the official release's member layout)."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"{arcdir}/{f.name}")


def _instance_masks(scene: Path) -> dict[str, np.ndarray]:
    frames = ScanNetReader().read(scene)
    files = frames.meta["instance_files"]
    assert all(f is not None for f in files)
    return {fid: np.asarray(Image.open(f)) for fid, f in zip(frames.frame_ids, files)}


def _prepare(raw: Path, out: Path, **options: object) -> dict:
    return plugins.create("dataset_converters", "scannet").convert(raw, out, progress=False, **options)


@pytest.fixture(scope="module")
def zipped_raw(scene_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same scene with its instance masks zipped as ScanNet ships them (and a label zip)."""
    raw = tmp_path_factory.mktemp("raw_zipped")
    dst = raw / scene_dir.name
    shutil.copytree(scene_dir, dst)
    sid = scene_dir.name
    _zip_folder(dst / "instance-filt", dst / f"{sid}_2d-instance-filt.zip", "instance-filt")
    (dst / "label-filt").mkdir()
    for f in sorted((dst / "instance-filt").iterdir()):  # labels: any uint8 image per frame
        Image.fromarray((np.asarray(Image.open(f)) % 7).astype(np.uint8)).save(dst / "label-filt" / f.name)
    _zip_folder(dst / "label-filt", dst / f"{sid}_2d-label-filt.zip", "label-filt")
    shutil.rmtree(dst / "instance-filt")
    shutil.rmtree(dst / "label-filt")
    return raw


def test_zipped_masks_prepare_like_the_extracted_folders(scene_dir: Path, zipped_raw: Path, tmp_path: Path) -> None:
    _prepare(scene_dir.parent, tmp_path / "a")
    _prepare(zipped_raw, tmp_path / "b")
    sid = scene_dir.name
    from_folder = _instance_masks(tmp_path / "a" / "scenes" / sid)
    from_zip = _instance_masks(tmp_path / "b" / "scenes" / sid)
    assert from_folder.keys() == from_zip.keys() and len(from_zip) == 6
    for fid in from_folder:
        np.testing.assert_array_equal(from_zip[fid], from_folder[fid])
    assert any(m.any() for m in from_zip.values())  # the synthetic scene has objects in view
    labels = sorted(p.name for p in (tmp_path / "b" / "scenes" / sid / "label-filt").iterdir())
    assert labels == sorted(f"{i}.png" for i in range(6))
    # the zips were read, not linked: real files with the umask's mode
    f = tmp_path / "b" / "scenes" / sid / "instance-filt" / "0.png"
    assert f.is_file() and not f.is_symlink()


def test_zipped_masks_with_a_frame_step_keep_the_kept_frames_only(zipped_raw: Path, tmp_path: Path) -> None:
    sid = next(zipped_raw.iterdir()).name
    _prepare(zipped_raw, tmp_path, frame_step=2)
    names = sorted(p.name for p in (tmp_path / "scenes" / sid / "instance-filt").iterdir())
    assert names == ["0.png", "2.png", "4.png"]


def test_zips_under_meta_like_the_scans_folder_of_the_release(zipped_raw: Path, tmp_path: Path) -> None:
    src = next(zipped_raw.iterdir())
    raw = tmp_path / "raw"
    meta = tmp_path / "scans" / src.name
    shutil.copytree(src, raw / src.name, ignore=shutil.ignore_patterns("*.zip"))
    meta.mkdir(parents=True)
    for z in src.glob("*.zip"):
        shutil.copy2(z, meta / z.name)
    _prepare(raw, tmp_path / "out", meta=tmp_path / "scans")
    assert len(list((tmp_path / "out" / "scenes" / src.name / "instance-filt").iterdir())) == 6


# ------------------------------------------------------------------------------- hostile archives


def _hostile(path: Path, kind: str) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("instance-filt/0.png", b"x")
        if kind == "slip":
            zf.writestr("instance-filt/../../evil.png", b"evil")
        elif kind == "absolute":
            zf.writestr("/tmp/evil.png", b"evil")
        elif kind == "drive":
            zf.writestr("C:/evil.png", b"evil")
        elif kind == "backslash":
            zf.writestr("..\\evil.png", b"evil")
        elif kind == "symlink":
            info = zipfile.ZipInfo("instance-filt/1.png")
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
        elif kind == "device":
            info = zipfile.ZipInfo("instance-filt/1.png")
            info.external_attr = (stat.S_IFCHR | 0o666) << 16
            zf.writestr(info, b"")
        elif kind == "bomb":
            zf.writestr("instance-filt/1.png", b"\0" * (20 * 1024**2))  # 20 MiB of zeros → ~20 KiB
        elif kind == "duplicate":
            zf.writestr("instance-filt/0.png", b"y")
        elif kind == "many":
            for i in range(1, 60):
                zf.writestr(f"instance-filt/{i}.png", b"x")


_HOSTILE = {
    "slip": "leaves the target folder",
    "absolute": "absolute path",
    "drive": "absolute path",
    "backslash": "backslash",
    "symlink": "symbolic link",
    "device": "not a regular file",
    "bomb": "zip bomb",
    "duplicate": "appears twice",
}


@pytest.mark.parametrize("kind", sorted(_HOSTILE))
def test_hostile_archives_are_refused_and_nothing_is_written(kind: str, tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    with pytest.warns(UserWarning) if kind == "duplicate" else contextlib.nullcontext():
        _hostile(archive, kind)
    target = tmp_path / "target"
    with pytest.raises(SR3DInputError, match=_HOSTILE[kind]) as err:
        extract_members(archive, target, lambda n: n)
    assert str(archive) in str(err.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.zip", "target"]  # nothing written, nothing outside


def test_too_many_members_and_size_limits(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    _hostile(archive, "many")
    with pytest.raises(SR3DInputError, match="60 entries, more than the limit of 50"):
        check_zip(archive, max_members=50)
    with pytest.raises(SR3DInputError, match="in all, the limit"):
        check_zip(archive, max_total_bytes=10)
    with pytest.raises(SR3DInputError, match="over the limit of 0"):
        check_zip(archive, max_member_bytes=0)
    assert len(check_zip(archive)) == 60


def test_corrupt_archives_are_refused_and_partial_output_removed(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(SR3DInputError, match="not a readable zip archive"):
        extract_members(archive, tmp_path / "t", lambda n: n)
    # a valid directory whose second member's data is damaged: CRC error after the first was written
    good = tmp_path / "b.zip"
    with zipfile.ZipFile(good, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("instance-filt/0.png", b"A" * 1000)
        zf.writestr("instance-filt/1.png", b"B" * 1000)
    data = bytearray(good.read_bytes())
    pos = data.find(b"B" * 1000)
    data[pos + 10] = ord("C")
    good.write_bytes(bytes(data))
    target = tmp_path / "t2"
    with pytest.raises(SR3DInputError, match=r"member 'instance-filt/1.png' is corrupt"):
        extract_members(good, target, lambda n: n)
    assert not any(p.is_file() for p in target.rglob("*"))  # the first member was removed again
    # damaged deflate data (zlib's own error)
    deflated = tmp_path / "c.zip"
    with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("instance-filt/0.png", np.random.default_rng(0).bytes(4000))
    data = bytearray(deflated.read_bytes())
    data[30 + len("instance-filt/0.png") + 5] ^= 0xFF
    deflated.write_bytes(bytes(data))
    with pytest.raises(SR3DInputError, match=r"member 'instance-filt/0.png' is corrupt"):
        extract_members(deflated, tmp_path / "t3", lambda n: n)


def test_a_member_longer_than_announced_is_cut_off(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("instance-filt/0.png", b"A" * 100)
    data = bytearray(archive.read_bytes())
    # lie in the central directory: announce 10 bytes uncompressed (the local header keeps 100)
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 24 : cd + 28] = (10).to_bytes(4, "little")
    archive.write_bytes(bytes(data))
    with pytest.raises(SR3DInputError, match="instance-filt/0.png"):
        extract_members(archive, tmp_path / "t", lambda n: n)
    assert not (tmp_path / "t" / "instance-filt" / "0.png").exists()


def test_output_names_cannot_leave_the_target(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    _hostile(archive, "plain")
    with pytest.raises(SR3DInputError, match="leaves the target folder"):
        extract_members(archive, tmp_path / "t", lambda n: "../escaped.png")
    assert not (tmp_path / "escaped.png").exists()


def test_prepare_names_the_hostile_archive_and_keeps_nothing(
    zipped_raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = next(zipped_raw.iterdir())
    raw = tmp_path / "raw"
    shutil.copytree(src, raw / src.name)
    _hostile(raw / src.name / f"{src.name}_2d-instance-filt.zip", "slip")
    code = main(["prepare", "scannet", "--raw", str(raw), "--out", str(tmp_path / "out")])
    assert code != 0
    err = capsys.readouterr().err
    assert f"{src.name}_2d-instance-filt.zip" in err and "leaves the target folder" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "scenes" / src.name).exists()
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "out" / "evil.png").exists()
