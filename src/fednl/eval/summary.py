"""Summaries of one metric over clients (the evaluation report's and the report's tables)."""

from __future__ import annotations

import math

from fednl.records import HIGHER_IS_BETTER, Summary


def summarise(per_client: dict[str, dict[str, float]], metric: str, *, higher_is_better: bool | None = None) -> Summary:
    """Mean, worst client (min, or max for lower-is-better metrics) and population std of ``metric``."""
    vals = {c: float(m[metric]) for c, m in per_client.items() if metric in m}
    if not vals:
        return Summary(metric=metric, mean=None, worst=None, worst_client=None, std=None, n_clients=0)
    mean = sum(vals.values()) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals.values()) / len(vals))
    hib = HIGHER_IS_BETTER.get(metric, True) if higher_is_better is None else higher_is_better
    pick = min if hib else max
    worst_client = pick(vals, key=lambda c: vals[c])
    return Summary(metric=metric, mean=mean, worst=vals[worst_client], worst_client=worst_client, std=std,
                   n_clients=len(vals))


def aggregation_drop(local: float, aggregated: float, metric: str) -> float:
    """``local - aggregated`` signed so that positive = aggregation hurt (``aggregated - local`` for CE)."""
    return (local - aggregated) if HIGHER_IS_BETTER.get(metric, True) else (aggregated - local)
