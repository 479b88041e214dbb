"""Limits on untrusted inputs: decoded pixels (checked from file headers before decoding), record size and YAML
alias expansion.

**Decoded pixels.** A 47-byte COCO RLE can claim a 16000 × 12000 mask, a small PNG a 20000 × 20000 image and a
``.npz`` of zeros a billion-element array. Every reader of the package asks :func:`check_pixels`
with the size the header announces, and refuses the file with
:class:`~sr3d_plugin.errors.SR3DLimitError` (an ``SR3DInputError``) naming the file, the size and
the limit — before decoding.

The limit (pixels per decoded file) is, in order of precedence:

1. :func:`set_max_pixels` (``None`` turns it off; :func:`max_pixels_limit` as a context manager
   sets it for a block);
2. the environment variable ``SR3D_MAX_PIXELS`` (an integer; ``0`` or ``none`` turns it off);
3. :data:`DEFAULT_MAX_PIXELS` = 89,478,485 — PIL's ``Image.MAX_IMAGE_PIXELS`` (≈ 89.5 Mpx, about
   a 1 GB 24-bit image decoded).

What counts as pixels: an image's width × height; a mask's height × width (RLE ``size``); a
``.npy`` / ``.npz`` array's element count without a trailing axis of 1–4 channels (xyz, RGB,
RGBA), i.e. frames × height × width for a ``[V, H, W, 3]`` point map or a ``[V, H, W]`` depth
stack: the limit bounds each file as a whole, not each frame.

**Text inputs.**

* :func:`iter_json_records` reads record files with line numbers and a record-size limit
  (:func:`sr3d_plugin.records.load_records`, :func:`sr3d_plugin.data_check.check_records`);
* :func:`safe_yaml` is ``yaml.safe_load`` that refuses alias bombs and recursive aliases (recipes,
  config files of the ``scratch`` builder).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from sr3d_plugin.errors import SR3DConfigError, SR3DError, SR3DInputError, SR3DLimitError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ENV_VAR",
    "MAX_RECORD_BYTES",
    "MAX_YAML_NODES",
    "check_npy_file",
    "check_npz_file",
    "check_pixels",
    "get_max_pixels",
    "iter_json_records",
    "max_pixels_limit",
    "npy_header",
    "open_image",
    "safe_yaml",
    "set_max_pixels",
]

#: PIL's own ``Image.MAX_IMAGE_PIXELS`` (1024 · 1024 · 1024 // 4 // 3)
DEFAULT_MAX_PIXELS = 89_478_485
#: environment variable read when no limit was set with :func:`set_max_pixels`
ENV_VAR = "SR3D_MAX_PIXELS"

_UNSET = object()
_override: Any = _UNSET
_pil_lock = threading.Lock()


def _parse_limit(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower().replace("_", "")
        if text in ("", "none", "off", "0"):
            return None
        try:
            value = int(float(text)) if ("e" in text or "." in text) else int(text)
        except ValueError:
            raise SR3DConfigError(f"{what} must be a positive integer (pixels) or 'none', got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SR3DConfigError(f"{what} must be a positive integer (pixels) or None, got {value!r}")
    if value < 0:
        raise SR3DConfigError(f"{what} must be a positive integer (pixels) or None, got {value}")
    return value or None


def get_max_pixels() -> int | None:
    """The pixel limit in force (module docstring); None when there is none."""
    if _override is not _UNSET:
        return _override
    env = os.environ.get(ENV_VAR)
    if env is not None:
        return _parse_limit(env, f"environment variable {ENV_VAR}")
    return DEFAULT_MAX_PIXELS


def set_max_pixels(limit: int | None) -> int | None:
    """Set the pixel limit for this process (None: no limit); returns the previous one.

    Overrides ``SR3D_MAX_PIXELS``. ``set_max_pixels(DEFAULT_MAX_PIXELS)`` restores the default.
    """
    global _override
    new = _parse_limit(limit, "limit=")
    try:
        previous = get_max_pixels()
    except SR3DConfigError:  # an unreadable environment value: it is being replaced anyway
        previous = None
    _override = new
    return previous


@contextlib.contextmanager
def max_pixels_limit(limit: int | None) -> Iterator[None]:
    """Context manager: the pixel limit is ``limit`` inside the block, as before after it."""
    global _override
    saved = _override
    _override = _parse_limit(limit, "limit=")
    try:
        yield
    finally:
        _override = saved


def check_pixels(pixels: int, what: str, shape: Sequence[int] | None = None) -> None:
    """Raise :class:`SR3DLimitError` when ``pixels`` exceeds the limit.

    Args:
        pixels: the number of pixels the input would decode to.
        what: the input, as the message should name it (e.g. ``"mask image '/data/m.png'"``).
        shape: the announced size (shown in the message), e.g. ``(width, height)``.
    """
    limit = get_max_pixels()
    if limit is None or pixels <= limit:
        return
    size = f"{' × '.join(str(int(s)) for s in shape)} = " if shape else ""
    raise SR3DLimitError(
        f"{what} would decode to {size}{pixels:,} pixels, more than the limit of {limit:,} pixels; "
        f"raise it with sr3d_plugin.limits.set_max_pixels(...) or the {ENV_VAR} environment variable "
        "if the file is trusted"
    )


def open_image(path: str | os.PathLike, what: str = "image", load: bool = True) -> Any:
    """Open an image after checking its size (from the header) against the limit.

    Returns an open ``PIL.Image.Image`` (use it as a context manager), decoded when ``load`` (the
    default) and lazy (header only) otherwise. PIL's own decompression-bomb check is replaced by
    this limit: a larger limit set here is honoured, a smaller one applies. Decoding refuses a
    truncated file even where another library set PIL's process-wide
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` (lmms-eval does, on import), which would otherwise fill the
    missing rows with grey.

    Raises:
        SR3DLimitError: width × height exceeds the limit.
        SR3DInputError: the file is not a readable image (or is truncated).
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path).expanduser()
    limit = get_max_pixels()
    try:
        try:
            im = _pil_open(Image, p, limit)
        except Image.DecompressionBombError:
            # PIL refused before we saw the size: read the header again with PIL's check lifted
            with _pil_lock:
                saved = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
                try:
                    im = Image.open(p)
                finally:
                    Image.MAX_IMAGE_PIXELS = saved
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise SR3DInputError(f"{what} {str(p)!r} is not a readable image: {exc}") from exc
    w, h = im.size
    try:
        check_pixels(int(w) * int(h), f"{what} {str(p)!r}", (w, h))
    except SR3DLimitError:
        im.close()
        raise
    if load:
        _load_strictly(im, p, what)
    return im


def _load_strictly(im: Any, p: Path, what: str) -> None:
    """Decode ``im`` with PIL's truncated-image tolerance off (restored afterwards); closes it on failure."""
    from PIL import ImageFile

    with _pil_lock:
        saved = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            im.load()
        except (OSError, ValueError, SyntaxError) as exc:
            im.close()
            raise SR3DInputError(f"{what} {str(p)!r} is not a readable image: {exc}") from exc
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _pil_open(image_mod: Any, p: Path, limit: int | None) -> Any:
    import warnings

    pil_limit = image_mod.MAX_IMAGE_PIXELS
    if pil_limit is not None and (limit is None or limit > pil_limit):
        # our limit is larger than PIL's: lift PIL's for this header read (ours is checked after)
        with _pil_lock:
            image_mod.MAX_IMAGE_PIXELS = None
            try:
                return image_mod.open(p)
            finally:
                image_mod.MAX_IMAGE_PIXELS = pil_limit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", image_mod.DecompressionBombWarning)
        return image_mod.open(p)


def npy_header(fh: IO[bytes], what: str) -> tuple[tuple[int, ...], Any]:
    """``(shape, dtype)`` from the header of the ``.npy`` stream ``fh`` (left after the header)."""
    import numpy as np

    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        else:  # pragma: no cover - numpy rejects unknown versions in read_magic
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, OSError, SyntaxError, EOFError) as exc:
        raise SR3DInputError(f"{what} is not a readable .npy array: {exc}") from exc
    return tuple(int(s) for s in shape), dtype


def _array_pixels(shape: tuple[int, ...]) -> int:
    dims = list(shape)
    if len(dims) >= 3 and 1 <= dims[-1] <= 4:
        dims = dims[:-1]
    return math.prod(dims) if dims else 1


def check_npy_file(path: str | os.PathLike, what: str = "array file") -> tuple[tuple[int, ...], Any]:
    """Check a ``.npy`` file's announced size against the limit; returns ``(shape, dtype)``."""
    p = Path(path).expanduser()
    label = f"{what} {str(p)!r}"
    try:
        with open(p, "rb") as fh:
            shape, dtype = npy_header(fh, label)
    except OSError as exc:
        raise SR3DInputError(f"{label} is not readable: {exc}") from exc
    check_pixels(_array_pixels(shape), label, shape)
    return shape, dtype


def check_npz_file(path: str | os.PathLike, what: str = "array file") -> dict[str, tuple[int, ...]]:
    """Check every array of a ``.npz`` file (headers only) against the limit; returns their shapes."""
    p = Path(path).expanduser()
    label = f"{what} {str(p)!r}"
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        with zipfile.ZipFile(p) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as fh:
                    shape, _ = npy_header(fh, f"{label} member {info.filename!r}")
                name = info.filename[: -len(".npy")]
                check_pixels(_array_pixels(shape), f"{label} array {name!r}", shape)
                shapes[name] = shape
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError, NotImplementedError) as exc:
        raise SR3DInputError(f"{label} is not a readable .npz archive: {exc}") from exc
    return shapes


# --- text inputs: records and YAML ---------------------------------------------------------------------

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
