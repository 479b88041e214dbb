"""Disk faults in atomic writes and caches: clear errors, computed results kept, umask modes, temp cleanup.

Faults are injected by monkeypatching the OS calls for paths under the test's folder (tests may run as
root, where a read-only ``chmod`` does not stop writes).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sr3d_plugin import io_utils
from sr3d_plugin.cli import main
from sr3d_plugin.errors import SR3DDiskError
from sr3d_plugin.io_utils import atomic_dir, atomic_path, atomic_write_text, clean_stale_temps
from sr3d_plugin.pointmap import PointMapCache, pointmaps_with_cache
from sr3d_plugin.sources.base import FrameSet

K = np.array([[20.0, 0, 8], [0, 20.0, 6], [0, 0, 1]])


def _fail_under(root: Path, code: int) -> Callable[..., None]:
    def check(*paths: object) -> None:
        for p in paths:
            if isinstance(p, (str, os.PathLike)) and str(os.fspath(p)).startswith(str(root)):
                raise OSError(code, os.strerror(code), str(p))

    return check


def _patch(monkeypatch: pytest.MonkeyPatch, name: str, root: Path, code: int) -> None:
    """``os.<name>`` fails with ``code`` for paths under ``root`` and works elsewhere."""
    real = getattr(os, name)
    check = _fail_under(root, code)

    def fake(*args: object, **kwargs: object) -> object:
        check(*args[:2])
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, fake)


@pytest.mark.parametrize(
    ("call", "code", "words"),
    [
        ("replace", errno.ENOSPC, "no space left on the device (disk full) [ENOSPC]"),
        ("open", errno.EROFS, "read-only file system [EROFS]"),
        ("open", errno.EACCES, "permission denied [EACCES]"),
        ("replace", errno.EDQUOT, "disk quota exceeded [EDQUOT]"),
    ],
)
def test_atomic_write_faults_name_the_path_and_the_cause(
    call: str, code: int, words: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "out" / "file.json"
    atomic_write_text(dest, "old\n")
    _patch(monkeypatch, call, tmp_path / "out", code)
    with pytest.raises(SR3DDiskError) as err:
        atomic_write_text(dest, "new\n")
    assert str(dest) in str(err.value) and words in str(err.value)
    assert err.value.errno == code and err.value.filename == str(dest) and isinstance(err.value, OSError)
    monkeypatch.undo()
    assert dest.read_text() == "old\n"  # untouched
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file.json"]  # no temp left


def test_faults_inside_the_with_block_and_from_safetensors(tmp_path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    dest = tmp_path / "w.safetensors"
    full = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left" })'
    with (
        pytest.raises(SR3DDiskError, match=r"w\.safetensors' failed: no space left on the device"),
        atomic_path(dest, suffix=".safetensors") as tmp,
    ):
        save_file({"a": torch.zeros(2)}, str(tmp))
        raise SafetensorError(full)  # what safetensors raises on a full disk (its Rust I/O error in the message)
    with pytest.raises(SR3DDiskError, match="read-only file system"), atomic_dir(tmp_path / "d") as tmp:
        raise OSError(errno.EROFS, "Read-only file system", str(tmp / "x"))
    # other errors pass through unchanged
    with pytest.raises(KeyError), atomic_path(dest):
        raise KeyError("not a disk fault")
    with pytest.raises(FileNotFoundError), atomic_path(dest):
        raise FileNotFoundError(errno.ENOENT, "input missing", "/nowhere/in.txt")
    with pytest.raises(PermissionError) as err, atomic_path(dest):  # an unreadable input is not a write fault
        raise PermissionError(errno.EACCES, "Permission denied", "/elsewhere/in.txt")
    assert not isinstance(err.value, SR3DDiskError)
    full = r"disk full\) \[ENOSPC\] \(reported on /elsewhere/src.png\)"
    with pytest.raises(SR3DDiskError, match=full), atomic_dir(tmp_path / "d"):
        raise OSError(errno.ENOSPC, "No space left on device", "/elsewhere/src.png")  # shutil names the source
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_parent_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(SR3DDiskError, match=r"creating the folder '.*/f/sub' failed: a parent of the path is a file"):
        atomic_write_text(tmp_path / "f" / "sub" / "a.txt", "x")


def test_atomic_dir_keeps_the_old_folder_when_the_swap_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "scene"
    with atomic_dir(dest) as tmp:
        (tmp / "a").write_text("old")
    real = os.replace

    def fake(src: object, dst: object) -> None:
        if ".sr3dtmp-" in str(src):  # the new folder cannot be moved in
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", fake)
    with pytest.raises(SR3DDiskError, match="moving the new folder into place"), atomic_dir(dest) as tmp:
        (tmp / "a").write_text("new")
    monkeypatch.undo()
    assert (dest / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_modes_follow_the_umask(umask: int, tmp_path: Path) -> None:
    old = os.umask(umask)
    try:
        assert io_utils.current_umask() == umask
        atomic_write_text(tmp_path / "f.txt", "x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "inner").write_text("x")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # what a normal open gives
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~umask == plain.stat().st_mode & 0o777
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~umask


def test_replacing_a_file_keeps_its_mode(tmp_path: Path) -> None:
    f = tmp_path / "secret.json"
    atomic_write_text(f, "1")
    f.chmod(0o600)
    atomic_write_text(f, "2")
    assert f.stat().st_mode & 0o777 == 0o600 and f.read_text() == "2"


# ------------------------------------------------------------------------------ stale temp files


def test_stale_temps_are_cleaned_on_the_next_write(tmp_path: Path) -> None:
    host = io_utils._HOST
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {
        "dead": f".k.npz.sr3dtmp-{host}-{dead.pid}-0123abcd.npz",  # writer gone → removed
        "alive": f".k.npz.sr3dtmp-{host}-{os.getppid()}-0123abcd.npz",  # writer running → kept
        "other_host_old": ".k.npz.sr3dtmp-ffffff-1-0123abcd.npz",  # cannot check: by age
        "other_host_new": ".k.npz.sr3dtmp-fffff0-1-0123abcd.npz",
        "legacy_old": ".k.npz.a1b2c3d4.npz",  # mkstemp names of earlier versions: by age
        "legacy_new": ".k.npz.a1b2c3d5.npz",
        "legacy_tmp_old": ".f.json.abcdefgh.tmp",
        "unrelated_old": ".hidden.npz",  # not ours, whatever their age
        "user_json_old": ".config.settings.json",
        "user_npz_old": ".scan.abcdefgh.npz",
        "alive_ancient_old": f".k.npz.sr3dtmp-{host}-{os.getppid()}-0123abce.npz",  # pid reused after a day
        "dead_dir": f".scene.sr3dtmp-{host}-{dead.pid}-0123abcd.tmp",
    }
    for key, name in names.items():
        p = tmp_path / name
        if key.endswith("dir"):
            p.mkdir()
            (p / "x").write_text("x")
        else:
            p.write_text("x")
        if key.endswith("_old"):
            age = 2 * 86400 if "ancient" in key else 7200
            os.utime(p, (time.time() - age, time.time() - age))
    atomic_write_text(tmp_path / "k.npz", "x")
    left = {p.name for p in tmp_path.iterdir()}
    kept = {"alive", "other_host_new", "legacy_new", "unrelated_old", "user_json_old", "user_npz_old"}
    assert left == {names[k] for k in kept} | {"k.npz"}
    assert clean_stale_temps(tmp_path, max_age_s=0) and ".hidden.npz" in {p.name for p in tmp_path.iterdir()}


def test_a_killed_cache_write_leaves_a_temp_file_that_the_next_write_removes(tmp_path: Path) -> None:
    code = f"""
