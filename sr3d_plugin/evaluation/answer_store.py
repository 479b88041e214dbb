"""Resumable evaluation runs: every answer is written to disk as soon as it is produced.

An :class:`AnswerStore` is a folder of append-only JSONL files, one per process
(``answers.rank<k>.jsonl``), one line per answer::

    {"v": 1, "key": "<sha256>", "task": "sr3d_scanqa", "split": "val", "doc_id": 17,
     "question_id": "train-scene0000-0", "answer": "brown chair"}

Each line is written with a single ``write`` followed by ``flush`` and ``os.fsync``, so a run killed at
any moment leaves at most one torn last line; that line is ignored when the folder is read and cut off
before the next append. A rerun reads every file of the folder (whatever the number of processes of
the earlier run), answers the requests whose key is stored and computes only the others.

The key (:meth:`AnswerStore.key`) covers everything an answer depends on:

* the run *settings* (:func:`run_settings`): the model identity (:func:`model_fingerprint`: the
  resolved folder, the content of its JSON files and the name, size and modification time of its
  weight files), the builder, dtype, input settings (frames, depth source and model, point maps),
  the system prompt and the store format version;
* per request: the task and split, the document id, the record itself (question, answers, regions
  … hashed), the full prompt text given by the task (so any prompt change, versioned or not, is a
  miss) and the generation settings as the model will use them (after the ``max_new_tokens``
  override, with the stop strings).

Requests whose input failed are not stored: a rerun tries them again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sr3d_plugin.errors import SR3DConfigError

__all__ = [
    "STORE_VERSION",
    "AnswerStore",
    "JsonlAppender",
    "cut_torn_tail",
    "model_fingerprint",
    "read_jsonl",
    "run_settings",
]

#: bumped when the meaning of a stored answer changes
STORE_VERSION = 1
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".model", ".tiktoken")
_MAX_FILES = 4000


def _digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def model_fingerprint(pretrained: str | os.PathLike) -> dict[str, Any]:
    """What identifies a model folder cheaply: its path, JSON files' contents, weight files' name/size/mtime.

    Weights are not read (an 8B checkpoint would take minutes to hash); a changed, moved or re-saved
    weight file changes its size or modification time and so the fingerprint. A name that is not a
    folder (a hub id) is its own fingerprint.
    """
    root = Path(pretrained).expanduser()
    if not root.is_dir():
        return {"name": str(pretrained)}
    root = root.resolve()
    files: list[list[Any]] = []
    for path in sorted(root.rglob("*")):
        if len(files) >= _MAX_FILES:
            break
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        rel = path.relative_to(root).as_posix()
        if path.suffix == ".json":
            files.append([rel, hashlib.sha256(path.read_bytes()).hexdigest()])
        elif path.suffix in _WEIGHT_SUFFIXES:
            st = path.stat()
            files.append([rel, st.st_size, st.st_mtime_ns])
    return {"folder": str(root), "files": files}


def run_settings(pretrained: str | os.PathLike, **settings: Any) -> dict[str, Any]:
    """The run-wide part of the key: :func:`model_fingerprint` of ``pretrained`` plus ``settings``."""
    return {"store_version": STORE_VERSION, "model": model_fingerprint(pretrained), **settings}


def read_jsonl(path: str | os.PathLike, what: str = "answer file") -> tuple[list[Any], int]:
    """The JSON value of every readable line of ``path`` (in order) and the number of unreadable ones.

    Blank lines are skipped; a line that is not JSON (torn by a killed writer, or corrupt) is counted,
    not raised. A missing file reads as no lines. ``what`` names the file in the error of an unreadable file.
    """
    path = Path(path)
    if not path.exists():
        return [], 0
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SR3DConfigError(f"cannot read the {what} {str(path)!r}: {exc}") from exc
    values: list[Any] = []
    bad = 0
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except ValueError:
            bad += 1
    return values, bad


def cut_torn_tail(path: str | os.PathLike) -> bool:
    """Cut a last line without its newline (a writer killed mid-line) off ``path``; True when one was cut.

    Without this, the next append would glue onto the torn line and spoil both.
    """
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb+") as fh:
        data = fh.read()
        if not data or data.endswith(b"\n"):
            return False
        fh.truncate(data.rfind(b"\n") + 1)
        fh.flush()
        os.fsync(fh.fileno())
    return True


class JsonlAppender:
    """Appends JSON objects to a file, one line each, durable when :meth:`append` returns.

    Each line is one ``write`` followed by ``flush`` and ``os.fsync``: a process killed at any moment
    leaves at most one torn last line (see :func:`cut_torn_tail`, which runs on open). The file is opened
    on the first append and kept open until :meth:`close`. Disk faults raise
    :class:`~sr3d_plugin.errors.SR3DDiskError` naming the file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        cut_torn_tail(self.path)
        self._fh: Any = None

    def append(self, obj: Any) -> None:
        """Write ``obj`` as one JSON line (UTF-8, no ASCII escaping) and ``fsync`` it."""
        from sr3d_plugin.io_utils import disk_error

        line = json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n"
        try:
            if self._fh is None:
                self._fh = open(self.path, "ab")  # noqa: SIM115 - kept open for the run, closed in close()
            self._fh.write(line)
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            raise disk_error(exc, self.path, "appending to") from exc

    def close(self) -> None:
        """Close the file (idempotent)."""
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


