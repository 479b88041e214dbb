"""Device placement, decided in one place: which device ``"auto"`` means, and how weights are placed
while loading (bitsandbytes quantises on load, so quantised weights cannot be moved afterwards).

Callers: the builders' quantisation checks (:func:`device_of`), training's model set-up
(:func:`placement_map`), the inference pipeline and the depth estimator (:func:`resolve_device`).
Needs torch only.
"""

from __future__ import annotations

from typing import Any

import torch

from sr3d_plugin.errors import SR3DConfigError

__all__ = ["AUTO_DEVICE_MAPS", "device_of", "placement_map", "resolve_device"]

#: ``device_map`` strings that let accelerate spread the weights (over the GPUs when there are any)
AUTO_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` / ``"auto"`` → CUDA when available, else the CPU; anything else as ``torch.device``.

    Raises:
        SR3DConfigError: ``device`` is not a device name (e.g. ``"gpu"``).
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise SR3DConfigError(f"unknown device {device!r}; expected e.g. 'cpu', 'cuda', 'cuda:1' or 'auto'") from exc


def placement_map(device: str | torch.device | None = None) -> dict[str, int | str]:
    """The ``device_map`` that puts every weight on ``device`` while loading (``{"": index}`` for a CUDA
    device, ``{"": "cpu"}`` for the CPU); ``device`` is resolved by :func:`resolve_device`."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        return {"": dev.index if dev.index is not None else 0}
    return {"": str(dev)}


def device_of(device_map: Any) -> str:
    """The device (name) a ``device_map`` loads onto first: ``"cpu"`` for None, CUDA (when available)
    for the automatic maps, the first entry of a dict (an int is a CUDA index)."""
    if device_map is None:
        return "cpu"
    if isinstance(device_map, (str, torch.device)):
        text = str(device_map)
        if text in AUTO_DEVICE_MAPS:
            return str(resolve_device("auto"))
        return text
    if isinstance(device_map, dict) and device_map:
        first = next(iter(device_map.values()))
        return f"cuda:{first}" if isinstance(first, int) else str(first)
    return "cpu"