import sys, time
from pathlib import Path
from sr3d_plugin.io_utils import atomic_path
with atomic_path(Path({str(tmp_path)!r}) / "ab" / "key.npz", suffix=".npz") as tmp:
    tmp.write_bytes(b"half a file")
    print("writing", flush=True)
    time.sleep(60)
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    temps = list((tmp_path / "ab").glob(".key.npz.sr3dtmp-*.npz"))
    assert len(temps) == 1  # the writer is alive: another writer leaves its file alone
    atomic_write_text(tmp_path / "ab" / "other.npz", "x")
    assert temps[0].exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert temps[0].exists() and not (tmp_path / "ab" / "key.npz").exists()
    atomic_write_text(tmp_path / "ab" / "other.npz", "y")  # the next write into the folder cleans up
    assert sorted(p.name for p in (tmp_path / "ab").iterdir()) == ["other.npz"]


# ---------------------------------------------------------------------------------------- caches


def _frames() -> FrameSet:
    depth = np.tile(np.linspace(1, 2, 16, dtype=np.float32), (12, 1))[None]
    img = Image.fromarray(np.full((12, 16, 3), 90, np.uint8))
    return FrameSet(images=[img], depth=depth, intrinsics=K[None], frame_ids=["0"], source="mem")


def test_a_failed_cache_write_warns_once_and_returns_the_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    reference = pointmaps_with_cache(_frames(), cache=False)
    io_utils._WARNED_CACHE_ROOTS.discard(str(cache))
    _patch(monkeypatch, "open", cache, errno.EROFS)
    with pytest.warns(RuntimeWarning, match=rf"cache folder '{cache}' cannot be written .*read-only file system"):
        result = pointmaps_with_cache(_frames(), cache=PointMapCache(cache))
    assert result.cache_hit is False and result.cache_path is None
    torch.testing.assert_close(result.canonical, reference.canonical)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per folder: no second warning
        again = pointmaps_with_cache(_frames(), cache=PointMapCache(cache))
    torch.testing.assert_close(again.canonical, reference.canonical)
    # the store itself raises the clear error
    with pytest.raises(SR3DDiskError, match="read-only file system"):
        PointMapCache(cache).save("k" * 32, result.pointmaps, result.canonical, result.canonical_mode)


