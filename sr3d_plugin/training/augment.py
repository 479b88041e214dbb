"""Mask augmentation for region-prompted training (SR3D-FACTS §7).

* **mask → box**: a region's mask is replaced, on every frame it covers, by its tight bounding box;
* **frame dropping**: multi-view samples lose a random subset of frames, never a frame a region is
  drawn on, and always keep at least one frame;
* **region shuffling**: regions are relabelled in a random order and every reference to them is
  rewritten consistently — ``<regionK>`` aliases, bare ``<mask>`` tokens (the k-th ``<mask>`` is
  region k, so it becomes ``<region{new k}>``) and "Region [k]" in any turn (questions and answers).

All randomness comes from :func:`sample_rng` — a generator seeded by ``(seed, epoch, sample index)`` —
so a resumed run sees exactly the samples an uninterrupted run would have seen, whatever the worker
count or process.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from sr3d_plugin.modeling.inputs import Region

__all__ = ["frames_to_keep", "mask_to_box", "relabel_regions", "remap_region_frames", "sample_rng"]

_REFS = re.compile(r"<mask>|<region(\d+)>|(Region \[)(\d+)(\])")
_NAMED = re.compile(r"Region \[(\d+)\]")


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random generator of sample ``index`` in ``epoch`` (independent of workers and processes)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index), 0x5D3])


def mask_to_box(region: Region) -> Region:
    """The region with each frame's mask replaced by its tight bounding box (same frames, same label)."""
    masks = {}
    for k, m in region.masks.items():
        x0, y0, x1, y1 = region.bbox(k)
        box = np.zeros_like(m, dtype=bool)
        box[y0:y1, x0:x1] = True
        masks[k] = box
    return Region(masks, label=region.label)


def frames_to_keep(
    num_frames: int, protected: set[int], rng: np.random.Generator, max_fraction: float
) -> list[int] | None:
    """Pick frames to keep after random dropping, or None when nothing is dropped.

    Args:
        num_frames: frames of the sample (``V``).
        protected: frames that must stay (those regions are drawn on).
        rng: the sample's generator.
        max_fraction: at most this fraction of the droppable frames is dropped (at least one when any
            may go); at least one frame always stays.

    Returns:
        Sorted indices of the kept frames.
    """
    droppable = [i for i in range(num_frames) if i not in protected]
    limit = int(np.floor(max_fraction * len(droppable)))
    if not protected:
        limit = min(limit, num_frames - 1)
    if limit < 1:
        return None
    n_drop = int(rng.integers(1, limit + 1))
    dropped = set(rng.choice(droppable, size=n_drop, replace=False).tolist())
    return [i for i in range(num_frames) if i not in dropped]


def remap_region_frames(regions: Sequence[Region], keep: Sequence[int]) -> list[Region]:
    """Regions re-indexed onto the kept frames (``keep[j]`` becomes frame ``j``)."""
    new_index = {old: new for new, old in enumerate(keep)}
    out = []
    for r in regions:
        missing = [k for k in r.masks if k not in new_index]
        if missing:
            raise ValueError(f"frames {missing} of a region were dropped; region frames must be kept")
        out.append(Region({new_index[k]: m for k, m in r.masks.items()}, label=r.label))
    return out


def relabel_regions(
    messages: list[dict[str, str]], regions: Sequence[Region], perm: Sequence[int]
) -> tuple[list[dict[str, str]], list[Region]]:
    """Relabel regions: old region ``k`` becomes region ``perm[k]`` everywhere.

    Bare ``<mask>`` tokens (the k-th one is region k, counted over the whole conversation) become
    ``<region{perm[k]}>``; ``<regionK>`` becomes ``<region{perm[K]}>``; "Region [K]" becomes
    "Region [perm[K]]" for ``K`` < number of regions. Returns the new messages and the regions in
    their new order. When the bare ``<mask>`` count does not match the regions, nothing changes.

    Nothing changes either when an assistant turn names a region ("Region [K]") that no other turn
    names: the LLM sees a region only as a ``<mask>`` embedding, never its index, so the index in
    such an answer means "the K-th ``<mask>`` of the question" — relabelling would change the
    answer and nothing the model can see (label noise, not augmentation).
    """
    n = len(regions)
    if n < 2:
        return messages, list(regions)
    named_in_prompt = {
        int(m.group(1)) for t in messages if t["role"] != "assistant" for m in _NAMED.finditer(t["content"])
    }
    named_in_answer = {
        int(m.group(1)) for t in messages if t["role"] == "assistant" for m in _NAMED.finditer(t["content"])
    }
    if named_in_answer - named_in_prompt:
        return messages, list(regions)
    bare = sum(m["content"].count("<mask>") for m in messages)
    if bare and bare != n:
        return messages, list(regions)
    counter = iter(range(n))

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "<mask>":
            return f"<region{perm[next(counter)]}>"
        if match.group(1) is not None:
            k = int(match.group(1))
            return f"<region{perm[k]}>" if k < n else match.group(0)
        k = int(match.group(3))
        return f"{match.group(2)}{perm[k]}{match.group(4)}" if k < n else match.group(0)

    new_messages = [{**m, "content": _REFS.sub(sub, m["content"])} for m in messages]
    new_regions: list[Region] = [regions[0]] * n
    for old, new in enumerate(perm):
        new_regions[int(new)] = regions[old]
    return new_messages, new_regions
