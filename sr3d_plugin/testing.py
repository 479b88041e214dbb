"""Tiny models built from configs: a local BPE tokenizer, a tiny SigLIP tower and a tiny Qwen2.

Used by the tests, the from-scratch training recipe and the embedded demo. Nothing here touches the
network: the tokenizer is trained with ``tokenizers`` on a built-in corpus, weights are random.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sr3d_plugin.modeling.configuration_sr3d import SR3D_SPECIAL_TOKENS

__all__ = [
    "CHATML_TEMPLATE",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "tiny_image_processor",
    "tiny_sr3d_config",
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


def build_tiny_tokenizer(save_dir: str | Path | None = None, vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer with ChatML and the SR-3D special tokens (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
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
        additional_special_tokens=SPECIAL_TOKENS[4:],
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


def tiny_sr3d_config(
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
    """An :class:`SR3DConfig` with tiny SigLIP and Qwen2 sub-configs matching ``tokenizer``."""
    from sr3d_plugin.modeling.configuration_sr3d import SR3DConfig

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
    return SR3DConfig(**kwargs)


def build_tiny_model(seed: int = 0, **config_overrides: Any) -> tuple[Any, Any]:
    """``(model, processor)``: a random tiny SR-3D with a local tokenizer, ready for CPU tests."""
    import torch

    from sr3d_plugin.modeling.modeling_sr3d import SR3DForConditionalGeneration
    from sr3d_plugin.modeling.processing_sr3d import SR3DProcessor

    tokenizer = build_tiny_tokenizer()
    config = tiny_sr3d_config(tokenizer, **config_overrides)
    torch.manual_seed(seed)
    model = SR3DForConditionalGeneration(config).eval()
    processor = SR3DProcessor.from_model_config(config, tiny_image_processor(config.tile_size), tokenizer)
    return model, processor
