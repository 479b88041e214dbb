"""Visual inputs of one request: images or frames, their canonical point maps and region prompts."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from sr3d_plugin.errors import SR3DInputError

__all__ = ["Region", "VisualInput"]


def _as_bool_mask(mask: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.ndim == 3 and m.shape[-1] in (1, 3, 4):  # an image file read as H×W×C
        m = m[..., 0]
    if m.ndim != 2:
        raise SR3DInputError(f"{what} must be a 2-D [H, W] mask, got shape {m.shape}")
    return m.astype(bool) if m.dtype != bool else m


@dataclass
class Region:
    """A region prompt: a binary mask on one or more frames (one ``<mask>`` token in the prompt).

    Attributes:
        masks: frame index → ``[H, W]`` bool mask on that frame (any resolution with the frame's
            aspect ratio; normally the frame's own size).
        label: optional human-readable name ("the chair"), used in messages only.
    """

    masks: dict[int, np.ndarray]
    label: str | None = None

    def __post_init__(self) -> None:
        if not self.masks:
            raise SR3DInputError(f"region {self.label or ''} has no mask on any frame".replace("  ", " "))
        self.masks = {int(k): _as_bool_mask(v, f"mask of region on frame {k}") for k, v in self.masks.items()}
        for k, m in self.masks.items():
            if not m.any():
                raise SR3DInputError(
                    f"region{' ' + self.label if self.label else ''} has an empty mask on frame {k}; "
                    "expected at least one pixel set"
                )

    @classmethod
    def from_box(
        cls, frame: int, box: tuple[float, float, float, float], image_size: tuple[int, int], label: str | None = None
    ) -> Region:
        """A box ``(x0, y0, x1, y1)`` in pixels on ``frame`` of size ``(width, height)`` as a region.

        As SR-REAL's ``mm_utils.process_mask`` draws a ``bbox``: every coordinate is truncated with
        ``int()``, clamped to the image, and ``mask[y0:y1, x0:x1]`` is set (end exclusive). A box
        that lies entirely outside the image or has no area is an error; one thinner than a pixel
        after truncation keeps the pixel holding its centre (the reference would pool nothing).
        """
        width, height = image_size
        x0, y0, x1, y1 = (float(v) for v in box)
        if not all(np.isfinite([x0, y0, x1, y1])):
            raise SR3DInputError(f"box {box} has non-finite coordinates")
        if x1 <= x0 or y1 <= y0:
            raise SR3DInputError(f"box {box} is empty; expected x0 < x1 and y0 < y1 (pixels)")
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            raise SR3DInputError(f"box {box} lies outside the {width}×{height} image of frame {frame}")
        ix0, ix1 = (min(max(int(v), 0), width) for v in (x0, x1))
        iy0, iy1 = (min(max(int(v), 0), height) for v in (y0, y1))
        mask = np.zeros((height, width), dtype=bool)
        mask[iy0:iy1, ix0:ix1] = True
        if not mask.any():  # thinner than a pixel: keep the pixel that contains the box centre
            cx = min(max(int((x0 + x1) / 2), 0), width - 1)
            cy = min(max(int((y0 + y1) / 2), 0), height - 1)
            mask[cy, cx] = True
        return cls({frame: mask}, label=label)

    @property
    def frames(self) -> list[int]:
        return sorted(self.masks)

    def bbox(self, frame: int) -> tuple[int, int, int, int]:
        """Tight ``(x0, y0, x1, y1)`` box of the mask on ``frame`` (exclusive upper bounds)."""
        ys, xs = np.nonzero(self.masks[frame])
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@dataclass
class VisualInput:
    """Everything visual about one request.

    Attributes:
        images: one image (tiled dynamically) or several frames (one tile each).
        points: optional ``[V, H, W, 3]`` canonical 3D positions aligned with the images (any
            resolution with the images' aspect ratio), e.g. ``PointMaps.canonical()``.
        valid: optional ``[V, H, W]`` bool validity of ``points``.
        regions: region prompts, in the order ``<mask>`` / ``<regionK>`` refer to them.
        multi_view: treat the images as frames of one scene (no tiling). Defaults to ``len(images) > 1``.
    """

    images: list[Image.Image]
    points: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    regions: list[Region] = field(default_factory=list)
    multi_view: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.images, Image.Image):
            self.images = [self.images]
        if not self.images:
            raise SR3DInputError("visual input has no images")
        for i, im in enumerate(self.images):
            if not isinstance(im, Image.Image):
                raise SR3DInputError(f"image {i} is a {type(im).__name__}; expected a PIL image")
        if self.multi_view is None:
            self.multi_view = len(self.images) > 1
        if not self.multi_view and len(self.images) != 1:
            raise SR3DInputError(f"single-view input must have exactly one image, got {len(self.images)}")
        v = len(self.images)
        if self.points is not None:
            p = torch.as_tensor(self.points)
            if p.dim() == 3:
                p = p.unsqueeze(0)
            if p.dim() != 4 or p.shape[-1] != 3 or p.shape[0] != v:
                raise SR3DInputError(
                    f"points must be [V, H, W, 3] with V = {v} images, got shape {tuple(torch.as_tensor(self.points).shape)}"
                )
            if not bool(torch.isfinite(p).all()):
                raise SR3DInputError("points contain NaN or inf; mark invalid pixels with `valid` instead")
            for i, im in enumerate(self.images):
                _check_aspect(im.size, (p.shape[2], p.shape[1]), f"point map of frame {i}")
            self.points = p
            if self.valid is not None:
                m = torch.as_tensor(self.valid)
                if m.dim() == 2:
                    m = m.unsqueeze(0)
                if tuple(m.shape) != tuple(p.shape[:3]):
                    raise SR3DInputError(
                        f"valid mask shape {tuple(m.shape)} does not match points {tuple(p.shape[:3])}"
                    )
                self.valid = m.to(torch.bool)
        self._check_regions()

    def with_regions(self, regions: list[Region]) -> VisualInput:
        """The same frames and point maps (shared, not checked again) with other ``regions`` (checked)."""
        out = copy.copy(self)
        out.regions = list(regions)
        out._check_regions()
        return out

    def _check_regions(self) -> None:
        v = len(self.images)
        for r_idx, region in enumerate(self.regions):
            for frame, mask in region.masks.items():
                if not 0 <= frame < v:
                    raise SR3DInputError(
                        f"region {r_idx} is drawn on frame {frame}, but the input has {v} frame(s) (0..{v - 1})"
                    )
                _check_aspect(self.images[frame].size, (mask.shape[1], mask.shape[0]), f"mask of region {r_idx}")

    @property
    def num_images(self) -> int:
        return len(self.images)


def _check_aspect(image_size: tuple[int, int], other_size: tuple[int, int], what: str) -> None:
    (iw, ih), (ow, oh) = image_size, other_size
    if (iw, ih) == (ow, oh):
        return
    if abs(iw / ih - ow / oh) > 0.02 * (iw / ih):
        raise SR3DInputError(
            f"{what} is {ow}×{oh} but its image is {iw}×{ih}; expected the same size or the same aspect ratio"
        )
