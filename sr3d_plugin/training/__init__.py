"""Finetuning SR-3D: recipes, data, LoRA/QLoRA set-up, the accelerate training loop, memory planning, merging.

* :mod:`~sr3d_plugin.training.recipe` — typed recipe schema (YAML + dotted overrides).
* :mod:`~sr3d_plugin.training.data` — records / generated samples → batches; :mod:`~sr3d_plugin.training.augment`.
* :mod:`~sr3d_plugin.training.model_setup` — load or build, quantise, LoRA on the LLM only, freezing.
* :mod:`~sr3d_plugin.training.trainer` — the loop (``sr3d train``), atomic checkpoints, exact resume.
* :mod:`~sr3d_plugin.training.checkpoint` — checkpoint states as safetensors + JSON (no pickles), the manifest
  verified on resume.
* :mod:`~sr3d_plugin.training.memory` — the peak-memory planner (``sr3d train --dry-run``).
* :mod:`~sr3d_plugin.training.merge` — ``sr3d merge``.

Submodules are imported on use so that ``sr3d --help`` stays fast.
"""