class AnswerStore:
    """Answers of one evaluation run folder, read at start and appended to as they come (module docstring).

    Args:
        folder: the run's answer folder (created).
        settings: the run-wide key part (:func:`run_settings`).
        rank: this process's rank; it appends to ``answers.rank<rank>.jsonl`` only.
    """

    def __init__(self, folder: str | os.PathLike, settings: Mapping[str, Any], rank: int = 0) -> None:
        self.folder = Path(folder).expanduser()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SR3DConfigError(f"answers_dir={str(self.folder)!r} cannot be created: {exc}") from exc
        if not self.folder.is_dir():
            raise SR3DConfigError(f"answers_dir={str(self.folder)!r} is not a folder")
        self.settings_digest = _digest(dict(settings))
        self.path = self.folder / f"answers.rank{int(rank)}.jsonl"
        #: key → answer, from every file of the folder
        self.answers: dict[str, str] = {}
        #: lines that could not be read (torn or corrupt; their questions are recomputed)
        self.bad_lines = 0
        #: answers reused / written in this process
        self.reused = 0
        self.written = 0
        for f in sorted(self.folder.glob("answers.rank*.jsonl")):
            self._read(f)
        self._out = JsonlAppender(self.path)  # cuts a torn last line off before the first append

    # -- reading
    def _read(self, path: Path) -> None:
        values, bad = read_jsonl(path)
        self.bad_lines += bad
        for obj in values:
            try:
                key, answer = obj["key"], obj["answer"]
                if obj.get("v") != STORE_VERSION or not isinstance(key, str) or not isinstance(answer, str):
                    raise ValueError("unexpected fields")
            except (ValueError, KeyError, TypeError, AttributeError):
                self.bad_lines += 1
                continue
            self.answers[key] = answer

    # -- keys
    def key(
        self,
        task: str,
        split: str,
        doc_id: int,
        doc: Mapping[str, Any] | None,
        prompt: str,
        generation: Mapping[str, Any],
    ) -> str:
        """The key of one request (module docstring); ``doc`` is the task's record of ``doc_id``."""
        return _digest(
            {
                "run": self.settings_digest,
                "task": task,
                "split": split,
                "doc_id": int(doc_id),
                "doc": None if doc is None else _digest(dict(doc)),
                "prompt": prompt,
                "generation": dict(generation),
            }
        )

    def get(self, key: str) -> str | None:
        """The stored answer of ``key`` (None when it has none); counts a reuse."""
        answer = self.answers.get(key)
        if answer is not None:
            self.reused += 1
        return answer

    def __contains__(self, key: object) -> bool:
        return key in self.answers

    def __len__(self) -> int:
        return len(self.answers)

    # -- writing
    def put(self, key: str, answer: str, *, task: str, split: str, doc_id: int, question_id: Any = None) -> None:
        """Append one answer (durable when this returns: one write, flush, fsync)."""
        if not isinstance(answer, str):
            raise SR3DConfigError(f"an answer to store must be a string, got {type(answer).__name__}")
        self._out.append(
            {
                "v": STORE_VERSION,
                "key": key,
                "task": task,
                "split": split,
                "doc_id": int(doc_id),
                "question_id": None if question_id is None else str(question_id),
                "answer": answer,
            }
        )
        self.answers[key] = answer
        self.written += 1

    def close(self) -> None:
        """Close the append handle (idempotent)."""
        self._out.close()
