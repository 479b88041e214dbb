"""Atomic file and folder writes, and small readers shared across the package.

Readers of a cache, checkpoint or prepared data set only ever see a complete file: everything is
written to a temporary name in the destination folder and moved into place with ``os.replace``.

Disk faults (disk full, read-only file system, no permission, quota) while creating, writing or
moving the temporary file become :class:`~sr3d_plugin.errors.SR3DDiskError` naming the
destination and what failed (see :func:`disk_error`); the destination is left untouched.

File modes follow the umask like a plain ``open()``: a new file gets ``0o666 & ~umask``, a new
folder ``0o777 & ~umask``; replacing an existing file or folder keeps its permission bits.

Temporary names are ``.<name>.sr3dtmp-<host>-<pid>-<random><suffix>`` (``<host>`` a 6-hex hash of
the host name). A writer killed mid-write leaves such an entry behind; the next atomic write into
the same folder removes the stale ones (:func:`clean_stale_temps`): those whose writer process, on
this host, is no longer running, and — where the writer cannot be checked (another host, or the
older ``.<name>.<random><suffix>`` names of earlier versions) — those older than
:data:`STALE_TEMP_AGE_S` (one hour).
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sr3d_plugin.errors import SR3DDiskError

__all__ = [
    "DISK_ERRNOS",
    "LIVE_WRITER_AGE_S",
    "STALE_TEMP_AGE_S",
    "atomic_dir",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "clean_stale_temps",
    "current_umask",
    "disk_error",
    "replace_folder",
    "stable_hash",
    "warn_cache_write_failed",
]

#: OS error codes that mean "this location cannot be written" (rather than a programming error)
DISK_ERRNOS: dict[int, str] = {
    code: text
    for code, text in (
        (getattr(errno_mod, "ENOSPC", None), "no space left on the device (disk full)"),
        (getattr(errno_mod, "EDQUOT", None), "disk quota exceeded"),
        (getattr(errno_mod, "EROFS", None), "read-only file system"),
        (getattr(errno_mod, "EACCES", None), "permission denied"),
        (getattr(errno_mod, "EPERM", None), "operation not permitted"),
        (getattr(errno_mod, "EFBIG", None), "file too large for the file system"),
        (getattr(errno_mod, "EIO", None), "input/output error of the device"),
        (getattr(errno_mod, "ENAMETOOLONG", None), "file name too long"),
        (getattr(errno_mod, "ENOTDIR", None), "a parent of the path is a file, not a folder"),
        (getattr(errno_mod, "EISDIR", None), "the path is a folder"),
        (getattr(errno_mod, "EXDEV", None), "the temporary file is on another device"),
        (getattr(errno_mod, "EMFILE", None), "too many open files"),
    )
    if code is not None
}

#: age (seconds) after which a temporary entry whose writer cannot be checked counts as stale
STALE_TEMP_AGE_S = 3600.0

_TEMP_TAG = "sr3dtmp"
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
# new names: .<name>.sr3dtmp-<host>-<pid>-<random><suffix>; older ones (tempfile): .<name>.<8 chars><suffix>
_NEW_TEMP_RE = re.compile(rf"^\..+\.{_TEMP_TAG}-(?P<host>[0-9a-f]{{6}})-(?P<pid>\d+)-[0-9a-f]{{8}}(\.[^/]*)?$")
# older names repeat the destination's suffix (".k.npz.ab12cd34.npz") or end in ".tmp"
_OLD_TEMP_RE = re.compile(r"^\..+?(?P<ext>\.(?:npz|png|safetensors))\.[a-z0-9_]{8}(?P=ext)$|^\..+\.[a-z0-9_]{8}\.tmp$")
#: a temporary entry of a running process on this host is removed only past this age (pid reuse)
LIVE_WRITER_AGE_S = 24 * 3600.0


def disk_error(exc: OSError, path: str | os.PathLike, action: str) -> SR3DDiskError:
    """An :class:`SR3DDiskError` for ``exc`` raised while ``action`` (e.g. ``"writing"``) ``path``.

    The message names the path, the action and the cause in words (``ENOSPC`` → "no space left on
    the device (disk full)", ``EROFS`` → "read-only file system", ``EACCES`` → "permission denied").
    """
    if isinstance(exc, SR3DDiskError):
        return exc
    code = exc.errno
    name = errno_mod.errorcode.get(code, "") if code is not None else ""
    cause = DISK_ERRNOS.get(code, exc.strerror or str(exc)) if code is not None else (exc.strerror or str(exc))
    where = ""
    if exc.filename and str(exc.filename) != str(path):
        # our temporary file beside ``path``, or another file the OS named (shutil names a copy's source)
        inside = str(exc.filename).startswith(str(Path(path).parent))
        where = f" ({exc.filename})" if inside else f" (reported on {exc.filename})"
    err = SR3DDiskError(f"{action} {str(path)!r} failed: {cause}{f' [{name}]' if name else ''}{where}")
    err.errno = code
    err.strerror = exc.strerror
    err.filename = str(path)
    return err


_WRAPPED_OS_ERROR_RE = re.compile(r"Os \{ code: (\d+)")
# codes that can only concern the written side (full, read-only, quota, size); the others (no
# permission, not a folder, …) may concern a file the ``with`` block read, and are converted only
# when they name no file or a file beside the destination
_WRITE_SIDE = {getattr(errno_mod, n) for n in ("ENOSPC", "EDQUOT", "EROFS", "EFBIG") if hasattr(errno_mod, n)}


def _disk_fault_of(exc: BaseException, dest: Path) -> OSError | None:
    """The disk-fault ``OSError`` behind ``exc`` raised while writing ``dest`` (itself, its cause
    chain, or the ``Os { code: N }`` that safetensors' ``SafetensorError`` writes into its message),
    else None."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in DISK_ERRNOS:
            ours = not cur.filename or str(cur.filename).startswith(str(dest.parent))
            if cur.errno in _WRITE_SIDE or ours:
                return cur
            return None
        m = _WRAPPED_OS_ERROR_RE.search(str(cur)) if type(cur).__name__ == "SafetensorError" else None
        if m is not None and int(m[1]) in DISK_ERRNOS:
            code = int(m[1])
            return OSError(code, os.strerror(code))
        cur = cur.__cause__ or cur.__context__
    return None


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # no race-free way elsewhere: set and restore at once
    os.umask(old)
    return old


def _mode_for(dest: Path, default: int) -> int:
    """Permission bits for a new entry at ``dest``: an existing entry's, else ``default & ~umask``."""
    try:
        return stat.S_IMODE(os.stat(dest).st_mode)
    except OSError:
        return default & ~current_umask()


def _temp_name(dest: Path, suffix: str) -> str:
    return f".{dest.name}.{_TEMP_TAG}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def clean_stale_temps(folder: str | os.PathLike, max_age_s: float = STALE_TEMP_AGE_S) -> list[Path]:
    """Remove the stale temporary entries that atomic writes left in ``folder``; returns them.

    Only names of the two temporary patterns (module docstring) are considered. An entry carrying
    this host and the pid of a running process is left alone (its writer may still be at work)
    unless it is older than :data:`LIVE_WRITER_AGE_S` (the pid was reused); one whose pid no longer
    runs is removed; the rest (other hosts, older names) once older than ``max_age_s`` seconds (by
    modification time). Failures to remove are ignored: cleaning is a
    courtesy and must never fail a write.
    """
    removed: list[Path] = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not name.startswith("."):
            continue
        m = _NEW_TEMP_RE.match(name)
        age_limit = max_age_s
        if m is not None:
            if m["host"] == _HOST:
                pid = int(m["pid"])
                alive = pid == os.getpid() or _pid_alive(pid)
                age_limit = max(LIVE_WRITER_AGE_S, max_age_s) if alive else -1.0
        elif _OLD_TEMP_RE.match(name) is None:
            continue
        try:
            stale = age_limit < 0 or now - entry.stat(follow_symlinks=False).st_mtime > age_limit
            if not stale:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def _make_parent(dest: Path) -> None:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise disk_error(exc, dest.parent, "creating the folder") from exc


@contextlib.contextmanager
def _faults_name(dest: Path) -> Iterator[None]:
    """Turn a disk fault raised inside the block (also one wrapped by safetensors) into an
    :class:`~sr3d_plugin.errors.SR3DDiskError` naming ``dest``; other exceptions pass unchanged."""
    try:
        yield
    except Exception as exc:
        fault = _disk_fault_of(exc, dest)
        if fault is not None:
            raise disk_error(fault, dest, "writing") from exc
        raise


def replace_folder(tmp: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Move the complete folder ``tmp`` to ``dest`` with two renames (old ``dest`` → backup, ``tmp`` →
    ``dest``), so a crash leaves the old or the new folder whole; the old one is put back if the second
    rename fails and removed after it succeeds. Raises ``OSError`` (the caller names the step)."""
    tmp, dest = Path(tmp), Path(dest)
    backup = None
    if dest.exists():
        backup = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        if backup.exists():
            shutil.rmtree(backup)
        os.replace(dest, backup)
    try:
        os.replace(tmp, dest)
    except OSError:
        if backup is not None:  # put the old folder back where it was
            with contextlib.suppress(OSError):
                os.replace(backup, dest)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    The temporary file exists (empty) when yielded; write it by name. On an exception the
    temporary file is removed and ``path`` is left untouched. A disk fault (``ENOSPC``, ``EROFS``,
    ``EACCES``, … — :data:`DISK_ERRNOS`) while creating, writing (inside the ``with`` block),
    syncing or moving the file raises :class:`~sr3d_plugin.errors.SR3DDiskError` naming ``path``.
    The file gets the mode a plain ``open()`` would give (module docstring).
    """
    dest = Path(path)
    _make_parent(dest)
    clean_stale_temps(dest.parent)
    tmp_path = dest.parent / _temp_name(dest, suffix or ".tmp")
    try:
        os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.chmod(tmp_path, _mode_for(dest, 0o666))
    except OSError as exc:
        raise disk_error(exc, dest, "creating a temporary file for") from exc
    try:
        with _faults_name(dest):
            yield tmp_path
        try:
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp_path, dest)
        except OSError as exc:
            raise disk_error(exc, dest, "writing") from exc
    finally:
        with contextlib.suppress(OSError):
            if tmp_path.exists() or tmp_path.is_symlink():
                tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`)."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON (and a final newline) to ``path`` atomically (:func:`atomic_path`)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (old copy removed).

    The swap is two renames (old → backup, new → path), so a crash leaves either the old or the
    new folder complete, never a half-written one under ``path``. Disk faults raise
    :class:`~sr3d_plugin.errors.SR3DDiskError` naming ``path`` (as :func:`atomic_path`); the folder
    gets ``0o777 & ~umask`` (or the replaced folder's permission bits).
    """
    dest = Path(path)
    _make_parent(dest)
    clean_stale_temps(dest.parent)
    tmp = dest.parent / _temp_name(dest, ".tmp")
    try:
        tmp.mkdir(mode=0o700)
        tmp.chmod(_mode_for(dest, 0o777))
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.rmdir()
        raise disk_error(exc, dest, "creating a temporary folder for") from exc
    try:
        with _faults_name(dest):
            yield tmp
        try:
            replace_folder(tmp, dest)
        except OSError as exc:
            raise disk_error(exc, dest, "moving the new folder into place at") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_WARNED_CACHE_ROOTS: set[str] = set()


def warn_cache_write_failed(root: str | os.PathLike, exc: BaseException) -> None:
    """Warn (``RuntimeWarning``, once per cache folder and process) that writing into ``root`` failed.

    Every cache writer calls this instead of raising: a failed cache write never fails the
    computation whose result it was caching.
    """
    key = str(Path(root).expanduser())
    if key in _WARNED_CACHE_ROOTS:
        return
    _WARNED_CACHE_ROOTS.add(key)
    warnings.warn(
        f"cache folder {key!r} cannot be written ({exc}); results are computed but not cached (warned once per folder)",
        RuntimeWarning,
        stacklevel=3,
    )


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hex digest of a JSON-serialisable object (keys sorted), for cache keys."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
