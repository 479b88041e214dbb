"""Limits on untrusted text inputs: JSON / JSONL records (size per record) and YAML (alias expansion).

* :func:`iter_json_records` reads record files with line numbers and a record-size limit
  (:func:`sr3d_plugin.records.load_records`, :func:`sr3d_plugin.data_check.check_records`);
* :func:`safe_yaml` is ``yaml.safe_load`` that refuses alias bombs and recursive aliases (recipes,
  config files of the ``scratch`` builder).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sr3d_plugin.errors import SR3DConfigError, SR3DError, SR3DInputError

__all__ = ["MAX_RECORD_BYTES", "MAX_YAML_NODES", "iter_json_records", "safe_yaml"]

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


#: most YAML nodes a document may expand to once aliases are followed (a recipe has about a hundred)
MAX_YAML_NODES = 10_000


def _expanded_nodes(node: Any, limit: int, where: str, error: type[SR3DError] = SR3DConfigError) -> int:
    """Nodes of a composed YAML document with every alias expanded (memoised, so a "billion laughs"
    bomb is measured in linear time). Raises on a recursive alias or more than ``limit`` nodes."""
    import yaml

    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n: Any) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise error(f"{where}: a YAML alias refers to itself (recursive anchor); expected plain data")
        active.add(key)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            total += sum(size(c) for c in n.value)
        elif isinstance(n, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in n.value)
        active.discard(key)
        sizes[key] = total
        if total > limit:
            raise error(
                f"{where}: the YAML expands to more than {limit} nodes once its aliases (*name) are followed; "
                "expected a recipe of plain values (an alias bomb?)"
            )
        return total

    return size(node)


def safe_yaml(text: str, where: str, max_nodes: int = MAX_YAML_NODES, error: type[SR3DError] = SR3DConfigError) -> Any:
    """``yaml.safe_load(text)`` with a bound on alias expansion.

    Anchors and aliases are allowed, but the document with every alias expanded may hold at most
    ``max_nodes`` nodes, and recursive aliases are refused: an alias bomb is rejected in
    milliseconds (before any Python object is built) instead of taking minutes (or all memory) in
    :meth:`~sr3d_plugin.training.recipe.Recipe.to_dict`. ``where`` names the text in errors, which are
    ``error`` (default :class:`SR3DConfigError`), with "is not valid YAML" for a syntax error.
    """
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.YAMLError as exc:
            raise error(f"{where} is not valid YAML: {exc}") from exc
        if node is None:
            return None
        _expanded_nodes(node, max_nodes, where, error)
        try:
            return loader.construct_document(node)
        except yaml.YAMLError as exc:
            raise error(f"{where} is not valid YAML: {exc}") from exc
    finally:
        loader.dispose()
