"""Record conformance cases from the ORIGINAL LLaVA code (haotian-liu/LLaVA, llava-torch 1.2.2.post1).

Run in a venv of its own (see README.md), never in the project venv::

    /work/venvs/llava/bin/python conformance/llava_original/record.py --out conformance/data

For each case the original code

1. builds a tiny random LLaVA checkpoint with its own classes (``LlavaLlamaForCausalLM`` +
   ``initialize_vision_modules`` loading the CLIP tower from a local folder, exactly as
   ``llava/train/train.py`` does) and saves it with ``save_pretrained`` (+ the tokenizer);
2. reloads it the way ``llava/model/builder.py:load_pretrained_model`` does (slow tokenizer, the
   tower taken from the ``mm_vision_tower`` folder, ``resize_token_embeddings``) but in float32 on the CPU;
3. builds the prompt with its own conversation template (mode inferred from the folder name as in
   ``llava/eval/run_llava.py``), ``tokenizer_image_token`` and ``process_images`` on a raw non-square
   image, runs a forward pass and greedy generation, and writes what came out.

Only this script (our own code) and the recorded data are committed.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

_CORPUS_WORDS = (
    "the a an image photo picture shows show is are of in on at to left right top bottom red green blue "
    "yellow black white cat dog car tree house chair table person man woman sky road water small large "
    "what where how many which color there here near far behind front next one two three four five "
    "describe answer question user assistant chat human artificial intelligence helpful detailed polite "
    "gives answers questions curious between and with this that it its"
)
WORDS = _CORPUS_WORDS.split()


def train_tokenizer(folder: Path, legacy: bool) -> None:
    """A Llama-style SentencePiece BPE model (byte fallback, dummy prefix), saved as the original saves it."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    rng = np.random.default_rng(0)
    lines = []
    for _ in range(3000):
        n = int(rng.integers(3, 14))
        words = [WORDS[int(i)] for i in rng.integers(0, len(WORDS), n)]
        sent = " ".join(words)
        if rng.random() < 0.3:
            sent = sent.capitalize() + "?"
        if rng.random() < 0.3:
            sent = sent + "\n" + " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), 3))
        lines.append(sent)
    lines += [
        "USER: ASSISTANT: Human: Assistant: ###",
        "A chat between a curious human and an artificial "
        "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.",
    ]
    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / "_spm"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=420, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, num_threads=1,
    )  # fmt: skip
    tok = LlamaTokenizer(vocab_file=str(prefix) + ".model", legacy=legacy)
    tok.pad_token = tok.unk_token  # llava/train/train.py: pad = unk for v1 conversations
    tok.padding_side = "right"
    tok.model_max_length = 2048
    tok.save_pretrained(str(folder))
    for f in folder.glob("_spm.*"):
        f.unlink()


def make_tower(folder: Path, image_size: int, seed: int) -> None:
    """A tiny random CLIP vision tower folder (weights + CLIPImageProcessor), like openai/clip-vit-large-patch14-336."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=14, projection_dim=32)  # fmt: skip
    CLIPVisionModel(cfg).save_pretrained(str(folder))
    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    ).save_pretrained(str(folder))


def make_image(width: int, height: int, seed: int) -> Image.Image:
    """A structured non-square RGB test image (gradients + blocks + noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), 128 + 60 * np.sin(x / 5.0)], -1)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width - 10)), int(rng.integers(0, height - 10))
        img[y0 : y0 + 12, x0 : x0 + 15] = rng.integers(0, 255, 3)
    img = img + rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


CASES = {
    "llava_original_v15_pad": {
        "folder": "llava-v1.5-tiny",
        "image_size": 56,
        "image": (80, 50),
        "aspect": "pad",
        "merge": "flat",
        "pinpoints": None,
        "question": "What is shown in this image?",
        "seed": 1,
        "description": "LLaVA-1.5: image_aspect_ratio pad (expand2square with the mean colour), llava_v1 "
        "conversation, tokenizer_image_token, mlp2x_gelu projector, CLIP tower read from mm_vision_tower",
    },
    "llava_original_v16_anyres": {
        "folder": "llava-v1.6-vicuna-tiny",
        "image_size": 56,
        "image": (60, 130),
        "aspect": "anyres",
        "merge": "spatial_unpad",
        "pinpoints": [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]],
        "question": "Describe the image in detail.",
        "seed": 2,
        "description": "LLaVA-1.6: anyres (select_best_resolution, resize_and_pad, patches + squashed base), "
        "spatial_unpad with image_newline, llava_v1 conversation",
    },
}


