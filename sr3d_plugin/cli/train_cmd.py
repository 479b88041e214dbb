"""``sr3d train``: finetune with a recipe (LoRA / QLoRA / full), or plan its memory with ``--dry-run``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any


class _OverridesParser(argparse.ArgumentParser):
    """Accepts ``KEY=VALUE`` overrides anywhere on the line (also after options such as ``--json``)."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        ns, extra = super().parse_known_args(args, namespace)
        late = [a for a in extra if "=" in a and not a.startswith("-")]
        if late and hasattr(ns, "overrides"):
            ns.overrides = [*ns.overrides, *late]
            extra = [a for a in extra if a not in late]
        return ns, extra


def add_parser(sub: argparse._SubParsersAction) -> None:
    from sr3d_plugin.training.recipe import field_help

    parser_class = sub._parser_class
    sub._parser_class = _OverridesParser  # this sub-command only
    try:
        _add_parser(sub, field_help())
    finally:
        sub._parser_class = parser_class


def _add_parser(sub: argparse._SubParsersAction, keys_help: str) -> None:
    p = sub.add_parser(
        "train",
        help="finetune an SR-3D model with a recipe (LoRA, QLoRA, two-stage, multi-GPU); --dry-run plans memory",
        description=(
            "Train with RECIPE (a YAML file or the name of a bundled recipe, see `sr3d recipes`). Override any "
            "recipe key with KEY=VALUE (dotted, e.g. training.learning_rate=1e-4 lora.r=16). Several GPUs: run "
            "the same command under `torchrun --nproc_per_node N -m sr3d_plugin.training RECIPE` or "
            "`accelerate launch --config_file recipes/accelerate/ddp.yaml -m sr3d_plugin.training RECIPE`."
        ),
        epilog="recipe keys (type, default, range; floats must be finite):\n" + keys_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="recipe YAML file or bundled recipe name")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides (dotted keys)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CKPT",
        help="continue from the newest checkpoint in training.output_dir, or from the checkpoint folder CKPT",
    )
    p.add_argument("--dry-run", action="store_true", help="print the memory plan without loading any weights")
    p.add_argument("--json", action="store_true", help="machine-readable output (one JSON object per line)")
    p.add_argument("--verbose", action="store_true", help="list every trainable tensor at start (default: per group)")
    p.add_argument("--tiles", type=int, default=None, help="dry run: tiles per sample (default data.num_frames)")
    p.add_argument("--text-tokens", type=int, default=256, help="dry run: text tokens per sample (default 256)")
    p.add_argument("--answer-tokens", type=int, default=64, help="dry run: supervised tokens per sample (default 64)")
    p.add_argument("--num-processes", type=int, default=1, help="dry run: processes sharing ZeRO/FSDP states")
    p.set_defaults(func=run)


def _print_event(event: dict[str, Any], verbose: bool = False) -> None:
    kind = event.get("event")
    if kind == "start":
        from sr3d_plugin.training.model_setup import format_trainable

        print(
            f"training on {event['device']} ({event['processes']} process(es)): {event['samples']} samples, "
            f"{event['total_steps']} steps"
        )
        print(f"run folder: {event['output_dir']}")
        if event.get("log_dir"):
            print(f"log folder: {event['log_dir']}  (every event: {event.get('log_file')})")
        if "tensorboard" in (event.get("trackers") or []):
            print(f"watch it:   tensorboard --logdir {shlex.quote(str(event['log_dir']))}")
        print(format_trainable(event, verbose))
    elif kind == "log":
        extra = f"  grad_norm {event['grad_norm']:.3f}" if "grad_norm" in event else ""
        print(
            f"step {event['step']}  epoch {event['epoch']:.2f}  loss {event['loss']:.4f}  lr {event['lr']:.3g}{extra}"
        )
    elif kind == "checkpoint":
        print(f"saved {event['path']}")
    elif kind == "resume":
        print(f"resumed from {event['checkpoint']} at step {event['global_step']}")
    elif kind == "end":
        print(
            f"done: {event['steps']} steps, final loss {event['final_loss']:.4f}, {event['seconds']} s -> {event['output']}"
        )
    elif kind == "warning":
        print(f"warning: {event['message']}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from sr3d_plugin.training.recipe import load_recipe

    overrides = list(args.overrides)
    if args.resume and "=" in args.resume and not Path(args.resume).exists():
        overrides.append(args.resume)  # `--resume KEY=VALUE`: the value is an override, not a checkpoint
        args.resume = "latest"
    args.overrides = overrides
    recipe, warnings = load_recipe(args.recipe, overrides, check_files=not args.dry_run)
    if args.dry_run:
        from sr3d_plugin.training.memory import plan_memory

        plan = plan_memory(
            recipe,
            tiles=args.tiles,
            text_tokens=args.text_tokens,
            answer_tokens=args.answer_tokens,
            num_processes=args.num_processes,
        )
        if args.json:
            print(json.dumps({"recipe": recipe.source, "warnings": warnings, **plan.to_dict()}, default=str))
        else:
            print(f"recipe: {recipe.source or '(mapping)'}")
            for w in warnings:
                print(f"warning: {w}")
            from sr3d_plugin.cli import flag_wording

            print(flag_wording(plan.format(), "train"))
        return 0
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    from sr3d_plugin.training.trainer import train

    def emit(event: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(event, default=str), flush=True)
        else:
            _print_event(event, verbose=args.verbose)
            sys.stdout.flush()

    from safetensors import SafetensorError

    from sr3d_plugin.errors import SR3DError
    from sr3d_plugin.training.checkpoint import describe_os_error

    try:
        train(recipe, resume=args.resume, emit=emit, progress=False if args.json else None)
    except KeyboardInterrupt:
        _interrupted(args, recipe.training.output_dir)
        return 130
    except SR3DError:
        raise
    except (OSError, SafetensorError) as exc:  # a disk fault the trainer did not name itself: still one line
        raise describe_os_error(exc, recipe.training.output_dir, "training into") from None
    return 0


def resume_command(args: argparse.Namespace) -> str:
    """The ``sr3d train`` line that continues this run from its newest complete checkpoint."""
    words = ["sr3d", "train", args.recipe, *args.overrides, "--resume"]
    return shlex.join(words)


def _interrupted(args: argparse.Namespace, output_dir: str) -> None:
    """Ctrl-C: name the last complete checkpoint and the exact command that resumes from it."""
    from sr3d_plugin.training.trainer import find_checkpoint

    try:
        ckpt = find_checkpoint(output_dir, True)
    except Exception:  # a half-written folder must not hide the hint
        ckpt = None
    command = resume_command(args) if ckpt is not None else None
    if args.json:
        event = {"event": "interrupted", "checkpoint": str(ckpt) if ckpt else None, "resume_command": command}
        print(json.dumps(event), flush=True)
        return
    if ckpt is None:
        print(f"interrupted: no complete checkpoint in {output_dir} yet; start again to train", file=sys.stderr)
    else:
        print(f"interrupted; last complete checkpoint: {ckpt}", file=sys.stderr)
        print(f"continue with: {command}", file=sys.stderr)
