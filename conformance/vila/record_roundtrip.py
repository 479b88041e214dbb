"""Record case ``vila_sr3d_encoder_roundtrip``: SR3DImageEncoder inside the REAL NVlabs/VILA, and back.

Run in a VILA environment (see README.md beside this file), never in CI::

    PYTHONPATH=conformance/vila/stubs:/path/to/VILA:. python conformance/vila/record_roundtrip.py

What it does, all with VILA's own code (import package ``llava``):

1. writes what a VILA user starts from: a tiny Qwen2 LLM folder (+ tokenizer with Qwen2's chat template)
   and a tiny SigLIP tower folder (random weights, transformers 4.46);
2. builds the VILA/NVILA model the way VILA's ``train.py`` does — ``LlavaLlamaConfig.from_pretrained``,
   ``prepare_config_for_training`` with VILA's ``ModelArguments`` / ``DataArguments`` /
   ``TrainingArguments`` and ``image_encoder={"_target_": "sr3d_plugin.integrations.vila.SR3DImageEncoder"}``
   (docs/vila.md), then ``LlavaLlamaModel(config=...)``;
3. packs two raw requests (an image + point map + boxes; three frames + point maps + a box) with VILA's
   ``dynamic_process_images_and_prompt`` / ``process_image`` and ``tokenize_conversation`` plus
   ``sr3d_plugin.integrations.vila.pack_sample`` (core only);
4. runs one training step through VILA's ``DataCollator`` and VILA's forward (loss → backward → SGD);
5. runs VILA's forward and ``generate`` on both requests, saves with VILA's ``save_pretrained``, rebuilds
   the model from the folder with VILA's own loading code (``load_pretrained_model``'s multimodal branch)
   and checks that it reproduces the logits;
6. writes ``conformance/data/vila_sr3d_encoder_roundtrip/`` (checkpoint, raw inputs, expected outputs).

Deviations from a GPU run, all harness-side: fp32 on the CPU (``model_dtype`` set to ``torch.float32``
after ``prepare_config_for_training``, which writes fp16/bf16), eager attention instead of
flash-attention-2 (VILA's SigLIP tower hard-codes it; :func:`use_eager_vision_attention`), and stubs for the GPU-only imports (``stubs/``: deepspeed, flash_attn; s2wrapper is
not on the package index and only serves the S2 towers SR-3D does not use).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CASE = "vila_sr3d_encoder_roundtrip"

#: Qwen2's chat template (ChatML with the default system prompt), as NVILA's Qwen2 tokenizers carry it
QWEN2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
#: the image_encoder entry of docs/vila.md; init_gain 1.0 (instead of the near-no-op 0.001) so that the
#: recorded logits visibly depend on every token's 3D position
ENCODER = {"_target_": "sr3d_plugin.integrations.vila.SR3DImageEncoder", "end_tokens": "\n", "init_gain": 1.0}
MAX_NEW_TOKENS = 6
TILE = 56
MAX_TILES = 12  # VILA's default; its saved config keeps 12 whatever DataArguments said


def _noise_image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _points(v: int, h: int, w: int, seed: int) -> np.ndarray:
    """A smooth canonical point map (x right, y down the rows, z = depth), values in [-1, 1]."""
    rng = np.random.default_rng(seed)
    ys, xs = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    maps = []
    for k in range(v):
        z = 0.5 * np.sin(2.0 * xs + k) * np.cos(1.5 * ys) + 0.1 * rng.standard_normal((h, w))
        maps.append(np.stack([xs, ys, np.clip(z, -1, 1)], axis=-1))
    return np.stack(maps).astype(np.float32)


def write_raw_inputs(folder: Path) -> list[dict]:
    """Two requests: one dynamically tiled image with two boxes, and a three-frame scene with one box."""
    folder.mkdir(parents=True, exist_ok=True)
    _noise_image(180, 100, 0).save(folder / "image.png")
    np.save(folder / "image_points.npy", _points(1, 100, 180, 1)[0])
    for k in range(3):
        _noise_image(64, 48, 10 + k).save(folder / f"frame{k}.png")
    np.save(folder / "frames_points.npy", _points(3, 48, 64, 2))
    requests = [
        {
            "images": ["image.png"],
            "points": "image_points.npy",
            "multi_view": False,
            "question": "Is <mask> left of <mask>?",
            "boxes": [[0, [10, 10, 50, 60]], [0, [100, 20, 170, 90]]],
            "answer": "Left.",
        },
        {
            "images": ["frame0.png", "frame1.png", "frame2.png"],
            "points": "frames_points.npy",
            "multi_view": True,
            "question": "Where is <mask>?",
            "boxes": [[1, [5, 5, 30, 30]]],
            "answer": "On the floor.",
        },
    ]
    (folder / "requests.json").write_text(json.dumps(requests, indent=2))
    return requests


def write_start_folders(work: Path, seed: int) -> tuple[Path, Path]:
    """The LLM and vision-tower folders a VILA user starts training from (tiny, random)."""
    from transformers import AutoModelForCausalLM, SiglipVisionModel

    from sr3d_plugin.testing import _tiny_text_config, _tiny_vision_config, build_tiny_tokenizer, tiny_image_processor

    tok = build_tiny_tokenizer()
    tok.chat_template = QWEN2_TEMPLATE
    torch.manual_seed(seed)
    llm = AutoModelForCausalLM.from_config(_tiny_text_config("qwen2", tok))
    llm_dir = work / "qwen2-tiny"
    llm.save_pretrained(str(llm_dir))
    tok.save_pretrained(str(llm_dir))
    tower = SiglipVisionModel(_tiny_vision_config("siglip_vision_model", TILE))
    tower_dir = work / "siglip-tiny"  # VILA picks the tower class by the folder name
    tower.save_pretrained(str(tower_dir))
    tiny_image_processor(TILE).save_pretrained(str(tower_dir))
    return llm_dir, tower_dir


def use_eager_vision_attention() -> None:
    """VILA's SigLIP towers hard-code ``attn_implementation="flash_attention_2"`` (CUDA only): use eager here."""
    from llava.model.multimodal_encoder import siglip_encoder

    tower_cls = siglip_encoder.SiglipVisionModel
    original = tower_cls.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        kwargs["attn_implementation"] = "eager"
        return original(cls, *args, **kwargs)

    tower_cls.from_pretrained = classmethod(from_pretrained)


