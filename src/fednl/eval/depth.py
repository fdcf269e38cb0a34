"""NIAH accuracy by needle depth (paper Fig. 4).

Multiple-choice examples carrying ``meta["depth"]`` (the depth fraction of the queried needle, see
:mod:`fednl.data.tasks.niah7`) are grouped by depth and scored with the ordinary metric
(:func:`fednl.client.metrics.evaluate_examples`, i.e. :func:`fednl.client.scoring.score_mc`); examples without a
depth (e.g. the counter template) are left out. :func:`depth_table` tabulates answers already scored (the
evaluation protocol's position pass); :func:`merge_depths` pools several clients' tables, weighting each by its
example count.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from fednl.client.metrics import evaluate_examples
from fednl.client.scoring import McScore


def depth_key(depth: float) -> str:
    """Stable JSON key of a depth fraction (``0.3`` -> ``"0.30"``)."""
    return f"{float(depth):.2f}"


def group_by_depth(examples: Iterable[Any]) -> dict[str, list[Any]]:
    """``{depth_key: [mc examples at that depth]}`` in increasing depth order."""
    groups: dict[str, list[Any]] = {}
    for ex in examples:
        depth = ex.meta.get("depth") if isinstance(ex.meta, dict) else None
        if ex.kind == "mc" and depth is not None:
            groups.setdefault(depth_key(depth), []).append(ex)
    return dict(sorted(groups.items(), key=lambda kv: float(kv[0])))


def depth_table(answers: Iterable[tuple[float | None, McScore]]) -> dict[str, dict[str, float]]:
    """``{depth_key: {"accuracy", "n"}}`` from ``(depth, score)`` pairs of answered ``mc`` examples (those
    without a depth are left out), in increasing depth order."""
    table: dict[str, dict[str, float]] = {}
    for depth, score in answers:
        if depth is not None:
            cell = table.setdefault(depth_key(depth), {"accuracy": 0.0, "n": 0.0})
            cell["accuracy"] += score.correct
            cell["n"] += 1.0
    for cell in table.values():
        cell["accuracy"] /= cell["n"]
    return dict(sorted(table.items(), key=lambda kv: float(kv[0])))


def accuracy_by_depth(model: torch.nn.Module, tokenizer: Any, examples: Sequence[Any], *, seq_len: int,
                      batch_size: int) -> dict[str, dict[str, float]]:
    """``{depth_key: {"accuracy", "n"}}`` of the model as currently loaded (empty if no example has a depth)."""
    out = {}
    for key, exs in group_by_depth(examples).items():
        m = evaluate_examples(model, tokenizer, exs, seq_len=seq_len, batch_size=batch_size)
        out[key] = {"accuracy": float(m["accuracy"]), "n": float(m["n"])}
    return out


def evaluate_with_depths(model: torch.nn.Module, tokenizer: Any, examples: Sequence[Any], *, seq_len: int,
                         batch_size: int) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """``(overall metrics, depth table)`` in one pass: each depth group (and the examples without a depth) is
    scored once and the overall ``mc`` metrics are their ``n``-weighted means, which equal the per-example means
    of :func:`evaluate_examples` over all examples. Non-``mc`` or depth-less example sets fall back to one call."""
    groups = group_by_depth(examples)
    grouped = {id(e) for exs in groups.values() for e in exs}
    rest = [e for e in examples if id(e) not in grouped]
    if not groups or any(e.kind != "mc" for e in rest):
        overall = evaluate_examples(model, tokenizer, examples, seq_len=seq_len, batch_size=batch_size)
        return overall, accuracy_by_depth(model, tokenizer, examples, seq_len=seq_len, batch_size=batch_size)
    parts = {k: evaluate_examples(model, tokenizer, exs, seq_len=seq_len, batch_size=batch_size)
             for k, exs in groups.items()}
    table = {k: {"accuracy": float(m["accuracy"]), "n": float(m["n"])} for k, m in parts.items()}
    pieces = list(parts.values())
    if rest:
        pieces.append(evaluate_examples(model, tokenizer, rest, seq_len=seq_len, batch_size=batch_size))
    n = sum(m["n"] for m in pieces)
    overall = {k: sum(m[k] * m["n"] for m in pieces) / n for k in ("accuracy", "answer_loglik")}
    overall["n"] = float(n)
    return overall, table


def merge_depths(tables: Iterable[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Pool per-client depth tables: accuracy weighted by each client's ``n`` at that depth."""
    hits: dict[str, float] = {}
    count: dict[str, float] = {}
    for table in tables:
        for key, m in table.items():
            hits[key] = hits.get(key, 0.0) + m["accuracy"] * m["n"]
            count[key] = count.get(key, 0.0) + m["n"]
    return {k: {"accuracy": hits[k] / count[k], "n": count[k]}
            for k in sorted(count, key=float) if count[k] > 0}
