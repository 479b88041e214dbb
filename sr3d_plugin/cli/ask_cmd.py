"""``sr3d ask``: ask an SR-3D model a question about an image, frames, a video or a scene.

Examples::

    sr3d ask --model ckpt --image photo.jpg --depth-model depth-anything/Depth-Anything-V2-Small-hf \\
        --region "box=40,60,200,220" --question "What is <mask>?"
    sr3d ask --model ckpt --scene scans/scene0000_00 --region "frame=3 box=10,20,110,140" \\
        --region "box3d=1.2,0.4,0.5,0.6,0.6,1.0" --question "Is <region0> closer than <region1>?" --json
    sr3d ask --model ckpt --video clip.mp4 --points cut3r.npz --question "How many chairs?" \\
        --score-answer "Two." --json
    sr3d ask --adapter runs/x/adapter --image photo.jpg --region "box=40,60,200,220" --question "What is <mask>?"

Regions (``--region``, repeatable, in the order ``<mask>`` tokens use them): ``frame=K box=x0,y0,x1,y1``,
``frame=K mask=F.png``, ``frame=K rle=F.json`` (COCO RLE), ``frame=K polygon=x0,y0,x1,y1,…`` or
``box3d=cx,cy,cz,sx,sy,sz[,yaw]`` (aligned world frame, metres / radians; projected onto every frame
where it is visible). ``K`` counts the frames *after* sampling; ``frame=@ID`` names an original frame
id (file stem or frame number). See :mod:`sr3d_plugin.regions`.

``--json`` prints ``answer``, ``answer_logprob`` (with ``--score-answer``: the summed natural-log
probability of that answer's tokens after the prompt, teacher-forced, end-of-turn token excluded),
``regions`` (index, spec, kind, frames, frame_ids, pixel_area, bbox per frame), ``num_frames``,
``num_tiles``, ``prompt_tokens``, ``generated_tokens``, ``geometry``, ``input`` and ``timings``
(seconds: load, read, geometry, regions, encode, generate, score, total = the whole command).

Many questions (``--questions FILE.jsonl``, one JSON object per line; :data:`QUESTIONS_HELP`)::

    sr3d ask --model tiny --scene scans/scene0000_00 --questions questions.jsonl --out answers.jsonl

Each line is a question with its own fields (``question``, ``id``, ``image`` / ``frames`` / ``video`` /
``scene``, ``depth``, ``intrinsics``, ``poses``, ``points``, ``depth_model``, ``depth_scale``,
``regions``, ``num_frames``, ``max_new_tokens``, ``score_answer``, ``system``); the command-line flags
are the defaults of every line (a line with its own visual input takes none of the flags' visual
input or geometry). The answers (``SR3DPipeline.ask_iter``: batches of ``--batch-size``, a scene's
frames, features and prompt prefix computed once) go to ``--out`` one JSON object per line,
``{"id", "line", "question", "answer", …}`` with the fields of ``--json``, each appended and
fsynced as soon as its batch is done; a rerun skips the ids ``--out`` already answers (resume).
Without ``--out`` the answer lines go to stdout. A progress bar runs on stderr when it is a terminal
(not with ``--json``).

``--stream`` prints the answer of one question as it is generated (a transformers
``TextIteratorStreamer``); with ``--json`` it prints JSON lines instead: ``{"event": "text", "text":
piece}`` per piece, then ``{"event": "result", …}`` with the fields of ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from sr3d_plugin.errors import SR3DError, SR3DInputError

#: the ``--questions`` schema, as ``sr3d ask --help`` prints it
QUESTIONS_HELP = """\
--questions FILE.jsonl: one JSON object per line (blank lines skipped), e.g.
  {"id": "q1", "question": "What is <mask>?", "scene": "scans/scene0000_00", "regions": ["frame=2 box=10,20,80,90"]}
  {"id": "q2", "question": "How many chairs?", "image": "room.jpg", "depth": "room_depth.png", "intrinsics": "K.txt"}
