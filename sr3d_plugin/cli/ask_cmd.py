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
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from sr3d_plugin.errors import SR3DError, SR3DInputError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ask",
        help="ask a model a question about an image, frames, a video or a scene (with region prompts)",
        description="Load a model, read the visual input and its geometry, resolve region prompts and generate "
        "an answer. Frame indices in --region count the frames after sampling.",
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
    src = p.add_mutually_exclusive_group(required=True)
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
    p.add_argument("--question", required=True, help="the question; refer to regions as <mask> or <region0>, …")
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
    p.epilog = (
        "region specs: frame=K box=x0,y0,x1,y1 | frame=K mask=F.png | frame=K rle=F.json | "
        "frame=K polygon=x0,y0,x1,y1,... | box3d=cx,cy,cz,sx,sy,sz[,yaw]; K counts frames after sampling, "
        "frame=@ID names an original frame id"
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


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    _check_args(args)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
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
        result = pipe.ask(
            args.question,
            image=args.image,
            frames=args.frames,
            video=args.video,
            scene=args.scene,
            depth=(args.depth[0] if args.image is not None else args.depth) if args.depth else None,
            depth_model=args.depth_model,
            intrinsics=args.intrinsics,
            poses=(args.poses[0] if args.image is not None else args.poses) if args.poses else None,
            points=args.points,
            regions=args.region,
            num_frames=args.num_frames,
            max_new_tokens=args.max_new_tokens,
            score_answer=args.score_answer,
            seed=args.seed,
            do_sample=args.do_sample,
            temperature=args.temperature,
            system=args.system,
            depth_scale=args.depth_scale,
            cache=args.cache_dir if args.cache_dir else False,
        )
    except SR3DError:
        raise
    except OSError as exc:  # unreadable files that slipped past the readers
        raise SR3DInputError(f"cannot read input: {exc}") from exc
    result["timings"]["total"] = round(time.perf_counter() - t0, 4)
    if args.json:
        print(json.dumps(result))
    else:
        print(result["answer"])
        print(_summary_line(result), file=sys.stderr)
    return 0
