"""``sr3d eval``: run lmms-eval with the ``sr3d`` model on the sr3d tasks (a thin wrapper).

Examples::

    sr3d eval --data data/sr3d --model checkpoints/sr3d-8b                       # all four (group sr3d_3d)
    sr3d eval --data data/sr3d --model ckpt --tasks sr3d_scanqa,sr3d_sqa3d --limit 20 --log_samples
    sr3d eval --data data/sr3d --model ckpt --model-args num_frames=16,dtype=bfloat16 --batch_size 4
    sr3d eval --data data/sr3d --model ckpt --num-processes 8 -- --verbosity DEBUG  # accelerate launch, 8 GPUs
    sr3d eval --data data/sr3d --model ckpt --num-processes 2 --cpu                # 2 CPU processes (gloo)
    sr3d eval ... --dry-run                                                     # print the command only
    sr3d eval ... --output-path out/run1        # killed? the same command again computes only what is missing

What it sets: ``--model sr3d``, ``--include_path`` (``sr3d tasks-path``), ``--model_args
pretrained=<model>,…``, ``--tasks`` (default ``sr3d_3d``), ``--output_path`` (default
``sr3d-eval-results``), the environment variable ``SR3D_DATA`` (``--data``) and, unless ``--online``,
``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1``. Frequent lmms-eval flags are
accepted directly; anything else goes after ``--``. With ``--num-processes N`` the command is
``accelerate launch --multi_gpu --num_processes N -m lmms_eval …`` (one process per GPU); with
``--cpu`` also ``ACCELERATE_USE_CPU=1`` (``accelerate launch --cpu`` itself would start one process). lmms-eval reports a failed run in its log but
exits with status 0, so success here means a new ``*_results.json`` appeared under the output path.

Pre-flight (before lmms-eval or any model starts; :mod:`sr3d_plugin.evaluation.preflight`): every
selected sr3d task's prepared records, visual inputs and geometry source (point maps, depth maps or a
depth model that can be loaded here) are checked. By default (``--skip-missing``) tasks that cannot
run are listed and left out of ``--tasks``, the others run; ``--strict`` refuses to start instead;
``--no-preflight`` turns the check off.

Runs are resumable by default: the model argument ``answers_dir`` is set to ``--answers-dir``
(default ``<output path>/sr3d-answers``), so every answer is on disk as soon as it is produced and
the same command after an interruption computes only the missing answers
(:mod:`sr3d_plugin.evaluation.answer_store`); ``--no-resume`` turns that off.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from sr3d_plugin.errors import SR3DConfigError

#: lmms-eval flags passed through as given (name, takes a value)
_PASSTHROUGH: tuple[tuple[str, bool], ...] = (
    ("--limit", True),
    ("--offset", True),
    ("--batch_size", True),
    ("--gen_kwargs", True),
    ("--verbosity", True),
    ("--use_cache", True),
    ("--seed", True),
    ("--log_samples", False),
    ("--predict_only", False),
    ("--show_config", False),
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a model on the sr3d lmms-eval tasks (wraps `python -m lmms_eval`)",
        description=(
            "Run lmms-eval with --model sr3d and the sr3d tasks (--include_path set for you). Extra lmms-eval "
            "arguments go after `--`."
        ),
    )
    p.add_argument("--data", metavar="DIR", help="prepared data folder (sets SR3D_DATA; default: $SR3D_DATA)")
    p.add_argument("--model", metavar="PATH", help="model folder (pretrained=…); with --adapter: its base")
    p.add_argument(
        "--adapter",
        metavar="DIR",
        help="a trained LoRA adapter (adapter=…), applied without merging to its recorded base model (or --model)",
    )
    p.add_argument("--model-args", default="", metavar="K=V,…", help="more sr3d model arguments (see docs)")
    p.add_argument("--tasks", default="sr3d_3d", help="comma-separated tasks or the group sr3d_3d (default)")
    p.add_argument("--output-path", default="sr3d-eval-results", metavar="DIR", help="lmms-eval --output_path")
    p.add_argument("--num-processes", type=int, default=1, help="processes for `accelerate launch` (default 1)")
    p.add_argument("--cpu", action="store_true", help="with --num-processes: run the processes on CPU (gloo)")
    p.add_argument("--main-process-port", type=int, help="with --num-processes: rendezvous port (default: a free one)")
    p.add_argument(
        "--answers-dir",
        metavar="DIR",
        help="folder of the run's answers, reused by a rerun (default: <output-path>/sr3d-answers)",
    )
    p.add_argument(
        "--no-resume", action="store_true", help="neither store nor reuse answers (no answers_dir model argument)"
    )
    p.add_argument("--online", action="store_true", help="do not set the Hugging Face offline variables")
    p.add_argument("--dry-run", action="store_true", help="print the command and environment, run nothing")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--skip-missing",
        dest="strict",
        action="store_false",
        default=False,
        help="(default) pre-flight: skip and list the tasks whose data or geometry is missing; run the others",
    )
    mode.add_argument(
        "--strict", dest="strict", action="store_true", help="pre-flight: refuse to start when any task cannot run"
    )
    p.add_argument("--no-preflight", action="store_true", help="do not check the tasks' inputs before the model loads")
    for flag, takes_value in _PASSTHROUGH:
        if takes_value:
            p.add_argument(flag, dest="pt_" + flag[2:], metavar="V", help=f"lmms-eval {flag}")
        else:
            p.add_argument(flag, dest="pt_" + flag[2:], action="store_true", help=f"lmms-eval {flag}")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after `--`: more lmms-eval arguments")
    p.set_defaults(func=run)


def build_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The lmms-eval command line and the environment additions for ``args``."""
    from sr3d_plugin.resources import eval_tasks_dir

    env: dict[str, str] = {}
    data = args.data or os.environ.get("SR3D_DATA")
    if not data:
        raise SR3DConfigError("give --data DIR (the folder written by `sr3d prepare`) or set SR3D_DATA")
    data_path = Path(data).expanduser().resolve()
    if not data_path.is_dir():
        raise SR3DConfigError(f"--data {data!r} is not a folder; prepare it with `sr3d prepare`")
    env["SR3D_DATA"] = str(data_path)
    if not args.online:
        env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    model_args = [a for a in (args.model_args or "").split(",") if a.strip()]
    if args.model:
        from sr3d_plugin.resources import resolve_model_name

        model_path = Path(resolve_model_name(args.model)).expanduser()
        if not model_path.exists():
            raise SR3DConfigError(f"--model {args.model!r} does not exist (expected a model folder)")
        if any(a.strip().startswith("pretrained=") for a in model_args):
            raise SR3DConfigError("give the model either with --model or as pretrained= in --model-args, not both")
        model_args.insert(0, f"pretrained={model_path.resolve()}")
    adapter = getattr(args, "adapter", None)
    if adapter:
        from sr3d_plugin.training.merge import is_adapter

        if any(a.strip().startswith("adapter=") for a in model_args):
            raise SR3DConfigError("give the adapter either with --adapter or as adapter= in --model-args, not both")
        if not is_adapter(adapter):
            raise SR3DConfigError(
                f"--adapter {adapter!r} holds no adapter_config.json (expected an adapter, checkpoint or run folder)"
            )
        if "," in str(Path(adapter).expanduser().resolve()):
            raise SR3DConfigError(f"--adapter {adapter!r} must not contain ',' (lmms-eval splits model_args on it)")
        model_args.insert(0, f"adapter={Path(adapter).expanduser().resolve()}")
    elif not args.model and not any(a.strip().startswith(("pretrained=", "adapter=")) for a in model_args):
        raise SR3DConfigError("give the model folder with --model PATH (or a trained adapter with --adapter DIR)")
    given_store = any(a.strip().startswith("answers_dir=") for a in model_args)
    if getattr(args, "no_resume", False):
        if given_store or getattr(args, "answers_dir", None):
            raise SR3DConfigError("--no-resume contradicts --answers-dir and the answers_dir model argument")
    elif not given_store:
        folder = getattr(args, "answers_dir", None) or str(Path(args.output_path) / "sr3d-answers")
        if "," in folder:
            raise SR3DConfigError(f"--answers-dir {folder!r} must not contain ',' (lmms-eval splits model_args on it)")
        model_args.append(f"answers_dir={Path(folder).expanduser().resolve()}")
    elif getattr(args, "answers_dir", None):
        raise SR3DConfigError(
            "give the answer folder either with --answers-dir or as the answers_dir model argument, not both"
        )
    lmms = [
        "-m", "lmms_eval",
        "--model", "sr3d",
        "--model_args", ",".join(model_args),
        "--tasks", args.tasks,
        "--include_path", str(eval_tasks_dir()),
        "--output_path", args.output_path,
    ]  # fmt: skip
    for flag, takes_value in _PASSTHROUGH:
        value = getattr(args, "pt_" + flag[2:])
        if takes_value and value is not None:
            lmms += [flag, str(value)]
        elif not takes_value and value:
            lmms.append(flag)
    extra = list(args.extra or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    lmms += extra
    if args.num_processes < 1:
        raise SR3DConfigError(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.num_processes > 1:
        # `accelerate launch --cpu` starts a single process; data-parallel CPU processes are a torchrun
        # (--multi_gpu) launch with ACCELERATE_USE_CPU=1, which makes every Accelerator use gloo on CPU.
        port = args.main_process_port or _free_port()
        launch = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(args.num_processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(port),
        ]  # fmt: skip
        if args.cpu:
            env["ACCELERATE_USE_CPU"] = "1"
            env.setdefault("OMP_NUM_THREADS", "1")
        return [*launch, *lmms], env
    return [sys.executable, *lmms], env


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _new_results(folder: Path, since: float) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*_results.json") if p.stat().st_mtime >= since)


def _model_arguments(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def preflight_tasks(args: argparse.Namespace, data_dir: str) -> str:
    """The ``--tasks`` value that can run, after the pre-flight (:mod:`sr3d_plugin.evaluation.preflight`).

    Tasks that cannot run are listed on stderr and left out; with ``--strict`` (or when none can
    run) that is an error, before any model loads.
    """
    from sr3d_plugin.evaluation.preflight import expand_tasks, model_depth_model, model_needs_positions, preflight

    margs = _model_arguments(args.model_args)
    model_dir = args.model or margs.get("pretrained")
    adapter = getattr(args, "adapter", None) or margs.get("adapter")
    if model_dir is None and adapter:  # the base's config decides what the inputs need
        from sr3d_plugin.training.merge import adapter_base

        model_dir = str(adapter_base(adapter))

    def opt(name: str) -> str | None:
        value = margs.get(name)
        return None if value is None or value == "" or value.lower() == "none" else value

    report = preflight(
        data_dir,
        args.tasks,
        depth_source=opt("depth_source") or "auto",
        pointmap_dir=opt("pointmap_dir"),
        depth_model=opt("depth_model") or model_depth_model(model_dir),
        needs_positions=model_needs_positions(model_dir),
        offline=not args.online,
    )
    if report.ok:
        return args.tasks
    _, other = expand_tasks(args.tasks)
    if args.strict or not (report.runnable or other):
        if args.dry_run:
            print(f"sr3d eval: warning: pre-flight failed:\n{report.message()}", file=sys.stderr)
            return args.tasks
        report.raise_if_failed()
    skipped = ", ".join(c.lmms_name for c in report.failed)
    print(
        f"sr3d eval: skipping {len(report.failed)} task(s) that cannot run ({skipped}); --strict refuses instead:\n"
        f"{report.message()}",
        file=sys.stderr,
    )
    return ",".join([*report.runnable, *other])


def run(args: argparse.Namespace) -> int:
    cmd, env_add = build_command(args)
    if not getattr(args, "no_preflight", False):
        tasks = preflight_tasks(args, env_add["SR3D_DATA"])
        if tasks != args.tasks:
            args.tasks = tasks
            cmd, env_add = build_command(args)
    if args.dry_run:
        print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env_add.items()) + " " + shlex.join(cmd))
        return 0
    env = {**os.environ, **env_add}
    start = time.time() - 1.0
    proc = subprocess.run(cmd, env=env, check=False)
    if proc.returncode != 0:
        print(f"sr3d eval: lmms-eval exited with status {proc.returncode}", file=sys.stderr)
        return proc.returncode
    if getattr(args, "pt_predict_only", False):
        return 0
    found = _new_results(Path(args.output_path), start)
    if not found:
        print(
            f"sr3d eval: lmms-eval finished without writing results under {args.output_path!r}; the run failed "
            "(see the error above)",
            file=sys.stderr,
        )
        return 1
    for p in found:
        print(f"results: {p}")
    return 0
