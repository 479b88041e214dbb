"""Start-up time of the command line and of ``import sr3d_plugin``, against torch / transformers / bare Python.

Each command runs in a fresh interpreter (``sys.executable``), several times, interleaved so that a
busy moment of the machine hits every command alike; the figure per command is the median wall time.
Targets (issue 10): ``sr3d --help`` ≤ 0.25 × ``import torch``; ``import sr3d_plugin`` ≤ 1.5 ×
``import transformers``. ``sr3d --help`` runs the installed console script beside ``sys.executable``
(``python -m sr3d_plugin.cli --help`` where there is none).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DESCRIPTION = "start-up: sr3d --help, import sr3d_plugin, import torch, import transformers, python -c pass"


def commands() -> dict[str, list[str]]:
    """Label → command line."""
    script = Path(sys.executable).with_name("sr3d")
    sr3d = [str(script)] if script.is_file() else [sys.executable, "-m", "sr3d_plugin.cli"]
    py = sys.executable
    return {
        "sr3d --help": [*sr3d, "--help"],
        "import sr3d_plugin": [py, "-c", "import sr3d_plugin"],
        "import torch": [py, "-c", "import torch"],
        "import transformers": [py, "-c", "import transformers"],
        "python -c pass": [py, "-c", "pass"],
    }


def _env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])  # this checkout's sr3d_plugin, as for the tests
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def time_commands(repeats: int) -> dict[str, float]:
    """Median wall seconds of each of :func:`commands` over ``repeats`` interleaved rounds."""
    env = _env()
    todo = commands()
    samples: dict[str, list[float]] = {label: [] for label in todo}
    for argv in todo.values():  # warm the file cache once, untimed
        subprocess.run(argv, env=env, check=True, capture_output=True)
    for _ in range(repeats):
        for label, argv in todo.items():
            start = time.perf_counter()
            subprocess.run(argv, env=env, check=True, capture_output=True)
            samples[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) for label, values in samples.items()}


def run(quick: bool = False) -> dict[str, Any]:
    times = time_commands(3 if quick else 7)
    figures: dict[str, Any] = {f"{label} [s]": round(t, 3) for label, t in times.items()}
    figures["sr3d --help / import torch"] = round(times["sr3d --help"] / times["import torch"], 3)
    figures["import sr3d_plugin / import transformers"] = round(
        times["import sr3d_plugin"] / times["import transformers"], 3
    )
    figures["targets"] = "sr3d --help <= 0.25 x import torch; import sr3d_plugin <= 1.5 x import transformers"
    return figures
