"""Imported first by every module of the model layer; raises on a transformers older than 5.0.

The model layer (``SR3DConfig``, ``SR3DForConditionalGeneration``, ``SR3DProcessor``, the builders)
uses transformers-5 names (``PreTrainedConfig``, ``SubConfigSpec``, …). Importing it on transformers
4.x (e.g. inside a VILA environment, which pins 4.46) raises
:class:`~sr3d_plugin.errors.SR3DDependencyError` naming the installed version and what works there,
instead of an ``ImportError`` about a missing name deep inside transformers.
"""

from sr3d_plugin._compat import require_model_classes

require_model_classes(
    "the sr3d-plugin model classes (SR3DConfig, SR3DForConditionalGeneration, SR3DProcessor, builders)"
)
