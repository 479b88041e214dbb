"""``SR3DConfig``: one vision tower + 3D positional encoder + projector + region extractor + causal LLM.

The defaults describe SR-3D-8B (SR3D-FACTS §1): SigLIP-so400m-patch14-448, ``mlp_downsample_3x3_fix``,
``abs_mlp`` PE with 8 frequencies, ``regiongpt`` region extractor and a Qwen2-7B language model.
Components are looked up by name in the plugin registry, so a third-party projector, position
encoder or region extractor is selected by putting its registered name in the config.
"""

from __future__ import annotations

import sr3d_plugin._model_layer  # noqa: F401  (first, raises SR3DDependencyError on transformers < 5)

# isort: split
from typing import Any, ClassVar, Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from sr3d_plugin.errors import SR3DConfigError
from sr3d_plugin.modeling._names import SR3D_SPECIAL_TOKENS

__all__ = ["DTYPE_NAMES", "SR3D_SPECIAL_TOKENS", "TOKEN_POINT_SAMPLING", "SR3DConfig", "parse_dtype"]

#: how a vision token's 3D position is taken from the point map (``SR3DConfig.token_point_sampling``)
TOKEN_POINT_SAMPLING = ("area", "center")


#: the only dtype spellings accepted from checkpoint files (never ``eval`` a config string, SR3D-FACTS §9)
DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "torch.float32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "torch.bfloat16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "torch.float16": "float16",
}


def parse_dtype(value: Any) -> Any:
    """Map a dtype name from a config file or the command line to a ``torch.dtype`` (allow-list only)."""
    import torch

    if value is None or isinstance(value, torch.dtype):
        return value
    if value == "auto":
        return "auto"
    key = str(value).strip().lower()
    if key not in DTYPE_NAMES:
        raise SR3DConfigError(f"unsupported dtype {value!r}; expected one of {sorted(set(DTYPE_NAMES))} or 'auto'")
    return getattr(torch, DTYPE_NAMES[key])


