"""What ``sr3d app`` does behind its page, without gradio: load inputs, answer, draw.

:class:`AppBackend` holds one :class:`~sr3d_plugin.inference.SR3DPipeline` (the bundled tiny model by
default, loaded on first use) and the inputs the page has loaded. Answers come from
:meth:`SR3DPipeline.ask <sr3d_plugin.inference.SR3DPipeline.ask>` with exactly the arguments
``sr3d ask`` would pass, so the page and the command give the same answer for the same input.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from sr3d_plugin import _checks
from sr3d_plugin.errors import SR3DInputError
from sr3d_plugin.io_utils import stable_hash

__all__ = ["INPUT_KINDS", "AppBackend", "LoadedInput"]

#: what the page can load (``AppBackend.load(kind, ...)``)
INPUT_KINDS = ("synthetic", "image", "video", "scan")

#: loaded inputs kept per backend (least recently used ones are dropped)
_KEEP_INPUTS = 4


@dataclass
class LoadedInput:
    """One loaded visual input: what ``ask`` is called with and what the page shows.

    Attributes:
        key: identity of the input (a hash of ``ask_kwargs``).
        ask_kwargs: the visual-input arguments of :meth:`SR3DPipeline.ask` (``scene=``, ``image=`` …).
        frames: the :class:`~sr3d_plugin.sources.base.FrameSet` after sampling (what region specs'
            ``frame=K`` count).
        points: ``[V, H, W, 3]`` float32 canonical point map, or None without geometry.
        valid: ``[V, H, W]`` bool, False where a pixel has no 3D point, or None.
        geometry: the point-map info (``{"source", "space", "canonical_mode", …}``).
    """

    key: str
    ask_kwargs: dict[str, Any]
    frames: Any
    points: np.ndarray | None
    valid: np.ndarray | None
    geometry: dict[str, Any] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        """``V``, the frames after sampling."""
        return len(self.frames)

    def frame(self, k: int) -> Image.Image:
        """Frame ``k`` (after sampling) as an RGB image."""
        k = _checks.integer(k, "frame", minimum=0, maximum=self.num_frames - 1)
        return self.frames.images[k].convert("RGB")

    def pointmap_images(self) -> list[np.ndarray]:
        """One ``[H, W, 3]`` uint8 picture of the canonical point map per frame (``(xyz + 1) / 2`` as RGB)."""
        from sr3d_plugin.pointmap import colour_pointmap

        if self.points is None:
            return []
        return [colour_pointmap(p, None if self.valid is None else v) for p, v in zip(self.points, self._valid_list())]

    def _valid_list(self) -> list[Any]:
        return [None] * len(self.points) if self.valid is None else list(self.valid)


class AppBackend:
    """The model and the loaded inputs of one ``sr3d app`` server.

    Args:
        model: model folder or ``"tiny"`` (the bundled tiny SR-3D), as :meth:`SR3DPipeline.from_pretrained`.
        device: ``"cpu"``, ``"cuda"`` … (default: CUDA when available).
        depth_model: Depth Anything V2 id or folder for images and videos without depth or point maps
            (the pipeline's ``depth_model``; None: such inputs are refused with the pipeline's message).
        max_new_tokens: answer budget of each question.
        pipeline: a ready pipeline (then ``model`` and ``device`` are not used).
        work_dir: folder for the bundled scene and unpacked scan archives (default: a fresh temporary
            folder, removed by :meth:`close`).
    """

    def __init__(
        self,
        model: str | Path = "tiny",
        *,
        device: str | None = None,
        depth_model: str | Path | None = None,
        max_new_tokens: int = 32,
        pipeline: Any = None,
        work_dir: str | Path | None = None,
    ) -> None:
        self.model = str(model)
        self.device = device
        self.depth_model = None if depth_model is None else str(depth_model)
        self.max_new_tokens = _checks.integer(max_new_tokens, "max_new_tokens", minimum=1)
        self._pipeline = pipeline
        self._own_dir = work_dir is None
        self.work_dir = Path(tempfile.mkdtemp(prefix="sr3d-app-")) if work_dir is None else Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._inputs: OrderedDict[str, LoadedInput] = OrderedDict()
        self._lock = threading.RLock()

    # ------------------------------------------------------------------------------------------
    # the model
    # ------------------------------------------------------------------------------------------

    @property
    def pipeline(self) -> Any:
        """The :class:`~sr3d_plugin.inference.SR3DPipeline` (loaded on first use)."""
        with self._lock:
            if self._pipeline is None:
                from sr3d_plugin.inference import SR3DPipeline

                self._pipeline = SR3DPipeline.from_pretrained(
                    self.model, device=self.device, depth_model=self.depth_model
                )
            return self._pipeline

    def close(self) -> None:
        """Forget the loaded inputs and remove the temporary work folder (when the backend made it)."""
        with self._lock:
            self._inputs.clear()
            if self._own_dir:
                shutil.rmtree(self.work_dir, ignore_errors=True)

    # ------------------------------------------------------------------------------------------
    # inputs
    # ------------------------------------------------------------------------------------------

    def synthetic_scene(self, seed: int = 0, num_frames: int = 8) -> Path:
        """The bundled synthetic scene: a rendered room (:func:`sr3d_plugin.synthetic.generate_scene`,
        320×240) written as a ScanNet-style folder under the work folder (once per seed and size)."""
        from sr3d_plugin.synthetic import generate_scene, write_scannet_layout

        seed = _checks.integer(seed, "seed", minimum=0)
        num_frames = _checks.integer(num_frames, "num_frames", minimum=1, maximum=64)
        sid = f"synthetic{seed:04d}_{num_frames:02d}"
        folder = self.work_dir / "synthetic" / sid
        if not folder.is_dir():
            scene = generate_scene(seed, num_frames=num_frames, scene_id=sid)
            folder = write_scannet_layout(scene, folder.parent)
        return folder

    def unpack_scan(self, archive: str | Path) -> Path:
        """A zip of one ScanNet-style scene folder (its files at the top or inside one folder), unpacked
        safely (:func:`sr3d_plugin.archives.extract_members`) under the work folder."""
        from sr3d_plugin.archives import check_zip, extract_members

        names = [m.name for m in check_zip(archive)]
        tops = {PurePosixPath(n).parts[0] for n in names}
        strip = len(tops) == 1 and all(len(PurePosixPath(n).parts) > 1 for n in names)
        if not any(
            PurePosixPath(n).parts[1 if strip else 0] == "color" for n in names if len(PurePosixPath(n).parts) > 1
        ):
            raise SR3DInputError(
                f"archive {str(archive)!r} holds no color/ folder; expected one ScanNet-style scene folder "
                "(color/, depth/, pose/, intrinsic/) at its top or inside one folder"
            )
        target = self.work_dir / "scans" / stable_hash([str(archive), names])

        def name_for(name: str) -> str:
            parts = PurePosixPath(name).parts
            return str(PurePosixPath(*parts[1:])) if strip else name

        if not target.is_dir():
            extract_members(archive, target, name_for)
        return target

    def load(
        self,
        kind: str,
        *,
        seed: int = 0,
        num_frames: int = 8,
        image: str | Path | None = None,
        depth: str | Path | None = None,
        intrinsics: str | Path | None = None,
        video: str | Path | None = None,
        points: str | Path | None = None,
        scan: str | Path | None = None,
    ) -> LoadedInput:
        """Load one visual input for the page.

        Args:
            kind: one of :data:`INPUT_KINDS`: ``"synthetic"`` (the bundled scene, ``seed`` and
                ``num_frames`` views), ``"image"`` (``image`` with optional ``depth`` map and
                ``intrinsics`` file), ``"video"`` (``video`` with optional ``points`` ``.npz``/``.npy``
                reconstruction) or ``"scan"`` (``scan``: a ScanNet-style folder or a ``.zip`` of one).

        Returns:
            The :class:`LoadedInput` (frames after sampling, canonical point map), kept for :meth:`ask`.
        """
        if kind not in INPUT_KINDS:
            raise SR3DInputError(f"kind={kind!r}; expected one of {', '.join(INPUT_KINDS)}")
        need = {"image": ("image", image), "video": ("video", video), "scan": ("scan", scan)}.get(kind)
        if need is not None and not need[1]:
            raise SR3DInputError(f"kind={kind!r} needs {need[0]}= (a file{' or folder' if kind == 'scan' else ''})")
        kwargs: dict[str, Any]
        if kind == "synthetic":
            kwargs = {"scene": str(self.synthetic_scene(seed, num_frames))}
        elif kind == "image":
            kwargs = {"image": str(image), "depth": _opt(depth), "intrinsics": _opt(intrinsics)}
        elif kind == "video":
            kwargs = {"video": str(video), "points": _opt(points)}
        else:
            path = Path(str(scan)).expanduser()
            if path.is_file() and path.suffix.lower() == ".zip":
                path = self.unpack_scan(path)
            elif not path.is_dir():
                raise SR3DInputError(f"scan={str(scan)!r} is neither a scene folder nor a .zip of one")
            kwargs = {"scene": str(path)}
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        key = stable_hash(kwargs)
        with self._lock:
            if key in self._inputs:
                self._inputs.move_to_end(key)
                return self._inputs[key]
            loaded = self._read(key, kwargs)
            self._inputs[key] = loaded
            while len(self._inputs) > _KEEP_INPUTS:
                self._inputs.popitem(last=False)
            return loaded

    def _read(self, key: str, kwargs: dict[str, Any]) -> LoadedInput:
        """Frames and canonical points of ``kwargs`` as :meth:`SR3DPipeline.ask` reads them."""
        from sr3d_plugin.visual_inputs import default_depth_model, visual_input

        pipe = self.pipeline
        config = pipe.config
        dm = pipe.depth_model
        bundle = visual_input(
            **kwargs,
            fallback_depth_model=default_depth_model(config) if dm == "auto" else dm,
            num_frames=getattr(config, "num_video_frames", 32),
            needs_positions=pipe.needs_positions,
            canonical_mode=getattr(config, "canonical_mode", "sr3d"),
            device=pipe.device,
        )
        points = valid = None
        if bundle.visual.points is not None:
            points = bundle.visual.points.detach().float().cpu().numpy()
            if bundle.visual.valid is not None:
                valid = bundle.visual.valid.detach().cpu().numpy().astype(bool)
            depth = bundle.frames.depth
            if valid is None and depth is not None and np.shape(depth) == points.shape[:3]:
                valid = np.asarray(depth) > 0  # the "sr3d" convention keeps pixels without depth
        return LoadedInput(key, kwargs, bundle.frames, points, valid, dict(bundle.geometry))

    def get(self, key: str | None) -> LoadedInput:
        """A loaded input by its key."""
        with self._lock:
            if key is None or key not in self._inputs:
                raise SR3DInputError("no input is loaded (or it was dropped); load an image, video or scene first")
            return self._inputs[key]

    # ------------------------------------------------------------------------------------------
    # asking
    # ------------------------------------------------------------------------------------------

    def ask(self, loaded: LoadedInput, question: str, specs: list[str]) -> dict[str, Any]:
        """:meth:`SR3DPipeline.ask` on a loaded input, plus where each region reaches.

        Returns:
            the pipeline's result with ``"reach"``: one ``{frame index: [H, W] bool mask at the image
            size}`` per region (every frame whose point map sees the region's surface,
            :func:`~sr3d_plugin.app.views.region_reach`; only the drawn frames without geometry).
        """
        from sr3d_plugin.app.views import region_reach
        from sr3d_plugin.masks import fit_mask
        from sr3d_plugin.regions import resolve_regions

        with self._lock:
            result = self.pipeline.ask(question, regions=specs, max_new_tokens=self.max_new_tokens, **loaded.ask_kwargs)
        reach = []
        for region in resolve_regions(specs, loaded.frames):
            masks = region.masks
            if loaded.points is not None:
                masks = region_reach(masks, loaded.points, loaded.valid)
            reach.append(
                {k: fit_mask(m, loaded.frames.images[k].size, f"reach on frame {k}") for k, m in sorted(masks.items())}
            )
        result["reach"] = reach
        return result

    def reach_images(self, loaded: LoadedInput, reach: list[dict[int, np.ndarray]], specs: list[str]) -> list[Any]:
        """``(image, caption)`` per frame: every region drawn where it reaches (thick: the frame it was drawn on)."""
        from sr3d_plugin.app.views import draw_regions
        from sr3d_plugin.regions import parse_region_spec

        drawn_on = [parse_region_spec(s).frame for s in specs]
        out = []
        for k in range(loaded.num_frames):
            here = [(i, r[k]) for i, r in enumerate(reach) if k in r]
            drawn = [i for i, f in enumerate(drawn_on) if f == k or (f is None and loaded.num_frames == 1)]
            names = ", ".join(f"R{i}" for i, _ in here) or "no region"
            out.append((draw_regions(loaded.frame(k), here, drawn=drawn), f"frame {k}: {names}"))
        return out


def _opt(value: Any) -> str | None:
    return None if value in (None, "") else str(value)
