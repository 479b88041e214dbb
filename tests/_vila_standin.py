"""STAND-IN for the parts of VILA that ``sr3d_plugin.integrations.vila`` relies on — this is NOT VILA.

VILA (NVlabs/VILA, import package ``llava``) pins transformers 4.46 / torch 2.3 and cannot be installed
beside this project. This module reproduces only the interface and the semantics the integration
uses, as read from VILA's source (``git show HEAD:<file>`` of the NVlabs/VILA mirror):

* ``llava/model/llava_arch.py``:
  ``LlavaMetaModel.init_vlm`` (``self.encoders[name] = instantiate(config, parent=self)`` for ``image``
  and ``video``, a plain dict), ``get_vision_tower`` / ``get_mm_projector`` / ``encode_images``,
  ``save_pretrained`` (writes only ``llm/``, ``vision_tower/``, ``mm_projector/`` and the top config,
  filtering the state dict by the substrings ``llm``, ``vision_tower``, ``mm_projector``),
  ``resize_token_embeddings``; ``LlavaMetaForCausalLM._embed`` (text embeddings of all ids, media
  embeddings per media name via ``encoders[name](media[name], media_config[name])``, dummy handling,
  padding removal by ``attention_mask``, the fusion loop that replaces each media token by the next
  embedding of its media name, the "all consumed" check, re-padding on ``tokenizer.padding_side``).
* ``llava/model/language_model/builder.py``: ``tokenizer.media_tokens = MEDIA_TOKENS`` (the module
  constant itself) and ``tokenizer.media_token_ids`` filled with ``add_tokens``.
* ``llava/data/collate.py``: ``DataCollator`` gathers ``instance[name]`` for every name in
  ``tokenizer.media_tokens``, checks object counts against token counts, and returns
  ``media_config = {"image": {"block_sizes": ...}, "video": {}}`` (a plain dict).
* ``llava/model/multimodal_encoder/vision_encoder.py``: ``VisionTower.feature_select`` (hidden state
  ``mm_vision_select_layer``; ``cls_patch`` keeps every token, ``patch`` drops the first).
* ``llava/model/encoders/image/basic.py``: ``BasicImageEncoder`` (``encode_images`` + end-token embedding).

Left out: dynamic_s2, PS3, sequence packing, sequence parallelism, multi-rank dummy gathering.
"""

from __future__ import annotations

import importlib
import json
from collections import defaultdict, deque
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

#: VILA's llava/constants.py MEDIA_TOKENS (the stand-in checks that the integration never mutates it)
MEDIA_TOKENS = {"image": "<image>", "video": "<vila/video>"}
IGNORE_INDEX = -100


def instantiate(config: dict[str, Any], **kwargs: Any) -> Any:
    """hydra.utils.instantiate for a flat ``{"_target_": "module.Class", ...}`` mapping."""
    config = dict(config)
    module, _, name = config.pop("_target_").rpartition(".")
    return getattr(importlib.import_module(module), name)(**config, **kwargs)


class VisionTowerStandIn(nn.Module):
    """VILA's ``VisionTower``: a transformers tower in ``.vision_tower`` + layer/feature selection."""

    def __init__(
        self, tower: nn.Module, image_processor: Any, select_layer: int = -2, select_feature: str = "cls_patch"
    ):
        super().__init__()
        self.vision_tower = tower
        self.image_processor = image_processor
        self.select_layer = select_layer
        self.select_feature = select_feature

    @property
    def hidden_size(self) -> int:
        return self.vision_tower.config.hidden_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        ref = next(self.vision_tower.parameters())
        out = self.vision_tower(images.to(device=ref.device, dtype=ref.dtype), output_hidden_states=True)
        feats = out.hidden_states[self.select_layer]
        if self.select_feature == "patch":
            feats = feats[:, 1:]
        return feats.to(images.dtype)