fields (all but question optional; a missing field takes its flag's value):
  question (text), id (text or integer; default: the line number), image | frames (list) | video | scene,
  depth (path or list), intrinsics, poses (path or list), points, depth_model, depth_scale, regions
  (list of region specs), num_frames, max_new_tokens, score_answer, system.
  A line with its own image/frames/video/scene takes none of the flags' visual input or geometry.
  Relative paths are relative to the current folder, as for the flags.
out (--out FILE.jsonl, else stdout): one object per line, {"id", "line", "question", "answer", ...} with the
  fields of --json; appended and fsynced per answer; a rerun skips the ids --out already answers."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ask",
        help="ask a model a question about an image, frames, a video or a scene (with region prompts)",
        description="Load a model, read the visual input and its geometry, resolve region prompts and generate\n"
        "an answer (or the answers of --questions FILE.jsonl, in batches). Frame indices in --region\n"
        "count the frames after sampling.",
    )
    p.add_argument(
        "--model",
        metavar="PATH",
        help="model folder (ours, VILA/NVILA/SR-3D layout, …; an adapter folder works too), or tiny for the bundled tiny model; with --adapter: its base",
    )
    p.add_argument(
        "--adapter",
        metavar="DIR",
        help="a trained LoRA adapter (adapter, checkpoint or run folder from `sr3d train`), applied without merging "
        "to its recorded base model (or --model)",
    )
    p.add_argument("--builder", help="model builder name (default: detected from the folder)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", metavar="F", help="a single image (tiled dynamically)")
    src.add_argument("--frames", metavar="F", nargs="+", help="image files of one scene, in order (one tile each)")
    src.add_argument("--video", metavar="F", help="a video file (frames sampled uniformly)")
    src.add_argument("--scene", metavar="DIR", help="ScanNet-style posed RGB-D scene folder")
    p.add_argument("--depth", metavar="F", nargs="+", help="depth file(s), one per image/frame (16-bit PNG mm, .npy m)")
    p.add_argument("--depth-scale", type=float, default=1000.0, help="raw depth units per metre (default 1000 = mm)")
    p.add_argument(
        "--depth-model",
        metavar="ID_OR_PATH",
        help="estimate depth with Depth Anything V2 (hub id or local folder; 'auto' = the model config's)",
    )
    p.add_argument("--intrinsics", metavar="F", help="3×3 / 4×4 intrinsics (.txt / .npy) of the depth maps")
    p.add_argument("--poses", metavar="F", nargs="+", help="4×4 camera-to-world file(s), one per image/frame")
    p.add_argument("--points", metavar="F", help="reconstruction point maps (.npz / .npy from CUT3R, MASt3R, VGGT)")
    p.add_argument(
        "--region",
        metavar="SPEC",
        action="append",
        default=[],
        help="region prompt, e.g. 'frame=0 box=10,20,110,140' (repeatable, in <mask> order; syntax below)",
    )
    qs = p.add_mutually_exclusive_group(required=True)
    qs.add_argument("--question", help="the question; refer to regions as <mask> or <region0>, …")
    qs.add_argument(
        "--questions",
        metavar="FILE.jsonl",
        help="many questions, one JSON object per line (schema below); the other flags are their defaults",
    )
    p.add_argument(
        "--out",
        metavar="FILE.jsonl",
        help="with --questions: append the answers here, one JSON object per line; a rerun resumes (default: stdout)",
    )
    p.add_argument("--batch-size", type=int, help="with --questions: questions generated together (default 8)")
    p.add_argument(
        "--stream",
        action="store_true",
        help="print the answer as it is generated (one --question; with --json: JSON lines events)",
    )
    p.add_argument(
        "--system",
        help="system prompt (default: the model's own: none for VILA and LLaVA folders, whose chat or conversation "
        "template brings its default; 'You are a helpful assistant.' otherwise)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation budget (64)")
    p.add_argument(
        "--score-answer",
        metavar="TEXT",
        help="also report answer_logprob = log p(TEXT | prompt): the summed natural-log probability of TEXT's "
        "tokens right after the prompt, teacher-forced, end-of-turn token excluded",
    )
    p.add_argument("--num-frames", type=int, help="frames sampled from frame lists, videos and scenes (config: 32)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, help="sampling temperature (with --do-sample)")
    p.add_argument("--dtype", help="model dtype: bfloat16, float16, float32, auto (default: the checkpoint's)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    p.add_argument("--load-in-4bit", action="store_true", help="quantise the language model to 4 bits (bitsandbytes)")
    p.add_argument("--cache-dir", metavar="D", help="cache point maps in this folder (default: no cache)")
    p.add_argument(
        "--no-position-encoding",
        action="store_true",
        help="load the model without its 3D positional encoding (a LLaVA / VILA host model then answers exactly "
        "as the original; no depth needed)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON object on stdout")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (
        "region specs: frame=K box=x0,y0,x1,y1 | frame=K mask=F.png | frame=K rle=F.json |\n"
        "  frame=K polygon=x0,y0,x1,y1,... | box3d=cx,cy,cz,sx,sy,sz[,yaw]; K counts frames after sampling,\n"
        "  frame=@ID names an original frame id\n\n" + QUESTIONS_HELP
    )
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    if args.model is None and args.adapter is None:
        raise SR3DInputError("give the model folder with --model PATH (or a trained adapter with --adapter DIR)")
    if args.adapter is not None:
        from sr3d_plugin.training.merge import is_adapter

        if not is_adapter(args.adapter):
            raise SR3DInputError(
                f"--adapter {args.adapter!r} holds no adapter_config.json (expected an adapter, checkpoint or run "
                "folder written by `sr3d train`)"
            )
    if args.questions is None:
        if not any(x is not None for x in (args.image, args.frames, args.video, args.scene)):
            raise SR3DInputError("give the visual input: one of --image, --frames, --video or --scene")
        for flag, value in (("--out", args.out), ("--batch-size", args.batch_size)):
            if value is not None:
                raise SR3DInputError(f"{flag} applies to --questions FILE.jsonl, not to one --question")
    else:
        if args.stream:
            raise SR3DInputError("--stream prints one answer as it is generated; it does not apply to --questions")
        if args.batch_size is not None and args.batch_size <= 0:
            raise SR3DInputError(f"--batch-size must be positive, got {args.batch_size}")
    if args.image is not None:
        for flag, values in (("--depth", args.depth), ("--poses", args.poses)):
            if values and len(values) > 1:
                raise SR3DInputError(f"--image takes one {flag} file, got {len(values)}")
    if args.num_frames is not None and args.num_frames <= 0:
        raise SR3DInputError(f"--num-frames must be positive, got {args.num_frames}")
    if args.max_new_tokens <= 0:
        raise SR3DInputError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.temperature is not None and not args.do_sample:
        raise SR3DInputError("--temperature only applies with --do-sample")


def _summary_line(result: dict[str, Any]) -> str:
    geo = result["geometry"]
    parts = [
        f"{result['num_frames']} frame(s)",
        f"{result['num_tiles']} tile(s)",
        f"{result['prompt_tokens']} prompt tokens",
        f"{len(result['regions'])} region(s)",
        f"geometry {geo.get('source') or 'none'}"
        + (f" ({geo['canonical_mode']})" if geo.get("canonical_mode") else ""),
    ]
    if "answer_logprob" in result:
        parts.append(f"log p(score answer) = {result['answer_logprob']:.4f} over {result['answer_tokens']} token(s)")
    tm = result["timings"]
    parts.append(f"{tm['total']:.2f} s (load {tm.get('load', 0.0):.2f} s, generate {tm.get('generate', 0.0):.2f} s)")
    return "; ".join(parts)


def _inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The per-question keyword arguments of ``SR3DPipeline.ask`` given by the flags."""
    image = args.image is not None
    return {
        "image": args.image,
        "frames": args.frames,
        "video": args.video,
        "scene": args.scene,
        "depth": (args.depth[0] if image else args.depth) if args.depth else None,
        "depth_model": args.depth_model,
        "intrinsics": args.intrinsics,
        "poses": (args.poses[0] if image else args.poses) if args.poses else None,
        "points": args.points,
        "regions": args.region,
        "num_frames": args.num_frames,
        "max_new_tokens": args.max_new_tokens,
        "score_answer": args.score_answer,
        "system": args.system,
        "depth_scale": args.depth_scale,
    }


def _read_questions(path: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, item)`` of every non-blank line of a ``--questions`` file, checked for JSON
    objects with known fields and unique ids (``id`` defaults to the line number)."""
    from pathlib import Path

    from sr3d_plugin.inference import check_item_fields

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SR3DInputError(f"cannot read --questions {path!r}: {exc}") from exc
    items: list[tuple[int, dict[str, Any]]] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise SR3DInputError(f"{where}: not JSON ({exc}); expected one JSON object per line") from exc
        if not isinstance(obj, dict):
            raise SR3DInputError(f"{where}: expected a JSON object, got {type(obj).__name__} {line.strip()[:60]!r}")
        try:
            check_item_fields(len(items), obj)
        except SR3DInputError as exc:
            raise _line_error(path, n, exc) from exc
        if obj.get("id") is None:
            obj["id"] = n
        key = json.dumps(obj["id"])
        if key in seen:
            raise SR3DInputError(f"{where}: id {key} is also the id of line {seen[key]}; expected unique ids")
        seen[key] = n
        items.append((n, obj))
    if not items:
        raise SR3DInputError(f"--questions {path!r} holds no questions (expected one JSON object per line)")
    return items


def _answered(out: str, items: list[tuple[int, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The answers ``--out`` already holds for ids of ``items`` (resume), checked against their questions."""
    from sr3d_plugin.evaluation.answer_store import read_jsonl

    lines, bad = read_jsonl(out, "--out file")
    if bad:
        print(f"sr3d ask: {bad} unreadable line(s) in {out} ignored (their questions are asked again)", file=sys.stderr)
    questions = {json.dumps(obj["id"]): obj["question"] for _, obj in items}
    done: dict[str, dict[str, Any]] = {}
    for obj in lines:
        if not isinstance(obj, dict) or "answer" not in obj or "id" not in obj:
            continue
        key = json.dumps(obj["id"])
        if key not in questions:
            continue
        if obj.get("question") != questions[key]:
            raise SR3DInputError(
                f"--out {out} already answers id {key} for another question ({obj.get('question')!r}, not "
                f"{questions[key]!r}); give another --out file or remove that one"
            )
        done[key] = obj
    return done


def _line_error(path: str, line: int, exc: SR3DInputError, note: str = "") -> SR3DInputError:
    """An error of ``SR3DPipeline.ask_iter`` about one item (``item_index`` …) named by its line of ``path``."""
    field = getattr(exc, "item_field", None)
    detail = getattr(exc, "item_detail", str(exc))
    return SR3DInputError(f"{path} line {line}{'' if field is None else f', {json.dumps(field)}'}: {detail}{note}")


def _run_questions(
    args: argparse.Namespace,
    pipe: Any,
    items: list[tuple[int, dict[str, Any]]],
    done: dict[str, dict[str, Any]],
    t0: float,
) -> int:
    from tqdm import tqdm

    from sr3d_plugin.evaluation.answer_store import JsonlAppender

    todo = [(n, obj) for n, obj in items if json.dumps(obj["id"]) not in done]
    show = not args.json and sys.stderr.isatty()
    bar = tqdm(total=len(items), initial=len(done), desc="sr3d ask", unit="q", file=sys.stderr, disable=not show)
    sink = JsonlAppender(args.out) if args.out else None
    written = 0
    try:
        results = pipe.ask_iter(
            [obj for _, obj in todo],
            batch_size=8 if args.batch_size is None else args.batch_size,
            seed=args.seed,
            do_sample=args.do_sample,
            temperature=args.temperature,
            cache=args.cache_dir if args.cache_dir else False,
            **_inputs(args),
        )
        for (n, obj), result in zip(todo, results):
            line = {"id": result.pop("id"), "line": n, "question": obj["question"], **result}
            if sink is not None:
                sink.append(line)
            else:
                print(json.dumps(line), flush=True)
            written += 1
            bar.update(1)
    except SR3DInputError as exc:
        index = getattr(exc, "item_index", None)
        if index is None:
            raise
        kept = f" ({written} answer(s) before it are in {args.out}; a rerun resumes)" if sink and written else ""
        raise _line_error(args.questions, todo[index][0], exc, kept) from exc
    finally:
        bar.close()
        if sink is not None:
            sink.close()
    seconds = round(time.perf_counter() - t0, 4)
    summary = {"questions": len(items), "answered": written, "resumed": len(done), "out": args.out, "seconds": seconds}
    if args.json and sink is not None:
        print(json.dumps(summary))
    elif not args.json:
        where = args.out if sink is not None else "stdout"
        print(
            f"{written} answer(s) to {where}" + (f", {len(done)} already there" if done else "") + f"; {seconds:.2f} s",
            file=sys.stderr,
        )
    return 0


def _run_stream(args: argparse.Namespace, pipe: Any) -> dict[str, Any]:
    inputs = _inputs(args)
    cache = args.cache_dir if args.cache_dir else False
    sampling = {"seed": args.seed, "do_sample": args.do_sample, "temperature": args.temperature}
    stream = pipe.ask_stream(args.question, cache=cache, **sampling, **inputs)
    started = False
    for piece in stream:
        if args.json:
            print(json.dumps({"event": "text", "text": piece}), flush=True)
            continue
        if not started:  # the answer is reported stripped; so is its printed start
            piece = piece.lstrip()
            started = bool(piece)
        print(piece, end="", flush=True)
    result = stream.result
    if not args.json:
        print(flush=True)
    return result


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    _check_args(args)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    # a bad --questions or --out file fails before the model loads
    items = _read_questions(args.questions) if args.questions is not None else []
    done = _answered(args.out, items) if args.out else {}
    from sr3d_plugin.inference import SR3DPipeline

    try:
        pipe = SR3DPipeline.from_pretrained(
            args.adapter if args.adapter is not None else args.model,
            base=args.model if args.adapter is not None else None,
            builder=args.builder,
            dtype=args.dtype,
            device=args.device,
            load_in_4bit=args.load_in_4bit,
            **({"use_position_encoding": False} if args.no_position_encoding else {}),
        )
        if args.questions is not None:
            return _run_questions(args, pipe, items, done, t0)
        if args.stream:
            result = _run_stream(args, pipe)
        else:
            result = pipe.ask(
                args.question,
                seed=args.seed,
                do_sample=args.do_sample,
                temperature=args.temperature,
                cache=args.cache_dir if args.cache_dir else False,
                **_inputs(args),
            )
    except SR3DError:
        raise
    except OSError as exc:  # unreadable files that slipped past the readers
        raise SR3DInputError(f"cannot read input: {exc}") from exc
    result["timings"]["total"] = round(time.perf_counter() - t0, 4)
    if args.json:
        print(json.dumps({"event": "result", **result} if args.stream else result))
    elif args.stream:
        print(_summary_line(result), file=sys.stderr)
    else:
        print(result["answer"])
        print(_summary_line(result), file=sys.stderr)
    return 0
