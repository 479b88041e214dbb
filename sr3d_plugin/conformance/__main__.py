"""``python -m sr3d_plugin.conformance``: the same as ``sr3d conformance``."""

from __future__ import annotations

import sys

from sr3d_plugin.cli import main

if __name__ == "__main__":
    sys.exit(main(["conformance", *sys.argv[1:]]))
