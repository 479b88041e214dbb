"""lmms-eval hooks of the ``sr3d_vsibench`` task; the logic lives in :mod:`sr3d_plugin.evaluation.lmms_tasks`."""

from sr3d_plugin.evaluation.lmms_tasks import hooks

globals().update(hooks("vsibench"))
