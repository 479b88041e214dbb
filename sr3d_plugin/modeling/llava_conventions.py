"""LLaVA's image and prompt conventions, reproduced for the ``llava_original`` and ``llava_hf`` builders.

A LLaVA checkpoint's own conventions win (issue 9): the plugin reproduces them from raw inputs, and
the SR-3D additions (point maps for the 3D PE, region masks) follow the same geometry as the pixels.
Everything here is our own code; where each rule comes from in the original code bases is listed in
``docs/conformance.md``, section "Original LLaVA and transformers' LLaVA family".

Image conventions (``image_aspect_ratio`` of :class:`~sr3d_plugin.modeling.SR3DConfig`):

* ``"pad"`` — LLaVA-1.5: the image is padded to a square with the image processor's mean colour
  (centred), then handed to the CLIP image processor (which resizes it to the tile).
* ``"anyres"`` — LLaVA-1.6: the best resolution among ``image_grid_pinpoints`` is chosen, the image
  is resized into it keeping its aspect ratio and padded with black, cut into tile-sized patches; a
  squashed copy of the whole image comes first. ``mm_patch_merge_type="spatial_unpad"`` then drops
  the feature rows/columns that only saw padding and appends the learned ``image_newline`` after
  every row of patch features.
* ``"native"`` — transformers' LLaVA family: the folder's own image processor receives the raw
  image (``CLIPImageProcessor``: shortest-edge resize + centre crop; ``LlavaNextImageProcessor`` /
  ``LlavaOnevisionImageProcessor``: any-resolution patches as above).

Every tile is described by the box it covers in source-image pixels (``(x0, y0, x1, y1)``, possibly
reaching outside the image where the tile shows padding). Point maps are averaged over each vision
token's footprint inside that box (padding has no geometry: a token that only sees padding gets
position 0, like an invalid pixel), and region masks are sampled onto the tile through the same box.

Prompt conventions: the conversation templates of ``llava/conversation.py`` (named as there, mode
inferred from the folder name like ``llava/eval/run_llava.py``) and ``tokenizer_image_token`` (every
text chunk between images is tokenised on its own, so a chunk that starts with ``"\\n"`` keeps
SentencePiece's ``▁`` piece before the newline).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sr3d_plugin.errors import SR3DConfigError, SR3DInputError

__all__ = [
    "CONVERSATIONS",
    "HOST_IMAGE_MODES",
    "ConversationStyle",
    "HostImageLayout",
    "anyres_grid",
    "anyres_layout",
    "centre_crop_layout",
    "conv_mode_for_model_name",
    "expand_to_square",
    "fit_into",
    "host_layout",
    "host_tile_masks",
    "host_tiles",
    "host_token_positions",
    "merge_anyres_features",
    "model_name_from_path",
    "pad_layout",
    "render_conversation",
    "select_best_resolution",
    "split_at_images",
    "squash_layout",
    "unpadded_grid",
]

#: image conventions handled by this module (the others are SR-3D's own tiling)
HOST_IMAGE_MODES = ("pad", "anyres", "native")

# ----------------------------------------------------------------------------------------------
# conversation templates
# ----------------------------------------------------------------------------------------------

_SYS_HUMAN = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_SYS_USER = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class ConversationStyle:
    """One conversation template of the original LLaVA code (``llava/conversation.py``).

    Attributes:
        name: the template's name there (``"llava_v1"``, ``"vicuna_v1"``, …).
        system: default system text.
        roles: (user, assistant) role names.
        style: separator style: ``"single"``, ``"two"``, ``"mpt"``, ``"plain"`` or ``"llama_2"``.
        sep, sep2: separators (``sep2`` closes assistant turns in ``"two"`` / ``"plain"`` / ``"llama_2"``).
    """

    name: str
    system: str
    roles: tuple[str, str]
    style: str
    sep: str
    sep2: str | None = None


CONVERSATIONS: dict[str, ConversationStyle] = {
    c.name: c
    for c in (
        ConversationStyle("llava_v1", _SYS_HUMAN, ("USER", "ASSISTANT"), "two", " ", "</s>"),
        ConversationStyle("vicuna_v1", _SYS_USER, ("USER", "ASSISTANT"), "two", " ", "</s>"),
        ConversationStyle("llava_v0", _SYS_HUMAN, ("Human", "Assistant"), "single", "###"),
        ConversationStyle("mistral_instruct", "", ("USER", "ASSISTANT"), "llama_2", "", "</s>"),
        ConversationStyle(
            "llava_llama_2",
            "You are a helpful language and vision assistant. You are able to understand the visual content "
            "that the user provides, and assist the user with a variety of tasks using natural language.",
            ("USER", "ASSISTANT"),
            "llama_2",
            "<s>",
            "</s>",
        ),
        ConversationStyle(
            "chatml_direct",
            "<|im_start|>system\nAnswer the questions.",
            ("<|im_start|>user\n", "<|im_start|>assistant\n"),
            "mpt",
            "<|im_end|>",
        ),
        ConversationStyle(
            "mpt",
            "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
            "The assistant gives helpful and honest answers.",
            ("<|im_start|>user\n", "<|im_start|>assistant\n"),
            "mpt",
            "<|im_end|>",
        ),
        ConversationStyle("plain", "", ("", ""), "plain", "\n"),
    )
}


def model_name_from_path(path: str) -> str:
    """The model name LLaVA derives from a folder path: its last component (``parent_checkpoint-N``)."""
    parts = str(path).strip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return parts[-2] + "_" + parts[-1]
    return parts[-1]


def conv_mode_for_model_name(name: str) -> str:
    """The conversation mode LLaVA's ``run_llava`` / ``cli`` infer from a model name (first match wins)."""
    low = name.lower()
    for needle, mode in (
        ("llama-2", "llava_llama_2"),
        ("mistral", "mistral_instruct"),
        ("v1.6-34b", "chatml_direct"),
        ("v1", "llava_v1"),
        ("mpt", "mpt"),
    ):
        if needle in low:
            return mode
    return "llava_v0"