def build_and_save(case: dict, ckpt: Path) -> Path:
    """The original code builds and saves the checkpoint; returns the LLaVA folder."""
    from llava.model import LlavaConfig, LlavaLlamaForCausalLM
    from transformers import AutoTokenizer

    tower_dir = ckpt / "clip-vit-tiny"
    model_dir = ckpt / case["folder"]
    train_tokenizer(model_dir, legacy=False)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), use_fast=False)
    make_tower(tower_dir, case["image_size"], seed=case["seed"] * 10)

    torch.manual_seed(case["seed"])
    cfg = LlavaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2,
    )  # fmt: skip
    model = LlavaLlamaForCausalLM(cfg)
    # a stronger random init than 0.02, so greedy tokens are decided by clear logit margins
    model_args = SimpleNamespace(
        vision_tower=str(tower_dir), mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        pretrain_mm_mlp_adapter=None, mm_patch_merge_type=case["merge"], mm_projector_type="mlp2x_gelu",
        mm_use_im_start_end=False, mm_use_im_patch_token=False, tune_mm_mlp_adapter=False,
    )  # fmt: skip
    model.get_model().initialize_vision_modules(model_args=model_args)
    # what llava/train/train.py writes into the config after initialize_vision_modules
    model.config.image_aspect_ratio = case["aspect"]
    if case["pinpoints"] is not None:
        model.config.image_grid_pinpoints = case["pinpoints"]
    model.config.tokenizer_padding_side = tokenizer.padding_side
    model.config.tokenizer_model_max_length = tokenizer.model_max_length
    model.config.tune_mm_mlp_adapter = False
    model.config.freeze_mm_mlp_adapter = False
    model.config.mm_use_im_start_end = False
    model.config.mm_projector_lr = None
    model.config.mm_use_im_patch_token = False
    model.initialize_vision_tokenizer(model_args, tokenizer=tokenizer)
    model.config.use_cache = True
    # mm_vision_tower as the original resolves it: a path relative to the working directory
    model.config.mm_vision_tower = "clip-vit-tiny"
    model.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    # The saved state dict carries the tower the model was built with; replace the tower FOLDER with
    # a different random tower: the original reads the tower from that folder, not from the stored tensors.
    shutil.rmtree(tower_dir)
    make_tower(tower_dir, case["image_size"], seed=case["seed"] * 10 + 1)
    return model_dir


def load_like_builder(model_dir: Path):
    """llava/model/builder.py:load_pretrained_model for a 'llava' folder, float32 on the CPU."""
    from llava.model import LlavaLlamaForCausalLM
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), use_fast=False)
    model = LlavaLlamaForCausalLM.from_pretrained(str(model_dir), low_cpu_mem_usage=True, torch_dtype=torch.float32)
    if getattr(model.config, "mm_use_im_patch_token", True):
        tokenizer.add_tokens(["<im_patch>"], special_tokens=True)
    if getattr(model.config, "mm_use_im_start_end", False):
        tokenizer.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    model.resize_token_embeddings(len(tokenizer))
    tower = model.get_vision_tower()
    if not tower.is_loaded:
        tower.load_model()
    tower.to(dtype=torch.float32)
    return tokenizer, model.eval(), tower.image_processor


def conv_mode_for(model_name: str) -> str:
    """The conversation mode llava/eval/run_llava.py infers from the model name."""
    name = model_name.lower()
    if "llama-2" in name:
        return "llava_llama_2"
    if "mistral" in name:
        return "mistral_instruct"
    if "v1.6-34b" in name:
        return "chatml_direct"
    if "v1" in name:
        return "llava_v1"
    if "mpt" in name:
        return "mpt"
    return "llava_v0"