class BasicEncoderStandIn(nn.Module):
    """VILA's ``BasicImageEncoder`` / ``BasicVideoEncoder`` essentials: ``encode_images`` + end tokens."""

    def __init__(self, parent: nn.Module, start_tokens: str | None = None, end_tokens: str | None = "\n") -> None:
        super().__init__()
        self._parent = [parent]
        self.start_tokens = start_tokens
        self.end_tokens = end_tokens

    def forward(self, images: list[torch.Tensor], config: dict[str, Any]) -> list[torch.Tensor]:
        parent = self._parent[0]
        feats = parent.encode_images(torch.stack(images, dim=0))
        end = None
        if self.end_tokens is not None:
            ids = torch.tensor(parent.tokenizer(self.end_tokens).input_ids)
            end = parent.llm.model.embed_tokens(ids)
        return [torch.cat([f, end]) if end is not None else f for f in feats]


class VILAStandIn(nn.Module):
    """The VILA model surface used by the integration (``llm``, ``tokenizer``, towers, encoders, ``_embed``)."""

    def __init__(
        self, config: SimpleNamespace, llm: nn.Module, tokenizer: Any, vision_tower: nn.Module, projector: nn.Module
    ):
        super().__init__()
        self.config = config
        self.llm = llm
        self.tokenizer = tokenizer
        self.vision_tower = vision_tower
        self.mm_projector = projector
        tokenizer.media_tokens = MEDIA_TOKENS
        tokenizer.media_token_ids = {}
        for name, token in MEDIA_TOKENS.items():
            tokenizer.add_tokens([token], special_tokens=True)
            tokenizer.media_token_ids[name] = tokenizer.convert_tokens_to_ids(token)
        self.encoders = {}
        for name in ["image", "video"]:
            cfg = getattr(self.config, f"{name}_encoder")
            if isinstance(cfg, str):
                cfg = json.loads(cfg)
            self.encoders[name] = instantiate(cfg, parent=self)

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    def get_vision_tower(self) -> nn.Module:
        return self.vision_tower

    def get_mm_projector(self) -> nn.Module:
        return self.mm_projector

    def encode_images(self, images: torch.Tensor, block_sizes: Any = None) -> torch.Tensor:
        return self.get_mm_projector()(self.get_vision_tower()(images))

    def resize_token_embeddings(self, size: int) -> None:
        self.llm.resize_token_embeddings(size)

    # -- VILA's LlavaMetaForCausalLM._embed, same semantics -----------------------------------------

    def _embed_media_tokens(self, media: dict[str, list], media_config: dict[str, dict]) -> dict[str, deque]:
        embeds: dict[str, deque] = defaultdict(deque)
        for name in media:
            if self.training and not media.get(name):
                continue  # VILA: no object of this type on any rank → the encoder is not called
            embeds[name] = deque(self.encoders[name](media[name], media_config[name]))
        return embeds

    def _embed(self, input_ids, media, media_config, labels, attention_mask):
        labels = labels if labels is not None else torch.full_like(input_ids, IGNORE_INDEX)
        attention_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        text_embeds = self.llm.model.embed_tokens(input_ids)
        media_embeds = self._embed_media_tokens(media, media_config)
        while media_embeds.get("dummy"):
            text_embeds = text_embeds + torch.sum(media_embeds["dummy"].popleft()) * 0
        batch_size = labels.shape[0]
        text_embeds = [text_embeds[k][attention_mask[k]] for k in range(batch_size)]
        labels = [labels[k][attention_mask[k]] for k in range(batch_size)]
        media_tokens = {token_id: name for name, token_id in self.tokenizer.media_token_ids.items()}
        ids = [input_ids[k][attention_mask[k]] for k in range(batch_size)]
        inputs_m, labels_m = [], []
        for k in range(batch_size):
            parts, part_labels, pos = [], [], 0
            while pos < len(labels[k]):
                if ids[k][pos].item() in media_tokens:
                    end = pos + 1
                    piece = media_embeds[media_tokens[ids[k][pos].item()]].popleft()
                    label = torch.full([piece.shape[0]], IGNORE_INDEX, dtype=labels[k].dtype)
                else:
                    end = pos
                    while end < len(labels[k]) and ids[k][end].item() not in media_tokens:
                        end += 1
                    piece, label = text_embeds[k][pos:end], labels[k][pos:end]
                parts.append(piece)
                part_labels.append(label)
                pos = end
            inputs_m.append(torch.cat(parts))
            labels_m.append(torch.cat(part_labels))
        for name in media_embeds:
            if media_embeds[name]:
                raise ValueError(f"Not all {name} embeddings are consumed!")
        width = max(x.shape[0] for x in inputs_m)
        hidden = inputs_m[0].shape[1]
        mask = torch.ones((batch_size, width), dtype=torch.bool)
        padded, padded_labels = [], []
        for k in range(batch_size):
            n = width - inputs_m[k].shape[0]
            zeros = torch.zeros((n, hidden), dtype=inputs_m[k].dtype)
            ignore = torch.full((n,), IGNORE_INDEX, dtype=labels_m[k].dtype)
            if self.tokenizer.padding_side == "right":
                mask[k, inputs_m[k].shape[0] :] = False
                padded.append(torch.cat([inputs_m[k], zeros]))
                padded_labels.append(torch.cat([labels_m[k], ignore]))
            else:
                mask[k, :n] = False
                padded.append(torch.cat([zeros, inputs_m[k]]))
                padded_labels.append(torch.cat([ignore, labels_m[k]]))
        return torch.stack(padded), torch.stack(padded_labels), mask

    def forward(self, input_ids, media=None, media_config=None, labels=None, attention_mask=None):
        if media_config is None:
            media_config = defaultdict(dict)
        inputs_embeds, labels, attention_mask = self._embed(input_ids, media, media_config, labels, attention_mask)
        return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels)

    # -- VILA's save_pretrained: llm/, vision_tower/, mm_projector/ and the top config only ----------

    def save_pretrained(self, output_dir, state_dict=None):
        from safetensors.torch import save_file

        out = Path(output_dir)
        if state_dict is None:
            state_dict = self.state_dict()
        self.tokenizer.save_pretrained(str(out / "llm"))
        llm_state = {k.split("llm.")[-1]: v for k, v in state_dict.items() if "llm" in k}
        self.llm.save_pretrained(str(out / "llm"), state_dict=llm_state)
        tower_state = {
            k.split("vision_tower.vision_tower.")[-1]: v for k, v in state_dict.items() if "vision_tower" in k
        }
        self.vision_tower.vision_tower.save_pretrained(str(out / "vision_tower"), state_dict=tower_state)
        self.vision_tower.image_processor.save_pretrained(str(out / "vision_tower"))
        proj_state = {
            k.split("mm_projector.")[-1]: v.contiguous() for k, v in state_dict.items() if "mm_projector" in k
        }
        (out / "mm_projector").mkdir(parents=True, exist_ok=True)
        (out / "mm_projector" / "config.json").write_text(
            json.dumps({"model_type": "v2l_projector", "mm_projector_type": self.config.mm_projector})
        )
        save_file(proj_state, str(out / "mm_projector" / "model.safetensors"))
        top = {k: v for k, v in vars(self.config).items() if not k.startswith("_")}
        top.update({"model_type": "llava_llama", "architectures": ["LlavaLlamaModel"]})
        (out / "config.json").write_text(json.dumps(top, indent=2, default=str))