def build_vila(llm_dir: Path, tower_dir: Path, out_dir: Path):
    """A VILA model with SR3DImageEncoder, built the way VILA's train.py builds one."""
    from llava import conversation as conversation_lib
    from llava.model import LlavaLlamaConfig, LlavaLlamaModel
    from llava.train.args import DataArguments, ModelArguments, TrainingArguments
    from llava.train.utils import prepare_config_for_training

    model_args = ModelArguments(
        model_name_or_path=str(llm_dir),
        version="auto",
        vision_tower=str(tower_dir),
        mm_projector="mlp_downsample_3x3_fix",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="cls_patch",
        image_encoder=json.dumps(ENCODER),
    )
    data_args = DataArguments(image_aspect_ratio="dynamic", min_tiles=1, max_tiles=MAX_TILES)
    training_args = TrainingArguments(
        output_dir=str(out_dir), tune_mm_projector=True, tune_language_model=True, model_max_length=512
    )
    conversation_lib.default_conversation = conversation_lib.conv_templates[model_args.version]
    config = LlavaLlamaConfig.from_pretrained(model_args.model_name_or_path, resume=False)
    prepare_config_for_training(config, model_args, training_args, data_args)
    config.model_dtype = "torch.float32"  # harness: fp32 on the CPU
    model = LlavaLlamaModel(config=config, attn_implementation="eager", model_max_length=512, cache_dir=None)
    data_args.image_processor = model.vision_tower.image_processor
    return model, data_args


def pack_request(req: dict, inputs: Path, data_args, tokenizer, with_answer: bool):
    """VILA's own image + prompt processing, plus SR-3D's positions and masks (core only)."""
    from llava.mm_utils import dynamic_process_images_and_prompt, process_image
    from llava.utils.tokenizer import preprocess_conversation, tokenize_conversation

    from sr3d_plugin.integrations.vila import pack_sample
    from sr3d_plugin.modeling.inputs import Region

    images = [Image.open(inputs / name).convert("RGB") for name in req["images"]]
    points = np.load(inputs / req["points"])
    regions = [Region.from_box(frame, box, images[frame].size) for frame, box in req["boxes"]]
    if req["multi_view"]:  # frames: one resized tile each (VILA's "resize" path)
        data_args.image_aspect_ratio = "resize"
        tiles = torch.stack([process_image(im, data_args, None) for im in images])
        data_args.image_aspect_ratio = "dynamic"
        # one bare <image> per frame, no text between frames: what VILA's own inference writes for a list of
        # images (llava/utils/media.py extract_media appends MEDIA_TOKENS["image"] per image)
        prompt = "<image>" * len(images) + req["question"]
        sample = pack_sample(tiles, points, regions, multi_view=True)
    else:
        tiles, prompt = dynamic_process_images_and_prompt(images, "<image>" + req["question"], data_args)
        sample = pack_sample(
            tiles, points, regions, image_size=images[0].size, min_tiles=data_args.min_tiles, max_tiles=MAX_TILES
        )
    conversation = [{"from": "human", "value": prompt}]
    if with_answer:
        conversation.append({"from": "gpt", "value": req["answer"]})
        enc = preprocess_conversation(conversation, tokenizer)
        return {"input_ids": enc["input_ids"], "labels": enc["labels"], **sample}
    ids = tokenize_conversation(conversation, tokenizer, add_generation_prompt=True)
    return {"input_ids": ids, **sample}


