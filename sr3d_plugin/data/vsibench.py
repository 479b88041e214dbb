"""``sr3d prepare vsibench``: VSI-Bench (``nyu-visionx/VSI-Bench``) → ``<out>/vsibench/<split>.jsonl`` + videos.

Inputs: the data set's parquet file(s) (``test-*.parquet``; columns ``id``, ``dataset``,
``scene_name``, ``question_type``, ``question``, ``options``, ``ground_truth``) as ``--raw`` (a file
or the folder holding them), and the videos ``<dataset>/<scene_name>.mp4`` (the data set's
``arkitscenes.zip``, ``scannet.zip``, ``scannetpp.zip`` extracted) in ``--videos DIR`` (default:
the ``--raw`` folder). Videos are linked into ``<out>/videos/<dataset>/<scene_name>.mp4``
(symbolic links; ``--copy`` copies them) and records refer to them relative to ``<out>``.
VSI-Bench videos have no depth: evaluate with reconstruction point maps (``pointmap_dir``) or a
depth model (``depth_model``), see ``docs/evaluation.md``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sr3d_plugin.data.common import (
    Converter,
    as_bool,
    link_or_copy,
    progress_bar,
    symlink,
    write_jsonl,
)
from sr3d_plugin.errors import SR3DInputError

__all__ = ["VSIBenchConverter"]

_COLUMNS = ("id", "dataset", "scene_name", "question_type", "question", "ground_truth")


def _parquet_files(raw: Path, split: str) -> list[Path]:
    if raw.is_file():
        if raw.suffix != ".parquet":
            raise SR3DInputError(f"vsibench: raw={str(raw)!r} is not a .parquet file")
        return [raw]
    if not raw.is_dir():
        raise SR3DInputError(f"vsibench: raw={str(raw)!r} does not exist")
    files = sorted(p for p in raw.rglob(f"{split}-*.parquet") if not any(part.startswith(".") for part in p.parts))
    if not files:
        files = sorted(raw.rglob(f"{split}.parquet"))
    if not files:
        raise SR3DInputError(f"vsibench: no {split}-*.parquet file under {str(raw)!r}")
    return files


def _rows(files: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    import pyarrow.parquet as pq

    rows: list[tuple[Path, dict[str, Any]]] = []
    for f in files:
        try:
            table = pq.read_table(f)
        except Exception as exc:
            raise SR3DInputError(f"vsibench: cannot read {str(f)!r} as parquet: {exc}") from None
        missing = [c for c in _COLUMNS if c not in table.column_names]
        if missing:
            raise SR3DInputError(f"vsibench: {f} lacks column(s) {missing}; expected {', '.join(_COLUMNS)}, options")
        rows.extend((f, r) for r in table.to_pylist())
    return rows


def _ground_truth(value: Any, where: str) -> str:
    if isinstance(value, bool) or value is None:
        raise SR3DInputError(f"{where}: ground_truth is {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise SR3DInputError(f"{where}: ground_truth is {value!r}")
    return str(value).strip()


class VSIBenchConverter(Converter):
    """VSI-Bench parquet + videos → records (module docstring)."""

    name = "vsibench"
    description = "VSI-Bench (test-*.parquet + <dataset>/<scene_name>.mp4 videos); split test"
    default_split = "test"
    options = {
        "videos": "folder holding <dataset>/<scene_name>.mp4 (default: the --raw folder)",
        "copy": "copy the videos instead of linking them",
        "skip_missing": "leave out questions whose video is missing (counted) instead of stopping",
    }

    def convert(
        self,
        raw: Any,
        out: Any,
        split: str | None = None,
        *,
        overwrite: bool = False,
        progress: bool = True,
        **options: Any,
    ) -> dict[str, Any]:
        from sr3d_plugin.evaluation.schema import (
            VSIBENCH_DATASETS,
            VSIBENCH_MC_TYPES,
            VSIBENCH_QUESTION_TYPES,
            validate_record,
        )

        split, out, dest, done = self.start(out, split, overwrite, options)
        if done is not None:
            return done
        raw = Path(raw).expanduser()
        videos = (
            Path(options["videos"]).expanduser() if options.get("videos") else (raw if raw.is_dir() else raw.parent)
        )
        copy = as_bool(options.get("copy", False), "copy")
        skip = as_bool(options.get("skip_missing", False), "skip_missing")
        files = _parquet_files(raw, split)
        rows = _rows(files)
        records: list[dict[str, Any]] = []
        missing_videos: dict[str, int] = {}
        linked: set[str] = set()
        seen: set[str] = set()
        for i, (f, r) in enumerate(progress_bar(rows, f"vsibench {split}", len(rows), progress)):
            where = f"{f.name} row #{i} (id {r.get('id')!r})"
            for c in _COLUMNS:
                if r.get(c) is None:
                    raise SR3DInputError(f"vsibench: {where}: column {c!r} is empty")
            qtype = str(r["question_type"])
            if qtype not in VSIBENCH_QUESTION_TYPES:
                raise SR3DInputError(f"vsibench: {where}: unknown question_type {qtype!r}")
            ds = str(r["dataset"])
            if ds not in VSIBENCH_DATASETS:
                raise SR3DInputError(f"vsibench: {where}: unknown dataset {ds!r}; expected one of {VSIBENCH_DATASETS}")
            qid = str(r["id"])
            if qid in seen:
                raise SR3DInputError(f"vsibench: {where}: duplicate id {qid!r}")
            seen.add(qid)
            scene = str(r["scene_name"])
            rel = f"videos/{ds}/{scene}.mp4"
            src = videos / ds / f"{scene}.mp4"
            if rel not in linked:
                if not src.is_file():
                    missing_videos[str(src)] = missing_videos.get(str(src), 0) + 1
                    continue
                target = out / rel
                if target.is_symlink() and (overwrite or not target.exists()):
                    target.unlink()  # a stale or dangling link
                elif target.exists() and overwrite:
                    target.unlink()
                if not target.exists():
                    if copy:
                        link_or_copy(src, target, copy=True)
                    else:
                        symlink(src, target)
                linked.add(rel)
            options_list = [str(o) for o in (r.get("options") or [])]
            rec = {
                "question_id": qid,
                "scene_id": scene,
                "dataset": ds,
                "question_type": qtype,
                "question": str(r["question"]),
                "options": options_list,
                "ground_truth": _ground_truth(r["ground_truth"], where),
                "video": rel,
            }
            if qtype in VSIBENCH_MC_TYPES and not options_list:
                raise SR3DInputError(f"vsibench: {where}: multiple-choice question without options")
            validate_record("vsibench", rec, i)
            records.append(rec)
        if missing_videos and not skip:
            shown = ", ".join(list(missing_videos)[:3])
            raise SR3DInputError(
                f"vsibench: {sum(missing_videos.values())} question(s) refer to {len(missing_videos)} missing video(s), "
                f"e.g. {shown}; give the video folder as videos=, or pass skip_missing=True"
            )
        if not records:
            raise SR3DInputError(f"vsibench: no question left to write for split {split!r}")
        write_jsonl(dest, records)
        return {
            "dataset": self.name,
            "split": split,
            "source": [str(f) for f in files],
            "written": str(dest),
            "records": len(records),
            "videos": len(linked),
            "skipped_missing_video": sum(missing_videos.values()),
        }
