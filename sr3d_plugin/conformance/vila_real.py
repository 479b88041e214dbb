"""Runner of case ``vila_sr3d_encoder_roundtrip``: a folder the REAL NVlabs/VILA trained and saved with SR3DImageEncoder.

The case was recorded by ``conformance/vila/record_roundtrip.py`` in a VILA environment (transformers
4.46): VILA built a tiny NVILA-style model with ``image_encoder._target_ =
sr3d_plugin.integrations.vila.SR3DImageEncoder``, ran one training step through its own collator,
saved the folder with its own ``save_pretrained``, rebuilt it with its own loading code (same logits),
and recorded its forward (last-position logits) and greedy ``generate`` on two raw requests.

Here the user's path in transformers 5 replays the same raw requests: ``load_model(folder)`` (the
``vila`` builder, detected), ``processor.build_prompt`` + ``processor(...)`` from the image files,
point maps and boxes, then ``model(**batch)`` and ``model.generate(**batch)``. A third comparison per
request checks that the processor's ids, folded to one ``<image>`` per tile
(:func:`~sr3d_plugin.integrations.vila.to_vila_inputs`), are exactly the ids VILA tokenised. The
logit figure is the max over every position of the sequence (stricter than the last position alone:
a region or tile convention that only shifts early positions still shows).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sr3d_plugin.conformance import CaseResult

__all__ = ["run"]


def _visual(req: dict[str, Any], inputs: Path) -> Any:
    import numpy as np
    import torch
    from PIL import Image

    from sr3d_plugin.modeling import Region, VisualInput

    images = [Image.open(inputs / name).convert("RGB") for name in req["images"]]
    points = torch.from_numpy(np.load(inputs / req["points"]))
    if not req["multi_view"]:
        points = points[None]
    regions = [Region.from_box(int(frame), tuple(box), images[int(frame)].size) for frame, box in req["boxes"]]
    return VisualInput(images, points=points, regions=regions, multi_view=bool(req["multi_view"]))


def run(case_dir: Path, meta: dict[str, Any]) -> list[CaseResult]:
    """Replay every recorded request through the ``vila`` builder and the processor (fp32, CPU)."""
    import torch
    from safetensors.torch import load_file

    from sr3d_plugin.builders import detect_builder, load_model
    from sr3d_plugin.integrations.vila import to_vila_inputs

    folder = case_dir / "checkpoint"
    builder = detect_builder(folder)
    model, processor = load_model(folder, dtype="float32")
    model.eval()
    expected = load_file(str(case_dir / "expected.safetensors"))
    requests = json.loads((case_dir / "inputs" / "requests.json").read_text(encoding="utf-8"))
    new_tokens = int(meta.get("max_new_tokens", 6))
    results = []
    for k, req in enumerate(requests):
        visual = _visual(req, case_dir / "inputs")
        batch = processor(processor.build_prompt(req["question"], visual), visual)
        with torch.no_grad():
            all_logits = model(**batch).logits[0].float()
            generated = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, num_beams=1)
        tokens = generated[0, batch["input_ids"].shape[1] :]
        logits, want_logits = all_logits[-1], expected[f"request{k}.logits"]
        want_all = expected[f"request{k}.all_logits"]
        want_tokens = expected[f"request{k}.tokens"]
        vila_ids = to_vila_inputs(batch, processor)["input_ids"][0]
        ids_equal = torch.equal(vila_ids, expected[f"request{k}.input_ids"])
        diff = float((logits - want_logits).abs().max()) if logits.shape == want_logits.shape else float("inf")
        # every position too (tiles, <mask> and text tokens); the case's figure is the larger of the two
        diff_all = float((all_logits - want_all).abs().max()) if all_logits.shape == want_all.shape else float("inf")
        results.append(
            CaseResult(
                case=case_dir.name,
                path=f"{builder} builder + processor, request {k} ({'frames' if req['multi_view'] else 'tiled image'})",
                max_abs_logit_diff=max(diff, diff_all),
                tokens_equal=torch.equal(tokens.cpu(), want_tokens) and ids_equal,
                detail={
                    "input_ids_equal": ids_equal,
                    "last_position_max_abs_diff": diff,
                    "all_positions_max_abs_diff": diff_all,
                    "tiles": int(batch["pixel_values"].shape[0]),
                    "ours_tokens": tokens.tolist(),
                    "vila_tokens": want_tokens.tolist(),
                },
            )
        )
    return results
