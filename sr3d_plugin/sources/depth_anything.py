"""The ``depth_anything_v2`` depth estimator: Depth Anything V2 through stock ``transformers`` classes.

SR3D-FACTS §3 (single view): the model's relative prediction (larger = closer) is resized back to
the image size the way the model's image processor does it (``post_process_depth_estimation``:
bicubic, ``align_corners=False``), then ``d = 1 − minmax(pred)`` (far = 1), quantised to 8 bits as
in the released training data (:func:`sr3d_plugin.geometry.disparity_to_relative_depth`).

Any hub id or local folder with a ``depth_estimation`` model and its image processor works. Model
weights are loaded on the first call of :meth:`DepthAnythingV2Estimator.estimate` and shared between
estimators with the same (model, device, dtype).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sr3d_plugin.devices import resolve_device  # re-exported: one device rule (sr3d_plugin.devices)
from sr3d_plugin.errors import SR3DConfigError, SR3DInputError
from sr3d_plugin.geometry import disparity_to_relative_depth
from sr3d_plugin.sources.files import file_identity

__all__ = ["DEFAULT_DEPTH_MODEL", "DepthAnythingV2Estimator", "resolve_device", "resolve_dtype"]

DEFAULT_DEPTH_MODEL = "depth-anything/Depth-Anything-V2-Large-hf"

#: dtype names accepted from configs and the command line (never ``eval``-ed, SR3D-FACTS §9)
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "torch.float32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "torch.float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "torch.bfloat16": torch.bfloat16,
}

_cache_lock = threading.Lock()
_loaded: dict[tuple[str, str, str], tuple[Any, Any]] = {}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` / ``"auto"`` → float16 on CUDA, float32 elsewhere; strings go through an allow-list."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    key = str(dtype).strip().lower()
    if key not in _DTYPES:
        raise SR3DConfigError(f"unknown dtype {dtype!r}; expected one of {sorted(set(_DTYPES))} or 'auto'")
    return _DTYPES[key]


class DepthAnythingV2Estimator:
    """Monocular relative depth with Depth Anything V2 (or any ``AutoModelForDepthEstimation``).

    Args:
        model: hub id or local folder (default ``depth-anything/Depth-Anything-V2-Large-hf``).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda:0"``, …
        dtype: ``"auto"``, ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        quantize: truncate the relative depth to 8 bits like the released data and SR-REAL's
            inference path (default True; False keeps float depth, an improvement off by default).
        pil_resize: resize each image to the processor's input size with PIL on the uint8 image
            before the processor (``do_resize=False``), as the transformers 4.x image processors
            that SR-REAL ran with did (default True); False lets the installed processor resize.
        batch_size: images per forward pass (images of one size are batched together).
        local_files_only: never contact the hub (default: follow ``HF_HUB_OFFLINE``).
        revision: optional hub revision.
    """

    name = "depth_anything_v2"

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_DEPTH_MODEL,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        quantize: bool = True,
        batch_size: int = 4,
        local_files_only: bool | None = None,
        revision: str | None = None,
        pil_resize: bool = True,
    ) -> None:
        if batch_size <= 0:
            raise SR3DConfigError(f"batch_size must be positive, got {batch_size}")
        self.model_id = str(model)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.quantize = bool(quantize)
        self.pil_resize = bool(pil_resize)
        self.batch_size = int(batch_size)
        self.local_files_only = local_files_only
        self.revision = revision

    def options(self) -> dict:
        """What determines the output (for cache keys): model (with its files' sizes and times when it is a
        local folder), dtype and quantisation."""
        opts: dict[str, Any] = {"model": self.model_id, "dtype": str(self.dtype), "quantize": self.quantize}
        if not self.pil_resize:
            opts["pil_resize"] = False
        folder = Path(self.model_id).expanduser()
        if folder.is_dir():
            opts["model_files"] = [
                file_identity(f) for f in sorted(folder.iterdir()) if f.suffix in (".json", ".safetensors", ".bin")
            ]
        if self.revision is not None:
            opts["revision"] = self.revision
        return opts

    # -- loading --------------------------------------------------------------------------------

    def load(self) -> tuple[Any, Any]:
        """Load (once per process) and return ``(model, image_processor)``."""
        key = (self.model_id, str(self.device), str(self.dtype))
        with _cache_lock:
            if key in _loaded:
                return _loaded[key]
            from transformers import AutoImageProcessor, AutoModelForDepthEstimation

            kwargs: dict[str, Any] = {}
            if self.local_files_only is not None:
                kwargs["local_files_only"] = self.local_files_only
            if self.revision is not None:
                kwargs["revision"] = self.revision
            local = os.path.isdir(os.path.expanduser(self.model_id))
            source = os.path.expanduser(self.model_id) if local else self.model_id
            try:
                processor = AutoImageProcessor.from_pretrained(source, **kwargs)
                model = AutoModelForDepthEstimation.from_pretrained(source, dtype=self.dtype, **kwargs)
            except (OSError, ValueError, KeyError) as exc:
                hint = "" if local else " (not a local folder; is it downloaded, or is HF_HUB_OFFLINE set?)"
                raise SR3DInputError(f"cannot load depth model {self.model_id!r}{hint}: {exc}") from exc
            model = model.to(self.device).eval()
            _loaded[key] = (model, processor)
            return model, processor

    # -- inference ------------------------------------------------------------------------------

    @staticmethod
    def _as_images(images: Image.Image | Sequence[Image.Image]) -> list[Image.Image]:
        items = [images] if isinstance(images, Image.Image) else list(images)
        if not items:
            raise SR3DInputError("no images given to the depth estimator")
        for i, im in enumerate(items):
            if not isinstance(im, Image.Image):
                raise SR3DInputError(f"image {i} is a {type(im).__name__}; expected a PIL image")
        return [im if im.mode == "RGB" else im.convert("RGB") for im in items]

    def _preprocess(self, processor: Any, images: list[Image.Image]) -> Any:
        """Processor inputs for same-size images (see ``pil_resize``)."""
        if not (self.pil_resize and getattr(processor, "do_resize", False)):
            return processor(images=images, return_tensors="pt")
        probe = processor(images=images[:1], return_tensors="pt")["pixel_values"]
        height, width = (int(v) for v in probe.shape[-2:])
        resample = Image.Resampling(int(getattr(processor, "resample", Image.Resampling.BICUBIC)))
        resized = [im.resize((width, height), resample) for im in images]
        return processor(images=resized, do_resize=False, return_tensors="pt")

    @torch.no_grad()
    def predict(self, images: Image.Image | Sequence[Image.Image]) -> list[torch.Tensor]:
        """Raw predictions (larger = closer) resized to each image's size: list of ``[H_i, W_i]`` float32 (CPU)."""
        items = self._as_images(images)
        model, processor = self.load()
        out: list[torch.Tensor | None] = [None] * len(items)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(items):
            by_size.setdefault(im.size, []).append(i)
        for (width, height), idx in by_size.items():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                inputs = self._preprocess(processor, [items[i] for i in chunk])
                pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
                outputs = model(pixel_values=pixel_values)
                outputs.predicted_depth = outputs.predicted_depth.float()
                sizes = [(height, width)] * len(chunk)
                if hasattr(processor, "post_process_depth_estimation"):
                    results = processor.post_process_depth_estimation(outputs, target_sizes=sizes)
                    preds = [r["predicted_depth"].reshape(height, width) for r in results]
                else:  # same resize as the DPT / Depth Anything processors
                    up = F.interpolate(
                        outputs.predicted_depth.unsqueeze(1), size=(height, width), mode="bicubic", align_corners=False
                    )
                    preds = list(up[:, 0])
                for i, pred in zip(chunk, preds):
                    out[i] = pred.detach().float().cpu()
        return [t for t in out if t is not None]

    def estimate_list(self, images: Image.Image | Sequence[Image.Image]) -> list[np.ndarray]:
        """Relative depth in ``[0, 1]`` (far = 1) per image, each ``[H_i, W_i]`` float32 at the image size."""
        preds = self.predict(images)
        return [disparity_to_relative_depth(p, quantize=self.quantize).numpy().astype(np.float32) for p in preds]

    def estimate(self, images: Image.Image | Sequence[Image.Image]) -> np.ndarray:
        """Relative depth of same-size images: ``[V, H, W]`` float32 in ``[0, 1]``, far = 1.

        Raises SR3DInputError when the images differ in size (use :meth:`estimate_list`).
        """
        items = self._as_images(images)
        sizes = {im.size for im in items}
        if len(sizes) != 1:
            raise SR3DInputError(
                f"images have different sizes {sorted(sizes)}; estimate() stacks one size, use estimate_list()"
            )
        return np.stack(self.estimate_list(items))
