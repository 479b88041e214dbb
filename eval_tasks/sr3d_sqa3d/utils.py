"""lmms-eval hooks of the ``sr3d_sqa3d`` task; the logic lives in :mod:`sr3d_plugin.evaluation.lmms_tasks`."""

from sr3d_plugin.evaluation.lmms_tasks import hooks

globals().update(hooks("sqa3d"))
