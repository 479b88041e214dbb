"""``python -m sr3d_plugin.cli``: the ``sr3d`` command without its console script."""

import sys

from sr3d_plugin.cli import main

sys.exit(main())