def collate(instances: list[dict[str, Any]], tokenizer: Any) -> dict[str, Any]:
    """VILA's ``DataCollator`` essentials: media per name in ``tokenizer.media_tokens``, count checks, padding."""
    media: dict[str, list] = {name: [] for name in tokenizer.media_tokens}
    for inst in instances:
        for name in media:
            objs = inst.get(name) or []
            expected = int((inst["input_ids"] == tokenizer.media_token_ids[name]).sum())
            if len(objs) != expected:
                raise ValueError(f"There are {expected} {name} tokens but {len(objs)} {name} objects.")
            media[name].extend(objs)
    input_ids = torch.nn.utils.rnn.pad_sequence(
        [i["input_ids"] for i in instances], batch_first=True, padding_value=tokenizer.pad_token_id
    )
    labels = torch.nn.utils.rnn.pad_sequence(
        [i["labels"] for i in instances], batch_first=True, padding_value=IGNORE_INDEX
    )
    return {
        "input_ids": input_ids,
        "media": media,
        "media_config": {"image": {"block_sizes": [None] * len(media["image"])}, "video": {}},
        "labels": labels,
        "attention_mask": input_ids.ne(tokenizer.pad_token_id),
    }


def build_standin(model: nn.Module, processor: Any, root: str | None = None, **encoder_kwargs: Any) -> VILAStandIn:
    """A stand-in VILA model sharing the LLM, vision tower and projector of an SR3D ``model``.

    Its image encoder is ``sr3d_plugin.integrations.vila.SR3DImageEncoder`` (selected by ``_target_``,
    as a VILA config would), so PE and region extractor are created (or loaded from ``root``) by it.
    """
    cfg = model.config
    encoder = {"_target_": "sr3d_plugin.integrations.vila.SR3DImageEncoder", **encoder_kwargs}
    config = SimpleNamespace(
        hidden_size=cfg.llm_hidden_size,
        mm_hidden_size=cfg.vision_hidden_size,
        mm_projector=cfg.projector_type,
        mm_vision_select_layer=cfg.vision_feature_layer,
        mm_vision_select_feature=cfg.vision_feature_select,
        image_aspect_ratio=cfg.image_aspect_ratio,
        min_tiles=cfg.min_tiles,
        max_tiles=cfg.max_tiles,
        model_dtype="torch.float32",
        image_encoder=json.dumps(encoder),
        video_encoder=json.dumps({"_target_": "_vila_standin.BasicEncoderStandIn"}),
        _name_or_path=root or "",
    )
    tower = VisionTowerStandIn(model.vision_tower, processor.image_processor, cfg.vision_feature_layer, "cls_patch")
    return VILAStandIn(config, model.llm, processor.tokenizer, tower, model.mm_projector)


