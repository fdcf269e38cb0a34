"""The one place where evaluation turns logits into scores; a client's metrics (:mod:`fednl.client.metrics`),
CE by position, NIAH by depth and the evaluation protocol (:mod:`fednl.eval`) all call it.

* **Multiple choice** — :func:`score_mc`: for each example, the logits at its last prompt position ``[V]``;
  ``correct`` when the gold letter's logit is the largest among the choice letters' (``argmax``, ties to the first
  choice), ``answer_loglik`` = log-softmax over the *full* vocabulary at the gold letter. :func:`mc_metrics`
  averages them into ``accuracy``, ``answer_loglik`` and ``n``.
* **Text** — :func:`token_ce`: next-token cross-entropy per scored position (``targets == -100`` is not scored and
  gives 0), or summed over the scored positions.

:func:`score_mc_reference` and :func:`token_ce_reference` are the readable specifications (one example, one
position at a time, the softmax written out in float64); the tests check the fast paths against them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from fednl.client.batching import IGNORE


@dataclass(frozen=True)
class McScore:
    """One multiple-choice answer: whether the model picked the gold letter, and log p(gold letter | prompt)."""

    correct: bool
    answer_loglik: float


def _check_mc(last: torch.Tensor, choice_ids: Sequence[Sequence[int]], gold: Sequence[int]) -> None:
    if last.ndim != 2 or len(choice_ids) != last.shape[0] or len(gold) != last.shape[0]:
        raise ValueError(f"expected last-position logits [B, V] with B choice lists and B gold indices, got "
                         f"{tuple(last.shape)}, {len(choice_ids)} and {len(gold)}")
    for ids, g in zip(choice_ids, gold):
        if not ids or not 0 <= g < len(ids):
            raise ValueError(f"gold index {g} is not one of {len(ids)} choices")


def score_mc(last: torch.Tensor, choice_ids: Sequence[Sequence[int]], gold: Sequence[int]) -> list[McScore]:
    """Score B multiple-choice examples from their last-prompt-position logits ``last`` ``[B, V]``."""
    _check_mc(last, choice_ids, gold)
    last = last.float()
    logp = torch.log_softmax(last, dim=-1)
    out = []
    for b, (ids, g) in enumerate(zip(choice_ids, gold)):
        scores = last[b, torch.tensor(ids, device=last.device)]
        out.append(McScore(correct=int(scores.argmax()) == g, answer_loglik=float(logp[b, ids[g]])))
    return out


def score_mc_reference(last: torch.Tensor, choice_ids: Sequence[Sequence[int]], gold: Sequence[int]) -> list[McScore]:
    """:func:`score_mc` written out: a Python max over the choices and ``x_g - log Σ_v exp(x_v)`` in float64."""
    _check_mc(last, choice_ids, gold)
    out = []
    for b, (ids, g) in enumerate(zip(choice_ids, gold)):
        row = [float(x) for x in last[b].double()]
        best = 0
        for i in range(1, len(ids)):
            if row[ids[i]] > row[ids[best]]:
                best = i
        top = max(row)
        log_z = top + math.log(sum(math.exp(x - top) for x in row))
        out.append(McScore(correct=best == g, answer_loglik=row[ids[g]] - log_z))
    return out


def mc_metrics(scores: Iterable[McScore]) -> dict[str, float]:
    """``accuracy`` and mean ``answer_loglik`` over the scored examples (in order), and ``n``."""
    scores = list(scores)
    if not scores:
        raise ValueError("mc_metrics: no scored example")
    n = len(scores)
    return {"accuracy": sum(s.correct for s in scores) / n, "answer_loglik": sum(s.answer_loglik for s in scores) / n,
            "n": float(n)}


def _check_ce(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.ndim < 2 or logits.shape[:-1] != targets.shape:
        raise ValueError(f"expected logits [..., V] and targets [...] of the same leading shape, got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")


def token_ce(logits: torch.Tensor, targets: torch.Tensor, *,
             reduction: Literal["none", "sum"] = "none") -> torch.Tensor:
    """Next-token CE of ``logits`` ``[..., V]`` against ``targets`` ``[...]`` in float32: per position (0 where
    ``targets == -100``), or its sum over the scored positions (``reduction="sum"``)."""
    _check_ce(logits, targets)
    V = logits.shape[-1]
    ce = F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE,
                         reduction=reduction)
    return ce.reshape(targets.shape) if reduction == "none" else ce


def token_ce_reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position CE, one position at a time (the specification of :func:`token_ce`)."""
    _check_ce(logits, targets)
    flat, ys = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    out = []
    for row, y in zip(flat, ys.tolist()):
        if y == IGNORE:
            out.append(row.new_zeros((), dtype=torch.float32))
        else:
            out.append(-torch.log_softmax(row.float(), dim=-1)[y])
    return torch.stack(out).reshape(targets.shape)
