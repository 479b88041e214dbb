"""Record SR-3D conformance cases from the ORIGINAL code (jiyt17/SR-REAL, cold-start/, package ``llava``).

Run in a venv of its own (see README.md): the original builds tiny random parts, saves them with its
own ``save_pretrained``, loads them back with its loader's steps, preprocesses fixed RAW inputs with
its own functions (``generate_content``: ``mm_utils.process_depth``, ``dynamic_preprocess``,
``process_xyz``, masks, conversation, ``tokenizer_image_token``; ``utils.video_utils.VideoProcessor``
for posed RGB-D) and generates greedily. What it saw and produced is written to
``conformance/data/<case>/``. This file is our own code; nothing of the original is copied.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gpu_stubs  # noqa: E402

gpu_stubs.install()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

# device shim: the original moves tensors with .cuda(); on this CPU-only recorder that is the identity
torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[assignment]

import llava  # noqa: E402
import llava.model.multimodal_encoder.siglip_encoder as siglip_encoder  # noqa: E402
import transformers  # noqa: E402
from llava import conversation as clib  # noqa: E402
from llava.media import Depth, Mask  # noqa: E402
from llava.model import LlavaLlamaModel  # noqa: E402
from llava.model.language_model.llava_llama import LlavaLlamaConfig  # noqa: E402
from llava.utils.video_utils import VideoProcessor  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

# flash attention is CUDA-only: the original asks for it when loading SigLIP; use the eager kernel
_orig_siglip_fp = siglip_encoder.SiglipVisionModel.from_pretrained.__func__


def _siglip_from_pretrained(cls, *args, **kwargs):
    kwargs["attn_implementation"] = "eager"
    return _orig_siglip_fp(cls, *args, **kwargs)


siglip_encoder.SiglipVisionModel.from_pretrained = classmethod(_siglip_from_pretrained)

DATA = HERE.parent / "data"
TILE = 112  # tiny SigLIP at 112 px, patch 14 -> 8x8 token grid (the original allows any square size)
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "What is the distance between the chair and the table?",
    "How many chairs are in the room? There are three chairs near the window.",
    "Is the lamp to the left or to the right of the sofa? The lamp is left of the sofa.",
    "Describe the region. It is a wooden cabinet next to the door, about one meter tall.",
    "Which object is closer to the camera, the bed or the desk? The desk is closer.",
    "Region [0] is a red box on the floor. Region [1] is a plant behind the box.",
    "The answer is 2.5 meters. The kitchen has a fridge, a sink and an oven.",
    "You are a helpful assistant. Answer the question about the scene in one word.",
]


def build_tokenizer(out: Path) -> None:
    """A byte-level BPE in the Qwen2 style, trained locally on a few sentences."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = transformers.Qwen2TokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        chat_template=CHATML,
        model_max_length=4096,
    )
    fast.save_pretrained(str(out))


def build_bases(work: Path, seed: int) -> tuple[Path, Path]:
    """The 'pretrained' inputs the original builder starts from: a tiny Qwen2 LLM and a tiny SigLIP."""
    torch.manual_seed(seed)
    llm = work / "qwen2-tiny"
    build_tokenizer(llm)
    cfg = transformers.Qwen2Config(
        vocab_size=512,  # padded beyond len(tokenizer), as Qwen2 checkpoints are
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        torch_dtype="float32",
    )
    model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15) if p.dim() > 1 else None
        model.lm_head.weight[430:] *= 4.0  # padded rows: would win greedy decoding if they were kept
        # <|im_end|> (id 2) shadows a frequent token, so that greedy answers stop after a few tokens
        # (the original stops at the chat template's stop tokens; a replay must stop there too)
        model.lm_head.weight[2] = 1.02 * model.lm_head.weight[44]
    model.save_pretrained(str(llm), safe_serialization=True)
    vt = work / "siglip-tiny"
    vcfg = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=TILE,
        patch_size=14,
        torch_dtype="float32",
    )
    vcfg.architectures = ["SiglipVisionModel"]
    tower = transformers.SiglipVisionModel(vcfg)
    with torch.no_grad():
        for p in tower.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
    tower.save_pretrained(str(vt), safe_serialization=True)
    proc = transformers.SiglipImageProcessor(
        size={"height": TILE, "width": TILE}, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3
    )
    proc.save_pretrained(str(vt))
    return llm, vt