def _conversation(name: str) -> ConversationStyle:
    if name not in CONVERSATIONS:
        raise SR3DConfigError(
            f"conv_mode={name!r} is not a LLaVA conversation template; expected one of {sorted(CONVERSATIONS)}"
        )
    return CONVERSATIONS[name]


def render_conversation(name: str, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """A conversation rendered exactly as LLaVA's ``Conversation.get_prompt`` renders it.

    Args:
        name: template name (:data:`CONVERSATIONS`).
        messages: ``{"role": "system" | "user" | "assistant", "content": str}``; a system message
            replaces the template's system text; user and assistant turns must alternate, user first.
        add_generation_prompt: end with an empty assistant turn (the prompt for generation).
    """
    conv = _conversation(name)
    system = conv.system
    turns: list[tuple[int, str | None]] = []
    for m in messages:
        role = m.get("role")
        if role == "system":
            system = str(m.get("content") or "")
            continue
        if role not in ("user", "assistant"):
            raise SR3DInputError(f"message role {role!r}; expected 'system', 'user' or 'assistant'")
        k = 0 if role == "user" else 1
        if k != len(turns) % 2:
            raise SR3DInputError(f"{name} conversations alternate user and assistant turns, user first; got {role!r}")
        turns.append((k, str(m.get("content") or "")))
    if add_generation_prompt:
        if len(turns) % 2 != 1:
            raise SR3DInputError("a generation prompt needs the conversation to end with a user turn")
        turns.append((1, None))
    roles, seps = conv.roles, [conv.sep, conv.sep2 if conv.sep2 is not None else conv.sep]
    if conv.style == "single":
        out = system + conv.sep
        for k, msg in turns:
            out += f"{roles[k]}: {msg}{conv.sep}" if msg else f"{roles[k]}:"
        return out
    if conv.style == "two":
        out = system + seps[0]
        for i, (k, msg) in enumerate(turns):
            out += f"{roles[k]}: {msg}{seps[i % 2]}" if msg else f"{roles[k]}:"
        return out
    if conv.style == "mpt":
        out = system + conv.sep
        for k, msg in turns:
            out += f"{roles[k]}{msg}{conv.sep}" if msg else roles[k]
        return out
    if conv.style == "plain":
        out = system
        for i, (_, msg) in enumerate(turns):
            out += f"{msg}{seps[i % 2]}" if msg else ""
        return out
    # llama_2
    out = ""
    for i, (_k, msg) in enumerate(turns):
        if not msg:
            continue
        if i == 0:
            msg = (f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else "") + msg
        out += conv.sep + f"[INST] {msg} [/INST]" if i % 2 == 0 else f" {msg} {conv.sep2}"
    return out.lstrip(conv.sep)  # str.lstrip, as the original (it strips the separator's characters)


def split_at_images(
    tokenizer: Any, prompt: str, image_token: str, offsets: bool = False
) -> tuple[list[int], list[tuple[int, int]] | None, list[int]]:
    """Token ids of ``prompt`` as LLaVA's ``tokenizer_image_token`` builds them.

    The text is split at every ``image_token``; each chunk is tokenised on its own with the
    tokenizer's special tokens (its BOS); when the first chunk starts with BOS, that BOS is kept once
    and the BOS of every chunk is dropped. Each image becomes one ``image_token`` id.

    Returns:
        ``(ids, offset mapping into prompt or None, positions of the image ids)``.
    """
    chunks = prompt.split(image_token)
    image_id = int(tokenizer.convert_tokens_to_ids(image_token))
    bos = tokenizer.bos_token_id
    dummy = _always_prefixes(tokenizer)
    encoded = []
    for chunk in chunks:
        # SentencePiece adds its dummy "▁" to every encoded text, also before a leading space; a
        # converted tokenizer (Metaspace, prepend_scheme "first") skips it there, so add it back
        extra = 1 if dummy and chunk.startswith(" ") else 0
        enc = tokenizer(" " * extra + chunk, add_special_tokens=True, return_offsets_mapping=offsets)
        spans = [(max(a - extra, 0), max(b - extra, 0)) for a, b in enc["offset_mapping"]] if offsets else None
        encoded.append((list(enc["input_ids"]), spans))
    drop = 1 if encoded and encoded[0][0] and bos is not None and encoded[0][0][0] == bos else 0
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    positions: list[int] = []
    start = 0
    for n, (chunk_ids, chunk_offsets) in enumerate(encoded):
        if n == 0 and drop:
            ids.append(chunk_ids[0])
            spans.append((0, 0))
        ids.extend(chunk_ids[drop:])
        if chunk_offsets is not None:
            spans.extend((a + start, b + start) for a, b in chunk_offsets[drop:])
        start += len(chunks[n])
        if n < len(chunks) - 1:
            positions.append(len(ids))
            ids.append(image_id)
            spans.append((start, start + len(image_token)))
            start += len(image_token)
    return ids, (spans if offsets else None), positions


def _always_prefixes(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` is a converted SentencePiece tokenizer that prepends ``▁`` only to text not
    already starting with one (``Metaspace(prepend_scheme="first")``), unlike SentencePiece itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    if pre is None:
        return False
    from tokenizers import pre_tokenizers

    parts = list(pre) if isinstance(pre, pre_tokenizers.Sequence) else [pre]
    return any(isinstance(p, pre_tokenizers.Metaspace) and p.prepend_scheme == "first" for p in parts)


# ----------------------------------------------------------------------------------------------
# image geometry
# ----------------------------------------------------------------------------------------------

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class HostImageLayout:
    """How one image is turned into vision-tower tiles under a host (LLaVA) convention.

    Attributes:
        boxes: per tile, in tower order, the ``(x0, y0, x1, y1)`` box of source pixels it shows.
        image_size: ``(width, height)`` of the source image.
        grid: ``(rows, cols)`` of the high-resolution patches (anyres), None for a single tile.
        num_tokens: LLM placeholder tokens this image becomes.
    """

    boxes: tuple[Box, ...]
    image_size: tuple[int, int]
    grid: tuple[int, int] | None
    num_tokens: int

    @property
    def num_tiles(self) -> int:
        return len(self.boxes)


def expand_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """Pad ``image`` to a square of its longer side with colour ``fill``, the image centred (floor offset)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), fill)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def mean_colour(image_processor: Any) -> tuple[int, int, int]:
    """The image processor's mean as 0..255 ints (LLaVA's padding colour)."""
    mean = getattr(image_processor, "image_mean", None)
    if mean is None:
        raise SR3DConfigError("image_aspect_ratio 'pad' needs an image processor with image_mean (the padding colour)")
    if isinstance(mean, (int, float)):
        mean = [mean] * 3
    return tuple(int(float(x) * 255) for x in mean)  # type: ignore[return-value]


def select_best_resolution(size: tuple[int, int], resolutions: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The ``(width, height)`` among ``resolutions`` (``(width, height)`` pairs) that keeps most of a
    ``(width, height)`` image after an aspect-preserving resize, ties broken by the least waste."""
    w, h = size
    best, best_eff, best_waste = None, 0, math.inf
    for rw, rh in resolutions:
        scale = min(rw / w, rh / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = rw * rh - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(rw), int(rh)), eff, waste
    if best is None:
        raise SR3DConfigError(f"image_grid_pinpoints {list(resolutions)} holds no usable resolution")
    return best


def fit_into(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """``(width, height)`` of a ``size`` image resized into ``target`` keeping its aspect ratio (ceil, clamped)."""
    w, h = size
    tw, th = target
    sw, sh = tw / w, th / h
    if sw < sh:
        return tw, min(math.ceil(h * sw), th)
    return min(math.ceil(w * sh), tw), th


def anyres_grid(size: tuple[int, int], pinpoints: Sequence[Sequence[int]], tile: int) -> tuple[int, int]:
    """``(rows, cols)`` of high-resolution patches for a ``(width, height)`` image."""
    bw, bh = select_best_resolution(size, pinpoints)
    return bh // tile, bw // tile


def unpadded_grid(size: tuple[int, int], rows: int, cols: int, rounding: str = "floor") -> tuple[int, int, int, int]:
    """The feature rows/columns kept by ``spatial_unpad``: ``(top, bottom, left, right)`` bounds.

    ``rows`` × ``cols`` is the full feature grid; ``size`` the source ``(width, height)``. ``rounding``
    is how the scaled side is truncated: ``"floor"`` (``int``, original LLaVA) or ``"round"``
    (``int(round(x, 7))``, transformers).
    """
    w, h = size
    trunc = (lambda x: int(x)) if rounding == "floor" else (lambda x: int(round(x, 7)))
    if w / h > cols / rows:
        new_h = trunc(h * (cols / w))
        pad = (rows - new_h) // 2
        return pad, rows - pad, 0, cols
    new_w = trunc(w * (rows / h))
    pad = (cols - new_w) // 2
    return 0, rows, pad, cols - pad


def anyres_token_count(
    size: tuple[int, int],
    grid: tuple[int, int],
    side: int,
    merge: str,
    newline: bool,
    rounding: str,
    max_patches: int | None,
) -> int:
    """LLM tokens of one anyres image: base tile + merged patch features (see :func:`merge_anyres_features`)."""
    rows, cols = grid[0] * side, grid[1] * side
    if merge == "flat":
        return (1 + grid[0] * grid[1]) * side * side
    if merge == "spatial":
        return side * side + rows * cols
    top, bottom, left, right = unpadded_grid(size, rows, cols, rounding)
    r, c = bottom - top, right - left
    if max_patches is not None:
        ratio = math.sqrt(r * c / (max_patches * side * side))
        if ratio > 1.1:
            r, c = int(r // ratio), int(c // ratio)
    return side * side + r * (c + int(newline))


def pad_layout(size: tuple[int, int], tokens_per_tile: int) -> HostImageLayout:
    """LLaVA-1.5 ``pad``: one tile showing the image padded (centred) to a square of its longer side."""
    w, h = size
    side = max(w, h)
    ox, oy = (side - w) // 2, (side - h) // 2
    return HostImageLayout(((-ox, -oy, side - ox, side - oy),), (w, h), None, tokens_per_tile)


def centre_crop_layout(
    size: tuple[int, int], shortest_edge: int, crop: int, tokens_per_tile: int, crop_rounding: str = "round"
) -> HostImageLayout:
    """A CLIP image processor's shortest-edge resize + centre crop to ``crop``, as one tile's box.

    ``crop_rounding``: the crop offset of the torchvision backend (``"round"``) or of the PIL one (``"floor"``).
    """
    w, h = size
    if w <= h:
        nw, nh = shortest_edge, int(shortest_edge * h / w)
    else:
        nw, nh = int(shortest_edge * w / h), shortest_edge
    off = (lambda d: round(d / 2.0)) if crop_rounding == "round" else (lambda d: d // 2)
    left, top = off(nw - crop), off(nh - crop)
    sx, sy = w / nw, h / nh
    return HostImageLayout(
        ((left * sx, top * sy, (left + crop) * sx, (top + crop) * sy),), (w, h), None, tokens_per_tile
    )


def squash_layout(size: tuple[int, int], tokens_per_tile: int) -> HostImageLayout:
    """One tile showing the whole image resized to a square (a processor without a crop)."""
    w, h = size
    return HostImageLayout(((0.0, 0.0, float(w), float(h)),), (w, h), None, tokens_per_tile)


def anyres_layout(
    size: tuple[int, int],
    pinpoints: Sequence[Sequence[int]],
    tile: int,
    side: int,
    merge: str,
    newline: bool,
    rounding: str,
    max_patches: int | None,
) -> HostImageLayout:
    """LLaVA-1.6 / LLaVA-NeXT anyres: a squashed base tile, then the patches of the resized + padded image."""
    w, h = size
    bw, bh = select_best_resolution(size, pinpoints)
    nw, nh = fit_into(size, (bw, bh))
    px, py = (bw - nw) // 2, (bh - nh) // 2
    sx, sy = w / nw, h / nh
    boxes: list[Box] = [(0.0, 0.0, float(w), float(h))]
    rows, cols = bh // tile, bw // tile
    for r in range(rows):
        for c in range(cols):
            x0, y0 = c * tile - px, r * tile - py
            boxes.append((x0 * sx, y0 * sy, (x0 + tile) * sx, (y0 + tile) * sy))
    count = anyres_token_count(size, (rows, cols), side, merge, newline, rounding, max_patches)
    return HostImageLayout(tuple(boxes), (w, h), (rows, cols), count)


def anyres_tiles(image: Image.Image, pinpoints: Sequence[Sequence[int]], tile: int) -> list[Image.Image]:
    """The original LLaVA-1.6 tiles of ``image``: squashed base first, then the patches (PIL bicubic, black padding)."""
    best = select_best_resolution(image.size, pinpoints)
    nw, nh = fit_into(image.size, best)
    canvas = Image.new("RGB", best, (0, 0, 0))
    canvas.paste(image.resize((nw, nh), Image.Resampling.BICUBIC), ((best[0] - nw) // 2, (best[1] - nh) // 2))
    patches = [
        canvas.crop((x, y, x + tile, y + tile)) for y in range(0, best[1], tile) for x in range(0, best[0], tile)
    ]
    return [image.resize((tile, tile), Image.Resampling.BICUBIC), *patches]


def _overlap(edges: torch.Tensor, n: int) -> torch.Tensor:
    """``[g, n]`` length of overlap of each cell ``[edges[i], edges[i+1]]`` with pixel ``[j, j + 1]``."""
    lo, hi = edges[:-1, None], edges[1:, None]
    j = torch.arange(n, dtype=edges.dtype)[None]
    return (torch.minimum(hi, j + 1) - torch.maximum(lo, j)).clamp_min(0)


def host_token_positions(
    points: torch.Tensor, layout: HostImageLayout, grid: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """``[T, grid, grid, 3]`` position of every vision token: the (valid-weighted) area average of the
    point map over the token's footprint in the source image; tokens that see only padding get 0.

    Args:
        points: ``[H, W, 3]`` point map aligned with the source image (any resolution with its aspect ratio).
        layout: the image's :class:`HostImageLayout` (boxes in source-image pixels).
        valid: optional ``[H, W]`` bool mask of pixels with a position.
    """
    if points.dim() != 3 or points.shape[-1] != 3:
        raise SR3DInputError(f"point map must be [H, W, 3], got shape {tuple(points.shape)}")
    ph, pw = points.shape[:2]
    w, h = layout.image_size
    kx, ky = pw / w, ph / h  # point-map pixels per image pixel
    pts = points.to(torch.float64)
    wgt = torch.ones(ph, pw, dtype=torch.float64) if valid is None else valid.to(torch.float64)
    out = []
    for x0, y0, x1, y1 in layout.boxes:
        ex = torch.linspace(x0 * kx, x1 * kx, grid + 1, dtype=torch.float64)
        ey = torch.linspace(y0 * ky, y1 * ky, grid + 1, dtype=torch.float64)
        ax, ay = _overlap(ex, pw), _overlap(ey, ph)  # [g, W], [g, H]
        num = torch.einsum("ih,hwc,jw->ijc", ay, pts * wgt[..., None], ax)
        den = torch.einsum("ih,hw,jw->ij", ay, wgt, ax)
        out.append(torch.where(den[..., None] > 0, num / den.clamp_min(1e-300)[..., None], torch.zeros_like(num)))
    return torch.stack(out).to(torch.float32)


def _mask_coverage(m: torch.Tensor, layout: HostImageLayout, tile: int) -> torch.Tensor:
    """``[T, tile, tile]`` fraction of every tile pixel's footprint covered by the mask."""
    mh, mw = m.shape
    w, h = layout.image_size
    kx, ky = mw / w, mh / h
    out = []
    for x0, y0, x1, y1 in layout.boxes:
        ax = _overlap(torch.linspace(x0 * kx, x1 * kx, tile + 1, dtype=torch.float64), mw)
        ay = _overlap(torch.linspace(y0 * ky, y1 * ky, tile + 1, dtype=torch.float64), mh)
        area = ((x1 - x0) * kx / tile) * ((y1 - y0) * ky / tile)
        out.append(torch.einsum("ih,hw,jw->ij", ay, m.to(torch.float64), ax) / area)
    return torch.stack(out)


def host_tile_masks(mask: np.ndarray | torch.Tensor, layout: HostImageLayout, tile: int) -> torch.Tensor:
    """``[T, tile, tile]`` bool: the region mask as every tile shows it (nearest sample at pixel centres;
    padding is outside the region). A region thinner than a tile pixel keeps the pixels it touches."""
    m = torch.as_tensor(np.asarray(mask), dtype=torch.bool)
    sampled = _nearest_tile_masks(m, layout, tile)
    if not bool(sampled.any()):
        sampled = _mask_coverage(m, layout, tile) > 0
    return sampled


def _nearest_tile_masks(m: torch.Tensor, layout: HostImageLayout, tile: int) -> torch.Tensor:
    mh, mw = m.shape
    w, h = layout.image_size
    kx, ky = mw / w, mh / h
    out = []
    centres = (torch.arange(tile, dtype=torch.float64) + 0.5) / tile
    for x0, y0, x1, y1 in layout.boxes:
        xs = torch.floor((x0 + centres * (x1 - x0)) * kx).long()
        ys = torch.floor((y0 + centres * (y1 - y0)) * ky).long()
        inside = ((ys >= 0) & (ys < mh))[:, None] & ((xs >= 0) & (xs < mw))[None]
        sampled = m[ys.clamp(0, mh - 1)][:, xs.clamp(0, mw - 1)]
        out.append(sampled & inside)
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------
# feature merging (model side)
# ----------------------------------------------------------------------------------------------


def merge_anyres_features(
    tiles: torch.Tensor,
    size: tuple[int, int],
    grid: tuple[int, int],
    side: int,
    merge: str,
    newline: torch.Tensor | None,
    rounding: str,
    max_patches: int | None,
) -> torch.Tensor:
    """One anyres image's projected tiles ``[1 + rows·cols, side², H]`` → its ``[n, H]`` LLM embeddings.

    ``"spatial"``: base tokens, then the patch features in row-major order of the full feature grid.
    ``"spatial_unpad"``: base tokens, then the feature grid with padding-only rows/columns removed
    (:func:`unpadded_grid`), bilinearly shrunk when it exceeds ``max_patches`` tiles by more than
    10 % (LLaVA-OneVision's ``anyres_max_N``), with ``newline`` appended after every row.
    """
    rows, cols = grid
    n_tiles, n_tok, hidden = tiles.shape
    if n_tiles != 1 + rows * cols or n_tok != side * side:
        raise SR3DInputError(
            f"an anyres image of grid {rows}×{cols} needs {1 + rows * cols} tiles of {side * side} tokens; "
            f"got {n_tiles} of {n_tok}"
        )
    base, patches = tiles[0], tiles[1:]
    feat = patches.view(rows, cols, side, side, hidden)
    if merge == "spatial":
        return torch.cat([base, feat.permute(0, 2, 1, 3, 4).reshape(-1, hidden)], dim=0)
    feat = feat.permute(4, 0, 2, 1, 3).reshape(hidden, rows * side, cols * side)
    top, bottom, left, right = unpadded_grid(size, rows * side, cols * side, rounding)
    feat = feat[:, top:bottom, left:right]
    if max_patches is not None:
        r, c = feat.shape[1:]
        ratio = math.sqrt(r * c / (max_patches * side * side))
        if ratio > 1.1:
            feat = F.interpolate(feat[None], [int(r // ratio), int(c // ratio)], mode="bilinear")[0]
    if newline is not None:
        nl = newline.to(feat.dtype)[:, None, None].expand(hidden, feat.shape[1], 1)
        feat = torch.cat([feat, nl], dim=-1)
    return torch.cat([base, feat.flatten(1, 2).transpose(0, 1)], dim=0)


# ----------------------------------------------------------------------------------------------
# processor side: layouts and pixel tiles of one image
# ----------------------------------------------------------------------------------------------


def _size_entry(size: Any, key: str) -> int | None:
    if size is None:
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return None if value is None else int(value)


def host_layout(processor: Any, image: Image.Image) -> HostImageLayout:
    """The :class:`HostImageLayout` of ``image`` under ``processor.image_aspect_ratio`` (a host mode)."""
    mode = processor.image_aspect_ratio
    size = image.size
    side, tile, tpt = processor.grid_size, processor.tile_size, processor.tokens_per_tile
    if mode == "anyres" or (mode == "native" and processor.image_grid_pinpoints):
        if processor.mm_patch_merge_type != "flat" and tpt != side * side:
            raise SR3DConfigError(
                f"anyres feature merging needs {side}×{side} tokens per tile, the projector gives {tpt} "
                "(a vision tower that keeps its CLS token cannot be laid out as a grid)"
            )
        return anyres_layout(
            size, processor.image_grid_pinpoints, tile, side, processor.mm_patch_merge_type,
            processor.use_image_newline, processor.unpad_rounding, processor.anyres_max_patches,
        )  # fmt: skip
    ip = processor.image_processor
    shortest = _size_entry(getattr(ip, "size", None), "shortest_edge")
    crop = _size_entry(getattr(ip, "crop_size", None), "height") if getattr(ip, "do_center_crop", False) else None
    if mode == "pad":
        layout = pad_layout(size, tpt)
        if shortest and crop and crop < shortest:  # the square is resized, then centre-cropped
            (x0, y0, x1, y1), k = layout.boxes[0], (1 - crop / shortest) / 2
            d = (x1 - x0) * k
            layout = HostImageLayout(((x0 + d, y0 + d, x1 - d, y1 - d),), layout.image_size, None, tpt)
        return layout
    if mode != "native":
        raise SR3DConfigError(
            f"image_aspect_ratio={mode!r} is not a host convention; expected one of {HOST_IMAGE_MODES}"
        )
    if shortest:
        rounding = "floor" if type(ip).__name__.endswith("Pil") else "round"
        return centre_crop_layout(size, shortest, crop or shortest, tpt, rounding)
    return squash_layout(size, tpt)


def host_tiles(processor: Any, images: Sequence[Image.Image], layouts: Sequence[HostImageLayout]) -> list[Any]:
    """The tiles the vision tower sees: PIL images (``pad``, ``anyres``; normalised later by the
    image processor) or ``[3, S, S]`` tensors from the folder's own image processor (``native``)."""
    mode = processor.image_aspect_ratio
    out: list[Any] = []
    for image, layout in zip(images, layouts):
        image = image.convert("RGB")
        if mode == "pad":
            out.append(expand_to_square(image, mean_colour(processor.image_processor)))
        elif mode == "anyres":
            out.extend(anyres_tiles(image, processor.image_grid_pinpoints, processor.tile_size))
        else:
            enc = processor.image_processor(images=[image], return_tensors="pt")
            pv = enc["pixel_values"]
            pv = pv[0] if pv.dim() == 5 else pv
            if pv.shape[0] < layout.num_tiles:
                raise SR3DConfigError(
                    f"the folder's image processor ({type(processor.image_processor).__name__}) made {pv.shape[0]} "
                    f"tile(s) of a {image.size[0]}×{image.size[1]} image, the model's convention expects "
                    f"{layout.num_tiles}; its settings do not match the model config"
                )
            out.extend(pv[: layout.num_tiles])
    return out
