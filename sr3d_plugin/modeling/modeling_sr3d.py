"""``SR3DForConditionalGeneration``: any vision tower + 3D PE + projector + region extractor + any causal LLM.

Data flow for one batch (SR3D-FACTS §2, §6)::

    pixel_values [T, 3, S, S] ── vision tower (layer −2) ── feats [T, L, C]
    tile_xyz [T, g, g, 3] ── PositionEncoder3D ── + feats            (PE added before the projector)
    feats ── projector ── [T, N, H] ── scattered at <image> placeholder ids
    region_weights [R, T, L] · feats ── region projector ── [R, H] ── scattered at <mask> ids
    inputs_embeds ── LLM ── logits

The processor (:class:`~sr3d_plugin.modeling.SR3DProcessor`) expands every tile into ``N``
placeholder ids (plus the VILA end-of-tile ids), so ``input_ids`` and ``inputs_embeds`` have the
same length and ``generate`` works on stock transformers.
"""

from __future__ import annotations

import sr3d_plugin._model_layer  # noqa: F401  (first, raises SR3DDependencyError on transformers < 5)

# isort: split
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from sr3d_plugin import plugins
from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.modeling.configuration_sr3d import SR3DConfig
from sr3d_plugin.modeling.position_encoding import PositionEncoder3D

__all__ = [
    "SR3DCausalLMOutput",
    "SR3DForConditionalGeneration",
    "SR3DPreTrainedModel",
    "SR3DVisualFeatures",
    "label_position_loss",
    "tower_hidden_state",
]


#: vision towers whose ``hidden_states[k]`` is the output of ``encoder.layers[k - 1]`` (k ≥ 1)
_EARLY_EXIT_TOWERS = ("siglip_vision_model", "clip_vision_model")


