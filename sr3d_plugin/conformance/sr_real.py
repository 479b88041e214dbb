"""Runner for the SR-3D / VILA-lineage cases recorded from the original SR-REAL code.

Each case folder (``conformance/data/sr3d_*``, written by ``conformance/sr_real/record.py``) holds
the tiny checkpoint the original built and saved, the raw inputs (``inputs/request.json`` plus
images, depth images, a ScanNet-style scene folder, mask images) and what the original produced
(``expected.safetensors``: ``input_ids``, ``tile_xyz`` [T, S, S, 3], ``token_xyz`` [T, g², 3],
``vision_features``, ``pe_output``, ``projector_output``, ``region_embeddings``, ``last_logits``
[V] and ``greedy_tokens``).

The raw inputs go through this package's default user paths, named in ``case.json`` ``paths``:

* ``processor`` — :meth:`SR3DPipeline.read_frames` / :meth:`~SR3DPipeline.positions` /
  :func:`~sr3d_plugin.regions.resolve_regions`, then ``SR3DProcessor.build_prompt`` and
  ``SR3DProcessor.__call__``; also compares the per-token 3D positions and the prompt ids;
* ``pipeline.ask`` — :meth:`SR3DPipeline.ask`;
* ``cli ask`` — ``sr3d ask`` (in process);
* ``lmms-eval`` — the ``sr3d`` lmms-eval model's ``generate_until`` on an equivalent record.

``case.json`` ``load_kwargs`` are passed to :meth:`SR3DPipeline.from_pretrained` (the PE-off case
loads with ``use_position_encoding=False``).

For every path the inputs handed to ``generate`` are captured; the last-position logits are
recomputed from them with one forward pass and compared with the recorded ones (fp32, CPU), and
the greedy tokens with the recorded tokens.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sr3d_plugin.conformance import CaseResult
from sr3d_plugin.errors import SR3DInputError

__all__ = ["collapse_image_ids", "run"]


def _load_expected(case_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = case_dir / "expected.safetensors"
    if not path.is_file():
        raise SR3DInputError(f"conformance case {case_dir.name!r} has no expected.safetensors")
    return load_file(str(path))


def _request(case_dir: Path) -> dict[str, Any]:
    path = case_dir / "inputs" / "request.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SR3DInputError(f"cannot read {str(path)!r}: {exc}") from exc


def _region_specs(case_dir: Path, req: dict[str, Any]) -> list[str]:
    """Region spec strings (sr3d_plugin.regions syntax) for the request's regions."""
    specs = []
    for r in req.get("regions", []):
        frame = f"frame=@{r['frame']} " if "frame" in r else ""
        if "box" in r:
            specs.append(frame + "box=" + ",".join(str(v) for v in r["box"]))
        elif "mask" in r:
            specs.append(frame + f"mask={case_dir / 'inputs' / r['mask']}")
        else:
            raise SR3DInputError(f"{case_dir.name}: region {r} has neither 'box' nor 'mask'")
    return specs


def _visual_kwargs(case_dir: Path, req: dict[str, Any]) -> dict[str, Any]:
    inputs = case_dir / "inputs"
    kw: dict[str, Any] = {}
    if "image" in req:
        kw["image"] = str(inputs / req["image"])
    if "scene" in req:
        kw["scene"] = str(inputs / req["scene"])
        kw["num_frames"] = int(req["num_frames"])
    if "depth" in req:
        kw["depth"] = str(inputs / req["depth"])
    if "depth_model" in req:
        kw["depth_model"] = str((inputs / req["depth_model"]).resolve())
    return kw


class _Capture:
    """Records what ``generate`` of a model class receives and returns (first call)."""

    def __init__(self) -> None:
        self.inputs: dict[str, Any] | None = None
        self.output: torch.Tensor | None = None


@contextlib.contextmanager
def _capture_generate(model_cls: type) -> Iterator[_Capture]:
    cap = _Capture()
    original = model_cls.generate

    def generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        if cap.inputs is None:
            cap.inputs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
            cap.output = out
        return out

    model_cls.generate = generate
    try:
        yield cap
    finally:
        model_cls.generate = original