def build_checkpoint(out: Path, work: Path, seed: int) -> None:
    """Let the original build the VLM from the bases and save it with its own save_pretrained."""
    llm, vt = build_bases(work, seed)
    config = LlavaLlamaConfig(
        llm_cfg=str(llm),
        vision_tower_cfg=str(vt),
        mm_projector_cfg="mlp_downsample_3x3_fix",
        region_extractor_cfg="regiongpt",
        perception_encoder_cfg="abs_mlp",
        perception_encoder="abs_mlp",
        image_aspect_ratio="dynamic",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="cls_patch",
        min_tiles=1,
        max_tiles=6,
        num_video_frames=8,
    )
    config.model_dtype = "torch.float32"  # LlavaConfig.__init__ drops unknown kwargs
    config.chat_template = "qwen2"  # as SR-REAL's scripts/sft.sh (--chat_template qwen2)
    config.resume_path = None
    model = LlavaLlamaModel(config=config)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        # the fresh PE is xavier(gain 0.001): scale it up so that 3D positions visibly change the answer
        for _name, p in model.perception_encoder.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
        for module in (model.mm_projector, model.region_extractor):
            for p in module.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.2)
    model.save_pretrained(str(out))


def load_original(path: Path):
    """The loading steps of ``llava.model.builder.load_pretrained_model`` for a multimodal folder, in fp32.

    (The original forces float16 there; fp32 keeps the CPU comparison exact. Everything else is the
    same: config.resume_path, LlavaLlamaModel(config), eval(), resize_token_embeddings(len(tokenizer)).)
    """
    clib.auto_set_conversation_mode(str(path))
    config = transformers.AutoConfig.from_pretrained(str(path))
    config.resume_path = str(path)
    if getattr(config, "vision_tower_cfg", None) is None:
        config.vision_tower_cfg = config.mm_vision_tower
    config.model_dtype = "torch.float32"
    model = LlavaLlamaModel(config=config, low_cpu_mem_usage=True)
    model.eval()
    model.resize_token_embeddings(len(model.tokenizer))
    return model


class Recorder:
    """Hooks that capture what the original computed inside ``generate_content``."""

    def __init__(self, model, max_new_tokens: int) -> None:
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.rec: dict[str, torch.Tensor] = {}
        self.handles = []
        m = model
        self.handles.append(m.vision_tower.register_forward_hook(self._hook("vision_features")))
        if m.perception_encoder is not None:
            self.handles.append(m.perception_encoder.register_forward_hook(self._hook_pe))
        self.handles.append(m.mm_projector.register_forward_hook(self._hook("projector_output")))
        if m.region_extractor is not None:
            self.handles.append(m.region_extractor.register_forward_hook(self._hook_region))
        self._orig_generate = m.generate
        m.generate = self._generate

    def _hook(self, key):
        def fn(_mod, _inp, out):
            self.rec[key] = out.detach().clone().float()

        return fn

    def _hook_pe(self, _mod, inp, out):
        self.rec["token_xyz"] = inp[0].detach().clone().float()
        self.rec["pe_output"] = out.detach().clone().float()

    def _hook_region(self, _mod, inp, out):
        self.rec["pe_augmented_features"] = inp[0].detach().clone().float()
        if out[0] is not None:
            self.rec["region_embeddings"] = out[0].detach().clone().float()

    def _generate(self, input_ids=None, media=None, media_config=None, mask_idx=None, **gen):
        m = self.model
        self.rec["input_ids"] = input_ids[0].detach().clone()
        if "xyz" in media:
            self.rec["tile_xyz"] = torch.stack([x.float() for x in media["xyz"]])
        self.rec["pixel_values"] = torch.stack([x.float() for x in media["image"]])
        masks = [mk for mk in media.get("mask", []) if mk is not None]
        with torch.no_grad():
            embeds, _, attn = m._embed(
                input_ids, {k: list(v) for k, v in media.items()}, copy.deepcopy(media_config), None, None, mask_idx
            )
            logits = m.llm(inputs_embeds=embeds, attention_mask=attn).logits
        self.rec["inputs_embeds"] = embeds[0].detach().clone().float()
        self.rec["last_logits"] = logits[0, -1].detach().clone().float()
        del masks
        out = self._orig_generate(input_ids=input_ids, media=media, media_config=media_config, mask_idx=mask_idx, **gen)
        self.rec["greedy_tokens"] = out[0].detach().clone()
        return out