class _TowerExit(Exception):
    """Raised by the forward hook of the selected layer to skip the rest of the tower."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__("vision tower early exit")
        self.hidden = hidden


def _encoder_layers(tower: nn.Module) -> nn.ModuleList | None:
    for path in (("encoder", "layers"), ("vision_model", "encoder", "layers")):
        mod: Any = tower
        for part in path:
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.ModuleList):
            return mod
    return None


def _early_exit_layer(tower: nn.Module, feature_layer: int) -> nn.Module | None:
    """The encoder layer whose output is ``hidden_states[feature_layer]``, where stopping there is safe."""
    if getattr(getattr(tower, "config", None), "model_type", None) not in _EARLY_EXIT_TOWERS:
        return None
    if getattr(torch.compiler, "is_compiling", lambda: False)():  # torch.compile traces the plain call
        return None
    if tower._forward_hooks or getattr(tower, "_forward_hooks_with_kwargs", None):
        return None  # hooks on the tower expect its whole call to finish
    layers = _encoder_layers(tower)
    if layers is None or len(layers) == 0:
        return None
    index = feature_layer if feature_layer >= 0 else len(layers) + 1 + feature_layer
    if not 1 <= index <= len(layers):
        return None  # the embeddings (index 0) or an index the full call rejects
    for module in tower.modules():  # sharding engines rely on every module's post-forward hooks
        if type(module).__name__.startswith("FSDP") or hasattr(module, "_fsdp_wrapped_module"):
            return None
    if any(hasattr(p, "ds_id") for p in tower.parameters()):  # DeepSpeed ZeRO-3 partitions
        return None
    return layers[index - 1]


def tower_hidden_state(
    tower: nn.Module, pixel_values: torch.Tensor, feature_layer: int, early_exit: bool = True
) -> torch.Tensor:
    """``tower(pixel_values, output_hidden_states=True).hidden_states[feature_layer]`` — ``[T, L, C]``.

    With ``early_exit`` (SigLIP and CLIP towers without forward hooks of their own, outside FSDP /
    ZeRO-3 and torch.compile), the tower stops after the
    encoder layer that produces the selected hidden state: the layers after it, the post-layernorm
    and the pooling head are never run. The selected hidden state is computed by exactly the same
    operations, so the result is bit-identical (tests/test_vision_early_exit.py); with
    ``vision_feature_layer=-2`` this skips the last layer and the head (a 27-layer SO400M: ~5 % of
    the tower; the tiny demo model's 2-layer tower: more than half).
    """
    layer = _early_exit_layer(tower, int(feature_layer)) if early_exit else None
    if layer is None:
        out = tower(pixel_values, output_hidden_states=True, return_dict=True)
        return out.hidden_states[feature_layer]

    def stop(_module: nn.Module, _args: Any, output: Any) -> None:
        raise _TowerExit(output[0] if isinstance(output, (tuple, list)) else output)

    handle = layer.register_forward_hook(stop)
    try:
        tower(pixel_values, output_hidden_states=False, return_dict=True)
    except _TowerExit as done:
        return done.hidden
    finally:
        handle.remove()
    raise SR3DInputError(  # pragma: no cover - a tower that never ran its encoder layers
        f"the vision tower {type(tower).__name__} did not run its encoder layers; set vision_early_exit=False"
    )


@dataclass
class SR3DCausalLMOutput(ModelOutput):
    """Output of :meth:`SR3DForConditionalGeneration.forward` (the LLM's output plus vision extras)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    image_features: torch.Tensor | None = None
    region_embeddings: torch.Tensor | None = None


@dataclass
class SR3DVisualFeatures:
    """The question-independent visual part of a request, computed once by
    :meth:`SR3DForConditionalGeneration.encode_visual` and reusable by every question on the same
    frames (pass it as ``visual_features`` to ``forward`` / ``generate`` / ``build_inputs_embeds``
    instead of ``pixel_values`` / ``tile_xyz`` / ``image_sizes``).

    Attributes:
        features: ``[T, L, C]`` PE-augmented vision tokens (the region extractor pools these with each
            question's own ``region_weights``).
        embeddings: ``[M, H]`` projected (and, for anyres models, merged) image embeddings in
            placeholder order: what fills the prompt's ``M`` image placeholder ids.
        num_tiles: ``T``.
    """

    features: torch.Tensor
    embeddings: torch.Tensor

    @property
    def num_tiles(self) -> int:
        return int(self.features.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by the two tensors."""
        return sum(t.element_size() * t.nelement() for t in (self.features, self.embeddings))

    @classmethod
    def cat(cls, parts: list[SR3DVisualFeatures]) -> SR3DVisualFeatures:
        """The features of several requests in batch order (tiles and placeholders concatenated, as the
        processor lays out a batch)."""
        if not parts:
            raise SR3DInputError("SR3DVisualFeatures.cat needs at least one part")
        if len(parts) == 1:
            return parts[0]
        return cls(torch.cat([p.features for p in parts]), torch.cat([p.embeddings for p in parts]))


def label_position_loss(
    logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
) -> torch.Tensor:
    """Cross-entropy of logits computed only at supervised positions (the memory-saving training loss).

    Args:
        logits: ``[N, V]`` logits of the positions whose next-token label is not -100, row-major
            over ``[B, L]`` (``logits_to_keep`` with a boolean mask).
        targets: ``[N]`` the labels those positions predict.
        num_items_in_batch: token count to divide the summed loss by (gradient accumulation / DDP);
            None: mean over the ``N`` tokens — both exactly as transformers' ``ForCausalLMLoss``.

    Returns:
        Scalar loss (fp32), equal to the full-sequence loss.
    """
    if logits.numel() == 0:
        return logits.float().sum() * 0.0  # nothing supervised: a zero that keeps the graph
    logits = logits.reshape(-1, logits.shape[-1]).float()
    targets = targets.reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="mean")
    loss = nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


class SR3DPreTrainedModel(PreTrainedModel):
    config_class = SR3DConfig
    base_model_prefix = "sr3d"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["cache"]
    # The small SR-3D modules must stay whole (and in full precision under bitsandbytes).
    _no_split_modules = ["PositionEncoder3D", "Projector", "RegionExtractor"]

    def _init_weights(self, module: nn.Module) -> None:
        # transformers initialises leaves first and then skips parents whose parameters are done, so
        # the PE's xavier(gain) init is applied on its Linear layers, which carry their gain
        gain = getattr(module, "_sr3d_xavier_gain", None)
        if gain is not None and isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight, gain=gain)
            nn.init.zeros_(module.bias)
            return
        if isinstance(module, PositionEncoder3D):
            return
        super()._init_weights(module)


class SR3DForConditionalGeneration(SR3DPreTrainedModel):
    """SR-3D on stock transformers.

    Sub-modules (their state-dict prefixes match the released VILA folders, SR3D-FACTS §1):
    ``vision_tower`` (``vision_tower/``), ``mm_projector`` (``mm_projector/``), ``perception_encoder``
    (``perception_encoder/``), ``region_extractor`` (``region_extractor/``), ``llm`` (``llm/``).
    """

    def __init__(self, config: SR3DConfig) -> None:
        super().__init__(config)
        c, h = config.vision_hidden_size, config.llm_hidden_size
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.mm_projector = plugins.create("projectors", config.projector_type, c, h)
        self.perception_encoder = (
            plugins.create(
                "position_encoders",
                config.position_encoder_type,
                c,
                num_freqs=config.pe_num_freqs,
                init_gain=config.pe_init_gain,
            )
            if config.use_position_encoding
            else None
        )
        self.region_extractor = (
            plugins.create("region_extractors", config.region_extractor_type, c, h)
            if config.use_region_extractor
            else None
        )
        self.llm = AutoModelForCausalLM.from_config(config.text_config)
        # LLaVA-1.6 / NeXT: the learned embedding appended after every row of anyres patch features
        self.image_newline = nn.Parameter(torch.zeros(h)) if getattr(config, "use_image_newline", False) else None
        if config.image_seq_length is None:
            config.image_seq_length = self._infer_tokens_per_tile()
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any = None, *model_args: Any, **kwargs: Any) -> Any:
        """transformers' ``from_pretrained``; a local folder in a foreign layout (VILA / NVILA / SR-3D
        release, LLaVA) is loaded by its model builder instead (see :mod:`sr3d_plugin.builders`, which the
        package root registers in :mod:`sr3d_plugin.modeling._foreign`)."""
        from sr3d_plugin.modeling._foreign import load_foreign

        foreign = load_foreign(pretrained_model_name_or_path, model_args, kwargs)
        if foreign is not None:
            return foreign
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    # ------------------------------------------------------------------------------------------
    # plumbing expected by transformers / peft
    # ------------------------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.llm.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.llm.get_decoder()

    @property
    def generation_config(self):  # type: ignore[override]
        return self.llm.generation_config

    @generation_config.setter
    def generation_config(self, value) -> None:  # type: ignore[override]
        if "llm" in self._modules:
            self.llm.generation_config = value

    def can_generate(self) -> bool:  # type: ignore[override]
        return True

    def _infer_tokens_per_tile(self) -> int:
        grid = self.config.grid_size
        tokens = grid * grid
        if hasattr(self.mm_projector, "tokens_out"):
            return int(self.mm_projector.tokens_out(tokens))
        with torch.no_grad():
            probe = torch.zeros(1, tokens, self.config.vision_hidden_size)
            return int(self.mm_projector(probe).shape[1])

    # ------------------------------------------------------------------------------------------
    # vision path
    # ------------------------------------------------------------------------------------------

    def get_vision_features(self, pixel_values: torch.Tensor, tile_xyz: torch.Tensor | None = None) -> torch.Tensor:
        """PE-augmented vision tokens.

        Args:
            pixel_values: ``[T, 3, S, S]`` normalised tiles.
            tile_xyz: ``[T, g, g, 3]`` canonical positions of every token (required when the PE is on).

        Returns:
            ``[T, L, C]`` features from ``vision_feature_layer`` (+ PE), ``L = g²``.
        """
        tower_dtype = next(self.vision_tower.parameters()).dtype
        feats = tower_hidden_state(
            self.vision_tower,
            pixel_values.to(tower_dtype),
            self.config.vision_feature_layer,
            early_exit=getattr(self.config, "vision_early_exit", True),
        )
        if self.config.drops_cls_token:
            feats = feats[:, 1:]
        g = self.config.grid_size
        if feats.shape[1] != g * g:
            raise SR3DInputError(
                f"the vision tower produced {feats.shape[1]} tokens per tile; expected {g}×{g} = {g * g} for "
                f"tile size {self.config.tile_size} (check vision_feature_select={self.config.vision_feature_select!r})"
            )
        if self.perception_encoder is not None:
            if tile_xyz is None:
                raise SR3DInputError(
                    "this model adds 3D positional encodings but no 3D positions were given: pass depth, "
                    "point maps or a depth estimator to the processor (or use a model with use_position_encoding=False)"
                )
            xyz = tile_xyz.reshape(tile_xyz.shape[0], -1, 3)
            if tuple(xyz.shape[:2]) != tuple(feats.shape[:2]):
                raise SR3DInputError(
                    f"tile_xyz gives {tuple(xyz.shape[:2])} (tiles, tokens) but the vision tower produced "
                    f"{tuple(feats.shape[:2])}; the point maps must be tiled like the images"
                )
            pe_param = next(self.perception_encoder.parameters())
            pe = self.perception_encoder(xyz.to(device=pe_param.device, dtype=pe_param.dtype))
            feats = feats + pe.to(device=feats.device, dtype=feats.dtype)
        return feats

    def project_tiles(self, feats: torch.Tensor) -> torch.Tensor:
        """``[T, L, C]`` → ``[T, N, H]`` LLM embeddings of each tile."""
        param = next(self.mm_projector.parameters(), None)
        if param is not None:
            feats = feats.to(device=param.device, dtype=param.dtype)
        return self.mm_projector(feats)

    def region_embeddings(self, feats: torch.Tensor, region_weights: torch.Tensor) -> torch.Tensor:
        """``[R, T, L]`` pooling weights × ``[T, L, C]`` tokens → ``[R, H]`` region embeddings."""
        if self.region_extractor is None:
            raise SR3DInputError(
                "regions were given but this model has no region extractor (use_region_extractor=False)"
            )
        if tuple(region_weights.shape[1:]) != tuple(feats.shape[:2]):
            raise SR3DInputError(
                f"region weights cover {tuple(region_weights.shape[1:])} (tiles, tokens) but there are "
                f"{tuple(feats.shape[:2])} vision tokens; regions must be tiled like their images"
            )
        proj = self.region_extractor.projector
        pooled = torch.einsum("rtl,tlc->rc", region_weights.to(device=feats.device, dtype=feats.dtype), feats)
        return proj(pooled.to(device=proj.weight.device, dtype=proj.weight.dtype))

    def encode_visual(
        self,
        pixel_values: torch.Tensor,
        tile_xyz: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> SR3DVisualFeatures:
        """The question-independent visual work of a request: vision tower + 3D PE + projector (+ anyres merge).

        Args:
            pixel_values: ``[T, 3, S, S]`` normalised tiles (the processor's ``pixel_values``).
            tile_xyz: ``[T, g, g, 3]`` canonical token positions (required when the PE is on).
            image_sizes: ``[I, 2]`` (height, width) per image, for anyres models.

        Returns:
            :class:`SR3DVisualFeatures` (``features [T, L, C]``, ``embeddings [M, H]``), equal to what
            :meth:`build_inputs_embeds` computes from the same tensors; pass it as ``visual_features``.
            Gradients flow as usual; call it under ``torch.inference_mode()`` to keep it for reuse.
        """
        feats = self.get_vision_features(pixel_values, tile_xyz)
        merged = self.merge_image_tiles(self.project_tiles(feats), image_sizes)
        return SR3DVisualFeatures(feats, merged)

    # ------------------------------------------------------------------------------------------
    # embedding assembly
    # ------------------------------------------------------------------------------------------

    def _token_ids(self) -> tuple[int, int | None]:
        image_id = self.config.image_token_id
        if image_id is None:
            raise SR3DInputError(
                "config.image_token_id is not set; build the model with a builder or set it to the <image> id"
            )
        return int(image_id), (None if self.config.mask_token_id is None else int(self.config.mask_token_id))

    def merge_image_tiles(self, tiles: torch.Tensor, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """``[T, N, H]`` projected tiles → ``[M, H]`` image embeddings in placeholder order.

        ``mm_patch_merge_type="flat"`` concatenates the tiles. ``"spatial"`` / ``"spatial_unpad"``
        (LLaVA-1.6 / NeXT / OneVision anyres) merge each image's tiles (base + patches, their count
        given by ``image_sizes`` ``[I, 2]`` (height, width) and ``image_grid_pinpoints``) with
        :func:`~sr3d_plugin.modeling.llava_conventions.merge_anyres_features`.
        """
        cfg = self.config
        merge = getattr(cfg, "mm_patch_merge_type", "flat")
        if merge == "flat":
            return tiles.reshape(-1, tiles.shape[-1])
        from sr3d_plugin.modeling.llava_conventions import anyres_grid, merge_anyres_features

        if image_sizes is None:
            raise SR3DInputError(
                f"mm_patch_merge_type={merge!r} needs image_sizes [images, 2] (height, width); build inputs with SR3DProcessor"
            )
        out, offset, side = [], 0, cfg.grid_size
        for h, w in image_sizes.tolist():
            rows, cols = anyres_grid((int(w), int(h)), cfg.image_grid_pinpoints, cfg.tile_size)
            n = 1 + rows * cols
            part = tiles[offset : offset + n]
            offset += n
            out.append(
                merge_anyres_features(
                    part, (int(w), int(h)), (rows, cols), side, merge, self.image_newline,
                    cfg.unpad_rounding, cfg.anyres_max_patches,
                )
            )  # fmt: skip
        if offset != tiles.shape[0]:
            raise SR3DInputError(
                f"image_sizes describe {offset} anyres tiles but {tiles.shape[0]} tiles were given; expected equal"
            )
        return torch.cat(out, dim=0)

    def build_inputs_embeds(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        tile_xyz: torch.Tensor | None = None,
        region_weights: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        visual_features: SR3DVisualFeatures | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Text embeddings with tile and region embeddings scattered into their placeholders.

        ``image_sizes`` ``[I, 2]`` (height, width of each source image) is needed by anyres models
        (see :meth:`merge_image_tiles`). ``visual_features`` (from :meth:`encode_visual`, the batch's
        tiles in order) replaces ``pixel_values`` / ``tile_xyz`` / ``image_sizes``: the vision tower,
        PE and projector are then skipped and the region extractor pools the given features.

        Returns ``(inputs_embeds [B, L, H], vision features or None, region embeddings or None)``.
        """
        image_id, mask_id = self._token_ids()
        embed = self.get_input_embeddings()
        vocab = embed.weight.shape[0]
        is_image = input_ids == image_id
        is_mask = (input_ids == mask_id) if mask_id is not None else torch.zeros_like(is_image)
        safe_ids = input_ids.masked_fill((is_image | is_mask) & (input_ids >= vocab), 0)
        embeds = embed(safe_ids)
        feats = regions = None
        n_image_slots = int(is_image.sum())
        if visual_features is not None and pixel_values is not None:
            raise SR3DInputError("give either pixel_values or visual_features (from encode_visual), not both")
        if visual_features is not None or pixel_values is not None:
            if visual_features is None:
                assert pixel_values is not None
                visual_features = self.encode_visual(pixel_values, tile_xyz, image_sizes)
            feats, merged = visual_features.features, visual_features.embeddings
            if n_image_slots != merged.shape[0]:
                raise SR3DInputError(
                    f"the prompt has {n_image_slots} image placeholder tokens but {feats.shape[0]} tile(s) give "
                    f"{merged.shape[0]} image embeddings (merge "
                    f"{getattr(self.config, 'mm_patch_merge_type', 'flat')!r}); expected equal (build inputs with SR3DProcessor)"
                )
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1).to(embeds.device), merged.to(embeds.dtype))
        elif n_image_slots:
            raise SR3DInputError(
                f"the prompt has {n_image_slots} image placeholder tokens but no pixel_values (or visual_features)"
            )
        n_mask_slots = int(is_mask.sum())
        if region_weights is not None and region_weights.shape[0] > 0:
            if feats is None:
                raise SR3DInputError("region_weights were given without pixel_values (or visual_features)")
            regions = self.region_embeddings(feats, region_weights)
            if n_mask_slots != regions.shape[0]:
                raise SR3DInputError(
                    f"the prompt has {n_mask_slots} <mask> token(s) but {regions.shape[0]} region(s); expected one "
                    "<mask> per region"
                )
            embeds = embeds.masked_scatter(is_mask.unsqueeze(-1).to(embeds.device), regions.to(embeds.dtype))
        elif n_mask_slots:
            raise SR3DInputError(f"the prompt has {n_mask_slots} <mask> token(s) but no region was given")
        if self.training and feats is not None and regions is None and self.region_extractor is not None:
            # keep every parameter in the graph (DDP / ZeRO need gradients for all of them)
            embeds = embeds + self.region_extractor.dummy(feats).to(embeds.dtype)
        return embeds, feats, regions

    # ------------------------------------------------------------------------------------------
    # forward / generate
    # ------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        tile_xyz: torch.Tensor | None = None,
        region_weights: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        image_sizes: torch.Tensor | None = None,
        visual_features: SR3DVisualFeatures | None = None,
        **kwargs: Any,
    ) -> SR3DCausalLMOutput:
        """Teacher-forced forward pass. ``labels`` use -100 for ignored positions (prompt, images).

        With labels, in training mode (or with ``loss_on_label_positions=True`` as a keyword or config
        attribute), logits are computed only at positions whose next-token label is supervised; the
        loss is the same as the full computation (:func:`label_position_loss`) and ``logits`` is then
        ``[N, V]`` for those ``N`` positions (row-major over the batch) instead of ``[B, L, V]``.
        Pass ``loss_on_label_positions=False`` to get full logits while training.
        ``visual_features`` (:meth:`encode_visual`) replaces ``pixel_values`` / ``tile_xyz`` / ``image_sizes``.
        """
        feats = regions = None
        if inputs_embeds is None:
            if input_ids is None:
                raise SR3DInputError("pass input_ids (or inputs_embeds)")
            inputs_embeds, feats, regions = self.build_inputs_embeds(
                input_ids, pixel_values, tile_xyz, region_weights, image_sizes, visual_features
            )
        kwargs.pop("num_tiles", None)
        # --- memory-saving loss (training): logits only where a label is supervised ------------
        label_positions = kwargs.pop("loss_on_label_positions", None)
        if label_positions is None:
            label_positions = getattr(self.config, "loss_on_label_positions", None)
        if label_positions is None:
            label_positions = self.training
        if labels is not None and label_positions and self._llm_keeps_logit_positions():
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = labels[:, 1:] != -100  # position t predicts label t + 1
            num_items = kwargs.pop("num_items_in_batch", None)
            out = self.llm(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                logits_to_keep=keep.to(inputs_embeds.device),
                return_dict=True,
                **kwargs,
            )
            loss = label_position_loss(out.logits, labels[:, 1:][keep[:, :-1]], num_items)
        # ------------------------------------------------------------------------------------------
        else:
            out = self.llm(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                labels=labels,
                return_dict=True,
                **kwargs,
            )
            loss = out.get("loss")
        return SR3DCausalLMOutput(
            loss=loss,
            logits=out.get("logits"),
            cache=out.get("cache"),
            hidden_states=out.get("hidden_states"),
            attentions=out.get("attentions"),
            image_features=feats,
            region_embeddings=regions,
        )

    def _llm_keeps_logit_positions(self) -> bool:
        """Whether the LLM's forward takes ``logits_to_keep`` (boolean masks are understood since transformers 5)."""
        import inspect

        cached = getattr(self, "_keeps_logit_positions", None)
        if cached is None:
            cached = "logits_to_keep" in inspect.signature(type(self.llm).forward).parameters
            self._keeps_logit_positions = cached
        return cached

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        tile_xyz: torch.Tensor | None = None,
        region_weights: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        visual_features: SR3DVisualFeatures | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.LongTensor:
        """Generate with the LLM's own ``generate``.

        ``visual_features`` (:meth:`encode_visual`) replaces ``pixel_values`` / ``tile_xyz`` /
        ``image_sizes`` (the vision work of frames shared by several questions is done once).
        ``inputs_embeds`` ``[B, L, H]``: embeddings already assembled for ``input_ids``
        (:meth:`build_inputs_embeds`), used as they are (no visual arguments then). A transformers
        cache holding the KV of a shared prompt prefix can be passed as ``cache`` (``past_key_values``
        before transformers 5.2x): the LLM's ``generate`` then prefills only the rest (see
        :mod:`sr3d_plugin.scene_cache`).

        Returns ``[B, prompt + new]`` token ids, the prompt first, as for any decoder-only model
        (decode ``out[:, input_ids.shape[1]:]`` for the answer).
        """
        if input_ids is None:
            raise SR3DInputError("generate needs input_ids")
        if inputs_embeds is not None:
            if any(x is not None for x in (pixel_values, tile_xyz, region_weights, image_sizes, visual_features)):
                raise SR3DInputError("inputs_embeds are used as given; do not also pass visual inputs")
            if tuple(inputs_embeds.shape[:2]) != tuple(input_ids.shape):
                raise SR3DInputError(
                    f"inputs_embeds cover {tuple(inputs_embeds.shape[:2])} positions but input_ids are "
                    f"{tuple(input_ids.shape)}; expected the same [batch, length]"
                )
            embeds = inputs_embeds
        else:
            embeds, _, _ = self.build_inputs_embeds(
                input_ids, pixel_values, tile_xyz, region_weights, image_sizes, visual_features
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        for key in ("token_type_ids", "num_tiles", "labels"):
            generate_kwargs.pop(key, None)
        new_tokens = self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)
        prompt = input_ids.to(new_tokens.device)
        # placeholder ids may lie outside the vocabulary; keep them as they were given
        return torch.cat([prompt, new_tokens], dim=1)


# importing the model registers it with the Auto model classes (how that import happens: sr3d_plugin._compat)
for _auto in (AutoModel, AutoModelForImageTextToText, AutoModelForCausalLM):
    _auto.register(SR3DConfig, SR3DForConditionalGeneration, exist_ok=True)