def build_standin_from_parts(seed: int = 0, root: str | None = None, **encoder_kwargs: Any) -> VILAStandIn:
    """A stand-in VILA model from plain transformers parts (any transformers ≥ 4.46, no SR-3D model class).

    Qwen2 LLM + SigLIP tower + ``mlp_downsample_3x3_fix`` projector, tiny and random (``seed``), like the
    folders a VILA user trains from; the image encoder is selected by ``_target_`` as in a VILA config.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    from sr3d_plugin.modeling.projectors import build_projector
    from sr3d_plugin.testing import _tiny_text_config, _tiny_vision_config, build_tiny_tokenizer, tiny_image_processor

    tokenizer = build_tiny_tokenizer()
    text_config = _tiny_text_config("qwen2", tokenizer)
    vision_config = _tiny_vision_config("siglip_vision_model", 56)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        llm = AutoModelForCausalLM.from_config(text_config)
        tower = AutoModel.from_config(vision_config)
        projector = build_projector("mlp_downsample_3x3_fix", vision_config.hidden_size, text_config.hidden_size)
    encoder = {"_target_": "sr3d_plugin.integrations.vila.SR3DImageEncoder", **encoder_kwargs}
    config = SimpleNamespace(
        hidden_size=text_config.hidden_size,
        mm_hidden_size=vision_config.hidden_size,
        mm_projector="mlp_downsample_3x3_fix",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="cls_patch",
        image_aspect_ratio="dynamic",
        min_tiles=1,
        max_tiles=6,
        model_dtype="torch.float32",
        image_encoder=json.dumps(encoder),
        video_encoder=json.dumps({"_target_": "_vila_standin.BasicEncoderStandIn"}),
        _name_or_path=root or "",
    )
    vision = VisionTowerStandIn(tower, tiny_image_processor(56), -2, "cls_patch")
    return VILAStandIn(config, llm, tokenizer, vision, projector)


def image_tiles(image: Any, image_processor: Any, max_tiles: int = 6) -> torch.Tensor:
    """``[T, 3, S, S]`` tiles of one image as VILA's ``process_image(..., enable_dynamic_res=True)`` makes them.

    VILA's ``dynamic_preprocess`` picks the same grid as :func:`sr3d_plugin.tiling.plan_tiles` (the
    real-VILA conformance case checks the tile count); the crops come from the core tiler here.
    """
    from sr3d_plugin.tiling import plan_tiles, tile_image

    s = image_processor.size["height"]
    layout = plan_tiles(*image.size, 1, max_tiles, s, True)
    crops = tile_image(image.convert("RGB"), layout)
    return image_processor(images=crops, return_tensors="pt")["pixel_values"]
