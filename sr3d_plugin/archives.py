"""Reading members of untrusted zip archives safely (ScanNet's ``<scene>_2d-instance-filt.zip``, …).

Nothing is extracted by the archive's own paths. :func:`read_zip_members` first checks the whole
central directory and refuses the archive — :class:`~sr3d_plugin.errors.SR3DInputError` naming the
archive, the member and what was expected — when any member

* has an absolute name (``/x``, ``C:\\x``, ``\\\\host\\x``), a ``..`` component, a backslash or a
  NUL character in its name, or a name that appears twice;
* is a symbolic link, a device or any other non-regular file (Unix mode bits of the entry);
* is encrypted, or uses a compression method this Python cannot read;
* announces more than ``max_member_bytes`` uncompressed, or a compression ratio above
  ``max_ratio`` (for members over 1 MiB uncompressed: small files compress well legitimately);

or when the archive has more than ``max_members`` entries or announces more than
``max_total_bytes`` in all. The selected members are then streamed (never trusting the announced
sizes: reading stops as soon as a member yields more bytes than it announced or a limit allows)
and written by :func:`extract_members` under names the *caller* chooses inside the target folder,
each atomically; a corrupt archive (bad header, CRC mismatch, truncated data) is refused the same
way, and the files this call already wrote are removed again.
"""

from __future__ import annotations

import os
import stat
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sr3d_plugin.errors import SR3DDiskError, SR3DInputError
from sr3d_plugin.io_utils import atomic_path

__all__ = [
    "DEFAULT_MAX_MEMBERS",
    "DEFAULT_MAX_MEMBER_BYTES",
    "DEFAULT_MAX_RATIO",
    "DEFAULT_MAX_TOTAL_BYTES",
    "ArchiveMember",
    "check_zip",
    "extract_members",
    "read_zip_members",
]

#: most entries an archive may hold (ScanNet scenes have at most ~6k frames)
DEFAULT_MAX_MEMBERS = 100_000
#: most uncompressed bytes of one member (256 MiB)
DEFAULT_MAX_MEMBER_BYTES = 256 * 1024**2
#: most uncompressed bytes of the whole archive (8 GiB)
DEFAULT_MAX_TOTAL_BYTES = 8 * 1024**3
#: largest uncompressed / compressed ratio of a member over 1 MiB
DEFAULT_MAX_RATIO = 100.0
_RATIO_FLOOR = 1024**2
_CHUNK = 1024**2


@dataclass(frozen=True)
class ArchiveMember:
    """One checked regular-file member: its ``name`` (POSIX, relative) and announced ``size`` (bytes)."""

    name: str
    size: int


def _bad(archive: Path, detail: str) -> SR3DInputError:
    return SR3DInputError(f"archive {str(archive)!r}: {detail}")


def _check_name(archive: Path, name: str) -> str:
    if "\x00" in name:
        raise _bad(archive, f"member {name!r} has a NUL character in its name")
    if "\\" in name:
        raise _bad(archive, f"member {name!r} has a backslash in its name; expected '/'-separated relative paths")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise _bad(archive, f"member {name!r} has an absolute path; expected paths relative to the archive")
    parts = PurePosixPath(name).parts
    if ".." in parts:
        raise _bad(archive, f"member {name!r} leaves the target folder ('..'); expected paths inside it")
    if not parts:
        raise _bad(archive, f"member {name!r} has an empty name")
    return "/".join(p for p in parts if p != ".")


