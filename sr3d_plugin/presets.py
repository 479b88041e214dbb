"""Model presets in one place (like timm's default configs): architectures, tiny configs, chat templates.

* :data:`PRESETS` — named architectures (``"sr3d-8b"``) → a callable returning an :class:`SR3DConfig`;
  ``"tiny"`` is built through the ``scratch`` builder (it needs a tokenizer), see :func:`tiny_scratch_spec`.
* tiny configs — :func:`build_tiny_tokenizer` (a local byte-level BPE tokenizer, trained with
  ``tokenizers`` on a built-in corpus), :func:`tiny_image_processor`, :func:`tiny_sr3d_config`,
  :func:`tiny_text_config` and :func:`tiny_vision_config` (tiny Qwen2/Llama and SigLIP/CLIP sub-configs).
* :data:`CHATML_TEMPLATE` — the chat template of Qwen2 / NVILA-Lite / SR-3D.

Nothing here touches the network or loads weights. Tiny folders in foreign layouts (fixtures for
tests) are written by :mod:`sr3d_plugin.testing`, which production code never imports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sr3d_plugin.modeling._names import SR3D_SPECIAL_TOKENS

__all__ = [
    "CHATML_TEMPLATE",
    "PRESETS",
    "SPECIAL_TOKENS",
    "build_tiny_tokenizer",
    "sr3d_8b_config",
    "tiny_config_fields",
    "tiny_image_processor",
    "tiny_scratch_spec",
    "tiny_sr3d_config",
    "tiny_text_config",
    "tiny_vision_config",
]

#: ChatML, the template of Qwen2 / NVILA-Lite / SR-3D
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "[PAD]",
    SR3D_SPECIAL_TOKENS["sentinel"],
    SR3D_SPECIAL_TOKENS["image"],
    SR3D_SPECIAL_TOKENS["video"],
    SR3D_SPECIAL_TOKENS["mask"],
]

_CORPUS = """
You are a helpful assistant. Which region is closer to the camera? Region [0] is closer. Region [1] is closer.
Is the chair to the left or to the right of the table? Left. Right. Above. Below. In front. Behind.
How far apart are the two regions? About 1 meter. Less than one meter. Between one and two meters.
More than three meters. Which one is larger? How many chairs are in the room? There are 2 chairs.
What color is the sofa? The sofa is red. green blue yellow white black gray brown orange purple pink.
Describe the object in the region. A wooden table next to the wall. A lamp on the floor. A bed in the corner.
chair table sofa bed cabinet desk shelf lamp box plant door window wall floor ceiling monitor counter sink
yes no zero one two three four five six seven eight nine ten eleven twelve 0 1 2 3 4 5 6 7 8 9 10 0.5 1.5 2.5
the a an of in on at to from with and or is are was were be it this that which what where how why who when
Answer the question using a single word or phrase. The answer is Region [2]. Region [3]. Region [4].
"""


def build_tiny_tokenizer(
    save_dir: str | Path | None = None, vocab_size: int = 512, without: tuple[str, ...] = ()
) -> Any:
    """A byte-level BPE tokenizer with ChatML and the SR-3D special tokens (deterministic).

    ``without`` leaves out some of the extra special tokens (e.g. ``("<mask>",)`` for a NVILA-Lite
    stand-in whose tokenizer has no ``<mask>``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [t for t in SPECIAL_TOKENS if t not in without or t in SPECIAL_TOKENS[:4]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="[PAD]",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=specials[4:],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "left"
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast


def tiny_image_processor(tile_size: int = 56) -> Any:
    """A SigLIP image processor (resize to ``tile_size``, mean/std 0.5)."""
    from transformers import SiglipImageProcessor

    return SiglipImageProcessor(
        size={"height": tile_size, "width": tile_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def tiny_config_fields(
    tokenizer: Any,
    tile_size: int = 56,
    patch_size: int = 14,
    vision_hidden: int = 32,
    llm_hidden: int = 64,
    llm_layers: int = 2,
    vision_layers: int = 2,
    projector_type: str = "mlp_downsample_3x3_fix",
    **overrides: Any,
) -> Any:
    """The :class:`SR3DConfig` fields of a tiny SigLIP + Qwen2 model matching ``tokenizer`` (a dict).

    Sizes: ``tile_size`` px tiles of ``patch_size`` px patches, a ``vision_hidden``-wide SigLIP of
    ``vision_layers`` layers, a ``llm_hidden``-wide Qwen2 of ``llm_layers`` layers; ``overrides`` are
    further SR3DConfig fields.
    """
    vocab = len(tokenizer)
    kwargs: dict[str, Any] = {
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": 2,
            "image_size": tile_size,
            "patch_size": patch_size,
        },
        "text_config": {
            "model_type": "qwen2",
            "vocab_size": vocab,
            "hidden_size": llm_hidden,
            "intermediate_size": 2 * llm_hidden,
            "num_hidden_layers": llm_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": False,
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": None,
        },
        "projector_type": projector_type,
        "tile_size": tile_size,
        "max_tiles": 6,
        "image_token_id": tokenizer.convert_tokens_to_ids(SR3D_SPECIAL_TOKENS["image"]),
        "mask_token_id": tokenizer.convert_tokens_to_ids(SR3D_SPECIAL_TOKENS["mask"]),
    }
    kwargs.update(overrides)
    return kwargs


def tiny_sr3d_config(tokenizer: Any, **fields: Any) -> Any:
    """An :class:`SR3DConfig` with tiny SigLIP and Qwen2 sub-configs matching ``tokenizer``
    (arguments as :func:`tiny_config_fields`)."""
    from sr3d_plugin.modeling.configuration_sr3d import SR3DConfig

    return SR3DConfig(**tiny_config_fields(tokenizer, **fields))


def tiny_scratch_spec(overrides: dict[str, Any] | None = None, seed: int = 0) -> dict[str, Any]:
    """The ``scratch`` builder's input for the ``tiny`` preset: tiny config fields + the tiny tokenizer.

    ``overrides`` are :func:`tiny_config_fields` arguments (sizes) or SR3DConfig fields; ``seed`` is
    the seed of the random initial weights. Build it with
    ``ScratchBuilder().build(spec)`` (model + processor) or ``ScratchBuilder().config(spec)`` (config only).
    """
    tokenizer = build_tiny_tokenizer()
    return {**tiny_config_fields(tokenizer, **dict(overrides or {})), "tokenizer": tokenizer, "seed": int(seed)}


def tiny_text_config(kind: str, tokenizer: Any, hidden: int = 64, layers: int = 2) -> Any:
    """A tiny transformers text config of ``kind`` (``"qwen2"``, ``"llama"``) sized to ``tokenizer``."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        kind,
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )


def tiny_vision_config(kind: str, tile_size: int = 56, hidden: int = 32, layers: int = 2) -> Any:
    """A tiny transformers vision config of ``kind`` (``"siglip_vision_model"``, ``"clip_vision_model"``), 14 px patches."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        kind,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=tile_size,
        patch_size=14,
    )


def sr3d_8b_config() -> Any:
    """SR-3D-8B / NVILA-Lite-8B (SR3D-FACTS §1): SigLIP-so400m-448 + Qwen2-7B (vocabulary as Qwen2-7B's)."""
    from sr3d_plugin.modeling.configuration_sr3d import SR3DConfig

    return SR3DConfig(
        text_config={
            "model_type": "qwen2",
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 32768,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": False,
        },
        max_tiles=12,
        image_token_id=151649,
        mask_token_id=151651,
    )


#: architecture presets: name → callable returning an SR3DConfig (``tiny`` needs a tokenizer and goes
#: through the ``scratch`` builder: :func:`tiny_scratch_spec`)
PRESETS: dict[str, Any] = {"sr3d-8b": sr3d_8b_config}