def vila_outputs(model, packed: dict) -> dict[str, torch.Tensor]:
    """VILA's forward (last-position logits) and greedy generate for one request."""
    ids = packed["input_ids"][None]
    media = {"image": packed["image"], "mask": packed["mask"]}
    config = {"image": {"block_sizes": [None] * len(packed["image"])}}
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        logits = model(input_ids=ids, media=media, media_config=config, attention_mask=mask).logits
        tokens = model.generate(
            input_ids=ids, media=media, media_config=config, attention_mask=mask,
            max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1,
        )  # fmt: skip
    return {
        "logits": logits[0, -1].float(),
        "all_logits": logits[0].float(),  # every position: tiles, regions and text all show up here
        "tokens": tokens[0].long(),
        "input_ids": ids[0].long(),
    }


def train_step(model, data_args, requests, inputs: Path) -> float:
    """One SGD step on both requests through VILA's DataCollator and VILA's forward (loss.backward)."""
    from llava.data.collate import DataCollator

    instances = [pack_request(r, inputs, data_args, model.tokenizer, with_answer=True) for r in requests]
    batch = DataCollator(model.tokenizer)(instances)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    optimizer.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    pe_grad = float(model.perception_encoder.layers.position_embedding_head[0].weight.grad.abs().sum())
    region_grad = float(model.region_extractor.projector.weight.grad.abs().sum())
    if not (pe_grad > 0 and region_grad > 0):
        raise SystemExit(f"training step did not reach the SR-3D parts (pe {pe_grad}, region {region_grad})")
    optimizer.step()
    model.eval()
    return loss.item()


def reload_with_vila(folder: Path):
    """Rebuild from a saved folder with VILA's own loading code, in fp32.

    ``llava.model.builder.load_pretrained_model`` hard-codes ``torch_dtype=torch.float16``; its
    multimodal branch is ``AutoConfig.from_pretrained`` + ``resume_path`` + ``prepare_config_for_eval``
    + ``LlavaLlamaModel(config=...)``, which is called here with ``torch.float32``.
    """
    from llava.model import LlavaLlamaModel
    from llava.model.builder import prepare_config_for_eval
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    config.resume_path = str(folder)
    kwargs = {"torch_dtype": torch.float32}
    prepare_config_for_eval(config, kwargs)
    model = LlavaLlamaModel(config=config, low_cpu_mem_usage=True, **kwargs)
    model.eval()
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "conformance" / "data" / CASE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import llava
    import transformers
    from safetensors.torch import save_file

    import sr3d_plugin

    use_eager_vision_attention()
    torch.manual_seed(args.seed)
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    inputs = out / "inputs"
    requests = write_raw_inputs(inputs)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        llm_dir, tower_dir = write_start_folders(work, args.seed)
        model, data_args = build_vila(llm_dir, tower_dir, work / "run")
        from llava.train.train import find_all_linear_names

        # what VILA's --lora_enable would wrap (docs/vila.md §2.3): the SR-3D Linear layers are among them
        lora_targets = sorted(
            name
            for name in find_all_linear_names(model, lora_llm=True, lora_vt=False)
            if name.startswith(("perception_encoder", "region_extractor"))
        )
        loss = train_step(model, data_args, requests, inputs)
        packed = [pack_request(r, inputs, data_args, model.tokenizer, with_answer=False) for r in requests]
        before = [vila_outputs(model, p) for p in packed]
        ckpt = out / "checkpoint"
        model.save_pretrained(str(ckpt))
        again = reload_with_vila(ckpt)
        for part in ("perception_encoder", "region_extractor", "mm_projector"):  # found again, not made fresh
            saved, loaded = getattr(model, part).state_dict(), getattr(again, part).state_dict()
            if saved.keys() != loaded.keys() or not all(torch.equal(saved[k], loaded[k]) for k in saved):
                raise SystemExit(f"VILA's reload did not load {part}/ from the folder")
        after = [vila_outputs(again, p) for p in packed]
    reload_diff = max(float((a["all_logits"] - b["all_logits"]).abs().max()) for a, b in zip(before, after))
    tokens_same = all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(before, after))
    if reload_diff > 1e-6 or not tokens_same:
        raise SystemExit(f"VILA's own reload does not reproduce VILA: {reload_diff:.2e}, tokens {tokens_same}")
    tensors = {}
    for k, rec in enumerate(before):
        for key, value in rec.items():
            tensors[f"request{k}.{key}"] = value.detach().clone().contiguous()
    save_file(tensors, str(out / "expected.safetensors"))
    meta = {
        "name": CASE,
        "lineage": "vila",
        "runner": "sr3d_plugin.conformance.vila_real:run",
        "description": "SR3DImageEncoder switched on in NVlabs/VILA via image_encoder._target_; VILA trained one "
        "step, saved the folder and rebuilt it; the plugin's vila builder loads the folder and replays the raw requests",
        "recorded_with": {
            "vila_commit": getattr(llava, "__vila_commit__", None) or "NVlabs/VILA HEAD b760c34",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "sr3d_plugin": sr3d_plugin.__version__,
        },
        "max_new_tokens": MAX_NEW_TOKENS,
        "requests": len(requests),
        "vila_train_loss": round(loss, 6),
        "vila_reload_max_abs_logit_diff": reload_diff,
        "vila_lora_targets_in_sr3d_parts": lora_targets,
    }
    (out / "case.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