def record(name: str, case: dict, out_root: Path, max_new_tokens: int) -> None:
    import llava
    import transformers
    from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import get_model_name_from_path, process_images, tokenizer_image_token
    from safetensors.torch import save_file

    case_dir = out_root / name
    if case_dir.exists():
        shutil.rmtree(case_dir)
    ckpt = case_dir / "checkpoint"
    ckpt.mkdir(parents=True)
    import os

    cwd = os.getcwd()
    os.chdir(ckpt)  # mm_vision_tower "clip-vit-tiny" resolves against the working directory
    try:
        model_dir = build_and_save(case, ckpt.resolve())
        tokenizer, model, image_processor = load_like_builder(model_dir)
        image = make_image(*case["image"], seed=case["seed"] + 100)
        inputs = case_dir / "inputs"
        inputs.mkdir()
        image.save(inputs / "image.png")
        image = Image.open(inputs / "image.png").convert("RGB")

        model_name = get_model_name_from_path(str(model_dir))
        conv_mode = conv_mode_for(model_name)
        conv = conv_templates[conv_mode].copy()
        conv.append_message(conv.roles[0], DEFAULT_IMAGE_TOKEN + "\n" + case["question"])
        conv.append_message(conv.roles[1], None)
        prompt = conv.get_prompt()
        input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
        images = process_images([image], image_processor, model.config)
        if isinstance(images, list):
            images = [x.to(torch.float32) for x in images]
        else:
            images = images.to(torch.float32)
        image_sizes = [image.size]

        captured: dict[str, torch.Tensor] = {}
        h1 = model.get_model().mm_projector.register_forward_hook(
            lambda m, i, o: captured.__setitem__("projector_output", o.detach().clone())
        )
        tower = model.get_vision_tower()
        h2 = tower.register_forward_hook(lambda m, i, o: captured.__setitem__("vision_features", o.detach().clone()))
        with torch.no_grad():
            prepared = model.prepare_inputs_labels_for_multimodal(
                input_ids, None, None, None, None, images, image_sizes=image_sizes
            )
            embeds = prepared[4]
            logits = model(input_ids=input_ids, images=images, image_sizes=image_sizes).logits
            h1.remove()
            h2.remove()
            gen = model.generate(
                input_ids, images=images, image_sizes=image_sizes, do_sample=False, num_beams=1,
                max_new_tokens=max_new_tokens, use_cache=True,
            )  # fmt: skip
        pixel = images if torch.is_tensor(images) else torch.cat(images, 0)
        tensors = {
            "input_ids": input_ids[0].contiguous(),
            "pixel_values": pixel.reshape(-1, *pixel.shape[-3:]).contiguous(),
            "vision_features": captured["vision_features"].contiguous(),
            "projector_output": captured["projector_output"].contiguous(),
            "inputs_embeds": embeds[0].contiguous(),
            "last_logits": logits[0, -1].contiguous(),
            # transformers 4.37 generate(inputs_embeds=...) returns a dummy BOS start id + the new tokens
            "greedy_tokens": gen[0, 1:].contiguous(),
        }
        save_file(tensors, str(case_dir / "expected.safetensors"))
        (inputs / "prompt.json").write_text(json.dumps({"question": case["question"]}, indent=2) + "\n")
        # tokenizer_image_token on further prompts: chunks that start with a newline, a space, two
        # spaces, a tab, several images (the slow SentencePiece tokenizer always adds its dummy prefix)
        probes = [
            "USER: <image>\nWhat is it? ASSISTANT:",
            "USER: <image> What is it?",
            "<image>\n<image>\nCompare  them.",
            "A<image>\tB<image>",
            " leading space <image>",
        ]
        (inputs / "tokenizer_probes.json").write_text(
            json.dumps(
                [{"prompt": q, "input_ids": tokenizer_image_token(q, tokenizer, IMAGE_TOKEN_INDEX)} for q in probes],
                indent=1,
            )
            + "\n"
        )
        meta = {
            "name": name,
            "lineage": "llava_original",
            "runner": "sr3d_plugin.conformance.llava:run",
            "description": case["description"],
            "recorded_with": {
                "llava-torch": getattr(llava, "__version__", "1.2.2.post1"),
                "transformers": transformers.__version__,
                "torch": torch.__version__,
            },
            "model": f"checkpoint/{case['folder']}",
            "working_directory": "checkpoint",
            "conv_mode": conv_mode,
            "prompt": prompt,
            "image_aspect_ratio": case["aspect"],
            "mm_patch_merge_type": case["merge"],
            "max_new_tokens": max_new_tokens,
            "load_options": {"use_position_encoding": False, "use_region_extractor": False},
            "num_image_tokens": int(embeds.shape[1] - (input_ids.shape[1] - 1)),
        }
        meta["probes"] = record_probes(case, model, tokenizer, image_processor, prompt, case_dir)
        (case_dir / "case.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(name, "prompt:", repr(prompt), "ids:", input_ids.shape[1], "embeds:", embeds.shape[1],
              "tokens:", gen[0].tolist())  # fmt: skip
    finally:
        os.chdir(cwd)


PROBE_SHAPES = {
    "pad": [(50, 80), (64, 64), (123, 31), (31, 123), (57, 56)],
    "anyres": [(150, 40), (40, 150), (64, 64), (200, 199), (97, 41), (33, 170)],
}


def record_probes(case: dict, model, tokenizer, image_processor, prompt: str, case_dir: Path) -> list[dict]:
    """The same prompt on further image shapes: image-token count and last-position logits per shape
    (``probes.safetensors``: ``logits_<w>x<h>``), images in ``inputs/probes/``."""
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import process_images, tokenizer_image_token
    from safetensors.torch import save_file

    folder = case_dir / "inputs" / "probes"
    folder.mkdir(parents=True)
    input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
    out, tensors = [], {}
    for k, (w, h) in enumerate(PROBE_SHAPES[case["aspect"]]):
        name = f"{w}x{h}.png"
        make_image(w, h, seed=case["seed"] + 200 + k).save(folder / name)
        image = Image.open(folder / name).convert("RGB")
        images = process_images([image], image_processor, model.config)
        images = [x.float() for x in images] if isinstance(images, list) else images.float()
        with torch.no_grad():
            embeds = model.prepare_inputs_labels_for_multimodal(
                input_ids, None, None, None, None, images, [image.size]
            )[4]
            logits = model(input_ids=input_ids, images=images, image_sizes=[image.size]).logits
        tensors[f"logits_{w}x{h}"] = logits[0, -1].contiguous()
        out.append(
            {"image": f"inputs/probes/{name}", "num_image_tokens": int(embeds.shape[1] - (input_ids.shape[1] - 1))}
        )
    save_file(tensors, str(case_dir / "probes.safetensors"))
    return out


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
