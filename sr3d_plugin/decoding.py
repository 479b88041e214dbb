"""Decoding helpers shared by the pipeline and the lmms-eval model: stop strings, EOS ids and
teacher-forced scoring of continuations (batched, left padding)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from sr3d_plugin.errors import SR3DInputError

__all__ = ["ContinuationScore", "cut_at_stops", "eos_token_ids", "score_continuations"]


class ContinuationScore(NamedTuple):
    """Teacher-forced score of one continuation: summed natural-log probability, whether every token
    is the argmax (greedy), and the number of continuation tokens."""

    logprob: float
    greedy: bool
    num_tokens: int


def cut_at_stops(text: str, stops: Sequence[str] = ()) -> str:
    """``text`` cut at the first occurrence of each stop string, stripped."""
    for s in stops:
        pos = text.find(s)
        if pos >= 0:
            text = text[:pos]
    return text.strip()


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """The tokenizer's EOS id plus the model's ``generation_config.eos_token_id`` (int or list)."""
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else [int(e) for e in eos or ()])
    return ids


@torch.inference_mode()
def score_continuations(
    model: Any, tokenizer: Any, batch: dict[str, Any], continuations: Sequence[str | Sequence[int]]
) -> list[ContinuationScore]:
    """Teacher-forced ``log p(continuation | prompt)`` for each row of a processor batch.

    Args:
        batch: a processor batch of ``B`` prompts ending in the generation prompt (any padding side).
        continuations: ``B`` texts (tokenised on their own, no special tokens, no end-of-turn token)
            or token-id lists, appended right after each prompt's last real token.

    Returns:
        ``B`` :class:`ContinuationScore` (natural log, summed over the continuation's tokens).
    """
    tok = tokenizer
    conts: list[list[int]] = []
    for c in continuations:
        ids = tok(c, add_special_tokens=False)["input_ids"] if isinstance(c, str) else [int(x) for x in c]
        if not ids:
            raise SR3DInputError(f"continuation {c!r} has no tokens; expected a non-empty answer")
        conts.append(list(ids))
    if len(conts) != batch["input_ids"].shape[0]:
        raise SR3DInputError(f"{len(conts)} continuation(s) for {batch['input_ids'].shape[0]} prompt(s)")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = [batch["input_ids"][r][batch["attention_mask"][r].bool()].tolist() + c for r, c in enumerate(conts)]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for r, row in enumerate(rows):  # left padding: every continuation ends at the last position
        ids[r, length - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[r, length - len(row) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "num_tiles")}
    dev = batch["input_ids"].device
    inputs = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "position_ids": position_ids.to(dev), **extra}
    logits = model(**inputs).logits.float()
    out = []
    for r, cont in enumerate(conts):
        n = len(cont)
        logp = torch.log_softmax(logits[r, length - n - 1 : length - 1], dim=-1)
        target = torch.tensor(cont, device=logp.device)
        picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        out.append(ContinuationScore(float(picked.sum()), bool((logp.argmax(-1) == target).all()), n))
    return out
