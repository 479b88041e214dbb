"""Record conformance cases from transformers' own LLaVA family (llava, llava_next, llava_onevision).

Run in the project venv (transformers 5 ships these classes)::

    /work/main/.venv/bin/python conformance/llava_hf/record.py --out conformance/data

Per case: a tiny random model is built from a config with transformers' own class and saved with
``save_pretrained`` together with its own processor (tokenizer with ``<image>``, the model family's
image processor, chat template); the processor then turns a raw non-square image and a chat
conversation into inputs (``apply_chat_template`` + ``processor(images=, text=)``), and the model's
forward pass and greedy ``generate`` are recorded.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

_CORPUS_WORDS = (
    "the a an image photo picture shows show is are of in on at to left right top bottom red green blue "
    "yellow black white cat dog car tree house chair table person man woman sky road water small large "
    "what where how many which color there here near far behind front next one two three four five "
    "describe answer question user assistant system detail detailed helpful and with this that it its"
)
WORDS = _CORPUS_WORDS.split()

#: the chat template of the llava-hf LLaVA-1.5 / LLaVA-NeXT-vicuna processors (images first, then text)
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
#: a chatml template in the style of the llava-onevision-qwen2 processors
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer(folder: Path, extra: list[str]):
    """A Llama-style SentencePiece BPE tokenizer (trained here), loaded as transformers' LlamaTokenizer."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    rng = np.random.default_rng(0)
    lines = []
    for _ in range(3000):
        words = [WORDS[int(i)] for i in rng.integers(0, len(WORDS), int(rng.integers(3, 14)))]
        sent = " ".join(words)
        lines.append(sent.capitalize() + "?" if rng.random() < 0.3 else sent)
    lines.append("USER: ASSISTANT: <|im_start|> <|im_end|>")
    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / "_spm"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False, num_threads=1,
    )  # fmt: skip
    # transformers 5 converts a SentencePiece model when loading a folder that holds one
    sp_dir = folder / "_sp"
    sp_dir.mkdir()
    (prefix.parent / "_spm.model").rename(sp_dir / "tokenizer.model")
    (sp_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": False}))
    tok = LlamaTokenizer.from_pretrained(str(sp_dir))
    shutil.rmtree(sp_dir)
    for f in folder.glob("_spm.*"):
        f.unlink()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", *extra]})
    tok.pad_token = tok.unk_token
    return tok


def make_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), 128 + 60 * np.cos(y / 4.0)], -1)
    for _ in range(5):
        x0, y0 = int(rng.integers(0, width - 10)), int(rng.integers(0, height - 10))
        img[y0 : y0 + 11, x0 : x0 + 14] = rng.integers(0, 255, 3)
    img = img + rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

CASES = {
    "llava_hf_llava": {
        "kind": "llava", "image": (80, 50), "seed": 11, "question": "What is shown in this image?",
        "description": "transformers LlavaForConditionalGeneration + LlavaProcessor: CLIPImageProcessor "
        "(shortest-edge resize + centre crop), llava-1.5-hf chat template",
    },
    "llava_hf_llava_next": {
        "kind": "llava_next", "image": (60, 130), "seed": 12, "question": "Describe the image in detail.",
        "description": "transformers LlavaNextForConditionalGeneration + LlavaNextProcessor: any-resolution "
        "patches (select_best_resolution, resize + pad, base image), unpad + image_newline",
    },
    "llava_hf_llava_onevision": {
        "kind": "llava_onevision", "image": (230, 220), "seed": 13, "question": "How many objects are there?",
        "description": "transformers LlavaOnevisionForConditionalGeneration + LlavaOnevisionProcessor: SigLIP "
        "tower, anyres patches, unpad, anyres_max_9 bilinear feature downsampling, image_newline, chatml",
    },
}  # fmt: skip

PINPOINTS_NEXT = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]  # (height, width)
PINPOINTS_OV = [[56, 56], [56, 112], [112, 56], [112, 112], [168, 168], [224, 224]]


