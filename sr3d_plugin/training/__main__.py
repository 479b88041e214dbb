"""``python -m sr3d_plugin.training RECIPE [KEY=VALUE ...] [--resume] [--json]`` — ``sr3d train`` for launchers.

``torchrun`` and ``accelerate launch -m`` need a module to run; this is the same command.
"""

from __future__ import annotations

import sys

from sr3d_plugin.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