def _image_inputs(tmp_path: Path) -> list[str]:
    img = tmp_path / "im.png"
    Image.fromarray(np.full((12, 16, 3), 128, np.uint8)).save(img)
    np.save(tmp_path / "d.npy", np.tile(np.linspace(1, 2, 16, dtype=np.float32), (12, 1)))
    np.savetxt(tmp_path / "k.txt", K)
    return [
        "pointmap",
        "--image",
        str(img),
        "--depth",
        str(tmp_path / "d.npy"),
        "--intrinsics",
        str(tmp_path / "k.txt"),
    ]


def test_cli_out_on_a_full_or_read_only_disk_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*_image_inputs(tmp_path), "--no-cache", "--quiet"]
    for call, code, words in (("replace", errno.ENOSPC, "disk full"), ("open", errno.EROFS, "read-only file system")):
        out = tmp_path / f"ro-{code}" / "o.npz"
        _patch(monkeypatch, call, out.parent, code)
        assert main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("sr3d pointmap: error:") and str(out) in err and words in err and "\n" not in err
        for flag in ("--preview",):
            assert main([*argv, flag, str(out.with_suffix(".png"))]) == 2
            assert str(out.with_suffix(".png")) in capsys.readouterr().err
        monkeypatch.undo()
        assert not out.exists()


def test_cli_cache_dir_that_cannot_be_written_still_writes_the_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    io_utils._WARNED_CACHE_ROOTS.discard(str(cache))
    _patch(monkeypatch, "open", cache, errno.EACCES)
    _patch(monkeypatch, "mkdir", cache, errno.EACCES)
    out = tmp_path / "o.npz"
    with pytest.warns(RuntimeWarning, match="permission denied"):
        code = main([*_image_inputs(tmp_path), "--cache-dir", str(cache), "--out", str(out), "--json", "--quiet"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["cache"]["hit"] is False and summary["cache"]["path"] is None
    assert np.load(out)["canonical"].shape == (1, 12, 16, 3)


def test_cli_synthetic_scene_falls_back_to_a_temp_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    for root in (cache, cache.parent / "synthetic"):
        io_utils._WARNED_CACHE_ROOTS.discard(str(root))
    _patch(monkeypatch, "mkdir", tmp_path, errno.EROFS)
    with pytest.warns(RuntimeWarning, match="cannot be written"):
        code = main(["pointmap", "--synthetic", "--num-frames", "2", "--cache-dir", str(cache), "--json", "--quiet"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["frames"] == 2