def build(kind: str, tok) -> tuple:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )  # fmt: skip

    image_id = tok.convert_tokens_to_ids("<image>")
    vocab = len(tok)
    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                pad_token_id=0, initializer_range=0.2)  # fmt: skip
    clip = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=56, patch_size=14, projection_dim=32)  # fmt: skip
    if kind == "llava":
        cfg = LlavaConfig(vision_config=clip, text_config=LlamaConfig(**text), image_token_index=image_id,
                          vision_feature_layer=-2, vision_feature_select_strategy="default")  # fmt: skip
        model = LlavaForConditionalGeneration(cfg)
        ip = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                image_mean=MEAN, image_std=STD)  # fmt: skip
        proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                              chat_template=LLAVA_TEMPLATE, num_additional_image_tokens=1)  # fmt: skip
    elif kind == "llava_next":
        cfg = LlavaNextConfig(vision_config=clip, text_config=LlamaConfig(**text), image_token_index=image_id,
                              vision_feature_layer=-2, vision_feature_select_strategy="default",
                              image_grid_pinpoints=PINPOINTS_NEXT)  # fmt: skip
        model = LlavaNextForConditionalGeneration(cfg)
        ip = LlavaNextImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                     image_grid_pinpoints=PINPOINTS_NEXT, image_mean=MEAN, image_std=STD)  # fmt: skip
        proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                                  vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
                                  num_additional_image_tokens=1)  # fmt: skip
    else:
        sig = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=56, patch_size=14)  # fmt: skip
        cfg = LlavaOnevisionConfig(vision_config=sig, text_config=Qwen2Config(**text), image_token_index=image_id,
                                   vision_feature_layer=-1, vision_feature_select_strategy="full",
                                   image_grid_pinpoints=PINPOINTS_OV, vision_aspect_ratio="anyres_max_9")  # fmt: skip
        model = LlavaOnevisionForConditionalGeneration(cfg)
        ip = LlavaOnevisionImageProcessor(size={"height": 56, "width": 56}, image_grid_pinpoints=PINPOINTS_OV,
                                          image_mean=[0.5] * 3, image_std=[0.5] * 3)  # fmt: skip
        from transformers import LlavaOnevisionVideoProcessor

        vp = LlavaOnevisionVideoProcessor(size={"height": 56, "width": 56}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        proc = LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, num_image_tokens=16,
                                       vision_feature_select_strategy="full", chat_template=ONEVISION_TEMPLATE,
                                       vision_aspect_ratio="anyres_max_9")  # fmt: skip
    return model.eval(), proc


def record(name: str, case: dict, out_root: Path, max_new_tokens: int) -> None:
    import transformers
    from safetensors.torch import save_file

    case_dir = out_root / name
    if case_dir.exists():
        shutil.rmtree(case_dir)
    ckpt = case_dir / "checkpoint"
    torch.manual_seed(case["seed"])
    tok = make_tokenizer(ckpt, ["<|im_start|>", "<|im_end|>"] if case["kind"] == "llava_onevision" else [])
    model, proc = build(case["kind"], tok)
    model.save_pretrained(str(ckpt))
    proc.save_pretrained(str(ckpt))
    # reload both from the folder, as a user would
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(str(ckpt))

    inputs_dir = case_dir / "inputs"
    inputs_dir.mkdir(parents=True)
    make_image(*case["image"], seed=case["seed"] + 100).save(inputs_dir / "image.png")
    image = Image.open(inputs_dir / "image.png").convert("RGB")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": case["question"]}]}]
    prompt = proc.apply_chat_template(conversation, add_generation_prompt=True)
    batch = proc(images=image, text=prompt, return_tensors="pt")

    captured: dict[str, torch.Tensor] = {}
    hook = model.model.multi_modal_projector.register_forward_hook(
        lambda m, i, o: captured.update(projector_input=i[0].detach().clone(), projector_output=o.detach().clone())
    )
    with torch.no_grad():
        logits = model(**batch).logits
        hook.remove()
        gen = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens)
    n_prompt = batch["input_ids"].shape[1]
    tensors = {
        "input_ids": batch["input_ids"][0].contiguous(),
        "pixel_values": batch["pixel_values"].reshape(-1, *batch["pixel_values"].shape[-3:]).contiguous(),
        "vision_features": captured["projector_input"].contiguous(),
        "projector_output": captured["projector_output"].contiguous(),
        "last_logits": logits[0, -1].contiguous(),
        "greedy_tokens": gen[0, n_prompt:].contiguous(),
    }
    if "image_sizes" in batch:
        tensors["image_sizes"] = batch["image_sizes"].contiguous()
    save_file(tensors, str(case_dir / "expected.safetensors"))
    (inputs_dir / "prompt.json").write_text(json.dumps({"question": case["question"]}, indent=2) + "\n")
    image_id = model.config.image_token_index
    meta = {
        "name": name,
        "lineage": "llava_hf",
        "runner": "sr3d_plugin.conformance.llava:run",
        "description": case["description"],
        "recorded_with": {"transformers": transformers.__version__, "torch": torch.__version__},
        "model": "checkpoint",
        "model_type": case["kind"],
        "prompt": prompt,
        "max_new_tokens": max_new_tokens,
        "load_options": {"use_position_encoding": False, "use_region_extractor": False},
        "num_image_tokens": int((batch["input_ids"] == image_id).sum()),
    }
    (case_dir / "case.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(name, repr(prompt), "ids", n_prompt, "image tokens", meta["num_image_tokens"], "tokens",
          tensors["greedy_tokens"].tolist())  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data")
    parser.add_argument("--case", action="append", choices=sorted(CASES))
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.case or sorted(CASES):
        record(name, CASES[name], args.out.resolve(), args.max_new_tokens)


if __name__ == "__main__":
    main()
