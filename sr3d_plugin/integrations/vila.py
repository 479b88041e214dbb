"""SR-3D inside a VILA model: a config-selected image encoder plus ``<mask>`` region tokens.

VILA (NVlabs/VILA, import package ``llava``) builds its media encoders from the model config:
``image_encoder: {"_target_": "...", ...}`` is instantiated with ``parent=<the VILA model>``
(``llava/model/llava_arch.py::LlavaMetaModel.init_vlm``). Selecting :class:`SR3DImageEncoder` there
gives a VILA model the SR-3D vision path (SR3D-FACTS §2, §6)::

    "image_encoder": {"_target_": "sr3d_plugin.integrations.vila.SR3DImageEncoder"}

What the encoder does, and the VILA seams it uses (read from VILA's source, not guessed):

* **Tiles → features with 3D PE.** VILA's ``BasicImageEncoder.forward`` calls
  ``parent.encode_images`` (vision tower then projector, no hook in between). This encoder instead
  calls ``parent.get_vision_tower()(tiles)`` (features of the selected layer, ``[T, L, C]``), adds
  ``parent.perception_encoder(xyz)`` and only then applies ``parent.get_mm_projector()``; like
  ``BasicImageEncoder`` it appends the embedding of ``end_tokens`` (``"\\n"``) to every tile, taken
  from ``parent.llm.model.embed_tokens``.
* **Modules are trained and saved.** VILA keeps encoders in a plain dict (not sub-modules), so the
  position encoder and region extractor are attached to the parent as ``parent.perception_encoder``
  and ``parent.region_extractor``: they appear in ``parent.parameters()`` / ``state_dict()`` (and in
  ``non_lora_trainables.bin`` under LoRA). VILA's ``save_pretrained`` writes only ``llm/``,
  ``vision_tower/`` and ``mm_projector/``; :func:`install` wraps the instance's ``save_pretrained`` to
  also write ``perception_encoder/`` and ``region_extractor/`` with the released key names
  (SR3D-FACTS §1), so the folder loads with ``sr3d_plugin``'s ``vila`` builder, and a VILA model built
  from such a folder loads them back (``weights_from="auto"``).
* **``<mask>`` as a media token.** VILA's ``_embed`` replaces each media token (``tokenizer.media_token_ids``)
  by the next embedding its encoder produced, and its ``DataCollator`` gathers ``instance[name]`` for
  every name in ``tokenizer.media_tokens`` and checks the counts. :func:`install` registers
  ``"mask": "<mask>"`` there (on copies of the dicts: VILA's ``tokenizer.media_tokens`` is its module
  constant ``MEDIA_TOKENS``), adds ``parent.encoders["mask"]`` (:class:`SR3DRegionEncoder`, one
  embedding per ``<mask>``), and wraps the instance's ``_embed`` (the least intrusive hook; VILA's own
  fusion loop, truncation and padding run unchanged). The wrapper (a) makes ``media_config`` a
  ``defaultdict(dict)`` (the collator only fills ``"image"`` and ``"video"``), (b) orders ``media`` so
  images are encoded before masks, and (c) records, from ``input_ids``, which tiles each ``<mask>``
  belongs to (its sample's ``<image>`` tokens; VILA puts one ``<image>`` per tile).

Side channel for 3D positions and masks (VILA's collator passes only ``block_sizes`` in
``media_config``): positions travel *inside the image tensors* — each tile is ``[6, S, S]``, the
normalised RGB followed by the canonical xyz of every pixel (:func:`pack_tiles`); the encoder area-pools
xyz onto the token grid exactly like :class:`~sr3d_plugin.modeling.SR3DProcessor` (and returns packed
per-patch values unchanged). Alternatively,
``media_config["image"]["tile_xyz"]`` (``[T, g, g, 3]``, all tiles of the batch in order) is honoured
for direct ``generate`` calls. Each region is one ``"mask"`` media object: a ``[T_k, h, w]`` mask
(or pooling weights) over the ``T_k`` tiles of its own sample, in tile order (zeros on tiles without
the region). :func:`to_vila_inputs` turns an ``SR3DProcessor`` batch into VILA's
``input_ids`` / ``media`` / ``media_config``.

Not supported (clear errors): ``dynamic_s2`` block sizes, PS3 top-down selection, sequence
parallelism (VILA then treats every media object as video), regions on ``<vila/video>`` media.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sr3d_plugin.errors import SR3DConfigError, SR3DInputError

logger = logging.getLogger("sr3d_plugin.integrations.vila")

__all__ = [
    "MASK_MEDIA",
    "SR3DImageEncoder",
    "SR3DRegionEncoder",
    "install",
    "pack_sample",
    "pack_tiles",
    "save_sr3d_parts",
    "to_vila_inputs",
]

#: media name under which ``<mask>`` is registered in the VILA tokenizer and encoders
MASK_MEDIA = "mask"


@dataclass
class _ForwardPass:
    """Per-``_embed`` state shared by the image and region encoders."""

    plan: list[tuple[int, int]] = field(default_factory=list)  # per <mask>: (first tile, number of tiles)
    features: torch.Tensor | None = None  # [T, L, C] PE-augmented tokens of the real (non-dummy) tiles


def _pool_positions(xyz: torch.Tensor, grid: int) -> torch.Tensor:
    """``[T, 3, S, S]`` per-pixel xyz → ``[T, g, g, 3]`` token positions (area average, SR3D-FACTS §2 step 3).

    Tiles packed by :func:`pack_tiles` hold one value per token patch; those values are returned
    exactly (an average of 196 equal floats is not always that float, and the PE's highest frequency,
    2⁷·π, turns a 1e-7 change of x into ~4e-5 in the encoding).
    """
    size = xyz.shape[-1]
    if size % grid == 0:
        step = size // grid
        corners = xyz[:, :, ::step, ::step]
        if torch.equal(corners.repeat_interleave(step, dim=2).repeat_interleave(step, dim=3), xyz):
            return corners.permute(0, 2, 3, 1)
    return F.adaptive_avg_pool2d(xyz, (grid, grid)).permute(0, 2, 3, 1)


def _embed_tokens(parent: Any) -> nn.Module:
    llm = parent.llm
    model = getattr(llm, "model", None)
    if model is not None and hasattr(model, "embed_tokens"):
        return model.embed_tokens
    return llm.get_input_embeddings()


def _root_folder(parent: Any) -> Path | None:
    config = getattr(parent, "config", None)
    for attr in ("_name_or_path", "resume_path"):
        value = getattr(config, attr, None)
        if isinstance(value, str) and len(value) >= 2 and Path(value).is_dir():
            return Path(value)
    return None


def _reference_param(parent: Any) -> torch.Tensor | None:
    projector = parent.get_mm_projector()
    return next(projector.parameters(), None) if projector is not None else None


class SR3DImageEncoder(nn.Module):
    """VILA image encoder with SR-3D's 3D positional encoding and region support.

    Instantiated by VILA as ``SR3DImageEncoder(parent=vila_model, **config_kwargs)``.

    Args:
        parent: the VILA model (kept in a list, as VILA's ``BaseEncoder`` does, so it is not a sub-module).
        start_tokens, end_tokens: text embedded before / after every tile (VILA default: None, ``"\\n"``).
        use_position_encoding: add the 3D PE (then every tile needs xyz).
        position_encoder: registered position-encoder name (``abs_mlp``).
        num_freqs, init_gain: PE frequencies (8) and xavier gain of a fresh PE (0.001).
        use_regions: register ``<mask>`` as a media token and attach the region extractor.
        region_extractor: registered region-extractor name (``regiongpt``).
        mask_token: the region token text.
        weights_from: ``"auto"`` (load ``perception_encoder/`` and ``region_extractor/`` from the folder the
            parent was loaded from, when present), a folder path, or None (always fresh).
    """

    def __init__(
        self,
        parent: nn.Module,
        start_tokens: str | None = None,
        end_tokens: str | None = "\n",
        use_position_encoding: bool = True,
        position_encoder: str = "abs_mlp",
        num_freqs: int = 8,
        init_gain: float = 0.001,
        use_regions: bool = True,
        region_extractor: str = "regiongpt",
        mask_token: str = "<mask>",
        weights_from: str | Path | None = "auto",
    ) -> None:
        super().__init__()
        self._parent = [parent]
        self.start_tokens = start_tokens
        self.end_tokens = end_tokens
        self.use_position_encoding = use_position_encoding
        self.use_regions = use_regions
        self.mask_token = mask_token
        self._pass: _ForwardPass | None = None
        install(
            parent,
            self,
            position_encoder=position_encoder,
            num_freqs=num_freqs,
            init_gain=init_gain,
            region_extractor=region_extractor,
            weights_from=weights_from,
        )

    @property
    def parent(self) -> nn.Module:
        return self._parent[0]

    # ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def forward_pass(self, plan: list[tuple[int, int]]) -> Iterator[_ForwardPass]:
        """Scope of one ``_embed`` call: the region plan and the features the image call leaves for the masks."""
        previous = self._pass
        self._pass = _ForwardPass(plan=list(plan))
        try:
            yield self._pass
        finally:
            self._pass = previous

    def embed_text(self, text: str | None) -> torch.Tensor | None:
        """``[n, H]`` LLM embeddings of ``text`` (None for None), as VILA's ``BasicImageEncoder.embed_tokens``."""
        if text is None:
            return None
        embed = _embed_tokens(self.parent)
        ids = self.parent.tokenizer(text, add_special_tokens=False).input_ids
        return embed(torch.tensor(ids, device=embed.weight.device, dtype=torch.long))

    def _grid_positions(self, xyz_pixels: torch.Tensor | None, config: dict[str, Any], tiles: int, grid: int) -> Any:
        given = config.get("tile_xyz") if config else None
        if given is not None:
            xyz = torch.cat(list(given)) if isinstance(given, (list, tuple)) else given
            if tuple(xyz.shape) != (tiles, grid, grid, 3):
                raise SR3DInputError(
                    f"media_config['image']['tile_xyz'] has shape {tuple(xyz.shape)}; expected "
                    f"({tiles}, {grid}, {grid}, 3) for {tiles} tile(s) on a {grid}×{grid} token grid"
                )
            return xyz
        if xyz_pixels is None:
            raise SR3DInputError(
                "this VILA model adds SR-3D 3D positional encodings but the image tiles carry no positions: pass "
                "[6, S, S] tiles (RGB + canonical xyz, see sr3d_plugin.integrations.vila.pack_tiles) or "
                "media_config['image']['tile_xyz'] (or set use_position_encoding=False in image_encoder)"
            )
        return _pool_positions(xyz_pixels.float(), grid)

    def forward(self, images: Sequence[torch.Tensor], config: dict[str, Any] | None = None, *args: Any, **kwargs: Any):
        """Encode tiles: ``images`` is a list of ``[3 | 6, S, S]`` tiles; returns one ``[N (+ end), H]`` tensor each."""
        if isinstance(config, (torch.Tensor, list, tuple)):
            raise SR3DConfigError(
                "SR3DImageEncoder is called as upstream VILA calls image encoders, encoder(images, config) with "
                f"config a dict; got a {type(config).__name__} (the SR-3D fork's encoder(images, xyzs, masks, config) "
                "call?). Pack xyz into [6, S, S] tiles (pack_sample / pack_tiles) and regions as media['mask']"
            )
        if kwargs.get("ps3") or (args and args[0] is True):
            raise SR3DConfigError("SR3DImageEncoder does not support VILA's PS3 top-down selection (ps3=True)")
        config = dict(config or {})
        block_sizes = config.get("block_sizes") or []
        if any(b is not None for b in block_sizes):
            raise SR3DConfigError(
                f"block_sizes={block_sizes!r}: VILA's dynamic_s2 multi-scale tiling is not supported by "
                "SR3DImageEncoder; use image_aspect_ratio 'dynamic' (one <image> per tile)"
            )
        parent = self.parent
        x = torch.stack(list(images), dim=0)
        if x.dim() != 4 or x.shape[1] not in (3, 6):
            raise SR3DInputError(
                f"image tiles have shape {tuple(x.shape[1:])}; expected [3, S, S] (RGB) or [6, S, S] (RGB + xyz)"
            )
        rgb, xyz_pixels = x[:, :3], (x[:, 3:6] if x.shape[1] == 6 else None)
        feats = parent.get_vision_tower()(rgb)
        tiles, length = feats.shape[:2]
        grid = math.isqrt(length)
        if grid * grid != length:
            raise SR3DInputError(f"the vision tower returned {length} tokens per tile; expected a square grid")
        pe_module = getattr(parent, "perception_encoder", None)
        if self.use_position_encoding and pe_module is not None:
            xyz = self._grid_positions(xyz_pixels, config, tiles, grid)
            ref = next(pe_module.parameters())
            pe = pe_module(xyz.reshape(tiles, -1, 3).to(device=ref.device, dtype=ref.dtype))
            feats = feats + pe.to(device=feats.device, dtype=feats.dtype)
        state = self._pass
        if state is not None and state.features is None:
            state.features = feats
        out = parent.get_mm_projector()(feats)
        region = getattr(parent, "region_extractor", None)
        if parent.training and region is not None and (state is None or not state.plan):
            # no region in this batch: 0·(a region embedding) keeps every parameter in the graph (SR3D-FACTS §6)
            out = out + region.dummy(feats).to(out.dtype)
        start, end = self.embed_text(self.start_tokens), self.embed_text(self.end_tokens)
        results = []
        for tile in out:
            pieces = [p for p in (start, tile, end) if p is not None]
            results.append(torch.cat([p.to(tile.dtype) for p in pieces], dim=0))
        return results


class SR3DRegionEncoder(nn.Module):
    """The ``"mask"`` media encoder: one region embedding ``[1, H]`` per ``<mask>`` (slice-then-stitch, §6).

    Each media object is a ``[T_k, h, w]`` mask (bool or float weights) over the ``T_k`` tiles of its
    sample; it is resized bilinearly to the token grid, normalised, and used to average the
    PE-augmented tokens that :class:`SR3DImageEncoder` produced in the same forward pass.
    """

    def __init__(self, parent: nn.Module, image_encoder: SR3DImageEncoder) -> None:
        super().__init__()
        self._parent = [parent]
        self._image_encoder = [image_encoder]
        self.end_tokens = None  # read by VILA's sequence-parallel branch

    @property
    def parent(self) -> nn.Module:
        return self._parent[0]

    def forward(self, masks: Sequence[torch.Tensor], config: dict[str, Any] | None = None, *args: Any, **kwargs: Any):
        from sr3d_plugin.modeling.region_extractor import mask_weights

        extractor = self.parent.region_extractor
        state = self._image_encoder[0]._pass
        if state is None or not state.plan:
            # VILA's training-time dummy call (another rank has regions): a zero-valued embedding in the graph
            ref = next(extractor.parameters())
            width = extractor.projector.in_features
            return [extractor.projector(torch.zeros(1, width, device=ref.device, dtype=ref.dtype)) * 0.0]
        if len(masks) != len(state.plan):
            raise SR3DInputError(f"{len(masks)} region mask(s) for {len(state.plan)} <mask> token(s); expected equal")
        feats = state.features
        if feats is None:
            raise SR3DInputError("<mask> tokens need image tiles in the same sample; no image was encoded")
        grid = math.isqrt(feats.shape[1])
        out = []
        for index, (mask, (first, count)) in enumerate(zip(masks, state.plan)):
            m = mask if mask.dim() == 3 else mask.unsqueeze(0)
            if m.shape[0] != count:
                raise SR3DInputError(
                    f"region {index} covers {m.shape[0]} tile(s) but its sample has {count} <image> tile(s); "
                    "expected one mask per tile of the sample, in order"
                )
            if first + count > feats.shape[0]:
                raise SR3DInputError(
                    f"region {index} refers to tiles {first}..{first + count - 1} but only {feats.shape[0]} were encoded"
                )
            if not bool((m != 0).any()):
                raise SR3DInputError(f"region {index} has an empty mask; expected at least one pixel set")
            weights = mask_weights(m.float().unsqueeze(1), grid).to(device=feats.device, dtype=feats.dtype)
            pooled = weights @ feats[first : first + count].reshape(-1, feats.shape[-1])  # [1, C]
            proj = extractor.projector
            out.append(proj(pooled.to(device=proj.weight.device, dtype=proj.weight.dtype)))
        return out


# ----------------------------------------------------------------------------------------------
# installation on a VILA model
# ----------------------------------------------------------------------------------------------


#: seed of the generator that initialises fresh SR-3D parts (see :func:`_initialise`)
FRESH_INIT_SEED = 0x5E3D


@torch.no_grad()
def _initialise(module: nn.Module, gain: float | None, seed: int = FRESH_INIT_SEED) -> None:
    """Initialise a fresh module with tensor methods only, from a fixed-seed generator.

    VILA builds models under transformers' ``no_init_weights``, which turns the ``torch.nn.init``
    functions into no-ops (parameters would keep uninitialised memory). Linear weights: xavier-uniform
    with ``gain`` (the PE convention, SR3D-FACTS §5) or, when ``gain`` is None, PyTorch's default
    ``U(±1/√fan_in)``; biases 0 (PE) or ``U(±1/√fan_in)``; LayerNorm 1 / 0.

    The generator is seeded with ``seed`` (not the global RNG), so every process creates the same
    fresh parts: VILA's LoRA path rebuilds the base model from ``model_base`` at load time and adds
    the saved LoRA deltas to it — VILA's ``find_all_linear_names`` puts adapters on these Linear
    layers too — which is only right if the fresh base is the one training started from.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))

    def draw(tensor: torch.Tensor, bound: float) -> None:
        values = torch.empty(tensor.shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen)
        tensor.copy_(values.to(device=tensor.device, dtype=tensor.dtype))

    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            fan_out, fan_in = sub.weight.shape
            if gain is not None:
                draw(sub.weight, gain * math.sqrt(6.0 / (fan_in + fan_out)))
                if sub.bias is not None:
                    sub.bias.zero_()
            else:
                bound = 1.0 / math.sqrt(fan_in)
                draw(sub.weight, bound)
                if sub.bias is not None:
                    draw(sub.bias, bound)
        elif isinstance(sub, nn.LayerNorm):
            if sub.weight is not None:
                sub.weight.fill_(1.0)
            if sub.bias is not None:
                sub.bias.zero_()


def _load_part(module: nn.Module, folder: Path) -> bool:
    from sr3d_plugin.builders._common import read_weights

    if not folder.is_dir():
        return False
    state = read_weights(folder)
    ref = next(module.parameters())
    module.load_state_dict({k: v.to(device=ref.device, dtype=ref.dtype) for k, v in state.items()}, strict=True)
    return True


def _region_plan(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_id: int, mask_id: int):
    """Per ``<mask>`` in batch order: (first tile index, tiles of its sample)."""
    plan: list[tuple[int, int]] = []
    offset = 0
    for k in range(input_ids.shape[0]):
        ids = input_ids[k] if attention_mask is None else input_ids[k][attention_mask[k].bool()]
        n_image = int((ids == image_id).sum())
        n_mask = int((ids == mask_id).sum())
        if n_mask and not n_image:
            raise SR3DInputError(f"sample {k} has {n_mask} <mask> token(s) but no <image> tile to pool from")
        plan.extend([(offset, n_image)] * n_mask)
        offset += n_image
    return plan


def install(
    parent: nn.Module,
    encoder: SR3DImageEncoder,
    position_encoder: str = "abs_mlp",
    num_freqs: int = 8,
    init_gain: float = 0.001,
    region_extractor: str = "regiongpt",
    weights_from: str | Path | None = "auto",
) -> None:
    """Attach SR-3D modules and hooks to a VILA model (idempotent; called by :class:`SR3DImageEncoder`).

    Adds ``parent.perception_encoder`` / ``parent.region_extractor`` (dtype and device of the projector),
    registers ``<mask>`` as the ``"mask"`` media token with :class:`SR3DRegionEncoder`, and wraps the
    instance's ``_embed`` and ``save_pretrained`` (see the module docstring).
    """
    from sr3d_plugin import plugins

    config = parent.config
    width = getattr(config, "mm_hidden_size", None) or getattr(parent.get_vision_tower(), "hidden_size", None)
    hidden = getattr(config, "hidden_size", None) or parent.llm.config.hidden_size
    if not width or not hidden:
        raise SR3DConfigError("cannot read mm_hidden_size / hidden_size from the VILA config; expected both")
    ref = _reference_param(parent)
    placement = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    root = _root_folder(parent) if weights_from == "auto" else (Path(weights_from) if weights_from else None)

    if encoder.use_position_encoding and getattr(parent, "perception_encoder", None) is None:
        pe = plugins.create("position_encoders", position_encoder, int(width), num_freqs=num_freqs, init_gain=init_gain)
        parent.perception_encoder = pe.to(**placement)
        if root is not None and _load_part(parent.perception_encoder, root / "perception_encoder"):
            logger.info("loaded perception_encoder from %s", root)
        else:
            _initialise(parent.perception_encoder, init_gain)
            logger.warning("SR-3D perception_encoder created fresh (xavier gain %s)", init_gain)
    if encoder.use_regions:
        if getattr(parent, "region_extractor", None) is None:
            extractor = plugins.create("region_extractors", region_extractor, int(width), int(hidden))
            parent.region_extractor = extractor.to(**placement)
            if root is not None and _load_part(parent.region_extractor, root / "region_extractor"):
                logger.info("loaded region_extractor from %s", root)
            else:
                _initialise(parent.region_extractor, None)
                logger.warning("SR-3D region_extractor created fresh")
        _register_mask_media(parent, encoder)
    _wrap_save(parent, position_encoder, region_extractor, num_freqs)


def _register_mask_media(parent: nn.Module, encoder: SR3DImageEncoder) -> None:
    tokenizer = parent.tokenizer
    token = encoder.mask_token
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token], special_tokens=True)
    mask_id = int(tokenizer.convert_tokens_to_ids(token))
    rows = _embed_tokens(parent).weight.shape[0]
    if mask_id >= rows:
        parent.resize_token_embeddings(len(tokenizer))
        logger.warning("added %s to the VILA tokenizer and resized the LLM embeddings to %d", token, len(tokenizer))
    # copies: VILA's tokenizer.media_tokens is its module-level MEDIA_TOKENS constant
    tokenizer.media_tokens = {**dict(getattr(tokenizer, "media_tokens", {}) or {}), MASK_MEDIA: token}
    tokenizer.media_token_ids = {**dict(getattr(tokenizer, "media_token_ids", {}) or {}), MASK_MEDIA: mask_id}
    parent.encoders[MASK_MEDIA] = SR3DRegionEncoder(parent, encoder)
    # plain attribute (not a registered sub-module): the encoder holds no parameters of its own
    parent.__dict__["_sr3d_image_encoder"] = encoder
    if getattr(parent, "_sr3d_embed_wrapped", False):
        return
    original = parent._embed

    @functools.wraps(original)
    def _embed(input_ids, media=None, media_config=None, labels=None, attention_mask=None, *args, **kwargs):
        media = dict(media or {})
        if MASK_MEDIA in media:  # images first: the region encoder pools their features
            media = {**{k: v for k, v in media.items() if k != MASK_MEDIA}, MASK_MEDIA: media[MASK_MEDIA]}
        config = defaultdict(dict)
        config.update(media_config or {})
        ids = parent.tokenizer.media_token_ids
        plan = _region_plan(input_ids, attention_mask, int(ids["image"]), int(ids[MASK_MEDIA]))
        given = len(media.get(MASK_MEDIA) or [])
        if given != len(plan):
            raise SR3DInputError(
                f"the batch has {len(plan)} <mask> token(s) but {given} region mask(s) in media['{MASK_MEDIA}']; "
                "expected one mask per <mask>, in order"
            )
        if not plan:
            media.pop(MASK_MEDIA, None)
        with parent._sr3d_image_encoder.forward_pass(plan):
            return original(input_ids, media, config, labels, attention_mask, *args, **kwargs)

    parent._embed = _embed
    parent._sr3d_embed_wrapped = True


def _wrap_save(parent: nn.Module, position_encoder: str, region_extractor: str, num_freqs: int) -> None:
    if getattr(parent, "_sr3d_save_wrapped", False):
        return
    original = parent.save_pretrained

    @functools.wraps(original)
    def save_pretrained(output_dir, *args, **kwargs):
        result = original(output_dir, *args, **kwargs)
        state_dict = kwargs.get("state_dict", args[0] if args else None)
        save_sr3d_parts(parent, output_dir, state_dict, position_encoder, region_extractor, num_freqs)
        return result

    parent.save_pretrained = save_pretrained
    parent._sr3d_save_wrapped = True


def save_sr3d_parts(
    parent: nn.Module,
    output_dir: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
    position_encoder: str = "abs_mlp",
    region_extractor: str = "regiongpt",
    num_freqs: int = 8,
) -> list[str]:
    """Write ``perception_encoder/`` and ``region_extractor/`` (config.json + model.safetensors) beside VILA's parts.

    Tensors come from ``state_dict`` when given (e.g. gathered under ZeRO-3; keys may carry wrapper
    prefixes such as ``base_model.model.``) or from the modules. Key names are the released ones
    (SR3D-FACTS §1). Returns the sub-folders written.
    """
    from safetensors.torch import save_file

    from sr3d_plugin.io_utils import atomic_path, atomic_write_json

    written = []
    out = Path(output_dir)
    settings = {
        "perception_encoder": {"pe_type": position_encoder, "num_freqs": num_freqs},
        "region_extractor": {"region_extractor_type": region_extractor},
    }
    for part, extra in settings.items():
        module = getattr(parent, part, None)
        if module is None:
            continue
        tensors: dict[str, torch.Tensor] = {}
        if state_dict is not None:
            marker = f"{part}."
            for key, value in state_dict.items():
                if key.startswith(marker) or f".{marker}" in key:
                    tensors[key[key.index(marker) + len(marker) :]] = value
        if not tensors:
            tensors = dict(module.state_dict())
        folder = out / part
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "config.json", {**extra, "hidden_size": int(next(module.parameters()).shape[-1])})
        with atomic_path(folder / "model.safetensors", suffix=".safetensors") as tmp:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"}
            )
        written.append(part)
    config = getattr(parent, "config", None)
    if config is not None and written:
        # record the parts in the top-level config VILA writes next (or already wrote)
        if "perception_encoder" in written:
            config.perception_encoder = position_encoder
        if "region_extractor" in written:
            config.region_extractor = region_extractor
        top = out / "config.json"
        if top.is_file():
            import json

            data = json.loads(top.read_text(encoding="utf-8"))
            data.update(
                {k: getattr(config, k) for k in ("perception_encoder", "region_extractor") if hasattr(config, k)}
            )
            atomic_write_json(top, data)
    return written


# ----------------------------------------------------------------------------------------------
# inputs in VILA's format
# ----------------------------------------------------------------------------------------------


def pack_tiles(pixel_values: torch.Tensor, tile_xyz: torch.Tensor) -> torch.Tensor:
    """``[T, 3, S, S]`` tiles + ``[T, g, g, 3]`` (or ``[T, S, S, 3]``) xyz → ``[T, 6, S, S]`` VILA image objects.

    A token-grid ``tile_xyz`` is repeated over each ``S/g × S/g`` patch, so the encoder's area pooling
    returns it exactly.
    """
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise SR3DInputError(f"pixel_values must be [T, 3, S, S], got {tuple(pixel_values.shape)}")
    t, _, s, _ = pixel_values.shape
    if tile_xyz.dim() != 4 or tile_xyz.shape[0] != t or tile_xyz.shape[-1] != 3:
        raise SR3DInputError(f"tile_xyz must be [{t}, g, g, 3] (or [{t}, S, S, 3]), got {tuple(tile_xyz.shape)}")
    g = tile_xyz.shape[1]
    if s % g:
        raise SR3DInputError(f"tile size {s} is not a multiple of the xyz grid {g}")
    xyz = tile_xyz.permute(0, 3, 1, 2)
    if g != s:
        xyz = xyz.repeat_interleave(s // g, dim=2).repeat_interleave(s // g, dim=3)
    return torch.cat([pixel_values, xyz.to(pixel_values.dtype)], dim=1)


def to_vila_inputs(batch: dict[str, Any], processor: Any) -> dict[str, Any]:
    """An :class:`~sr3d_plugin.modeling.SR3DProcessor` batch in VILA's format.

    Each tile's ``tokens_per_tile`` placeholders + end-of-tile ids become one ``<image>`` id (VILA's
    encoder re-creates them); tiles (with xyz, see :func:`pack_tiles`) go to ``media["image"]`` and each
    region's pooling weights over its sample's tiles (``[T_k, g, g]``) to ``media["mask"]``.

    Returns:
        ``input_ids [B, L']``, ``attention_mask [B, L']`` (padding on the processor's side), ``media``,
        ``media_config``.
    """
    image_id = processor.image_token_id
    n = processor.tokens_per_tile
    end_ids = processor._end_ids()
    block = [image_id] * n + end_ids
    rows: list[list[int]] = []
    for ids, keep in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        ids = [tok for tok, k in zip(ids, keep) if k]
        out, i = [], 0
        while i < len(ids):
            if ids[i] == image_id:
                if ids[i : i + len(block)] != block:
                    raise SR3DInputError("input_ids do not hold complete tile blocks; build them with SR3DProcessor")
                out.append(image_id)
                i += len(block)
            else:
                out.append(ids[i])
                i += 1
        rows.append(out)
    pad = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else 0
    width = max(len(r) for r in rows)
    left = getattr(processor.tokenizer, "padding_side", "right") == "left"
    input_ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        input_ids[b, sl] = torch.tensor(r, dtype=torch.long)
        attention[b, sl] = True
    media: dict[str, list[torch.Tensor]] = {"image": [], MASK_MEDIA: []}
    if "pixel_values" in batch:
        pv = batch["pixel_values"]
        tiles = pack_tiles(pv, batch["tile_xyz"]) if "tile_xyz" in batch else pv
        media["image"] = list(tiles)
    weights = batch.get("region_weights")
    if weights is not None and weights.shape[0]:
        counts = batch["num_tiles"].tolist()
        starts = [sum(counts[:k]) for k in range(len(counts))]
        mask_id = processor.mask_token_id
        owners = [b for b, r in enumerate(rows) for tok in r if tok == mask_id]
        g = processor.grid_size
        for r, b in enumerate(owners):
            media[MASK_MEDIA].append(weights[r, starts[b] : starts[b] + counts[b]].reshape(counts[b], g, g))
    config = {"image": {"block_sizes": [None] * len(media["image"])}, "video": {}}
    return {"input_ids": input_ids, "attention_mask": attention, "media": media, "media_config": config}


def pack_sample(
    pixel_tiles: torch.Tensor,
    points: torch.Tensor | Any,
    regions: Sequence[Any] = (),
    *,
    image_size: tuple[int, int] | None = None,
    min_tiles: int = 1,
    max_tiles: int = 12,
    use_thumbnail: bool = True,
    grid: int | None = None,
    valid: torch.Tensor | Any | None = None,
    multi_view: bool = False,
    keep_thin_regions: bool = False,
) -> dict[str, list[torch.Tensor]]:
    """One training / inference sample in VILA's media format, with the core only (no transformers 5).

    Inside a VILA environment :class:`~sr3d_plugin.modeling.SR3DProcessor` is not available
    (transformers 4.46); this packs what VILA's own data code produced — the RGB tiles of
    ``llava.mm_utils.process_image(..., enable_dynamic_res=True)`` (single image) or one resized tile
    per frame (multi-view) — with SR-3D's 3D positions and region masks, computed exactly as the
    processor does (same tiling, same area pooling, thumbnail last).

    Args:
        pixel_tiles: ``[T, 3, S, S]`` normalised RGB tiles, in VILA's order.
        points: ``[H, W, 3]`` canonical point map of the image (``[F, H, W, 3]`` with ``multi_view``).
        regions: :class:`~sr3d_plugin.modeling.Region` objects, in ``<mask>`` order.
        image_size: ``(width, height)`` of the original image (single image; needed to re-plan VILA's
            tile grid). Defaults to the point map's size.
        min_tiles, max_tiles, use_thumbnail: VILA's ``min_tiles`` / ``max_tiles`` (and thumbnail) settings.
        grid: vision tokens per tile side (``S // patch``); defaults to ``S // 14``.
        valid: optional ``[H, W]`` (``[F, H, W]``) validity of ``points``.
        multi_view: frames of one scene, one tile each.
        keep_thin_regions: a region that nearest-neighbour tiling loses entirely falls back to area
            weights (the processor's option of the same name; off as in SR-REAL, where such a region would
            pool nothing — here it is an error instead, so training data never carries an empty region).

    Returns:
        ``{"image": [T × [6, S, S]], "mask": [R × [T, S, S] bool]}`` — the ``instance["image"]`` /
        ``instance["mask"]`` lists VILA's collator gathers.
    """
    from sr3d_plugin.pointmap import frame_token_positions, image_token_positions
    from sr3d_plugin.tiling import frame_layout, plan_tiles, tile_array, tile_mask

    if pixel_tiles.dim() != 4 or pixel_tiles.shape[1] != 3 or pixel_tiles.shape[2] != pixel_tiles.shape[3]:
        raise SR3DInputError(f"pixel_tiles must be [T, 3, S, S], got {tuple(pixel_tiles.shape)}")
    t, _, s, _ = pixel_tiles.shape
    g = int(grid) if grid else s // 14
    pts = torch.as_tensor(points, dtype=torch.float32)
    mask_valid = None if valid is None else torch.as_tensor(valid, dtype=torch.bool)
    if multi_view:
        if pts.dim() != 4 or pts.shape[0] != t:
            raise SR3DInputError(
                f"multi-view points must be [{t}, H, W, 3] (one map per frame), got {tuple(pts.shape)}"
            )
        layouts = [frame_layout(s) for _ in range(t)]
        xyz = frame_token_positions(pts, mask_valid, grid=g, tile_size=s)
    else:
        if pts.dim() != 3 or pts.shape[-1] != 3:
            raise SR3DInputError(f"points must be [H, W, 3] for one image, got {tuple(pts.shape)}")
        width, height = image_size if image_size is not None else (int(pts.shape[1]), int(pts.shape[0]))
        layout = plan_tiles(int(width), int(height), min_tiles, max_tiles, s, use_thumbnail)
        if layout.num_tiles != t:
            raise SR3DInputError(
                f"{t} RGB tile(s) but a {width}×{height} image makes {layout.num_tiles} tile(s) with "
                f"min_tiles={min_tiles}, max_tiles={max_tiles}; pass VILA's own settings (and image_size)"
            )
        layouts = [layout]
        xyz = image_token_positions(pts, layout, grid=g, valid=mask_valid)
    masks = []
    for index, region in enumerate(regions):
        per_view = []
        for v, lay in enumerate(layouts):
            m = region.masks.get(v)
            if m is None:
                per_view.append(torch.zeros(lay.num_tiles, s, s, dtype=torch.bool))
                continue
            tiled = tile_mask(m, lay)  # OpenCV INTER_NEAREST, as the processor
            if keep_thin_regions and not bool(tiled.any()):  # option: keep it with area resizing
                tiled = tile_array(torch.as_tensor(m, dtype=torch.float32)[None], lay, "area")[:, 0] > 0
            per_view.append(tiled)
        stacked = torch.cat(per_view, dim=0)
        if not bool(stacked.any()):
            raise SR3DInputError(
                f"region {index} covers no pixel of any tile after nearest-neighbour tiling; enlarge it or pass "
                "keep_thin_regions=True to keep it with area weights"
            )
        masks.append(stacked)
    return {"image": list(pack_tiles(pixel_tiles, xyz)), MASK_MEDIA: masks}
