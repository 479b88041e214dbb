"""Reading JSON / JSONL record files with line numbers and a record-size limit.

Shared by :func:`sr3d_plugin.records.load_records` (training data) and
:func:`sr3d_plugin.data_check.check_records`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sr3d_plugin.errors import SR3DInputError

__all__ = ["MAX_RECORD_BYTES", "iter_json_records"]

#: largest record accepted by default (bytes of one JSONL line / one JSON-list element); a record with
#: inline poses for 1,000 frames is about 200 kB
MAX_RECORD_BYTES = 16 << 20


def _skip_line(fh: Any) -> int:
    """Read to the end of the current line; returns the bytes skipped."""
    skipped = 0
    while True:
        chunk = fh.readline(1 << 20)
        skipped += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return skipped


def iter_json_records(
    path: str | os.PathLike, max_record_bytes: int = MAX_RECORD_BYTES
) -> Iterator[tuple[int, Any, str | None]]:
    """``(line, record, problem)`` for every record of a JSON list or JSONL file.

    ``problem`` is None for a decoded record, else a message (the record is then None): a line that
    is not JSON, or a record larger than ``max_record_bytes`` bytes (a JSONL line is never read
    beyond the limit). ``line`` is 1-based (for a JSON list: the line where the element starts).
    Raises :class:`SR3DInputError` when the file is missing, unreadable or a JSON list is malformed.
    """
    p = Path(path)
    if not p.is_file():
        raise SR3DInputError(f"data file {str(p)!r} does not exist; expected a JSON or JSONL file of records")
    if isinstance(max_record_bytes, bool) or not isinstance(max_record_bytes, int) or max_record_bytes <= 0:
        raise SR3DInputError(f"max_record_bytes={max_record_bytes!r}; expected a positive number of bytes")
    try:
        with open(p, "rb") as fh:
            head = fh.read(4096).lstrip()
            fh.seek(0)
            if head.startswith(b"["):
                yield from _json_list(p, fh.read(), max_record_bytes)
                return
            line = 0
            while True:
                raw = fh.readline(max_record_bytes + 1)
                if not raw:
                    return
                line += 1
                if len(raw) > max_record_bytes and not raw.endswith(b"\n"):
                    size = len(raw) + _skip_line(fh)
                    yield line, None, f"record of {size} bytes; expected at most max_record_bytes={max_record_bytes}"
                    continue
                text = raw.strip()
                if not text:
                    continue
                try:
                    yield line, json.loads(text), None
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    yield line, None, f"not valid JSON ({exc})"
    except OSError as exc:
        raise SR3DInputError(f"cannot read data file {str(p)!r}: {exc}") from exc


def _json_list(p: Path, data: bytes, max_record_bytes: int) -> Iterator[tuple[int, Any, str | None]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SR3DInputError(f"{p} is not UTF-8 text: {exc}") from exc
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    n = len(text)

    def skip(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    pos = skip(pos)
    if pos < n and text[pos] == "]":
        return
    while True:
        pos = skip(pos)
        line = text.count("\n", 0, pos) + 1
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise SR3DInputError(f"{p} is not valid JSON: {exc}") from exc
        size = len(text[pos:end].encode("utf-8"))
        if size > max_record_bytes:
            yield line, None, f"record of {size} bytes; expected at most max_record_bytes={max_record_bytes}"
        else:
            yield line, obj, None
        pos = skip(end)
        if pos < n and text[pos] == ",":
            pos += 1
            continue
        if pos < n and text[pos] == "]":
            if skip(pos + 1) != n:
                raise SR3DInputError(f"{p} is not valid JSON: extra data after the closing ']'")
            return
        raise SR3DInputError(f"{p} is not valid JSON: expected ',' or ']' at line {text.count(chr(10), 0, pos) + 1}")