def check_zip(
    path: str | os.PathLike,
    *,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_ratio: float = DEFAULT_MAX_RATIO,
) -> list[ArchiveMember]:
    """Check a zip archive's central directory (module docstring); returns its regular-file members.

    Folder entries are accepted and left out of the result. Nothing is decompressed.
    """
    archive = Path(path).expanduser()
    if not archive.is_file():
        raise SR3DInputError(f"archive not found: {str(archive)!r}")
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        raise _bad(archive, f"not a readable zip archive ({exc})") from exc
    if len(infos) > max_members:
        raise _bad(archive, f"holds {len(infos)} entries, more than the limit of {max_members}")
    members: list[ArchiveMember] = []
    seen: set[str] = set()
    total = 0
    for info in infos:
        name = _check_name(archive, info.filename)
        if name in seen:
            raise _bad(archive, f"member {info.filename!r} appears twice")
        seen.add(name)
        mode = (info.external_attr >> 16) & 0xFFFF
        if mode and stat.S_ISLNK(mode):
            raise _bad(archive, f"member {info.filename!r} is a symbolic link; links are not extracted")
        if info.is_dir():
            continue
        if stat.S_IFMT(mode) and not stat.S_ISREG(mode):  # no type bits: a plain file (Python's writestr)
            raise _bad(archive, f"member {info.filename!r} is not a regular file (mode {oct(mode)})")
        if info.flag_bits & 0x1:
            raise _bad(archive, f"member {info.filename!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
            raise _bad(archive, f"member {info.filename!r} uses unsupported compression method {info.compress_type}")
        size = int(info.file_size)
        if size > max_member_bytes:
            raise _bad(
                archive,
                f"member {info.filename!r} is {size:,} bytes uncompressed, over the limit of {max_member_bytes:,}",
            )
        if size > _RATIO_FLOOR and size > max_ratio * max(int(info.compress_size), 1):
            ratio = size / max(int(info.compress_size), 1)
            raise _bad(
                archive,
                f"member {info.filename!r} expands {ratio:,.0f}× ({info.compress_size:,} → {size:,} bytes), over the "
                f"limit of {max_ratio:g}× (a zip bomb?)",
            )
        total += size
        if total > max_total_bytes:
            raise _bad(archive, f"announces over {max_total_bytes:,} bytes uncompressed in all, the limit")
        members.append(ArchiveMember(name, size))
    return members


def read_zip_members(
    path: str | os.PathLike,
    select: Callable[[str], bool] | None = None,
    *,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_ratio: float = DEFAULT_MAX_RATIO,
) -> Iterator[tuple[ArchiveMember, Iterator[bytes]]]:
    """Yield ``(member, chunks)`` for each checked member that ``select(name)`` keeps, in archive order.

    The archive is checked first (:func:`check_zip`). ``chunks`` yields the member's bytes (at most
    1 MiB each) and raises :class:`SR3DInputError` when the data is corrupt or longer than
    announced; consume it before advancing to the next member.
    """
    archive = Path(path).expanduser()
    members = check_zip(
        archive,
        max_members=max_members,
        max_member_bytes=max_member_bytes,
        max_total_bytes=max_total_bytes,
        max_ratio=max_ratio,
    )
    by_name = {m.name: m for m in members}
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:  # pragma: no cover - check_zip opened it a moment ago
        raise _bad(archive, f"not a readable zip archive ({exc})") from exc
    with zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            member = by_name[_check_name(archive, info.filename)]
            if select is not None and not select(member.name):
                continue
            yield member, _chunks(zf, info, archive, member)


def _chunks(zf: zipfile.ZipFile, info: zipfile.ZipInfo, archive: Path, member: ArchiveMember) -> Iterator[bytes]:
    got = 0
    try:
        with zf.open(info) as fh:
            while True:
                block = fh.read(_CHUNK)
                if not block:
                    break
                got += len(block)
                if got > member.size:
                    raise _bad(
                        archive, f"member {info.filename!r} holds more data than the {member.size:,} bytes announced"
                    )
                yield block
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, NotImplementedError) as exc:
        if isinstance(exc, SR3DDiskError):
            raise
        raise _bad(archive, f"member {info.filename!r} is corrupt ({exc})") from exc
    if got != member.size:
        raise _bad(archive, f"member {info.filename!r} holds {got:,} bytes, not the {member.size:,} announced")


def extract_members(
    path: str | os.PathLike,
    target: str | os.PathLike,
    name_for: Callable[[str], str | None],
    **limits: float,
) -> list[Path]:
    """Write the members that ``name_for`` maps to a relative output name into ``target``.

    Args:
        path: the zip archive.
        target: the output folder (created if missing).
        name_for: member name → output path relative to ``target`` (``"instance-filt/12.png"``), or
            None to skip the member. Output names are checked as member names are: they cannot
            leave ``target``.
        **limits: ``max_members``, ``max_member_bytes``, ``max_total_bytes``, ``max_ratio``
            (see :func:`check_zip`).

    Returns:
        The written files, in archive order. On any error the files this call wrote are removed.
    """
    archive = Path(path).expanduser()
    root = Path(target).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    root_resolved = root.resolve()
    planned: dict[str, str] = {}

    def select(name: str) -> bool:
        out = name_for(name)
        if out is None:
            return False
        planned[name] = out
        return True

    written: list[Path] = []
    try:
        for member, chunks in read_zip_members(archive, select, **limits):  # type: ignore[arg-type]
            rel = _check_name(archive, planned[member.name])
            dest = root / rel
            if root_resolved not in dest.parent.resolve().parents and dest.parent.resolve() != root_resolved:
                raise _bad(archive, f"output name {rel!r} of member {member.name!r} leaves {str(root)!r}")
            if dest.is_symlink() or dest.exists():
                raise _bad(archive, f"two members (or an existing file) map to {str(dest)!r}")
            with atomic_path(dest, suffix=".part") as tmp, open(tmp, "wb") as fh:
                for block in chunks:
                    fh.write(block)
            written.append(dest)
    except BaseException:
        for f in written:
            f.unlink(missing_ok=True)
        raise
    return written
