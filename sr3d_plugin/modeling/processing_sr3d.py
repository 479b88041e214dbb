"""``SR3DProcessor``: prompt expansion, tiling, 3D positions per token and region pooling weights.

Prompt layout (VILA/NVILA, confirmed from VILA's ``mm_utils.dynamic_process_images_and_prompt``,
``BasicImageEncoder`` and ``generate_content``):

* the user text holds one ``<image>`` marker per image (single view) or per frame (multi-view);
* a single image cut into ``T`` tiles becomes ``"<image>\\n" × T`` in the text (``tile_separator``);
  every frame of multi-image / multi-view input becomes a bare ``"<image>"`` (``frame_separator``
  ``""``: SR-REAL's ``generate_content`` writes one ``<image>`` per frame, nothing in between);
* each ``<image>`` id then stands for the tile's ``N`` projected tokens followed by the embedding of
  ``image_end_text`` (``"\\n"``), which VILA's image encoder appends — we insert those ids directly
  so they are never merged with the following text by the BPE;
* each ``<mask>`` is one region embedding, in order; ``<regionK>`` aliases select region ``K``.

LLaVA host conventions (``image_aspect_ratio`` ``"pad"`` / ``"anyres"`` / ``"native"``, see
:mod:`~sr3d_plugin.modeling.llava_conventions`) keep one ``<image>`` id per image, expanded to that
image's token count (variable under anyres), tokenise like ``tokenizer_image_token`` when
``tokenize_image_chunks`` is set, and render prompts with the folder's conversation style.

Everything the vision path needs is computed here on the CPU: ``pixel_values [T, 3, S, S]``,
``tile_xyz [T, g, g, 3]`` (canonical position of every vision token: the point map tiled exactly
like the image, then area-pooled onto the token grid) and ``region_weights [R, T, g²]`` (region
masks tiled like the image, bilinearly resized to the grid and normalised).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from sr3d_plugin.errors import SR3DConfigError, SR3DInputError
from sr3d_plugin.modeling.configuration_sr3d import TOKEN_POINT_SAMPLING
from sr3d_plugin.modeling.inputs import Region, VisualInput
from sr3d_plugin.modeling.llava_conventions import HOST_IMAGE_MODES, host_layout, host_tiles
from sr3d_plugin.modeling.region_extractor import mask_weights
from sr3d_plugin.tiling import TileLayout, frame_layout, plan_tiles, tile_array, tile_image, tile_mask

__all__ = ["SR3DProcessor"]

_REGION_ALIAS = re.compile(r"<region(\d+)>")
_Edit = tuple[int, int, str]


def _apply_edits(text: str, edits: list[_Edit]) -> tuple[str, Any]:
    """Apply non-overlapping ``(start, end, replacement)`` edits; also return old→new offset mapping."""
    edits = sorted(edits)
    out, cursor, deltas = [], 0, []
    for start, end, new in edits:
        out.append(text[cursor:start])
        out.append(new)
        deltas.append((end, len(new) - (end - start)))
        cursor = end
    out.append(text[cursor:])

    def shift(offset: int) -> int:
        return offset + sum(d for end, d in deltas if end <= offset)

    return "".join(out), shift


DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
#: ``build_prompt(system=...)`` left out: use the processor's ``default_system``
_DEFAULT_SYSTEM: Any = object()


class SR3DProcessor(ProcessorMixin):
    """Turns text + :class:`~sr3d_plugin.modeling.inputs.VisualInput` into model inputs.

    Args:
        image_processor: the vision tower's image processor (normalisation; tiles arrive at ``tile_size``).
        tokenizer: the LLM tokenizer, with ``<image>`` and ``<mask>`` as special tokens.
        tile_size, min_tiles, max_tiles, image_aspect_ratio, use_thumbnail: tiling (see SR3DConfig).
        patch_size: vision patch size; ``tile_size // patch_size`` is the token grid ``g``.
        tokens_per_tile: LLM tokens per tile after the projector (121 for SR-3D).
        image_end_text: text whose ids follow each tile's placeholders (``"\\n"``; None for LLaVA).
        tile_separator: text after each tile's ``<image>`` marker of a single image (``"\\n"``; ``""`` for LLaVA).
        frame_separator: text after each frame's ``<image>`` marker of multi-view input (``""``).
        use_position_encoding: the model adds 3D PE, so every visual input needs point maps.
        image_grid_pinpoints, mm_patch_merge_type, unpad_rounding, anyres_max_patches,
        use_image_newline: LLaVA anyres conventions (see SR3DConfig and
            :mod:`~sr3d_plugin.modeling.llava_conventions`).
        conv_mode: render prompts with an original-LLaVA conversation template instead of the chat template.
        tokenize_image_chunks: tokenise like LLaVA's ``tokenizer_image_token`` (chunks between images).
        default_system: system text ``build_prompt`` uses when none is given (None: no system message, so
            the chat template's own default applies — what VILA folders get, as SR-REAL passes none — or
            the LLaVA conversation template's own).
        structured_chat_content: the chat template expects content lists (``{"type": "image"}``,
            ``{"type": "text", ...}``), as transformers' LLaVA processors.
        image_marker_suffix: text ``user_content`` writes after each ``<image>`` marker (``"\\n"`` for
            original LLaVA's ``<image>\\n`` + question).
        call_adds_special_tokens: the default of ``__call__``'s ``add_special_tokens`` (True for
            transformers' LLaVA folders, whose processors tokenise with the tokenizer's BOS rule).
        pixel_backend: ``"pil"`` when the image processor must be transformers' PIL backend
            (original LLaVA's ``CLIPImageProcessor`` is PIL-based); kept across ``save_pretrained``.
        token_point_sampling: ``"area"`` (released convention: each token's position is the mean of
            the points under its patch) or ``"center"`` (the points at its centre, sampled as region
            masks are; :func:`sr3d_plugin.pointmap.centre_token_positions`). Taken from the model's
            config by ``from_config``.
        keep_thin_regions: a region so thin that nearest-neighbour tiling or the bilinear resize to
            the token grid loses every pixel falls back to area weights (an option, off by default:
            SR-REAL then pools nothing and the region embedding is the projector's bias).
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        tile_size: int = 448,
        min_tiles: int = 1,
        max_tiles: int = 12,
        image_aspect_ratio: str = "dynamic",
        use_thumbnail: bool = True,
        patch_size: int = 14,
        tokens_per_tile: int = 121,
        image_end_text: str | None = "\n",
        tile_separator: str = "\n",
        frame_separator: str = "",
        use_position_encoding: bool = True,
        image_token: str = "<image>",
        mask_token: str = "<mask>",
        image_grid_pinpoints: list | None = None,
        mm_patch_merge_type: str = "flat",
        unpad_rounding: str = "floor",
        anyres_max_patches: int | None = None,
        use_image_newline: bool = False,
        conv_mode: str | None = None,
        tokenize_image_chunks: bool = False,
        default_system: str | None = DEFAULT_SYSTEM_PROMPT,
        structured_chat_content: bool = False,
        image_marker_suffix: str = "",
        call_adds_special_tokens: bool = False,
        pixel_backend: str | None = None,
        keep_thin_regions: bool = False,
        depth_model: str | None = None,
        canonical_mode: str = "sr3d",
        token_point_sampling: str = "area",
        **kwargs: Any,
    ) -> None:
        self.tile_size = tile_size
        self.min_tiles = min_tiles
        self.max_tiles = max_tiles
        self.image_aspect_ratio = image_aspect_ratio
        self.use_thumbnail = use_thumbnail
        self.patch_size = patch_size
        self.tokens_per_tile = tokens_per_tile
        self.image_end_text = image_end_text
        self.tile_separator = tile_separator
        self.frame_separator = frame_separator
        self.use_position_encoding = use_position_encoding
        self.image_token = image_token
        self.mask_token = mask_token
        self.image_grid_pinpoints = image_grid_pinpoints
        self.mm_patch_merge_type = mm_patch_merge_type
        self.unpad_rounding = unpad_rounding
        self.anyres_max_patches = anyres_max_patches
        self.use_image_newline = use_image_newline
        self.conv_mode = conv_mode
        self.tokenize_image_chunks = tokenize_image_chunks
        self.default_system = default_system
        self.structured_chat_content = structured_chat_content
        self.image_marker_suffix = image_marker_suffix
        self.call_adds_special_tokens = call_adds_special_tokens
        self.pixel_backend = pixel_backend
        self.keep_thin_regions = bool(keep_thin_regions)
        self.depth_model = None if depth_model is None else str(depth_model)
        self.canonical_mode = canonical_mode
        if token_point_sampling not in TOKEN_POINT_SAMPLING:
            raise SR3DConfigError(
                f"token_point_sampling={token_point_sampling!r}; expected one of {', '.join(TOKEN_POINT_SAMPLING)}"
            )
        self.token_point_sampling = token_point_sampling
        if chat_template is None and tokenizer is not None:
            chat_template = getattr(tokenizer, "chat_template", None)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> SR3DProcessor:  # type: ignore[override]
        """transformers' loading, then the image processor's backend restored (``pixel_backend``)."""
        proc = super().from_pretrained(*args, **kwargs)
        ip = getattr(proc, "image_processor", None)
        if getattr(proc, "pixel_backend", None) == "pil" and ip is not None:
            name = type(ip).__name__
            if not name.endswith("Pil"):
                import transformers

                pil_cls = getattr(transformers, name + "Pil", None)
                if pil_cls is None:
                    raise SR3DConfigError(f"the image processor {name} has no PIL backend (pixel_backend='pil')")
                config = {k: v for k, v in ip.to_dict().items() if k not in ("image_processor_type", "processor_class")}
                proc.image_processor = pil_cls(**config)
        return proc

    @classmethod
    def from_model_config(cls, config: Any, image_processor: Any, tokenizer: Any, **overrides: Any) -> SR3DProcessor:
        """A processor whose tiling and token accounting match ``config`` (an :class:`SR3DConfig`)."""
        kwargs = {
            "tile_size": config.tile_size,
            "min_tiles": config.min_tiles,
            "max_tiles": config.max_tiles,
            "image_aspect_ratio": config.image_aspect_ratio,
            "use_thumbnail": config.use_thumbnail,
            "patch_size": config.vision_config.patch_size,
            "tokens_per_tile": config.tokens_per_tile,
            "image_end_text": config.image_end_text,
            "tile_separator": config.tile_separator,
            "frame_separator": getattr(config, "frame_separator", ""),
            "use_position_encoding": config.use_position_encoding,
            "image_grid_pinpoints": getattr(config, "image_grid_pinpoints", None),
            "mm_patch_merge_type": getattr(config, "mm_patch_merge_type", "flat"),
            "unpad_rounding": getattr(config, "unpad_rounding", "floor"),
            "anyres_max_patches": getattr(config, "anyres_max_patches", None),
            "use_image_newline": getattr(config, "use_image_newline", False),
            "conv_mode": getattr(config, "conv_mode", None),
            "tokenize_image_chunks": getattr(config, "tokenize_image_chunks", False),
            "canonical_mode": getattr(config, "canonical_mode", "sr3d"),
            "token_point_sampling": getattr(config, "token_point_sampling", "area"),
        }
        kwargs.update(overrides)
        return cls(image_processor=image_processor, tokenizer=tokenizer, **kwargs)

    # ------------------------------------------------------------------------------------------
    # ids and layouts
    # ------------------------------------------------------------------------------------------

    @property
    def grid_size(self) -> int:
        return self.tile_size // self.patch_size

    def _special_id(self, token: str) -> int:
        ids = self.tokenizer.convert_tokens_to_ids([token])
        if not ids or ids[0] is None or ids[0] == self.tokenizer.unk_token_id:
            raise SR3DInputError(f"the tokenizer has no {token} token; add it as a special token")
        return int(ids[0])

    @property
    def image_token_id(self) -> int:
        return self._special_id(self.image_token)

    @property
    def mask_token_id(self) -> int:
        return self._special_id(self.mask_token)

    def _end_ids(self) -> list[int]:
        if not self.image_end_text:
            return []
        return list(self.tokenizer(self.image_end_text, add_special_tokens=False)["input_ids"])

    @property
    def host_convention(self) -> bool:
        """Whether images follow a host LLaVA convention (``pad`` / ``anyres`` / ``native``)."""
        return self.image_aspect_ratio in HOST_IMAGE_MODES

    def layouts(self, visual: VisualInput) -> list[Any]:
        """One layout per image: dynamic tiles for a single image, one tile per frame otherwise;
        under a host LLaVA convention every image or frame gets that convention's layout."""
        if self.host_convention:
            return [host_layout(self, image) for image in visual.images]
        if visual.multi_view:
            return [frame_layout(self.tile_size) for _ in visual.images]
        if self.image_aspect_ratio == "dynamic":
            w, h = visual.images[0].size
            return [plan_tiles(w, h, self.min_tiles, self.max_tiles, self.tile_size, self.use_thumbnail)]
        return [TileLayout(1, 1, self.tile_size, False)]

    def num_tiles(self, visual: VisualInput) -> int:
        return sum(layout.num_tiles for layout in self.layouts(visual))

    # ------------------------------------------------------------------------------------------
    # prompts
    # ------------------------------------------------------------------------------------------

    def user_content(self, question: str, visual: VisualInput | None) -> str:
        """``<image>`` markers (one per image or frame, each followed by ``image_marker_suffix``) and the question.

        Stripped at both ends as SR-REAL's ``tokenize_conversation`` strips every message; kept as given
        under a host LLaVA convention, whose conversation templates do not strip.
        """
        markers = (self.image_token + self.image_marker_suffix) * (visual.num_images if visual is not None else 0)
        text = markers + question
        return text if self.host_convention else text.strip()

    def build_prompt(
        self,
        question: str,
        visual: VisualInput | None = None,
        system: str | None = _DEFAULT_SYSTEM,
        answer: str | None = None,
        history: Sequence[tuple[str, str]] = (),
    ) -> str:
        """A chat-templated prompt (generation prompt appended when ``answer`` is None).

        ``system``: the system message; left out, the processor's ``default_system`` (None for VILA
        folders: no system message, so the chat template inserts its own default exactly as SR-REAL's
        ``tokenize_conversation`` does; none for LLaVA folders, whose conversation template brings its
        own; "You are a helpful assistant." otherwise); None: no system message.
        ``history``: earlier ``(user, assistant)`` turns of the conversation; the visual markers go with
        the first user turn (:meth:`user_content`), later user turns are used as given.
        """
        if system is _DEFAULT_SYSTEM:
            system = self.default_system
        messages: list[dict[str, str]] = []
        if system is not None:
            messages.append({"role": "system", "content": system})
        for i, (user, reply) in enumerate([*history, (question, answer)]):
            messages.append({"role": "user", "content": self.user_content(user, visual) if i == 0 else user})
            if reply is not None:
                messages.append({"role": "assistant", "content": reply})
        return self.render_chat(messages, add_generation_prompt=answer is None)

    def render_chat(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False, continue_final_message: bool = False
    ) -> str:
        """Render a conversation: the LLaVA conversation template ``conv_mode`` when set, else the chat template.

        ``continue_final_message``: leave the last (assistant) message open for the model to continue.
        """
        if self.conv_mode:
            if continue_final_message:
                raise SR3DInputError(
                    f"continue_final_message=True is not supported with the conversation template {self.conv_mode!r}"
                )
            from sr3d_plugin.modeling.llava_conventions import render_conversation

            return render_conversation(self.conv_mode, messages, add_generation_prompt)
        if self.structured_chat_content:
            messages = [self._structured(m) for m in messages]
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise SR3DInputError("the tokenizer has no chat template; pass a full prompt string instead")
        extra = {"continue_final_message": True} if continue_final_message else {}
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template, **extra
        )

    def _structured(self, message: dict[str, Any]) -> dict[str, Any]:
        """A ``{"role", "content": str}`` message as transformers' content list (images first, then the text)."""
        content = message.get("content")
        if not isinstance(content, str):
            return message
        n = content.count(self.image_token)
        text = content.replace(self.image_token + self.image_marker_suffix, "").replace(self.image_token, "")
        parts: list[dict[str, str]] = [{"type": "image"} for _ in range(n)]
        if text:
            parts.append({"type": "text", "text": text})
        return {**message, "content": parts}

    def assistant_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """Render a conversation and return the character spans of every assistant turn (with its end token)."""
        spans: list[tuple[int, int]] = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render_chat(messages[:k], add_generation_prompt=True)
            upto = self.render_chat(messages[: k + 1])
            if not upto.startswith(before):
                raise SR3DInputError("the chat template is not prefix-stable; cannot locate assistant turns")
            end = len(upto.rstrip("\n"))
            spans.append((len(before), end))
        return self.render_chat(messages), spans

    # ------------------------------------------------------------------------------------------
    # main entry point
    # ------------------------------------------------------------------------------------------

    def __call__(  # type: ignore[override]
        self,
        text: Any = None,
        visuals: VisualInput | Sequence[VisualInput | None] | None = None,
        supervised_spans: Sequence[Sequence[tuple[int, int]]] | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = "pt",
        add_special_tokens: bool | None = None,
        return_visual_tensors: bool = True,
        *,
        images: Any = None,
        videos: Any = None,
        depth: Any = None,
        intrinsics: Any = None,
        poses: Any = None,
        points: Any = None,
        regions: Any = None,
        depth_model: str | None = None,
        num_frames: int | None = None,
        padding: bool | str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Build a batch, from :class:`VisualInput` objects or transformers-style ``images`` / ``videos``.

        Args:
            text: prompt(s) containing ``<image>`` markers (one per image/frame) and ``<mask>`` or
                ``<regionK>`` references. With ``images`` / ``videos``, a text holding no ``<image>``
                marker is a bare question and becomes :meth:`build_prompt` ``(text, visual)`` (chat
                template, markers, default system); one with markers is used as given.
            visuals: one :class:`VisualInput` per prompt (or None for text-only prompts); not together
                with ``images`` / ``videos``.
            supervised_spans: optional character spans per prompt whose tokens get labels (all other
                positions get -100); returns ``labels`` when given.
            padding_side: ``"left"`` (generation) or ``"right"``; defaults to the tokenizer's.
            return_tensors: ``"pt"`` or None (tensors are always PyTorch).
            return_visual_tensors: with False, leave out ``pixel_values``, ``tile_xyz`` and ``image_sizes``
                (the question-independent tensors, for visual features computed once and reused:
                :meth:`SR3DForConditionalGeneration.encode_visual`); ids, masks, ``num_tiles`` and
                ``region_weights`` are the same as with True.
            images: per prompt one image (PIL, path or ``[H, W, 3]`` uint8 array; tiled dynamically) or a
                list of frames of one scene (one tile each); for a single prompt, the image or its list.
            videos: per prompt a video file or a list of frames (sampled to ``num_frames``, default 32).
            depth, intrinsics, poses: per prompt the images' depth (metres; files or arrays ``[H, W]`` /
                ``[N, H, W]``), ``[3, 3]`` pinhole matrix and ``[N, 4, 4]`` camera-to-world poses (as
                :func:`sr3d_plugin.visual_inputs.read_frames`).
            points: per prompt reconstruction point maps (``[V, H, W, 3]`` array or ``.npz`` / ``.npy``).
            regions: per prompt a list of regions in ``<mask>`` order: :class:`Region` objects or dicts
                ``{"frame": k, "box": [x0, y0, x1, y1]}`` (pixels) / ``{"frame": k, "mask": [H, W]}``.
            depth_model: Depth Anything V2 folder or id estimating depth for images without depth or
                points (default: the processor's ``depth_model``).
            padding: accepted for transformers' pipelines; batches are always padded to the longest.

        Unknown keyword arguments raise :class:`SR3DInputError` naming them.

        Returns:
            ``input_ids [B, L]``, ``attention_mask [B, L]``, ``num_tiles [B]`` and, when images are
            present, ``pixel_values [T, 3, S, S]``, ``tile_xyz [T, g, g, 3]`` (if point maps were
            given) and ``region_weights [R, T, g²]`` (if regions were given), ``labels`` on request.
        """
        if kwargs:
            raise SR3DInputError(
                f"SR3DProcessor got unknown keyword argument(s) {', '.join(sorted(kwargs))}; it takes text, images, "
                "videos, visuals, depth, intrinsics, poses, points, regions, depth_model, num_frames, "
                "supervised_spans, padding_side, return_tensors, add_special_tokens, return_visual_tensors"
            )
        if return_tensors not in ("pt", None):
            raise SR3DInputError(f"return_tensors={return_tensors!r}; SR3DProcessor returns PyTorch tensors ('pt')")
        if padding not in (None, True, False, "longest"):
            raise SR3DInputError(f"padding={padding!r}; batches are padded to the longest prompt (True or 'longest')")
        if _looks_visual(text) and (visuals is None or isinstance(visuals, str)) and images is None:
            text, visuals, images = visuals, None, text  # transformers' positional order: (images, text)
        if text is None:
            raise SR3DInputError("text is required: a prompt or a list of prompts")
        media = {"depth": depth, "intrinsics": intrinsics, "poses": poses, "points": points, "regions": regions}
        if images is not None or videos is not None:
            if visuals is not None:
                raise SR3DInputError("give either visuals (VisualInput objects) or images / videos, not both")
            text, visuals = self._visuals_from_media(text, images, videos, media, depth_model, num_frames)
        else:
            given = [k for k, v in media.items() if v is not None]
            if given:
                raise SR3DInputError(
                    f"{', '.join(given)} given without images or videos; pass the images they belong to"
                )
        return self._encode(text, visuals, supervised_spans, padding_side, add_special_tokens, return_visual_tensors)

    def _encode(
        self,
        text: str | Sequence[str],
        visuals: VisualInput | Sequence[VisualInput | None] | None,
        supervised_spans: Sequence[Sequence[tuple[int, int]]] | None,
        padding_side: str | None,
        add_special_tokens: bool | None,
        return_visual_tensors: bool,
    ) -> BatchFeature:
        """The batch of prompts and their :class:`VisualInput` objects (see :meth:`__call__`)."""
        if add_special_tokens is None:
            add_special_tokens = self.call_adds_special_tokens
        texts = [text] if isinstance(text, str) else list(text)
        if visuals is None or isinstance(visuals, VisualInput):
            vis_list: list[VisualInput | None] = [visuals] * len(texts)
            if isinstance(visuals, VisualInput) and len(texts) != 1:
                raise SR3DInputError(f"one VisualInput for {len(texts)} prompts; pass a list with one per prompt")
        else:
            vis_list = list(visuals)
        if len(vis_list) != len(texts):
            raise SR3DInputError(f"{len(texts)} prompts but {len(vis_list)} visual inputs; expected one per prompt")
        if supervised_spans is not None and len(supervised_spans) != len(texts):
            raise SR3DInputError(f"{len(texts)} prompts but {len(supervised_spans)} span lists")

        image_id = self.image_token_id if any(v is not None for v in vis_list) else None
        end_ids = self._end_ids()
        rows: list[list[int]] = []
        label_rows: list[list[int]] = []
        pixel_tiles: list[Image.Image] = []
        xyz_parts: list[torch.Tensor] = []
        region_blocks: list[tuple[int, torch.Tensor]] = []  # (tile offset, [R_i, T_i, L])
        tiles_per_sample: list[int] = []
        image_sizes: list[list[int]] = []  # (height, width) of every image, for anyres feature merging
        tile_offset = 0
        for i, (prompt, visual) in enumerate(zip(texts, vis_list)):
            edits, region_order = self._resolve_regions(prompt, visual, i)
            if visual is None:
                if self.image_token in prompt:
                    raise SR3DInputError(f"prompt {i} contains {self.image_token} but no image was given")
                layouts: list[TileLayout] = []
            else:
                layouts = self.layouts(visual)
                edits += self._marker_edits(prompt, visual, layouts, i)
            prompt, shift = _apply_edits(prompt, edits)
            spans = [(shift(a), shift(b)) for a, b in supervised_spans[i]] if supervised_spans is not None else None
            ids, labels = self._tokenize(prompt, spans, add_special_tokens)
            counts = [layout.num_tokens for layout in layouts] if self.host_convention else None
            ids, labels = self._expand_ids(ids, labels, image_id, end_ids, counts)
            rows.append(ids)
            label_rows.append(labels)
            n_tiles = sum(layout.num_tiles for layout in layouts)
            tiles_per_sample.append(n_tiles)
            if visual is None:
                continue
            if visual.points is None and self.use_position_encoding:
                raise SR3DInputError(
                    f"visual input {i} has no 3D positions, but this model adds a 3D positional encoding: "
                    "give depth (with intrinsics/poses), point maps, or a depth estimator"
                )
            if return_visual_tensors:
                pixel_tiles.extend(self._tile_images(visual, layouts))
                image_sizes.extend([image.size[1], image.size[0]] for image in visual.images)
                if visual.points is not None:
                    xyz_parts.append(self._tile_positions(visual, layouts))
            if region_order:
                region_blocks.append((tile_offset, self._region_weights(visual, layouts, region_order)))
            tile_offset += n_tiles

        data: dict[str, Any] = self._pad(rows, label_rows if supervised_spans is not None else None, padding_side)
        data["num_tiles"] = torch.tensor(tiles_per_sample, dtype=torch.long)
        if pixel_tiles:
            data["pixel_values"] = self._pixel_values(pixel_tiles)
            if self.mm_patch_merge_type != "flat":
                data["image_sizes"] = torch.tensor(image_sizes, dtype=torch.long)
            if xyz_parts:
                if len(xyz_parts) != sum(v is not None for v in vis_list):
                    raise SR3DInputError("either every visual input in a batch has point maps or none has")
                data["tile_xyz"] = torch.cat(xyz_parts, dim=0)
        if region_blocks:
            g2 = self.grid_size**2
            total = sum(block.shape[0] for _, block in region_blocks)
            weights = torch.zeros(total, tile_offset, g2)
            r = 0
            for offset, block in region_blocks:
                weights[r : r + block.shape[0], offset : offset + block.shape[1]] = block
                r += block.shape[0]
            data["region_weights"] = weights
        return BatchFeature(data=data, tensor_type=None)

    # ------------------------------------------------------------------------------------------
    # transformers-style inputs: images / videos / 3D keyword arguments, chat messages
    # ------------------------------------------------------------------------------------------

    def _visuals_from_media(
        self,
        text: Any,
        images: Any,
        videos: Any,
        media: dict[str, Any],
        depth_model: str | None,
        num_frames: int | None,
    ) -> tuple[list[str], list[VisualInput | None]]:
        """Prompts and one :class:`VisualInput` per prompt from ``images`` / ``videos`` and the 3D keywords."""
        from sr3d_plugin.visual_inputs import positions, read_frames

        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise SR3DInputError("text must be a prompt string or a list of them (chat messages: apply_chat_template)")
        b = len(texts)
        per_image = _per_prompt(images, b, "images", lambda v: not isinstance(v, (list, tuple)))
        per_video = _per_prompt(videos, b, "videos", lambda v: isinstance(v, (str, os.PathLike)))
        per = {k: _per_prompt(v, b, k, lambda _v: False) for k, v in media.items()}
        estimator = depth_model if depth_model is not None else self.depth_model
        prompts: list[str] = []
        visuals: list[VisualInput | None] = []
        for i in range(b):
            image, video = per_image[i], per_video[i]
            if image is not None and video is not None:
                raise SR3DInputError(f"prompt {i} has both images and a video; give one")
            if image is None and video is None:
                prompts.append(texts[i])
                visuals.append(None)
                continue
            geo = {k: per[k][i] for k in ("depth", "intrinsics", "poses")}
            if video is not None and not isinstance(video, (str, os.PathLike)):
                frames = read_frames(frames=list(video), num_frames=num_frames or 32, **geo)
            elif video is not None:
                if any(v is not None for v in geo.values()):
                    raise SR3DInputError(f"prompt {i}: a video takes points or a depth model, not depth / poses")
                frames = read_frames(video=video, num_frames=num_frames or 32)
            elif isinstance(image, (list, tuple)):
                frames = read_frames(frames=list(image), num_frames=len(image), **geo)
            else:
                frames = read_frames(image=image, **geo)
            pts = valid = None
            if self.use_position_encoding:
                if per["points"][i] is None and frames.depth is None and estimator is None:
                    raise SR3DInputError(
                        f"prompt {i}: this model adds a 3D positional encoding but its images have no depth, points "
                        "or depth model; pass depth= (with intrinsics=, and poses= for several frames), points=, "
                        "depth_model= (a Depth Anything V2 folder), or set the processor's depth_model"
                    )
                pts, valid, _ = positions(
                    frames,
                    "auto",
                    points=per["points"][i],
                    fallback_depth_model=estimator,
                    canonical_mode=self.canonical_mode,
                )
            region_list = [_region(r, frames.images, i) for r in (per["regions"][i] or [])]
            multi = len(frames.images) > 1 or video is not None
            visual = VisualInput(list(frames.images), pts, valid, region_list, multi_view=multi)
            prompt = texts[i]
            if self.image_token not in prompt:
                prompt = self.build_prompt(prompt, visual)
            prompts.append(prompt)
            visuals.append(visual)
        return prompts, visuals

    def apply_chat_template(  # type: ignore[override]
        self,
        conversation: list[dict[str, Any]] | list[list[dict[str, Any]]],
        chat_template: str | None = None,
        *,
        tokenize: bool = False,
        return_dict: bool = False,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        return_tensors: str | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        num_frames: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """Render chat messages whose content may be a string or transformers' list of parts.

        Parts: ``{"type": "text", "text": ...}``; ``{"type": "image", "image" | "path" | "url": ...}``
        (PIL image, local file or array; ``{"type": "image"}`` alone is a marker for an image passed
        separately); ``{"type": "video", "video" | "path" | "url": file or list of frames}``; ``{"type":
        "region", "frame": k, "box": [x0, y0, x1, y1]}`` (pixels, or ``"mask": [H, W]``) → ``<mask>`` in the
        prompt and a region in the batch. Parts are written in order (image → ``<image>``, one per video
        frame); a conversation without a system message gets the processor's ``default_system``, as
        :meth:`build_prompt`. ``chat_template`` overrides the processor's.

        Returns the prompt (a list for a batch of conversations) or, with ``tokenize=True``, the batch of
        :meth:`__call__` with the images, videos and regions of the messages (``processor_kwargs`` and the
        remaining keyword arguments — depth, intrinsics, poses, points, depth_model, padding_side —
        go to :meth:`__call__`; ``return_dict=False`` gives ``input_ids`` only).
        """
        from sr3d_plugin.visual_inputs import read_frames

        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        convs = list(conversation) if batched else [conversation]
        prompts: list[str] = []
        media: list[Any] = []
        regions: list[list[Any]] = []
        for c, conv in enumerate(convs):
            frames: list[Any] = []
            conv_regions: list[Any] = []
            messages: list[dict[str, str]] = []
            for message in conv:
                if not isinstance(message, dict) or "role" not in message:
                    raise SR3DInputError(f"conversation {c}: every message must be a dict with 'role' and 'content'")
                content = message.get("content", "")
                if isinstance(content, str):
                    messages.append({"role": message["role"], "content": content})
                    continue
                pieces: list[str] = []
                for part in content:
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind == "text":
                        pieces.append(str(part.get("text", "")))
                    elif kind == "image":
                        source = _part_source(part, "image")
                        if source is not None:
                            frames.append(source)
                        pieces.append(self.image_token + self.image_marker_suffix)
                    elif kind == "video":
                        source = _part_source(part, "video")
                        if source is None:
                            raise SR3DInputError(f"conversation {c}: a video part needs 'video', 'path' or 'url'")
                        if isinstance(source, (list, tuple)):
                            video_frames = list(source)
                        else:
                            video_frames = list(read_frames(video=source, num_frames=num_frames or 32).images)
                        frames.extend(video_frames)
                        pieces.append((self.image_token + self.image_marker_suffix) * len(video_frames))
                    elif kind == "region":
                        conv_regions.append(part)
                        pieces.append(self.mask_token)
                    else:
                        raise SR3DInputError(
                            f"conversation {c}: content part {part!r}; expected type 'text', 'image', 'video' or 'region'"
                        )
                text = "".join(pieces)
                if message["role"] == "user" and not self.host_convention:
                    text = text.strip()  # as user_content: SR-REAL strips every message
                messages.append({"role": message["role"], "content": text})
            if self.default_system is not None and not any(m["role"] == "system" for m in messages):
                messages.insert(0, {"role": "system", "content": self.default_system})
            if chat_template is not None:
                saved, self.chat_template = self.chat_template, chat_template
            try:
                prompts.append(self.render_chat(messages, add_generation_prompt, continue_final_message))
            finally:
                if chat_template is not None:
                    self.chat_template = saved
            media.append(frames[0] if len(frames) == 1 else (frames or None))
            regions.append(conv_regions)
        if not tokenize:
            return prompts if batched else prompts[0]
        options = {**(processor_kwargs or {}), **kwargs}
        if return_tensors is not None:
            options["return_tensors"] = return_tensors
        if any(m is not None for m in media):
            if not batched:
                options.update(images=media[0], regions=regions[0] or None)
            else:
                options.update(images=media, regions=regions)
        elif any(regions):
            raise SR3DInputError("region parts need an image or video in the conversation")
        out = self(text=prompts if batched else prompts[0], **options)
        return out if return_dict else out["input_ids"]

    # ------------------------------------------------------------------------------------------
    # pieces
    # ------------------------------------------------------------------------------------------

    def _resolve_regions(self, prompt: str, visual: VisualInput | None, index: int) -> tuple[list[_Edit], list[int]]:
        """Edits that turn ``<regionK>`` aliases into ``<mask>``, and the region order of the ``<mask>`` tokens."""
        regions = visual.regions if visual is not None else []
        matches = list(_REGION_ALIAS.finditer(prompt))
        bare = prompt.count(self.mask_token)
        if matches and bare:
            raise SR3DInputError(f"prompt {index} mixes {self.mask_token} and <regionK> references; use one style")
        if matches:
            order = [int(m.group(1)) for m in matches]
            for k in order:
                if not 0 <= k < len(regions):
                    raise SR3DInputError(
                        f"prompt {index} refers to <region{k}> but {len(regions)} region(s) were given (0..{len(regions) - 1})"
                    )
            return [(m.start(), m.end(), self.mask_token) for m in matches], order
        if bare != len(regions):
            raise SR3DInputError(
                f"prompt {index} has {bare} {self.mask_token} token(s) but {len(regions)} region(s) were given; "
                "expected one per region, in order"
            )
        return [], list(range(len(regions)))

    def _marker_edits(self, prompt: str, visual: VisualInput, layouts: list[TileLayout], index: int) -> list[_Edit]:
        """Edits that expand each ``<image>`` marker into ``(<image> + separator) × tiles``."""
        positions = [m.start() for m in re.finditer(re.escape(self.image_token), prompt)]
        if len(positions) != visual.num_images:
            raise SR3DInputError(
                f"prompt {index} has {len(positions)} {self.image_token} marker(s) but {visual.num_images} image(s) "
                f"were given; expected one marker per {'frame' if visual.multi_view else 'image'}"
            )
        if self.host_convention:
            return []  # one <image> id per image; _expand_ids gives it the image's token count
        sep = self.frame_separator if visual.multi_view else self.tile_separator
        edits = []
        for pos, layout in zip(positions, layouts):
            end = pos + len(self.image_token)
            if sep and prompt.startswith(sep, end):
                end += len(sep)  # the expansion brings its own separator
            edits.append((pos, end, (self.image_token + sep) * layout.num_tiles))
        return edits

    def _tokenize(
        self, prompt: str, spans: Sequence[tuple[int, int]] | None, add_special_tokens: bool
    ) -> tuple[list[int], list[int]]:
        if self.tokenize_image_chunks:
            from sr3d_plugin.modeling.llava_conventions import split_at_images

            ids, offsets, _ = split_at_images(self.tokenizer, prompt, self.image_token, offsets=spans is not None)
            if spans is None or offsets is None:
                return ids, [-100] * len(ids)
            return ids, [
                tok if b > a and any(a >= s and b <= e for s, e in spans) else -100 for tok, (a, b) in zip(ids, offsets)
            ]
        if spans is None:
            enc = self.tokenizer(prompt, add_special_tokens=add_special_tokens)
            ids = list(enc["input_ids"])
            return ids, [-100] * len(ids)
        enc = self.tokenizer(prompt, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = []
        for tok, (a, b) in zip(ids, enc["offset_mapping"]):
            inside = b > a and any(a >= s and b <= e for s, e in spans)
            labels.append(tok if inside else -100)
        return ids, labels

    def _expand_ids(
        self,
        ids: list[int],
        labels: list[int],
        image_id: int | None,
        end_ids: list[int],
        counts: list[int] | None = None,
    ) -> tuple[list[int], list[int]]:
        """Every ``<image>`` id → its tile's placeholders (+ end ids); with ``counts``, the k-th id → ``counts[k]``."""
        if image_id is None:
            return ids, labels
        out_ids: list[int] = []
        out_labels: list[int] = []
        block = [image_id] * self.tokens_per_tile + end_ids
        k = 0
        for tok, lab in zip(ids, labels):
            if tok == image_id:
                if counts is not None:
                    if k >= len(counts):
                        raise SR3DInputError(f"the prompt has more {self.image_token} ids than images ({len(counts)})")
                    block = [image_id] * counts[k] + end_ids
                    k += 1
                out_ids.extend(block)
                out_labels.extend([-100] * len(block))
            else:
                out_ids.append(tok)
                out_labels.append(lab)
        return out_ids, out_labels

    def _pad(self, rows: list[list[int]], labels: list[list[int]] | None, padding_side: str | None) -> dict[str, Any]:
        side = padding_side or getattr(self.tokenizer, "padding_side", "right")
        if side not in ("left", "right"):
            raise SR3DInputError(f"padding_side={side!r}; expected 'left' or 'right'")
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        lab = torch.full((len(rows), width), -100, dtype=torch.long) if labels is not None else None
        for b, row in enumerate(rows):
            n = len(row)
            sl = slice(width - n, width) if side == "left" else slice(0, n)
            ids[b, sl] = torch.tensor(row, dtype=torch.long)
            mask[b, sl] = 1
            if lab is not None and labels is not None:
                lab[b, sl] = torch.tensor(labels[b], dtype=torch.long)
        out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if lab is not None:
            out["labels"] = lab
        return out

    def _tile_images(self, visual: VisualInput, layouts: list[Any]) -> list[Any]:
        if self.host_convention:
            return host_tiles(self, visual.images, layouts)
        tiles: list[Image.Image] = []
        s = self.tile_size
        for image, layout in zip(visual.images, layouts):
            image = image.convert("RGB")
            if layout.num_tiles == 1 and not layout.thumbnail and layout.cols == 1 and layout.rows == 1:
                tiles.append(image if image.size == (s, s) else image.resize((s, s), Image.Resampling.BICUBIC))
            else:
                tiles.extend(tile_image(image, layout))
        return tiles

    def _pixel_values(self, tiles: list[Any]) -> torch.Tensor:
        if tiles and isinstance(tiles[0], torch.Tensor):  # ready tiles from the folder's own image processor
            pv = torch.stack(tiles)
        else:
            pv = self.image_processor(images=tiles, return_tensors="pt")["pixel_values"]
        s = self.tile_size
        if tuple(pv.shape[-2:]) != (s, s):
            raise SR3DInputError(
                f"the image processor produced {tuple(pv.shape[-2:])} pixels per tile; expected {s}×{s} "
                "(its size must equal the tile size)"
            )
        return pv

    def _tile_positions(self, visual: VisualInput, layouts: list[TileLayout]) -> torch.Tensor:
        """``[T, g, g, 3]`` canonical position of every vision token, tiled exactly like the images."""
        from sr3d_plugin.pointmap import frame_token_positions, image_token_positions

        assert visual.points is not None
        pts = visual.points.to(torch.float32)
        if self.host_convention:
            from sr3d_plugin.modeling.llava_conventions import host_token_positions

            return torch.cat(
                [
                    host_token_positions(
                        pts[v], layout, self.grid_size, None if visual.valid is None else visual.valid[v]
                    )
                    for v, layout in enumerate(layouts)
                ]
            )
        if self.token_point_sampling == "center":
            from sr3d_plugin.pointmap import centre_token_positions

            return torch.cat(
                [
                    centre_token_positions(
                        pts[v], layout, self.grid_size, None if visual.valid is None else visual.valid[v]
                    )
                    for v, layout in enumerate(layouts)
                ]
            )
        if visual.multi_view:
            return frame_token_positions(pts, visual.valid, grid=self.grid_size, tile_size=self.tile_size)
        valid = None if visual.valid is None else visual.valid[0]
        return image_token_positions(pts[0], layouts[0], grid=self.grid_size, valid=valid)

    def _region_weights(self, visual: VisualInput, layouts: list[TileLayout], order: list[int]) -> torch.Tensor:
        g = self.grid_size
        blocks = []
        for k in order:
            region: Region = visual.regions[k]
            tiles = []
            for v, layout in enumerate(layouts):
                mask = region.masks.get(v)
                if mask is None:
                    tiles.append(torch.zeros(layout.num_tiles, self.tile_size, self.tile_size, dtype=torch.bool))
                    continue
                if self.host_convention:
                    from sr3d_plugin.modeling.llava_conventions import host_tile_masks

                    tiles.append(host_tile_masks(mask, layout, self.tile_size))
                    continue
                t = tile_mask(mask, layout)  # OpenCV INTER_NEAREST, as SR-REAL's process_mask
                if self.keep_thin_regions and not bool(t.any()):  # option: keep it with area resizing
                    t = tile_array(torch.as_tensor(mask, dtype=torch.float32)[None], layout, "area")[:, 0] > 0
                tiles.append(t)
            stacked = torch.cat(tiles, dim=0).unsqueeze(1)  # [T, 1, S, S]
            blocks.append(mask_weights(stacked, g, fallback_area=self.keep_thin_regions).reshape(-1, g * g))
        return torch.stack(blocks, dim=0)

    def decode_answer(self, generated: torch.Tensor, prompt_length: int) -> list[str]:
        """Decode the new tokens of ``generate`` output (``[B, prompt + new]``)."""
        return self.tokenizer.batch_decode(generated[:, prompt_length:], skip_special_tokens=True)


def _looks_visual(value: Any) -> bool:
    """Whether ``value`` is an image (or a list starting with one) rather than prompt text."""
    import numpy as np

    first = value[0] if isinstance(value, (list, tuple)) and value else value
    return isinstance(first, (Image.Image, np.ndarray, torch.Tensor))


def _per_prompt(value: Any, batch: int, name: str, is_single: Any) -> list[Any]:
    """``value`` split into one entry per prompt: as given for one prompt, else a list of ``batch`` entries."""
    if value is None:
        return [None] * batch
    if batch == 1:
        return [value]
    if not isinstance(value, (list, tuple)) or is_single(value) or len(value) != batch:
        raise SR3DInputError(
            f"{name} for {batch} prompts must be a list with one entry per prompt (None for none), "
            f"got {type(value).__name__}" + (f" of {len(value)}" if isinstance(value, (list, tuple)) else "")
        )
    return list(value)


def _part_source(part: dict[str, Any], kind: str) -> Any:
    """The media of a chat content part: its ``kind`` key, ``path`` or ``url`` (None for a bare marker)."""
    for key in (kind, "path", "url"):
        if part.get(key) is not None:
            value = part[key]
            if isinstance(value, str) and value.startswith(("http://", "https://")):
                raise SR3DInputError(f"{kind} part {key}={value!r}: only local files and in-memory images are read")
            return value
    return None


def _region(spec: Any, images: Sequence[Image.Image], index: int) -> Region:
    """A :class:`Region` from a Region or a ``{"frame", "box" | "mask"}`` dict on ``images``."""
    if isinstance(spec, Region):
        return spec
    if not isinstance(spec, dict):
        raise SR3DInputError(f"prompt {index}: region {spec!r}; expected a Region or a dict with 'box' or 'mask'")
    frame = spec.get("frame", 0)
    if not isinstance(frame, int) or not 0 <= frame < len(images):
        raise SR3DInputError(
            f"prompt {index}: region frame={frame!r}; expected an integer frame index in 0..{len(images) - 1}"
        )
    label = spec.get("label")
    if spec.get("box") is not None:
        box = spec["box"]
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            raise SR3DInputError(f"prompt {index}: region box={box!r}; expected [x0, y0, x1, y1] in pixels")
        return Region.from_box(frame, tuple(box), images[frame].size, label=label)
    if spec.get("mask") is not None:
        return Region({frame: spec["mask"]}, label=label)
    raise SR3DInputError(f"prompt {index}: region {spec!r} has neither 'box' nor 'mask'")


def _register_with_auto_processor() -> None:
    from transformers import AutoProcessor

    from sr3d_plugin.modeling.configuration_sr3d import SR3DConfig

    AutoProcessor.register(SR3DConfig, SR3DProcessor, exist_ok=True)


# importing the processor registers it with AutoProcessor (how that import happens: sr3d_plugin._compat)
_register_with_auto_processor()
