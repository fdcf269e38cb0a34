"""One summary row per run (the report's results table and the across-seed tables are both made of them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fednl.eval.summary import summarise
from fednl.report.load import RunRecord


def results_rows(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """One row per run: method, task, mean ± std and worst of the primary metric, bytes/round, wall, and from
    eval.json the global / memory-off / held-out means and the mean aggregation drop."""
    rows = []
    for r in runs:
        metric = r.results.primary_metric()
        s = summarise(r.results.clients, metric)
        ev = r.evaluation
        drop = ev.aggregation_drop.summary if ev is not None else None
        rows.append({"run": r.label, "method": r.results.method, "task": r.results.task, "metric": metric,
                     "mean": s.mean, "std": s.std, "worst": s.worst,
                     "bytes_per_round": r.results.comm.bytes_per_round(), "wall_s": r.results.wall_s, "global": r.view_mean("global"),
                     "memory_off": r.view_mean("memory_off"), "heldout": r.view_mean("heldout"),
                     "agg_drop": None if drop is None else drop.mean})
    return rows
