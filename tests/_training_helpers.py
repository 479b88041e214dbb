"""Shared helpers of the training tests: one synthetic region-QA data set per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TOY_ARGS = {"num_scenes": 3, "num_frames": 6, "sampled_frames": 4, "questions_per_scene": 12, "seed": 0}


def toy_jsonl(tmp_path_factory) -> Path:
    """Synthetic scenes + region questions written as JSONL (generated once, shared by xdist workers)."""
    from filelock import FileLock

    from sr3d_plugin.training.toy_data import region_qa

    root = tmp_path_factory.getbasetemp().parent / "sr3d-toy-data"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        return region_qa(root, **TOY_ARGS)


def cli_env() -> dict[str, str]:
    """Environment of ``sr3d`` subprocesses: offline, one thread (bit-identical CPU runs)."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
    }


def run_train(
    out: Path, data: Path, *extra: str, timeout: int = 240, processes: int = 1
) -> subprocess.CompletedProcess:
    """``python -m sr3d_plugin.training tiny-cpu`` on the toy data with JSON events on stdout.

    ``processes`` > 1 launches that many CPU processes with ``torchrun --standalone`` (gloo, a free port).
    """
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    cmd = [
        *launcher,
        "-m",
        "sr3d_plugin.training",
        "tiny-cpu",
        f"training.output_dir={out}",
        "data.generator=null",
        f"data.train_file={data}",
        "logging.report_to=[]",
        *[e for e in extra if not e.startswith("--")],  # KEY=VALUE overrides come before the options
        "--json",
        *[e for e in extra if e.startswith("--")],
    ]
    return subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def events(stdout: str) -> list[dict]:
    import json

    out = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out
