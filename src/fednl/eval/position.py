"""Streaming CE by position bin (paper Fig. 5): :func:`ce_by_position` runs a model over documents (or question
prompts read as a stream), scores every token with :func:`fednl.client.scoring.token_ce` and bins the per-token CE
with :func:`fednl.data.bins.bin_means`; multiple-choice examples are answered in the same pass
(:func:`fednl.client.scoring.score_mc`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fednl.client.batching import IGNORE, collate, encode_cached
from fednl.client.trainer import model_device, model_logits
from fednl.data.bins import bin_means, relative_to_first
from fednl.client.scoring import score_mc, token_ce

__all__ = ["ce_by_position", "place_token_ce", "position_grid", "token_ce"]


def position_grid(encoded: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Zeroed ``(values, mask)`` ``[N, width]`` for per-token CE by document position (width: the longest)."""
    width = max(len(e.ids) for e in encoded)
    return np.zeros((len(encoded), width), dtype=np.float64), np.zeros((len(encoded), width), dtype=bool)


def place_token_ce(values: np.ndarray, mask: np.ndarray, start: int, ce: torch.Tensor, targets: torch.Tensor) -> None:
    """Write a batch's per-token CE ``[b, T]`` (rows ``start ..``) into the grid: input position ``t`` predicts the
    token at position ``t + 1``; ``mask`` marks the scored tokens (``targets != -100``)."""
    width = values.shape[1]
    ce_np, scored = ce.cpu().numpy(), (targets != IGNORE).cpu().numpy()
    T, b = ce_np.shape[1], ce_np.shape[0]
    values[start:start + b, 1:T + 1] = ce_np[:, : width - 1]
    mask[start:start + b, 1:T + 1] = scored[:, : width - 1]


@torch.no_grad()
def ce_by_position(model: torch.nn.Module, tokenizer: Any, examples: Sequence[Any], *, seq_len: int,
                   bin_size: int, batch_size: int) -> dict[str, Any]:
    """Token-weighted mean CE per position bin, and each bin relative to the first; ``ce_mean`` is the
    token-weighted mean over all scored tokens (a text split's overall CE).

    ``text`` examples are scored on every token. Question examples (``mc``, ``qa``) are scored on their prompt
    tokens only — the prompt read as a stream (NIAH, paper Fig. 5) — and ``mc`` examples are also answered in
    the same forward pass: ``mc`` holds one ``{"correct", "answer_loglik", "depth"}`` per ``mc`` example, in
    order (:func:`fednl.client.scoring.score_mc`, as :func:`fednl.client.metrics.eval_mc` scores them).

    Position ``t`` is the 0-based index of the *predicted* token in the document (the input at ``t - 1``
    predicts it), so the first scored token sits at position 1 of bin 0.
    """
    if not examples:
        raise ValueError("ce_by_position: no examples")
    was_training = model.training
    model.eval()
    device = model_device(model)
    enc = [encode_cached(e, tokenizer, seq_len) for e in examples]
    values, mask = position_grid(enc)
    mc: list[dict[str, Any]] = []
    for start in range(0, len(enc), batch_size):
        chunk = enc[start:start + batch_size]
        batch = collate(chunk, int(tokenizer.eos_id)).to(device)
        targets = batch.targets.clone()
        for b, (e, ex) in enumerate(zip(chunk, examples[start:start + batch_size])):
            if ex.kind != "text":  # the prompt's own tokens: input t predicts ids[t + 1], t + 1 < n_prompt
                targets[b] = IGNORE
                targets[b, : e.n_prompt - 1] = torch.tensor(e.ids[1:e.n_prompt], device=device)
        logits = model_logits(model, batch.input_ids)
        place_token_ce(values, mask, start, token_ce(logits, targets), targets)
        answered = [(b, e, ex) for b, (e, ex) in enumerate(zip(chunk, examples[start:start + batch_size]))
                    if ex.kind == "mc"]
        if answered:
            last = torch.stack([logits[b, int(batch.last_prompt[b])] for b, _, _ in answered])
            scores = score_mc(last, [e.choice_ids for _, e, _ in answered], [e.gold for _, e, _ in answered])
            for s, (_, _, ex) in zip(scores, answered):
                mc.append({"correct": int(s.correct), "answer_loglik": s.answer_loglik,
                           "depth": ex.meta.get("depth") if isinstance(ex.meta, dict) else None})
    model.train(was_training)
    if not mask.any():
        raise ValueError("ce_by_position: no scored token (every prompt is a single token)")
    means = bin_means(values, bin_size, mask)
    keep = [i for i, m in enumerate(means) if np.isfinite(m)]
    bins = [float(means[i]) for i in keep]
    out = {"bin_size": int(bin_size), "bin_start": [i * bin_size for i in keep], "ce": bins,
           "relative": relative_to_first(bins), "tokens": int(mask.sum()), "n": len(examples),
           "ce_mean": float(values[mask].sum() / int(mask.sum()))}
    if mc:
        out["mc"] = mc
    return out
