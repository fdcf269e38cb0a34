"""Per-client evaluation metrics (no gradient, deterministic): what a client computes on its own examples, in this
process or on a Flower node. The scores come from :mod:`fednl.client.scoring`.

* ``mc``   — ``accuracy``: argmax over the choice-letter tokens at the last prompt position;
             ``answer_loglik``: mean over examples of log p(gold letter | prompt) (full-vocabulary softmax)
             (:func:`~fednl.client.scoring.score_mc`).
* ``qa``   — ``exact_match``: greedy decoding of as many tokens as the gold answer has, compared after
             stripping whitespace; ``answer_loglik``: mean over examples of the mean per-token log-probability
             of the gold answer (teacher forcing).
* ``text`` — ``ce``: token-weighted mean next-token cross-entropy (nats/token) (:func:`~fednl.client.scoring.token_ce`).
Every result also carries ``n`` (examples scored). A client whose test set mixes kinds gets ``<kind>/``
prefixes on the clashing metric names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fednl.client.batching import IGNORE, Encoded, Tokenizer, collate, encode_cached
from fednl.client.trainer import model_device, selected_logits
from fednl.client.scoring import McScore, mc_metrics, score_mc, token_ce
from fednl.records import HIGHER_IS_BETTER, PRIMARY_METRIC

__all__ = ["HIGHER_IS_BETTER", "PRIMARY_METRIC", "eval_mc", "eval_qa", "eval_seq_len", "eval_text",
           "evaluate_examples", "greedy_decode"]


def _chunks(items: Sequence[Encoded], size: int) -> list[Sequence[Encoded]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def eval_mc(model: torch.nn.Module, encoded: Sequence[Encoded], eos_id: int, batch_size: int) -> dict[str, float]:
    device = model_device(model)
    scores: list[McScore] = []
    for chunk in _chunks(encoded, batch_size):
        batch = collate(chunk, eos_id).to(device)
        rows = torch.arange(len(chunk), device=device)
        last = selected_logits(model, batch.input_ids, rows, batch.last_prompt)  # [B, V]
        scores += score_mc(last, [e.choice_ids for e in chunk], [e.gold for e in chunk])
    return mc_metrics(scores)


@torch.no_grad()
def greedy_decode(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], n_new: Sequence[int], eos_id: int
) -> list[list[int]]:
    """Greedy continuation of each prompt by ``n_new[i]`` tokens (stops early at ``eos_id``).

    Batched without a cache: the right-padded batch is re-run each step and every row reads the logits at
    its own last real position (outputs at real positions of a causal model ignore right padding).
    """
    device = model_device(model)
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    steps = max(n_new) if n_new else 0
    ids = torch.full((B, int(lengths.max()) + steps), eos_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(list(p), dtype=torch.long)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [n == 0 for n in n_new]
    for _ in range(steps):
        if all(done):
            break
        width = int(lengths.max())
        rows = torch.arange(B, device=device)
        nxt = selected_logits(model, ids[:, :width].to(device), rows, (lengths - 1).to(device)).argmax(dim=-1).cpu()
        for b in range(B):
            if done[b]:
                continue
            tok = int(nxt[b])
            if tok == eos_id:
                done[b] = True
                continue
            out[b].append(tok)
            ids[b, lengths[b]] = tok
            lengths[b] += 1
            done[b] = len(out[b]) >= n_new[b]
    return out


@torch.no_grad()
def eval_qa(
    model: torch.nn.Module, encoded: Sequence[Encoded], answers: Sequence[str], tokenizer: Tokenizer, batch_size: int
) -> dict[str, float]:
    device = model_device(model)
    eos = int(tokenizer.eos_id)
    loglik, hits = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        batch = collate(chunk, eos).to(device)
        rows, cols = (batch.targets != IGNORE).nonzero(as_tuple=True)
        logp = torch.log_softmax(selected_logits(model, batch.input_ids, rows, cols).float(), dim=-1)
        tok_lp = logp.gather(-1, batch.targets[rows, cols].unsqueeze(-1)).squeeze(-1)
        per_row = torch.zeros(len(chunk), device=device).index_add_(0, rows, tok_lp)
        count = torch.zeros(len(chunk), device=device).index_add_(0, rows, torch.ones_like(tok_lp))
        loglik += float((per_row / count).sum())
        prompts = [e.ids[: e.n_prompt] for e in chunk]
        gen = greedy_decode(model, prompts, [len(e.ids) - e.n_prompt for e in chunk], eos)
        for g, ans in zip(gen, answers[start : start + batch_size]):
            hits += int(tokenizer.decode(g).strip() == ans.strip())
    n = len(encoded)
    return {"exact_match": hits / n, "answer_loglik": loglik / n, "n": float(n)}


@torch.no_grad()
def eval_text(model: torch.nn.Module, encoded: Sequence[Encoded], eos_id: int, batch_size: int) -> dict[str, float]:
    device = model_device(model)
    total, count = 0.0, 0
    for chunk in _chunks(encoded, batch_size):
        batch = collate(chunk, eos_id).to(device)
        rows, cols = (batch.targets != IGNORE).nonzero(as_tuple=True)
        logits = selected_logits(model, batch.input_ids, rows, cols)
        total += float(token_ce(logits, batch.targets[rows, cols], reduction="sum"))
        count += int(rows.numel())
    return {"ce": total / count, "tokens": float(count), "n": float(len(encoded))}


def evaluate_examples(
    model: torch.nn.Module, tokenizer: Tokenizer, examples: Sequence[Any], *, seq_len: int, batch_size: int
) -> dict[str, float]:
    """Metrics of ``model`` (as currently loaded) on ``examples``; see the module docstring."""
    if not examples:
        raise ValueError("no examples to evaluate")
    was_training = model.training
    model.eval()
    by_kind: dict[str, list[Any]] = {}
    for ex in examples:
        by_kind.setdefault(ex.kind, []).append(ex)
    results: dict[str, dict[str, float]] = {}
    eos = int(tokenizer.eos_id)
    for kind, exs in by_kind.items():
        enc = [encode_cached(ex, tokenizer, seq_len) for ex in exs]
        if kind == "mc":
            results[kind] = eval_mc(model, enc, eos, batch_size)
        elif kind == "qa":
            results[kind] = eval_qa(model, enc, [ex.answer for ex in exs], tokenizer, batch_size)
        elif kind == "text":
            results[kind] = eval_text(model, enc, eos, batch_size)
        else:
            raise ValueError(f"unknown example kind {kind!r}")
    model.train(was_training)
    if len(results) == 1:
        return next(iter(results.values()))
    return {f"{kind}/{k}": v for kind, res in results.items() for k, v in res.items()}


def eval_seq_len(spec: Any) -> int:
    """Tokens per evaluated sequence of a run spec: ``engine.eval_seq_len``, else ``train.seq_len``."""
    return int(getattr(spec.engine, "eval_seq_len", None) or spec.train.seq_len)