def collapse_image_ids(ids: list[int], image_id: int, tokens_per_tile: int, end_ids: list[int]) -> list[int]:
    """Our expanded ids (``tokens_per_tile`` placeholders + the end-text ids per tile) with one ``<image>``
    per tile, as the original's ``input_ids`` hold them (it appends the end text as embeddings)."""
    out: list[int] = []
    k = 0
    while k < len(ids):
        if ids[k] == image_id:
            out.append(image_id)
            k += tokens_per_tile
            if ids[k : k + len(end_ids)] == end_ids:
                k += len(end_ids)
        else:
            out.append(ids[k])
            k += 1
    return out


def _compare(
    case: str,
    path: str,
    model: Any,
    cap: _Capture,
    expected: dict[str, torch.Tensor],
    detail: dict[str, Any],
    processor: Any,
) -> CaseResult:
    if cap.inputs is None or cap.output is None:
        return CaseResult(case, path, math.nan, False, detail={**detail, "error": "generate was not called"})
    inputs = cap.inputs
    with torch.inference_mode():
        logits = model(**inputs).logits[0, -1].float().cpu()
    want = expected["last_logits"]
    if logits.shape != want.shape:
        detail["logits_shape"] = [list(logits.shape), list(want.shape)]
        diff = math.inf
    else:
        diff = float((logits - want).abs().max())
    prompt_len = int(inputs["input_ids"].shape[1])
    got = cap.output[0, prompt_len:].tolist()
    ref = expected["greedy_tokens"].tolist()
    detail["tokens"] = got
    detail["expected_tokens"] = ref
    ids = collapse_image_ids(
        inputs["input_ids"][0].tolist(),
        int(model.config.image_token_id),
        int(model.config.tokens_per_tile),
        processor._end_ids(),
    )
    detail["input_ids_equal"] = ids == expected["input_ids"].tolist()
    return CaseResult(case, path, diff, got == ref, detail=detail)


def _processor_path(case_dir: Path, pipe: Any, req: dict[str, Any], expected: dict[str, torch.Tensor]) -> CaseResult:
    from sr3d_plugin.modeling.inputs import VisualInput
    from sr3d_plugin.regions import resolve_regions

    kw = _visual_kwargs(case_dir, req)
    depth_model = kw.pop("depth_model", None)
    num_frames = kw.pop("num_frames", None)
    fs = pipe.read_frames(num_frames=num_frames, **kw)
    canonical = valid = None
    if pipe.needs_positions:
        canonical, valid, _ = pipe.positions(fs, depth_model=depth_model)
    regions = resolve_regions(_region_specs(case_dir, req), fs)
    visual = VisualInput(list(fs.images), points=canonical, valid=valid, regions=regions)
    proc = pipe.processor
    batch = proc(proc.build_prompt(req["question"], visual), visual)
    detail: dict[str, Any] = {}
    if "tile_xyz" in batch and "token_xyz" in expected:
        mine = batch["tile_xyz"].reshape(expected["token_xyz"].shape)
        detail["max_abs_token_xyz_diff"] = float((mine - expected["token_xyz"]).abs().max())
    inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    with _capture_generate(type(pipe.model)) as cap, torch.inference_mode():
        pipe.model.generate(**inputs, max_new_tokens=int(req["max_new_tokens"]), do_sample=False)
    return _compare(case_dir.name, "processor", pipe.model, cap, expected, detail, pipe.processor)


def _ask_path(case_dir: Path, pipe: Any, req: dict[str, Any], expected: dict[str, torch.Tensor]) -> CaseResult:
    with _capture_generate(type(pipe.model)) as cap:
        pipe.ask(
            req["question"],
            regions=_region_specs(case_dir, req),
            max_new_tokens=int(req["max_new_tokens"]),
            **_visual_kwargs(case_dir, req),
        )
    return _compare(case_dir.name, "pipeline.ask", pipe.model, cap, expected, {}, pipe.processor)