def generation_config(model, max_new_tokens: int):
    g = model.default_generation_config
    g.do_sample = False
    g.num_beams = 1
    g.max_new_tokens = max_new_tokens
    g.max_length = None
    g.temperature = None
    g.top_p = None
    g.top_k = None
    return g


def _media_to_cpu(media):
    return media


def run_case(model, prompt_parts, max_new_tokens: int, **kwargs):
    rec = Recorder(model, max_new_tokens)
    try:
        text = model.generate_content(
            prompt_parts, generation_config=generation_config(model, max_new_tokens), **kwargs
        )
    finally:
        model.generate = rec._orig_generate
        for h in rec.handles:
            h.remove()
    return rec.rec, text


# ----------------------------------------------------------------------------------------------
# raw inputs
# ----------------------------------------------------------------------------------------------


def smooth_image(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A smooth random RGB image (low-frequency noise, so resizing conventions matter but stay stable)."""
    small = rng.integers(0, 256, size=(max(2, h // 24), max(2, w // 24), 3)).astype(np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, size=(h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def relative_depth_png(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """An 8-bit relative depth image (0 = nearest, valid) with a gradient, a blob and some zeros."""
    yy, xx = np.mgrid[0:h, 0:w]
    d = 40 + 150 * yy / (h - 1) + 30 * np.sin(xx / 17.0) + rng.normal(0, 3, size=(h, w))
    d[h // 3 : h // 2, w // 4 : w // 3] = 0  # nearest points: value 0 is valid in the original
    return Image.fromarray(np.clip(d, 0, 255).astype(np.uint8), mode="L")


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_expected(case_dir: Path, rec: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.contiguous() for k, v in rec.items() if isinstance(v, torch.Tensor)}
    # keep the data small: the embeddings are implied by the ids and the checkpoint
    tensors.pop("inputs_embeds", None)
    tensors.pop("pixel_values", None)
    save_file(tensors, str(case_dir / "expected.safetensors"))


def versions() -> dict[str, str]:
    import cv2

    return {
        "original": "jiyt17/SR-REAL cold-start/ (package llava), commit " + os.environ.get("SRREAL_COMMIT", "unknown"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "pillow": Image.__version__,
    }


def new_case(name: str) -> Path:
    d = DATA / name
    if d.exists():
        shutil.rmtree(d)
    (d / "inputs").mkdir(parents=True)
    return d


def case_single_reldepth_box(ckpt_src: Path, max_new: int) -> None:
    d = new_case("sr3d_single_reldepth_box")
    shutil.copytree(ckpt_src, d / "checkpoint")
    rng = np.random.default_rng(11)
    img = smooth_image(rng, 340, 120)  # aspect 2.83 -> 3x1 grid at 112 px + thumbnail under max_tiles 6
    img.save(d / "inputs" / "image.png")
    dep = relative_depth_png(rng, 340, 120)
    dep.save(d / "inputs" / "depth.png")
    box = [37, 21, 171, 97]
    question = "What is the object <mask> next to?"
    model = load_original(d / "checkpoint")
    parts = [
        llava.Image(str(d / "inputs" / "image.png")),
        question,
        Depth(str(d / "inputs" / "depth.png")),
        Mask("bbox", [[*box, img.height, img.width]]),
    ]
    rec, text = run_case(model, parts, max_new)
    save_expected(d, rec)
    write_json(
        d / "inputs" / "request.json",
        {
            "question": question,
            "image": "image.png",
            "depth": "depth.png",
            "regions": [{"box": box}],
            "max_new_tokens": max_new,
        },
    )
    write_json(
        d / "case.json",
        {
            "name": d.name,
            "lineage": "sr3d",
            "runner": "sr3d_plugin.conformance.sr_real:run",
            "recorded_with": versions(),
            "answer": text,
            "paths": ["processor", "pipeline.ask", "cli ask"],
            "description": "Single non-square image (dynamic tiles + thumbnail), 8-bit relative depth image "
            "(value/255, 0 valid), one box region; generate_content of the original.",
        },
    )


def case_single_depth_anything(ckpt_src: Path, work: Path, max_new: int) -> None:
    d = new_case("sr3d_single_depth_anything")
    shutil.copytree(ckpt_src, d / "checkpoint")
    rng = np.random.default_rng(12)
    img = smooth_image(rng, 90, 200)  # small portrait: 1x2 tiles enlarge both axes, the thumbnail mixes up/down
    img.save(d / "inputs" / "image.png")
    # a tiny Depth Anything V2 (random weights) built from a config, saved with the case
    torch.manual_seed(5)
    bb = transformers.Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=70,
        patch_size=14,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    da_cfg = transformers.DepthAnythingConfig(
        backbone_config=bb,
        reassemble_hidden_size=32,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
        patch_size=14,
        depth_estimation_type="relative",
    )
    da = transformers.DepthAnythingForDepthEstimation(da_cfg)
    with torch.no_grad():
        # random weights with enough spread that the prediction varies over the image (a near-constant
        # map would make 1 - minmax(pred) amplify rounding noise)
        for p in da.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.25)
        da.head.conv3.bias.fill_(0.5)  # keep the ReLU output away from all-zero
    da_dir = d / "depth_model"
    da.save_pretrained(str(da_dir), safe_serialization=True)
    transformers.DPTImageProcessor(
        size={"height": 70, "width": 70},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=3,
        do_pad=False,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(str(da_dir))
    question = "How far is the wall?"
    model = load_original(d / "checkpoint")

    def init_depth_model(self=model):
        return (
            transformers.AutoImageProcessor.from_pretrained(str(da_dir)),
            transformers.AutoModelForDepthEstimation.from_pretrained(str(da_dir)).eval(),
        )

    model.init_depth_model = init_depth_model
    depth_seen: list = []
    orig_fromarray = Image.fromarray

    def fromarray(arr, *a, **k):  # the uint8 depth image the original makes from the prediction
        if getattr(arr, "dtype", None) == np.uint8 and arr.ndim == 2:
            depth_seen.append(np.array(arr))
        return orig_fromarray(arr, *a, **k)

    import PIL.Image

    PIL.Image.fromarray = fromarray
    try:
        rec, text = run_case(model, [llava.Image(str(d / "inputs" / "image.png")), question], max_new)
    finally:
        PIL.Image.fromarray = orig_fromarray
    rec["depth_uint8"] = torch.from_numpy(depth_seen[0])
    save_expected(d, rec)
    write_json(
        d / "inputs" / "request.json",
        {"question": question, "image": "image.png", "depth_model": "../depth_model", "max_new_tokens": max_new},
    )
    write_json(
        d / "case.json",
        {
            "name": d.name,
            "lineage": "sr3d",
            "runner": "sr3d_plugin.conformance.sr_real:run",
            "recorded_with": versions(),
            "answer": text,
            "paths": ["processor", "pipeline.ask", "cli ask"],
            "description": "Single portrait image without depth: the original's Depth Anything path "
            "(post-processed to the image size, 1 - minmax, uint8) with a tiny random Depth Anything V2 saved in depth_model/.",
        },
    )


def write_scene(root: Path, rng: np.random.Generator, n: int, w: int = 640, h: int = 480) -> dict:
    """A ScanNet-style posed RGB-D folder (uint16 mm depth with zero holes) and the same data as
    the original's EmbodiedScan-style meta dict."""
    for sub in ("color", "depth", "pose", "intrinsic"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    k = np.array([[577.6, 0, 319.5, 0], [0, 578.7, 239.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float64)
    np.savetxt(root / "intrinsic" / "intrinsic_depth.txt", k, fmt="%.6f")
    np.savetxt(root / "intrinsic" / "intrinsic_color.txt", k, fmt="%.6f")
    c, s = np.cos(0.3), np.sin(0.3)
    axis = np.array([[c, -s, 0, 1.2], [s, c, 0, -0.7], [0, 0, 1, 0.05], [0, 0, 0, 1]])
    (root / "scene0000_00.txt").write_text(
        "axisAlignment = " + " ".join(f"{v:.9f}" for v in axis.reshape(-1)) + "\nsceneType = Living room\n"
    )
    frames = []
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        img = smooth_image(rng, w, h)
        img.save(root / "color" / f"{i * 10}.jpg", quality=85)
        depth = 1500 + 900 * np.sin(xx / 90.0 + i) * np.cos(yy / 70.0) + 400 * yy / h + rng.integers(-2, 3, (h, w))
        depth = np.clip(depth, 300, 5000).astype(np.uint16)
        depth[rng.random((h, w)) < 0.04] = 0  # scattered holes
        depth[: h // 6, w - w // 5 :] = 0  # a missing block
        Image.fromarray(depth).save(root / "depth" / f"{i * 10}.png")
        yaw = 0.4 * i
        pose = np.eye(4)
        pose[:3, :3] = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]]) @ np.array(
            [[1, 0, 0], [0, 0, 1], [0, -1, 0]]
        )
        pose[:3, 3] = [0.3 * i, 1.5 - 0.1 * i, 1.4]
        np.savetxt(root / "pose" / f"{i * 10}.txt", pose, fmt="%.9f")
        frames.append(
            {
                "img_path": f"color/{i * 10}.jpg",
                "depth_path": f"depth/{i * 10}.png",
                "cam2global": np.loadtxt(root / "pose" / f"{i * 10}.txt"),
            }
        )
    meta = {
        "images": frames,
        "axis_align_matrix": np.loadtxt(root / "scene0000_00.txt", comments=None, converters=None, dtype=str)
        if False
        else _read_axis(root / "scene0000_00.txt"),
        "depth_cam2img": np.loadtxt(root / "intrinsic" / "intrinsic_depth.txt"),
        "cam2img": np.loadtxt(root / "intrinsic" / "intrinsic_color.txt"),
    }
    return meta


def _read_axis(path: Path) -> np.ndarray:
    line = next(ln for ln in path.read_text().splitlines() if ln.startswith("axisAlignment"))
    return np.array([float(v) for v in line.split("=")[1].split()]).reshape(4, 4)


def original_world_xyz(scene: Path, meta: dict, num_frames: int):
    """The original's VideoProcessor.preprocess on this scene (frame sampling, unproject, axis
    alignment, R_xup rotation, min/max over all pixels of all frames)."""
    vp = VideoProcessor.__new__(VideoProcessor)
    vp.video_folder = str(scene)
    vp.frame_folder = str(scene)
    vp.frame_sampling_strategy = "uniform"
    vp.scene = {"scannet/scene0000_00": meta}
    vp.scan2obj = {"scannet/scene0000_00": []}
    out = vp.preprocess("scannet/scene0000_00", force_sample=True, frames_upbound=num_frames)
    return out


def case_multiview(
    name: str,
    ckpt_src: Path,
    max_new: int,
    total: int,
    num_frames: int,
    regions: list,
    question: str,
    description: str,
    seed: int,
) -> None:
    d = new_case(name)
    shutil.copytree(ckpt_src, d / "checkpoint")
    rng = np.random.default_rng(seed)
    scene = d / "inputs" / "scene"
    meta = write_scene(scene, rng, total)
    vd = original_world_xyz(scene, meta, num_frames)
    images = [Image.open(p) for p in vd["frame_files"]]
    h, w = images[0].height, images[0].width
    # one Mask media per frame (empty for frames without a region), as the original's multi-image eval does
    per_frame: list[list] = [[] for _ in images]
    mask_files = []
    sampled_names = [Path(p).stem for p in vd["frame_files"]]
    for r in regions:
        k = sampled_names.index(r["frame"])
        if "box" in r:
            per_frame[k].append(("bbox", r["box"] + [h, w]))
        else:
            m = np.zeros((h, w), dtype=np.uint8)
            yy, xx = np.mgrid[0:h, 0:w]
            cy, cx, ry, rx = r["ellipse"]
            m[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0] = 1
            fname = f"mask_{r['frame']}.png"
            Image.fromarray(m * 255).save(d / "inputs" / fname)
            mask_files.append(fname)
            r["mask"] = fname
            per_frame[k].append(("mask", np.asarray(Image.open(d / "inputs" / fname)) > 0))
    parts = [*list(images), question]
    # the original takes the xyz branch only when depth media are present (their values are then
    # replaced by multiimg_world_xyz): one Depth per frame, as a caller of generate_content must pass
    parts += [Depth(str(scene / "depth" / f"{s}.png")) for s in sampled_names]
    for items in per_frame:
        kinds = {t for t, _ in items}
        if not items:
            parts.append(Mask("bbox", []))
        elif kinds == {"bbox"}:
            parts.append(Mask("bbox", [c for _, c in items]))
        elif kinds == {"mask"} and len(items) == 1:
            parts.append(Mask("mask", [items[0][1].astype(np.uint8)]))
        else:
            raise ValueError("one kind of region per frame in this recorder")
    model = load_original(d / "checkpoint")
    rec, text = run_case(model, parts, max_new, multiimg_world_xyz=vd["world_coords_norm"])
    rec["sampled_frames"] = torch.tensor([int(s) for s in sampled_names])
    save_expected(d, rec)
    write_json(
        d / "inputs" / "request.json",
        {
            "question": question,
            "scene": "scene",
            "num_frames": num_frames,
            "max_new_tokens": max_new,
            "regions": [{k: v for k, v in r.items() if k != "ellipse"} for r in regions],
        },
    )
    write_json(
        d / "case.json",
        {
            "name": d.name,
            "lineage": "sr3d",
            "runner": "sr3d_plugin.conformance.sr_real:run",
            "recorded_with": versions(),
            "answer": text,
            "paths": ["processor", "pipeline.ask", "cli ask", "lmms-eval"],
            "description": description,
        },
    )


def case_pe_off(ckpt_src: Path, max_new: int) -> None:
    """The host VILA model with the PE off (no perception encoder; the region extractor stays, unused:
    the original cannot run without one) on a single image without regions."""
    d = new_case("sr3d_vila_host_pe_off")
    shutil.copytree(ckpt_src, d / "checkpoint")
    shutil.rmtree(d / "checkpoint" / "perception_encoder")
    cfg_path = d / "checkpoint" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("perception_encoder", "perception_encoder_cfg"):
        cfg[key] = None
    cfg_path.write_text(json.dumps(cfg, indent=2))
    rng = np.random.default_rng(13)
    img = smooth_image(rng, 200, 310)
    img.save(d / "inputs" / "image.png")
    question = "Describe the scene."
    model = load_original(d / "checkpoint")
    rec, text = run_case(model, [llava.Image(str(d / "inputs" / "image.png")), question], max_new)
    save_expected(d, rec)
    write_json(d / "inputs" / "request.json", {"question": question, "image": "image.png", "max_new_tokens": max_new})
    write_json(
        d / "case.json",
        {
            "name": d.name,
            "lineage": "sr3d",
            "runner": "sr3d_plugin.conformance.sr_real:run",
            "recorded_with": versions(),
            "answer": text,
            "paths": ["processor", "pipeline.ask"],
            "load_kwargs": {"use_position_encoding": False},
            "description": "PE-off identity: the same original code with no perception encoder (the region "
            "extractor is kept but no region is asked; the original needs one to run), single image; our vila builder with the PE off must give these logits.",
        },
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", default="/tmp/srreal-record")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--only", action="append")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ckpt = work / "checkpoint"
    build_checkpoint(ckpt, work, seed=7)
    sel = set(args.only or [])

    def want(n):
        return not sel or n in sel

    if want("a"):
        case_single_reldepth_box(ckpt, args.max_new_tokens)
    if want("b"):
        case_single_depth_anything(ckpt, work, args.max_new_tokens)
    if want("c"):
        case_multiview(
            "sr3d_multiview_rgbd_box",
            ckpt,
            args.max_new_tokens,
            total=7,
            num_frames=3,
            regions=[{"frame": "30", "box": [101, 77, 388, 301]}],
            question="Where is <mask> relative to the camera?",
            description="Posed RGB-D scene (640x480 uint16 mm depth with zero holes, camera-to-world poses, "
            "axisAlignment), 3 of 7 frames sampled, a box on one frame; the original's VideoProcessor "
            "world coordinates fed to generate_content(multiimg_world_xyz=...).",
            seed=21,
        )
    if want("d"):
        case_multiview(
            "sr3d_multiview_mask_two_regions",
            ckpt,
            args.max_new_tokens,
            total=5,
            num_frames=4,
            regions=[{"frame": "10", "ellipse": [200, 300, 90, 130]}, {"frame": "40", "box": [12, 200, 250, 470]}],
            question="Is <mask> bigger than <mask>?",
            description="Posed RGB-D scene, 4 of 5 frames, a mask region on one frame and a box region on "
            "another (two <mask> tokens).",
            seed=22,
        )
    if want("e"):
        case_pe_off(ckpt, args.max_new_tokens)


if __name__ == "__main__":
    main()
