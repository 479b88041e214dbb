"""Inference API: ask an SR-3D model a question about an image, frames, a video or a scanned scene.

.. code-block:: python

    from sr3d_plugin.inference import SR3DPipeline

    pipe = SR3DPipeline.from_pretrained("checkpoints/sr3d-8b", depth_model="depth-anything/Depth-Anything-V2-Small-hf")
    out = pipe.ask("Is <region0> left of <region1>?", scene="scans/scene0000_00",
                   regions=["frame=3 box=10,20,110,140", "box3d=1.2,0.4,0.5,0.6,0.6,1.0"])
    print(out["answer"])

What happens in :meth:`SR3DPipeline.ask` (SR3D-FACTS §2, §3, §6):

1. **Frames.** ``image`` (one image, tiled dynamically), ``frames`` (image files or PIL images of
   one scene), ``video`` (a video file) or ``scene`` (a ScanNet-style folder). Frame lists, videos and
   scenes are sampled uniformly to ``num_frames`` (default ``config.num_video_frames`` = 32,
   ``floor(linspace(0, N−1, n))``); every sampled frame is one tile.
2. **3D positions** (only for models with ``use_position_encoding``), first that applies:
   ``points`` (a reconstruction ``.npz``/``.npy`` or an array; robust canonical mode) →
   ``depth_model`` (Depth Anything V2 id or folder; single-view convention per frame) → given depth:
   with intrinsics (and poses for several frames) metric back-projection into one world frame and
   the canonical transform in ``config.canonical_mode``; without intrinsics the single-view relative
   depth convention. No source at all is an error.
3. **Regions** (:mod:`sr3d_plugin.regions`): box / mask image / COCO RLE / polygon on a frame, or a
   3D box projected onto every frame where it is visible. Frame indices count the frames after
   sampling; ``frame=@ID`` names an original frame id. The question refers to regions with
   ``<mask>`` (in order) or ``<region0>``, ``<region1>`` … aliases.
4. **Generation** with the model's ``generate`` (greedy unless ``do_sample``), seeded with ``seed``.
5. **Scoring** (``score_answer``): ``answer_logprob`` = Σᵢ log p(aᵢ | prompt, a₍<ᵢ₎), the *summed*
   log-probability (natural log) of the answer's tokens under teacher forcing, i.e.
   log p(answer | prompt). The answer is tokenised on its own (no special tokens) and appended
   right after the generation prompt (``…<|im_start|>assistant\\n``); the end-of-turn token is not
   included.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sr3d_plugin.errors import SR3DConfigError, SR3DInputError
from sr3d_plugin.modeling.inputs import Region, VisualInput
from sr3d_plugin.regions import RegionSpec, parse_region_spec, region_summary, resolve_regions

__all__ = ["SR3DPipeline", "count_region_references"]

PathLike = str | os.PathLike
_REGION_ALIAS = re.compile(r"<region(\d+)>")


def count_region_references(question: str, mask_token: str = "<mask>") -> tuple[int, list[int]]:
    """``(number of <mask> tokens, [K of every <regionK> alias])`` in a question."""
    return question.count(mask_token), [int(m.group(1)) for m in _REGION_ALIAS.finditer(question)]


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def _resolve_device(device: str | torch.device | None) -> torch.device:
    from sr3d_plugin.sources.depth_anything import resolve_device

    return resolve_device(device)


def _to_image(value: Any, what: str) -> Image.Image:
    from sr3d_plugin.sources.files import load_rgb

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if _is_path(value):
        return load_rgb(value, what)
    if isinstance(value, np.ndarray):
        arr = value
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise SR3DInputError(f"{what} array must be [H, W, 3] uint8, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            raise SR3DInputError(f"{what} array must be uint8 (0..255), got {arr.dtype}")
        return Image.fromarray(np.ascontiguousarray(arr[..., :3]))
    raise SR3DInputError(f"{what} is a {type(value).__name__}; expected a file path, PIL image or uint8 array")


def _as_list(value: Any) -> list[Any] | None:
    """A per-frame list from a path, a list/tuple or a stacked array (leading axis = frames)."""
    if value is None:
        return None
    if _is_path(value) or isinstance(value, Image.Image):
        return [value]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return list(np.asarray(value))
    return list(value)


class SR3DPipeline:
    """An SR-3D model with its processor, ready to answer questions (see the module docstring).

    Args:
        model: an :class:`~sr3d_plugin.modeling.SR3DForConditionalGeneration` (or compatible).
        processor: its :class:`~sr3d_plugin.modeling.SR3DProcessor`.
        depth_model: default Depth Anything V2 id or folder for inputs without geometry (None: only
            when asked; ``"auto"``: the model config's ``depth_model``).
        device: device of the depth estimator (default: the model's device).
        load_seconds: time it took to load the model (reported in ``timings["load"]``).
        model_path: where the model came from (reported).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        depth_model: str | PathLike | None = None,
        device: str | torch.device | None = None,
        load_seconds: float = 0.0,
        model_path: str | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self.config = model.config
        self.depth_model = None if depth_model is None else str(depth_model)
        self.device = _resolve_device(device) if device is not None else self._model_device()
        self.load_seconds = float(load_seconds)
        self.model_path = model_path

    # ------------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: PathLike,
        builder: str | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        load_in_4bit: bool = False,
        depth_model: str | PathLike | None = None,
        **load_kwargs: Any,
    ) -> SR3DPipeline:
        """Load a model folder with :func:`sr3d_plugin.builders.load_model` and wrap it.

        Args:
            path: model folder (ours, VILA/NVILA/SR-3D layout, or anything a registered builder reads).
            builder: builder name (default: detected from the folder).
            dtype: ``"bfloat16"``, ``"float16"``, ``"float32"``, ``"auto"`` or a torch dtype (default: the checkpoint's).
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"`` (default: CUDA when available).
            load_in_4bit: quantise the language model to 4 bits (bitsandbytes; placed by the builder).
            depth_model: default depth estimator for inputs without geometry (see the class).
            **load_kwargs: passed on to the builder (e.g. ``device_map="auto"`` to spread a large model
                over several GPUs, ``load_in_8bit``, ``attn_implementation``); with a ``device_map`` or
                quantisation the model is not moved to ``device`` afterwards.
        """
        t0 = time.perf_counter()
        dev = _resolve_device(device)
        kwargs: dict[str, Any] = dict(load_kwargs)
        if dtype is not None:
            kwargs["dtype"] = dtype
        quantized = bool(load_in_4bit or kwargs.get("load_in_8bit") or kwargs.get("quantization_config") is not None)
        if load_in_4bit:
            kwargs["load_in_4bit"] = True
        if quantized:  # bitsandbytes places the weights while loading; they cannot be moved afterwards
            kwargs.setdefault("device_map", {"": dev.index or 0} if dev.type == "cuda" else None)
        placed = quantized or kwargs.get("device_map") is not None
        from sr3d_plugin.builders import load_model

        try:
            model, processor = load_model(path, builder=builder, **kwargs)
        except (SR3DInputError, SR3DConfigError):
            raise
        except (OSError, ValueError, KeyError) as exc:
            raise SR3DInputError(f"cannot load the model from {str(path)!r}: {exc}") from exc
        if not placed:
            model = model.to(dev)
        model.eval()
        return cls(
            model,
            processor,
            depth_model=depth_model,
            device=dev,
            load_seconds=time.perf_counter() - t0,
            model_path=str(path),
        )

    def _model_device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:  # pragma: no cover - a model without parameters
            return torch.device("cpu")

    def _default_depth_model(self) -> str:
        from sr3d_plugin.sources.depth_anything import DEFAULT_DEPTH_MODEL

        return str(getattr(self.config, "depth_model", None) or DEFAULT_DEPTH_MODEL)

    @property
    def needs_positions(self) -> bool:
        """Whether the model adds a 3D positional encoding (and so needs depth, points or a depth model)."""
        return bool(getattr(self.config, "use_position_encoding", True))

    # ------------------------------------------------------------------------------------------
    # frames
    # ------------------------------------------------------------------------------------------

    def read_frames(
        self,
        *,
        image: Any = None,
        frames: Sequence[Any] | None = None,
        video: PathLike | None = None,
        scene: PathLike | None = None,
        depth: Any = None,
        intrinsics: Any = None,
        poses: Any = None,
        num_frames: int | None = None,
        depth_scale: float = 1000.0,
    ) -> Any:
        """Read the visual input into a :class:`~sr3d_plugin.sources.base.FrameSet` (frames after sampling).

        ``meta["sampled_indices"]`` holds the positions of the sampled frames in the original sequence
        (when known) and ``meta["total_frames"]`` its length.
        """
        from sr3d_plugin import plugins

        given = [
            name
            for name, v in (("image", image), ("frames", frames), ("video", video), ("scene", scene))
            if v is not None
        ]
        if len(given) != 1:
            raise SR3DInputError(
                f"give exactly one visual input (image, frames, video or scene); got {len(given)}"
                + (f" ({', '.join(given)})" if given else "")
            )
        n = getattr(self.config, "num_video_frames", 32) if num_frames is None else num_frames
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise SR3DInputError(f"num_frames must be a positive integer, got {num_frames!r}")
        if (scene is not None or video is not None) and any(x is not None for x in (depth, intrinsics, poses)):
            raise SR3DInputError(
                "depth / intrinsics / poses go with an image or frames; a scene folder carries its own and a video "
                "takes point maps (points) or a depth model"
            )
        if scene is not None:
            fs = plugins.create("frame_readers", "scannet", num_frames=int(n), depth_scale=depth_scale).read(scene)
            return fs
        if video is not None:
            fs = plugins.create("frame_readers", "video", num_frames=int(n)).read(video)
            fs.meta["sampled_indices"] = list(fs.meta.get("frame_indices", []))
            return fs
        if image is not None:
            if isinstance(image, (list, tuple)):
                raise SR3DInputError(f"image takes one image, got a list of {len(image)}; use frames for several")
            return self._assemble([image], depth, intrinsics, poses, None, depth_scale, single=True)
        assert frames is not None
        if _is_path(frames) or isinstance(frames, Image.Image):
            frames = [frames]
        return self._assemble(list(frames), depth, intrinsics, poses, int(n), depth_scale, single=False)

    def _assemble(
        self,
        images: list[Any],
        depth: Any,
        intrinsics: Any,
        poses: Any,
        num_frames: int | None,
        depth_scale: float,
        single: bool,
    ) -> Any:
        from sr3d_plugin.sources.base import FrameSet, uniform_frame_indices
        from sr3d_plugin.sources.files import check_depth_array, load_depth_file, load_intrinsics_file, load_pose_file

        total = len(images)
        if total == 0:
            raise SR3DInputError("frames is empty; expected at least one image")
        unit = "image" if single else "frame"
        depth_l = _as_list(depth) if not (single and isinstance(depth, np.ndarray) and depth.ndim == 2) else [depth]
        poses_l = _as_list(poses) if not (single and isinstance(poses, np.ndarray) and poses.ndim == 2) else [poses]
        for what, lst in (("depth map", depth_l), ("pose", poses_l)):
            if lst is not None and len(lst) != total:
                raise SR3DInputError(
                    f"{len(lst)} {what}(s) for {total} {unit}(s); expected one {what} per {unit}, in the same order"
                )
        picked = uniform_frame_indices(total, num_frames or total)
        imgs = [_to_image(images[i], f"{unit} {i}") for i in picked]

        depth_arr = None
        if depth_l is not None:
            maps = []
            for i in picked:
                d = depth_l[i]
                if _is_path(d):
                    maps.append(load_depth_file(d, depth_scale))
                else:
                    arr = np.asarray(d, dtype=np.float32)
                    if arr.ndim != 2:
                        raise SR3DInputError(f"depth of {unit} {i} must be [H, W] metres, got shape {arr.shape}")
                    check_depth_array(arr, f"depth of {unit} {i}")
                    maps.append(arr)
            shapes = {m.shape for m in maps}
            if len(shapes) != 1:
                raise SR3DInputError(f"depth maps have different shapes {sorted(shapes)}; expected one size")
            depth_arr = np.stack(maps).astype(np.float32)

        k_arr = None
        if intrinsics is not None:
            if _is_path(intrinsics):
                k = load_intrinsics_file(intrinsics)[None].repeat(len(picked), axis=0)
            else:
                k = np.asarray(intrinsics, dtype=np.float64)
                if k.shape == (3, 3):
                    k = k[None].repeat(len(picked), axis=0)
                elif k.ndim == 3 and k.shape[1:] == (3, 3) and k.shape[0] == total:
                    k = k[picked]
                else:
                    raise SR3DInputError(
                        f"intrinsics must be [3, 3] or [{total}, 3, 3] (one per {unit}), got shape {k.shape}"
                    )
            if not np.isfinite(k).all() or (k[:, 0, 0] <= 0).any() or (k[:, 1, 1] <= 0).any():
                raise SR3DInputError("intrinsics must be finite pinhole matrices with fx > 0 and fy > 0")
            k_arr = k

        pose_arr = None
        if poses_l is not None:
            mats = []
            for i in picked:
                p = poses_l[i]
                m = load_pose_file(p) if _is_path(p) else np.asarray(p, dtype=np.float64)
                if m.shape != (4, 4):
                    raise SR3DInputError(
                        f"pose of {unit} {i} must be a 4×4 camera-to-world matrix, got shape {m.shape}"
                    )
                if not np.isfinite(m).all():
                    raise SR3DInputError(
                        f"pose of {unit} {i} holds non-finite values; expected a valid camera-to-world"
                    )
                mats.append(m)
            pose_arr = np.stack(mats)

        same_size = depth_arr is None or all(im.size == (depth_arr.shape[2], depth_arr.shape[1]) for im in imgs)
        stems = [Path(images[i]).stem if _is_path(images[i]) else str(i) for i in picked]
        ids = stems if len(set(stems)) == len(stems) else [str(i) for i in picked]
        first = images[0]
        return FrameSet(
            images=imgs,
            depth=depth_arr,
            intrinsics=k_arr,
            cam_to_world=pose_arr,
            color_intrinsics=k_arr if same_size else None,
            frame_ids=ids,
            source=str(first) if _is_path(first) else "in-memory images",
            meta={"total_frames": total, "sampled_indices": picked, "depth_scale": float(depth_scale)},
        )

    # ------------------------------------------------------------------------------------------
    # 3D positions
    # ------------------------------------------------------------------------------------------

    def positions(
        self,
        frames: Any,
        *,
        points: Any = None,
        depth_model: str | PathLike | None = None,
        cache: Any = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """Canonical point maps of ``frames``.

        Returns:
            ``(canonical [V, H, W, 3] float32, valid [V, H, W] bool or None, info)`` where ``valid`` is
            given only in robust mode (the released ``"sr3d"`` convention averages every pixel) and
            ``info`` = ``{"source", "space", "canonical_mode", "depth_model"?}``.
        """
        from sr3d_plugin.pointmap import canonical_pointmaps, choose_source, pointmaps_with_cache

        if points is not None:
            pm = self._reconstruction(frames, points)
            mode = pm.canonical_mode
            canonical = canonical_pointmaps(pm, mode)
            info = {"source": "reconstruction", "space": pm.space, "canonical_mode": mode}
            if _is_path(points):
                info["points"] = str(points)
        else:
            if depth_model is not None:
                name = "depth_anything"
                options: dict[str, Any] = {"model": str(depth_model), "device": str(self.device)}
            elif frames.depth is not None:
                name = choose_source(frames)
                options = {}
                if name == "relative_depth":  # depth images are read in file units (SR-REAL's process_depth)
                    options["depth_scale"] = float(frames.meta.get("depth_scale", 1000.0))
            else:
                raise SR3DInputError(
                    "this model adds 3D positional encodings (use_position_encoding=True) but the input has no "
                    "depth, point maps or depth model; give depth (with intrinsics, and poses for several frames), "
                    f"points (.npz/.npy reconstruction), or a depth model, e.g. depth_model={self._default_depth_model()!r}"
                )
            # metric ground-truth depth follows the model's convention; other sources pick their own mode
            mode_arg = getattr(self.config, "canonical_mode", "sr3d") if name == "gt_depth" else None
            result = pointmaps_with_cache(frames, name, canonical_mode=mode_arg, cache=cache, **options)
            pm, canonical, mode = result.pointmaps, result.canonical, result.canonical_mode
            info = {"source": name, "space": pm.space, "canonical_mode": mode}
            if depth_model is not None:
                info["depth_model"] = str(depth_model)
        valid = pm.valid if mode == "robust" else None
        return canonical.to(torch.float32), valid, info

    def _reconstruction(self, frames: Any, points: Any) -> Any:
        """Point maps from a reconstruction file or array, matched to the sampled frames."""
        from sr3d_plugin.sources.base import PointMaps
        from sr3d_plugin.sources.pointmap_sources import check_aspect
        from sr3d_plugin.sources.reconstruction import load_reconstruction

        v = len(frames)
        sampled = frames.meta.get("sampled_indices")
        total = frames.meta.get("total_frames")
        if _is_path(points):
            rec = load_reconstruction(points)
            xyz, valid, ids, where = rec.xyz, rec.valid, rec.frame_ids, repr(str(points))
        else:
            xyz = np.asarray(points.detach().cpu() if isinstance(points, torch.Tensor) else points, dtype=np.float32)
            if xyz.ndim == 3:
                xyz = xyz[None]
            if xyz.ndim != 4 or xyz.shape[-1] != 3:
                raise SR3DInputError(f"points must be [V, H, W, 3], got shape {xyz.shape}")
            valid = np.isfinite(xyz).all(axis=-1)
            xyz = np.where(valid[..., None], xyz, 0.0).astype(np.float32)
            ids, where = None, "the points array"
        index: list[int] | None = None
        if ids is not None:
            lookup: dict[str, int] = {}
            for i, fid in enumerate(ids):
                lookup.setdefault(_norm_id(fid), i)
            wanted = [_norm_id(f) for f in frames.frame_ids]
            if all(w in lookup for w in wanted):
                index = [lookup[w] for w in wanted]
        if index is None:
            if len(xyz) == v:
                index = list(range(v))
            elif sampled is not None and total is not None and len(xyz) == total:
                index = list(sampled)
            else:
                raise SR3DInputError(
                    f"{where} holds {len(xyz)} point map(s) but {v} frame(s) were sampled"
                    + (f" from {total}" if total is not None else "")
                    + "; expected one point map per sampled frame, one per original frame, or 'frame_ids' naming them"
                )
        xyz, valid = xyz[index], valid[index]
        check_aspect(frames, xyz.shape[1], xyz.shape[2], 0.02, f"point map of {where}")
        if not valid.any():
            raise SR3DInputError(f"{where} has no valid (finite) point for the sampled frames")
        return PointMaps(
            xyz=torch.from_numpy(np.ascontiguousarray(xyz)),
            valid=torch.from_numpy(np.ascontiguousarray(valid)),
            space="world",
            canonical_mode="robust",
        )

    # ------------------------------------------------------------------------------------------
    # asking
    # ------------------------------------------------------------------------------------------

    def _check_question(self, question: str, n_regions: int) -> None:
        if not isinstance(question, str) or not question.strip():
            raise SR3DInputError(f"the question is empty ({question!r}); expected some text")
        image_token = getattr(self.processor, "image_token", "<image>")
        if image_token in question:
            raise SR3DInputError(
                f"the question contains {image_token}; image markers are added automatically — remove them"
            )
        mask_token = getattr(self.processor, "mask_token", "<mask>")
        bare, aliases = count_region_references(question, mask_token)
        if bare and aliases:
            raise SR3DInputError(f"the question mixes {mask_token} and <regionK> references; use one style")
        if aliases:
            bad = sorted({k for k in aliases if k >= n_regions})
            if bad:
                raise SR3DInputError(
                    f"the question refers to <region{bad[0]}> but {n_regions} region(s) were given"
                    + (f" (<region0>..<region{n_regions - 1}>)" if n_regions else "")
                )
        elif bare != n_regions:
            raise SR3DInputError(
                f"the question has {bare} {mask_token} token(s) but {n_regions} region(s) were given; "
                f"expected one {mask_token} per region, in order (or <regionK> aliases)"
            )

    @staticmethod
    def _check_paths(**inputs: Any) -> None:
        """Fail early (before any decoding or model work) when a named input file or folder is missing."""
        from sr3d_plugin.sources.files import require_file

        for name, value in inputs.items():
            items = value if isinstance(value, (list, tuple)) else [value]
            for item in items:
                if not _is_path(item):
                    continue
                if name == "scene":
                    if not Path(item).expanduser().is_dir():
                        raise SR3DInputError(f"scene folder not found: {str(item)!r}")
                else:
                    require_file(
                        item,
                        {"image": "image", "frames": "frame image", "video": "video file"}.get(name, "point-map file"),
                    )

    def _batch_to_device(self, batch: Any) -> dict[str, Any]:
        dev = self._model_device()
        return {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def ask(
        self,
        question: str,
        *,
        image: Any = None,
        frames: Sequence[Any] | None = None,
        video: PathLike | None = None,
        scene: PathLike | None = None,
        depth: Any = None,
        depth_model: str | PathLike | None = None,
        intrinsics: Any = None,
        poses: Any = None,
        points: Any = None,
        regions: Sequence[str | RegionSpec | Region] = (),
        num_frames: int | None = None,
        max_new_tokens: int = 64,
        score_answer: str | None = None,
        seed: int = 0,
        do_sample: bool = False,
        temperature: float | None = None,
        system: str | None = None,
        depth_scale: float = 1000.0,
        cache: Any = False,
    ) -> dict[str, Any]:
        """Answer ``question`` about one visual input.

        Args:
            question: the user text; refers to regions with ``<mask>`` (in order) or ``<regionK>``.
            image: one image (path, PIL image or ``[H, W, 3]`` uint8 array), tiled dynamically.
            frames: several images of one scene (paths / PIL / arrays), one tile each.
            video: a video file.
            scene: a ScanNet-style posed RGB-D folder (CONTRIBUTING.md, "Data layouts").
            depth: depth for ``image`` / ``frames``: file(s) (16-bit PNG in mm / ``depth_scale``,
                ``.npy`` in metres) or ``[H, W]`` / ``[V, H, W]`` arrays in metres; one per frame.
            depth_model: Depth Anything V2 id or folder (``"auto"``: the model config's default);
                overrides the pipeline's default.
            intrinsics: ``[3, 3]`` pinhole matrix of the depth maps (file or array), or ``[V, 3, 3]``.
            poses: 4×4 camera-to-world per frame (files or ``[V, 4, 4]``).
            points: reconstruction point maps (``.npz`` / ``.npy`` file or ``[V, H, W, 3]`` array).
            regions: region specs (:mod:`sr3d_plugin.regions`) or :class:`Region` objects, in the order
                ``<mask>`` tokens use them.
            num_frames: frames sampled from frame lists, videos and scenes (default ``config.num_video_frames``).
            max_new_tokens: generation budget.
            score_answer: also return ``answer_logprob`` = log p(score_answer | prompt) (module docstring).
            seed: seeds torch / numpy / random before generating.
            do_sample: sample instead of greedy decoding (``temperature`` optional).
            system: system prompt (default the processor's ``default_system``: none for VILA folders, so the
                chat template's own default applies as in SR-REAL, and for LLaVA folders, whose conversation
                template brings its own; "You are a helpful assistant." otherwise).
            depth_scale: raw depth units per metre for integer depth images.
            cache: point-map cache (False, True, a folder or a :class:`~sr3d_plugin.pointmap.PointMapCache`).

        Returns:
            ``{"answer", "answer_logprob"? (with score_answer), "score_answer"?, "answer_tokens"?,
            "regions", "num_frames", "frame_ids", "num_tiles", "prompt_tokens", "generated_tokens",
            "geometry", "input", "model", "seed", "timings"}`` — ``timings`` in seconds: ``load`` (the
            model, once per pipeline), ``read``, ``geometry``, ``regions``, ``encode`` (processor),
            ``generate`` (vision tower + LLM), ``score`` and ``total`` (this call).
        """
        from transformers import set_seed

        t_start = time.perf_counter()
        timings: dict[str, float] = {"load": round(self.load_seconds, 4)}
        if isinstance(regions, (str, Region, RegionSpec)):
            regions = [regions]
        regions = list(regions)
        self._check_question(question, len(regions))
        if max_new_tokens is None or int(max_new_tokens) <= 0:
            raise SR3DInputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        specs = [parse_region_spec(r) if isinstance(r, str) else r for r in regions]
        if points is not None and depth is not None:
            raise SR3DInputError("give either depth or points (reconstruction point maps), not both")
        if depth_model is not None and (depth is not None or points is not None):
            raise SR3DInputError("a depth model estimates depth; do not also give depth or points")
        if depth_model == "auto":
            depth_model = self._default_depth_model()
        dm = depth_model if depth_model is not None else self.depth_model
        if dm == "auto":
            dm = self._default_depth_model()
        self._check_paths(image=image, frames=frames, video=video, scene=scene, points=points)
        has_geometry = scene is not None or depth is not None or points is not None or dm is not None
        if self.needs_positions and not has_geometry:
            raise SR3DInputError(
                "this model adds 3D positional encodings (use_position_encoding=True) but no depth source was given; "
                "pass depth (--depth, with --intrinsics, and --poses for several frames), point maps (--points "
                f".npz/.npy reconstruction) or a depth model (--depth-model, e.g. {self._default_depth_model()!r})"
            )

        t = time.perf_counter()
        fs = self.read_frames(
            image=image,
            frames=frames,
            video=video,
            scene=scene,
            depth=depth,
            intrinsics=intrinsics,
            poses=poses,
            num_frames=num_frames,
            depth_scale=depth_scale,
        )
        timings["read"] = time.perf_counter() - t

        t = time.perf_counter()
        canonical = valid = None
        geometry: dict[str, Any] = {"source": None}
        if self.needs_positions:
            # an explicit depth model beats the scene's own depth; the pipeline default only fills gaps
            use_dm = depth_model if depth_model is not None else (dm if (fs.depth is None and points is None) else None)
            canonical, valid, geometry = self.positions(fs, points=points, depth_model=use_dm, cache=cache)
        timings["geometry"] = time.perf_counter() - t

        t = time.perf_counter()
        region_objs = resolve_regions(specs, fs)
        summaries = [
            region_summary(r, i, fs, spec if isinstance(spec, (str, RegionSpec)) else None)
            for i, (r, spec) in enumerate(zip(region_objs, specs))
        ]
        timings["regions"] = time.perf_counter() - t

        t = time.perf_counter()
        visual = VisualInput(list(fs.images), points=canonical, valid=valid, regions=region_objs)
        kwargs = {} if system is None else {"system": system}
        prompt = self.processor.build_prompt(question, visual, **kwargs)
        batch = self.processor(prompt, visual)
        num_tiles = int(batch["num_tiles"].sum())
        inputs = self._batch_to_device(batch)
        prompt_len = int(inputs["input_ids"].shape[1])
        timings["encode"] = time.perf_counter() - t

        t = time.perf_counter()
        set_seed(int(seed))
        gen_kwargs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "do_sample": bool(do_sample)}
        if do_sample and temperature is not None:
            gen_kwargs["temperature"] = float(temperature)
        tok = self.processor.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is not None:
            gen_kwargs["pad_token_id"] = int(pad)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **gen_kwargs)
        new_ids = out[0, prompt_len:].tolist()
        eos = self._eos_ids()
        generated = next((i for i, x in enumerate(new_ids) if x in eos), len(new_ids))
        answer = self.processor.decode_answer(out, prompt_len)[0].strip()
        timings["generate"] = time.perf_counter() - t

        result: dict[str, Any] = {"answer": answer}
        if score_answer is not None:
            t = time.perf_counter()
            logprob, n_tok = self.answer_logprob(inputs, score_answer)
            result["answer_logprob"] = logprob
            result["score_answer"] = score_answer
            result["answer_tokens"] = n_tok
            timings["score"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start
        result.update(
            {
                "regions": summaries,
                "num_frames": len(fs),
                "frame_ids": [str(f) for f in fs.frame_ids],
                "num_tiles": num_tiles,
                "prompt_tokens": prompt_len,
                "generated_tokens": generated,
                "geometry": geometry,
                "input": {
                    "kind": next(
                        k
                        for k, v in (("image", image), ("frames", frames), ("video", video), ("scene", scene))
                        if v is not None
                    ),
                    "source": fs.source,
                    "total_frames": int(fs.meta.get("total_frames", len(fs))),
                    "image_size": list(fs.images[0].size),
                },
                "model": self.model_path,
                "seed": int(seed),
                "timings": {k: round(float(v), 4) for k, v in timings.items()},
            }
        )
        return result

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        tok = self.processor.tokenizer
        if tok.eos_token_id is not None:
            ids.add(int(tok.eos_token_id))
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
        return ids

    @torch.inference_mode()
    def answer_logprob(self, inputs: dict[str, Any], answer: str) -> tuple[float, int]:
        """Teacher-forced ``log p(answer | prompt)`` (natural log, summed over the answer's tokens).

        Args:
            inputs: a processor batch of one prompt ending in the generation prompt (on the model's device).
            answer: the answer text, tokenised on its own without special tokens; no end-of-turn token.

        Returns:
            ``(summed log-probability, number of answer tokens)``.
        """
        tok = self.processor.tokenizer
        ids = tok(answer, add_special_tokens=False)["input_ids"]
        if not answer or not ids:
            raise SR3DInputError(f"score_answer {answer!r} has no tokens; expected a non-empty answer")
        prompt_ids = inputs["input_ids"]
        if prompt_ids.shape[0] != 1:
            raise SR3DInputError("answer_logprob scores one prompt at a time")
        ans = torch.tensor([ids], dtype=prompt_ids.dtype, device=prompt_ids.device)
        full = torch.cat([prompt_ids, ans], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(ans)], dim=1)
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "num_tiles")}
        logits = self.model(input_ids=full, attention_mask=mask, **extra).logits
        p = prompt_ids.shape[1]
        logp = torch.log_softmax(logits[0, p - 1 : full.shape[1] - 1].float(), dim=-1)
        picked = logp.gather(-1, ans[0].unsqueeze(-1)).squeeze(-1)
        return float(picked.sum()), len(ids)


def _norm_id(value: Any) -> str:
    """``"frames/000010.jpg"``, ``"000010"`` and ``"10"`` all name frame ``"10"``."""
    s = str(value).strip()
    p = Path(s)
    if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".npy", ".txt"):
        s = p.stem
    return str(int(s)) if s.isdigit() else s