def _cli_path(case_dir: Path, pipe: Any, req: dict[str, Any], expected: dict[str, torch.Tensor]) -> CaseResult:
    from sr3d_plugin.cli import main as cli_main

    kw = _visual_kwargs(case_dir, req)
    argv = ["ask", "--model", str(case_dir / "checkpoint"), "--dtype", "float32", "--device", "cpu", "--json"]
    argv += ["--question", req["question"], "--max-new-tokens", str(req["max_new_tokens"])]
    for key, flag in (
        ("image", "--image"),
        ("scene", "--scene"),
        ("depth", "--depth"),
        ("depth_model", "--depth-model"),
    ):
        if key in kw:
            argv += [flag, kw[key]]
    if "num_frames" in kw:
        argv += ["--num-frames", str(kw["num_frames"])]
    for spec in _region_specs(case_dir, req):
        argv += ["--region", spec]
    out = io.StringIO()
    with _capture_generate(type(pipe.model)) as cap, contextlib.redirect_stdout(out):
        rc = cli_main(argv)
    detail: dict[str, Any] = {"exit_code": rc}
    if rc != 0:
        return CaseResult(case_dir.name, "cli ask", math.nan, False, detail=detail)
    return _compare(case_dir.name, "cli ask", pipe.model, cap, expected, detail, pipe.processor)


def _lmms_path(case_dir: Path, pipe: Any, req: dict[str, Any], expected: dict[str, torch.Tensor]) -> CaseResult:
    try:
        from lmms_eval.api.instance import Instance

        from sr3d_plugin.evaluation.lmms_model import SR3DLmms
    except ImportError as exc:  # the eval extra is not installed
        return CaseResult(case_dir.name, "lmms-eval", math.nan, False, detail={"error": f"lmms-eval missing: {exc}"})
    kw = _visual_kwargs(case_dir, req)
    record: dict[str, Any] = {"question": req["question"], "regions": _region_specs(case_dir, req)}
    num_frames = int(kw.get("num_frames", 32))
    if "scene" in kw:
        record["scene"] = kw["scene"]
    else:
        return CaseResult(
            case_dir.name, "lmms-eval", math.nan, False, detail={"error": "lmms-eval records need a scene"}
        )
    lm = SR3DLmms(pretrained=str(case_dir / "checkpoint"), dtype="float32", device="cpu", num_frames=num_frames)
    lm.task_dict = {"conformance": {"test": {0: record}}}
    gen = {"max_new_tokens": int(req["max_new_tokens"]), "do_sample": False, "until": []}
    inst = Instance(
        request_type="generate_until",
        arguments=(req["question"], gen, None, 0, "conformance", "test"),
        idx=0,
        metadata={"task": "conformance", "doc_id": 0, "repeats": 1},
    )
    with _capture_generate(type(lm.model)) as cap:
        lm.generate_until([inst])
    detail = {"failures": [f[3] for f in lm.failures]} if lm.failures else {}
    return _compare(case_dir.name, "lmms-eval", lm.model, cap, expected, detail, lm.processor)


_PATHS = {"processor": _processor_path, "pipeline.ask": _ask_path, "cli ask": _cli_path, "lmms-eval": _lmms_path}


def run(case_dir: Path, meta: dict[str, Any]) -> list[CaseResult]:
    """Replay one SR-REAL case through the paths listed in ``meta["paths"]``."""
    from sr3d_plugin.inference import SR3DPipeline

    case_dir = Path(case_dir)
    expected = _load_expected(case_dir)
    req = _request(case_dir)
    paths = meta.get("paths") or ["processor", "pipeline.ask"]
    unknown = [p for p in paths if p not in _PATHS]
    if unknown:
        raise SR3DInputError(f"{case_dir.name}: unknown path(s) {unknown} in case.json; expected {sorted(_PATHS)}")
    load_kwargs = dict(meta.get("load_kwargs") or {})
    torch.manual_seed(0)
    pipe = SR3DPipeline.from_pretrained(case_dir / "checkpoint", dtype="float32", device="cpu", **load_kwargs)
    return [_PATHS[p](case_dir, pipe, req, expected) for p in paths]
