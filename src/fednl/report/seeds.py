"""Across-seed tables: runs that differ only in ``seed`` (and output directory) form one group; each group gets
the mean ± std (over seeds) of the per-run client-mean metric, of the eval.json views, and of the aggregation
drop. Groups are labelled by method, task and the resolved-config keys that tell them apart."""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Sequence
from typing import Any

from fednl.report.load import RunRecord
from fednl.report.rows import results_rows

IGNORED = ("seed", "out", "description")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_config(run: RunRecord) -> dict[str, Any]:
    """The flattened resolved config of a run, minus seed / out / description ({} if the file is absent)."""
    path = run.path / "config.resolved.toml"
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    return {k: v for k, v in _flat(data).items() if k not in IGNORED}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof = 1; 0 for a single value)."""
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def seed_groups(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """One record per group of runs identical up to the seed, in first-seen order."""
    cfgs = [run_config(r) for r in runs]
    keys: dict[str, list[int]] = {}
    for i, c in enumerate(cfgs):
        keys.setdefault(json.dumps(c, sort_keys=True, default=str), []).append(i)
    all_keys = sorted({k for c in cfgs for k in c})
    varying = [k for k in all_keys if len({json.dumps(c.get(k), default=str) for c in cfgs}) > 1
               and not k.startswith("method.")]
    rows = results_rows(runs)
    out = []
    for idx in keys.values():
        first = cfgs[idx[0]]
        label_bits = [f"{k}={first.get(k)}" for k in varying if k not in ("task.name",)]
        rec: dict[str, Any] = {"method": runs[idx[0]].results.method, "task": runs[idx[0]].results.task,
                               "variant": ", ".join(label_bits), "metric": rows[idx[0]]["metric"],
                               "seeds": [runs[i].results.seed for i in idx],
                               "runs": [runs[i] for i in idx]}
        for field in ("mean", "worst", "global", "memory_off", "heldout", "agg_drop", "bytes_per_round", "wall_s"):
            vals = [rows[i][field] for i in idx if rows[i][field] is not None]
            rec[field] = mean_std(vals) if len(vals) == len(idx) else None
        rel = [_last_relative(runs[i]) for i in idx]
        rec["ce_last_bin_rel"] = mean_std(rel) if rel and all(v is not None for v in rel) else None
        out.append(rec)
    return out


def _last_relative(run: RunRecord) -> float | None:
    view = run.evaluation.position.get("personalised") if run.evaluation is not None else None
    return view.pooled.relative[-1] if view is not None else None


def _pm(v: tuple[float, float] | None, digits: int = 4) -> str:
    return "–" if v is None else f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def markdown_table(groups: Sequence[dict[str, Any]]) -> str:
    """The across-seed table as Markdown (for docs/RESULTS.md)."""
    head = ["method", "task", "variant", "seeds", "metric", "mean ± std", "worst", "global", "memory off",
            "agg. drop", "CE last bin rel.", "bytes / round"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        bpr = "–" if g["bytes_per_round"] is None else f"{g['bytes_per_round'][0]:,.0f}"
        cells = [g["method"], g["task"], g["variant"] or "–", ",".join(str(s) for s in g["seeds"]), g["metric"],
                 _pm(g["mean"]), _pm(g["worst"]), _pm(g["global"]), _pm(g["memory_off"]), _pm(g["agg_drop"]),
                 _pm(g["ce_last_bin_rel"]), bpr]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- curves
def _columns(run: RunRecord, kind: str, view: str) -> dict[str, float]:
    """One run's values by column: ``clients`` (personalised primary metric per client), ``depth`` (pooled NIAH
    accuracy per depth of ``view``) or ``position`` (pooled CE relative to the first bin, per bin start)."""
    if kind == "clients":
        metric = run.results.primary_metric()
        return {c: float(m[metric]) for c, m in run.results.clients.items() if metric in m}
    if run.evaluation is None:
        return {}
    if kind == "depth":
        depth = run.evaluation.depth.get(view)
        return {} if depth is None else {k: float(v.accuracy) for k, v in depth.pooled.items()}
    position = run.evaluation.position.get(view)
    if position is None:
        return {}
    return {str(b): float(r) for b, r in zip(position.pooled.bin_start, position.pooled.relative)}


def curve_table(groups: Sequence[dict[str, Any]], kind: str, view: str = "personalised", digits: int = 3) -> str:
    """Markdown: one row per seed group (and view), one column per client / depth / position bin, each cell
    mean ± std over the group's seeds. Empty string when no run has the data. ``kind``: ``clients``, ``depth``
    or ``position``."""
    if kind not in ("clients", "depth", "position"):
        raise ValueError(f"kind must be 'clients', 'depth' or 'position', got {kind!r}")
    rows = []
    for g in groups:
        per_run = [_columns(r, kind, view) for r in g["runs"]]
        if not per_run or not all(per_run):
            continue
        label = g["method"] + (f" ({g['variant']})" if g["variant"] else "")
        rows.append((label, per_run))
    if not rows:
        return ""
    cols = sorted({c for _, per_run in rows for pr in per_run for c in pr},
                  key=lambda c: (float(c) if kind != "clients" else 0.0, c))
    head = {"clients": "client", "depth": "needle depth", "position": "bin start (tokens)"}[kind]
    lines = [f"| method | {' | '.join(cols)} |", "|---|" + "---|" * len(cols)]
    for label, per_run in rows:
        cells = []
        for c in cols:
            vals = [pr[c] for pr in per_run if c in pr]
            cells.append(_pm(mean_std(vals), digits) if len(vals) == len(per_run) else "–")
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return f"Columns: {head}; {view} view; mean ± std over seeds.\n\n" + "\n".join(lines) + "\n"
