"""Runner for the LLaVA cases (original LLaVA and transformers' LLaVA family).

Every case is replayed from its raw inputs (``inputs/image.png``, ``inputs/prompt.json``) through
three default user paths, with the PE off and no region (the host-identity setting):

* ``processor``: :func:`sr3d_plugin.builders.load_model` → ``SR3DProcessor.build_prompt`` →
  ``SR3DProcessor.__call__`` → the model's forward (last-position logits) and ``generate``;
* ``pipeline.ask``: :meth:`sr3d_plugin.inference.SR3DPipeline.ask`;
* ``cli ask``: ``sr3d ask --model … --image … --question … --no-position-encoding`` in-process.

The logits of the last prompt position and the greedy tokens of the last two paths are read with a
forward hook on the language model (the prefill step gives the prompt's logits; every decoding step
gives one greedy token), so they are measured on the real path, not recomputed. Logits are compared
over the checkpoint's own vocabulary (the plugin adds ``<image>`` / ``<mask>`` rows after it).
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

__all__ = ["collapse_image_runs", "replay_processor", "run"]


def collapse_image_runs(ids: list[int], image_id: int, marker: int = -200) -> list[int]:
    """Every run of ``image_id`` placeholders → one ``marker`` (the original's ``IMAGE_TOKEN_INDEX``)."""
    out: list[int] = []
    for tok in ids:
        if tok == image_id:
            if not out or out[-1] != marker:
                out.append(marker)
        else:
            out.append(tok)
    return out


@contextlib.contextmanager
def _capture_llm_logits() -> Iterator[list[torch.Tensor]]:
    """Collect the last-position logits of every causal-LM forward pass (global forward hook)."""
    seen: list[torch.Tensor] = []

    def hook(module: Any, args: Any, output: Any) -> None:
        logits = getattr(output, "logits", None)
        if isinstance(logits, torch.Tensor) and logits.dim() == 3 and module.__class__.__name__.endswith("ForCausalLM"):
            seen.append(logits[0, -1].detach().float().cpu())

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _compare(
    case: str, path: str, logits: torch.Tensor, tokens: list[int], expected: dict[str, torch.Tensor], **detail: Any
) -> CaseResult:
    ref = expected["last_logits"].float()
    n = ref.shape[0]
    diff = float((logits[:n].float() - ref).abs().max()) if logits.shape[0] >= n else math.inf
    want = expected["greedy_tokens"].tolist()
    return CaseResult(case, path, diff, tokens == want, detail={"tokens": tokens, "expected_tokens": want, **detail})


def _steps_to_tokens(steps: list[torch.Tensor], n_max: int) -> tuple[torch.Tensor, list[int]]:
    """The prefill logits and the greedy token of every generation step (argmax, as greedy decoding)."""
    if not steps:
        raise RuntimeError("no language-model forward pass was observed")
    return steps[0], [int(s.argmax()) for s in steps[:n_max]]


def _trim_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def replay_processor(case_dir: Path, meta: dict[str, Any]) -> tuple[CaseResult, Any, Any]:
    """The ``processor`` path of one case: ``(result, model, processor)``.

    ``result.detail`` also says whether the prompt text, the input ids (image placeholders
    collapsed to the original's one ``-200`` per image) and the pixel values equal the recorded ones.
    """
    from PIL import Image
    from safetensors.torch import load_file

    from sr3d_plugin.builders import load_model
    from sr3d_plugin.modeling.inputs import VisualInput

    case = str(meta.get("name") or case_dir.name)
    expected = load_file(str(case_dir / "expected.safetensors"))
    model_dir = case_dir / meta.get("model", "checkpoint")
    image_path = case_dir / "inputs" / "image.png"
    question = json.loads((case_dir / "inputs" / "prompt.json").read_text())["question"]
    options = dict(meta.get("load_options") or {"use_position_encoding": False, "use_region_extractor": False})
    n_new = int(meta.get("max_new_tokens", expected["greedy_tokens"].numel()))
    model, proc = load_model(model_dir, dtype="float32", **options)
    visual = VisualInput([Image.open(image_path).convert("RGB")])
    prompt = proc.build_prompt(question, visual)
    batch = proc(prompt, visual)
    ids = batch["input_ids"][0].tolist()
    exp_ids = expected["input_ids"].tolist()
    image_id = int(model.config.image_token_id)
    if (expected["input_ids"] < 0).any():  # original LLaVA: one -200 per image
        ids_equal = collapse_image_runs(ids, image_id) == exp_ids
    else:
        ids_equal = ids == exp_ids
    pv = batch["pixel_values"]
    ref_pv = expected["pixel_values"]
    pixel_diff = float((pv - ref_pv).abs().max()) if pv.shape == ref_pv.shape else math.inf
    tok = proc.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        logits = model(**batch).logits[0, -1]
        gen = model.generate(**batch, max_new_tokens=n_new, do_sample=False, pad_token_id=pad)
    tokens = gen[0, batch["input_ids"].shape[1] :].tolist()
    result = _compare(
        case, "processor", logits, tokens, expected,
        prompt_equal=prompt == meta.get("prompt"), input_ids_equal=ids_equal, pixel_max_abs_diff=pixel_diff,
        image_tokens=int((batch["input_ids"] == image_id).sum()),
    )  # fmt: skip
    return result, model, proc


def run(case_dir: Path, meta: dict[str, Any]) -> list[CaseResult]:
    """Replay one LLaVA case through the processor, ``SR3DPipeline.ask`` and ``sr3d ask``."""
    from safetensors.torch import load_file

    from sr3d_plugin.cli import main as cli_main
    from sr3d_plugin.inference import SR3DPipeline

    case = str(meta.get("name") or case_dir.name)
    expected = load_file(str(case_dir / "expected.safetensors"))
    model_dir = case_dir / meta.get("model", "checkpoint")
    image_path = case_dir / "inputs" / "image.png"
    question = json.loads((case_dir / "inputs" / "prompt.json").read_text())["question"]
    options = dict(meta.get("load_options") or {"use_position_encoding": False, "use_region_extractor": False})
    n_new = int(meta.get("max_new_tokens", expected["greedy_tokens"].numel()))

    # --- 1. processor + model ---------------------------------------------------------------
    first_result, model, proc = replay_processor(case_dir, meta)
    results = [first_result]
    tok = proc.tokenizer
    eos = {int(tok.eos_token_id)} if tok.eos_token_id is not None else set()
    expected_answer = tok.decode(expected["greedy_tokens"].tolist(), skip_special_tokens=True).strip()

    # --- 2. SR3DPipeline.ask ------------------------------------------------------------------
    pipe = SR3DPipeline(model, proc, device="cpu", model_path=str(model_dir))
    with _capture_llm_logits() as steps:
        answer = pipe.ask(question, image=str(image_path), max_new_tokens=n_new)["answer"]
    first, greedy = _steps_to_tokens(steps, n_new)
    results.append(
        _compare(case, "pipeline.ask", first, _trim_eos(greedy, eos), expected, answer_equal=answer == expected_answer)
    )

    # --- 3. sr3d ask ----------------------------------------------------------------------------
    args = ["ask", "--model", str(model_dir), "--image", str(image_path), "--question", question,
            "--max-new-tokens", str(n_new), "--dtype", "float32", "--device", "cpu", "--json"]  # fmt: skip
    if not options.get("use_position_encoding", True):
        args.append("--no-position-encoding")
    buf = io.StringIO()
    with _capture_llm_logits() as steps, contextlib.redirect_stdout(buf):
        rc = cli_main(args)
    first, greedy = _steps_to_tokens(steps, n_new)
    answer = json.loads(buf.getvalue())["answer"] if rc == 0 else None
    results.append(
        _compare(case, "cli ask", first, _trim_eos(greedy, eos), expected, answer_equal=answer == expected_answer)
    )
    return results