class SR3DConfig(PreTrainedConfig):
    r"""Configuration of :class:`~sr3d_plugin.modeling.SR3DForConditionalGeneration`.

    Args:
        vision_config: config of any transformers vision encoder returning hidden states
            (``siglip_vision_model``, ``clip_vision_model``, …).
        text_config: config of any transformers causal LM.
        projector_type: registered projector name (``mlp_downsample_3x3_fix``, ``mlp2x_gelu``, …).
        use_position_encoding: add the 3D PE to vision tokens (the switch of the paper's ablation).
        position_encoder_type: registered position-encoder name (``abs_mlp``).
        pe_num_freqs: octave frequencies of the sinusoidal encoding (8 → 51 features).
        pe_init_gain: xavier gain of a freshly initialised PE (0.001).
        use_region_extractor: enable ``<mask>`` region tokens.
        region_extractor_type: registered region-extractor name (``regiongpt``).
        tile_size: side of a vision tile in pixels (448).
        min_tiles, max_tiles: dynamic-tiling limits for single images.
        image_aspect_ratio: ``"dynamic"`` (tiles + thumbnail), ``"resize"`` (one squashed tile), or a
            host LLaVA convention (:mod:`sr3d_plugin.modeling.llava_conventions`): ``"pad"`` (pad to a
            square with the mean colour), ``"anyres"`` (LLaVA-1.6 patches) or ``"native"`` (the
            folder's own image processor gets the raw image).
        image_grid_pinpoints: anyres resolutions as ``[width, height]`` pairs (multiples of ``tile_size``).
        mm_patch_merge_type: how anyres tile features become LLM tokens: ``"flat"`` (concatenate),
            ``"spatial"`` or ``"spatial_unpad"`` (LLaVA-1.6: drop padding-only features, ``image_newline``).
        unpad_rounding: ``"floor"`` (original LLaVA) or ``"round"`` (transformers) in the unpadding.
        anyres_max_patches: LLaVA-OneVision's ``anyres_max_N`` feature downsampling (None: off).
        use_image_newline: the model has a learned ``image_newline`` embedding (LLaVA-1.6 / NeXT).
        conv_mode: an original-LLaVA conversation template (``"llava_v1"``, …) for prompts; None: the
            tokenizer's chat template.
        tokenize_image_chunks: tokenise the text between images chunk by chunk, as LLaVA's
            ``tokenizer_image_token`` does (the BOS of the first chunk only).
        use_thumbnail: append the whole-image thumbnail when an image has several tiles.
        vision_feature_layer: hidden-state index taken from the vision tower (−2 = penultimate).
        vision_early_exit: stop the vision tower after the layer ``vision_feature_layer`` selects
            (SigLIP / CLIP towers; bit-identical features, the later layers and the head skipped).
        vision_feature_select: ``"cls_patch"``/``"full"`` keep every token; ``"patch"``/``"default"``
            drop the first (CLS) token.
        image_end_text: text whose embedding follows every tile's tokens (``"\n"`` in VILA/NVILA's
            image encoder, None for LLaVA). Inserted as token ids, never merged with the prompt text.
        tile_separator: prompt text after each tile's ``<image>`` marker (VILA writes
            ``"<image>\n"`` per tile; ``""`` for LLaVA, whose prompts carry their own newline).
        frame_separator: prompt text after each frame's ``<image>`` marker in multi-image /
            multi-view input (``""``: SR-REAL's ``generate_content`` joins one ``<image>`` per frame
            with no text in between; every frame still ends with the ``image_end_text`` embedding).
        image_seq_length: LLM tokens per tile; derived from the projector when None.
        canonical_mode: ``"sr3d"`` (released convention) or ``"robust"`` for metric point maps.
        token_point_sampling: where a vision token's 3D position comes from. ``"area"`` (released
            convention): the mean of every point under its patch; ``"center"``: the points at the
            patch centre, sampled exactly as region masks are (nearest-neighbour tiling, then a
            bilinear resize to the token grid), so a token that a region's mask selects sits on that
            region's surface instead of at an average of it and the wall behind (a named option for
            models whose objects span few patches, e.g. the tiny demo model).
        depth_source: default point-map source for images without geometry (``"depth_anything"``).
        depth_model: default Depth Anything V2 id or path.
        num_video_frames: frames sampled from a video or scan (32).
        image_token_id, mask_token_id: ids of ``<image>`` and ``<mask>`` in the tokenizer.
    """

    model_type: ClassVar[str] = "sr3d"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="siglip_vision_model",
            init_kwargs={
                "hidden_size": 1152,
                "intermediate_size": 4304,
                "num_hidden_layers": 27,
                "num_attention_heads": 16,
                "image_size": 448,
                "patch_size": 14,
            },
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector_type: str = "mlp_downsample_3x3_fix"
    use_position_encoding: bool = True
    position_encoder_type: str = "abs_mlp"
    pe_num_freqs: int = 8
    pe_init_gain: float = 0.001
    use_region_extractor: bool = True
    region_extractor_type: str = "regiongpt"
    tile_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 12
    image_aspect_ratio: Literal["dynamic", "resize", "pad", "anyres", "native"] = "dynamic"
    use_thumbnail: bool = True
    vision_feature_layer: int = -2
    vision_feature_select: str = "cls_patch"
    vision_early_exit: bool = True
    image_end_text: str | None = "\n"
    tile_separator: str = "\n"
    frame_separator: str = ""
    image_seq_length: int | None = None
    canonical_mode: Literal["sr3d", "robust"] = "sr3d"
    token_point_sampling: Literal["area", "center"] = "area"
    depth_source: str = "depth_anything"
    depth_model: str = "depth-anything/Depth-Anything-V2-Large-hf"
    num_video_frames: int = 32
    image_token_id: int | None = None
    mask_token_id: int | None = None
    tie_word_embeddings: bool = False
    image_grid_pinpoints: list | None = None
    mm_patch_merge_type: str = "flat"
    unpad_rounding: str = "floor"
    anyres_max_patches: int | None = None
    use_image_newline: bool = False
    conv_mode: str | None = None
    tokenize_image_chunks: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.validate_sr3d()

    # ------------------------------------------------------------------------------------------

    def validate_sr3d(self) -> None:
        """Raise :class:`SR3DConfigError` for inconsistent values."""
        if self.image_aspect_ratio not in ("dynamic", "resize", "pad", "anyres", "native"):
            raise SR3DConfigError(
                f"image_aspect_ratio={self.image_aspect_ratio!r}; expected 'dynamic' (tiles), 'resize' (one tile), "
                "'pad', 'anyres' or 'native' (LLaVA conventions)"
            )
        if self.mm_patch_merge_type not in ("flat", "spatial", "spatial_unpad"):
            raise SR3DConfigError(
                f"mm_patch_merge_type={self.mm_patch_merge_type!r}; expected 'flat', 'spatial' or 'spatial_unpad'"
            )
        if self.mm_patch_merge_type != "flat" and not self.image_grid_pinpoints:
            raise SR3DConfigError(
                f"mm_patch_merge_type={self.mm_patch_merge_type!r} merges anyres patches; it needs image_grid_pinpoints"
            )
        if self.unpad_rounding not in ("floor", "round"):
            raise SR3DConfigError(f"unpad_rounding={self.unpad_rounding!r}; expected 'floor' or 'round'")
        if self.image_aspect_ratio == "anyres" and not self.image_grid_pinpoints:
            raise SR3DConfigError("image_aspect_ratio 'anyres' needs image_grid_pinpoints ([width, height] pairs)")
        for pair in self.image_grid_pinpoints or []:
            if len(pair) != 2 or any(int(v) <= 0 or int(v) % self.tile_size for v in pair):
                raise SR3DConfigError(
                    f"image_grid_pinpoints entry {pair} must be [width, height], multiples of tile_size {self.tile_size}"
                )
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise SR3DConfigError(f"need 1 <= min_tiles <= max_tiles, got {self.min_tiles} and {self.max_tiles}")
        if self.vision_feature_select not in ("cls_patch", "full", "patch", "default"):
            raise SR3DConfigError(
                f"vision_feature_select={self.vision_feature_select!r}; expected 'cls_patch', 'full', 'patch' or 'default'"
            )
        if self.canonical_mode not in ("sr3d", "robust"):
            raise SR3DConfigError(f"canonical_mode={self.canonical_mode!r}; expected 'sr3d' or 'robust'")
        if self.token_point_sampling not in TOKEN_POINT_SAMPLING:
            raise SR3DConfigError(
                f"token_point_sampling={self.token_point_sampling!r}; expected one of {', '.join(TOKEN_POINT_SAMPLING)}"
            )
        vc = self.vision_config
        patch = getattr(vc, "patch_size", None)
        if patch and self.tile_size % patch:
            raise SR3DConfigError(f"tile_size {self.tile_size} is not a multiple of the vision patch size {patch}")
        if getattr(vc, "image_size", self.tile_size) != self.tile_size:
            raise SR3DConfigError(
                f"tile_size {self.tile_size} differs from the vision tower's image_size {vc.image_size}; they must match"
            )

    @property
    def drops_cls_token(self) -> bool:
        return self.vision_feature_select in ("patch", "default")

    @property
    def grid_size(self) -> int:
        """Vision tokens per tile side (448 / 14 = 32)."""
        return self.tile_size // self.vision_config.patch_size

    @property
    def vision_hidden_size(self) -> int:
        return self.vision_config.hidden_size

    @property
    def llm_hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens produced by one tile after the projector (121 for SR-3D)."""
        from sr3d_plugin.modeling.projectors import downsample_rate

        if self.image_seq_length:
            return int(self.image_seq_length)
        side = self.grid_size
        k = downsample_rate(self.projector_type)
        return (-(-side // k)) ** 2

    def get_text_config(self, *args: Any, **kwargs: Any) -> PreTrainedConfig:
        return self.text_config


# importing this module registers ``sr3d`` with AutoConfig (sr3d_plugin._compat explains when that happens;
# the model and processor classes are registered by sr3d_plugin.modeling.registration)
AutoConfig.register("sr3d", SR3DConfig, exist_ok=True)
