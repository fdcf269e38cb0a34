"""The report's plots: each panel returns PNG bytes, or ``None`` when its data is missing (the page then says
so). Matplotlib's Agg backend only; nothing touches a display."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fednl.report.load import RunRecord  # noqa: E402


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def per_client_bars(runs: Sequence[RunRecord]) -> bytes | None:
    metric = runs[0].results.primary_metric()
    clients = sorted({c for r in runs for c, m in r.results.clients.items() if metric in m})
    if not clients:
        return None
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        vals = [r.results.clients.get(c, {}).get(metric, math.nan) for c in clients]
        ax.bar([x + i * width for x in range(len(clients))], vals, width, label=r.label)
    ax.set_xticks([x + width * (len(runs) - 1) / 2 for x in range(len(clients))], clients, rotation=20)
    ax.set_ylabel(metric)
    ax.set_title(f"personalised {metric} per client (final round)")
    ax.legend(fontsize=7)
    return _png(fig)


def _pooled_views_plot(runs: Sequence[RunRecord], section: str,
                       xy: Callable[[Any], tuple[list[Any], list[Any]]], *, xlabel: str, ylabel: str,
                       title: str, ylim: tuple[float, float] | None = None, zero_line: bool = False) -> bytes | None:
    """One line per run and view (``personalised`` solid, ``memory_off`` dashed) of the pooled ``section``
    (``depth`` or ``position``) of the runs' eval.json; ``xy`` turns a pooled record into the line's points.
    ``None`` when no run has one."""
    series = []
    for r in runs:
        views = getattr(r.evaluation, section) if r.evaluation is not None else {}
        for view in ("personalised", "memory_off"):
            if view in views and views[view].pooled:
                series.append((f"{r.label} {view}", views[view].pooled))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for label, pooled in series:
        xs, ys = xy(pooled)
        ax.plot(xs, ys, marker="o", linestyle="--" if "memory_off" in label else "-", label=label)
    if zero_line:
        ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _png(fig)


def _depth_points(pooled: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    xs = sorted(pooled, key=float)
    return [float(x) for x in xs], [pooled[x].accuracy for x in xs]


def accuracy_vs_depth(runs: Sequence[RunRecord]) -> bytes | None:
    return _pooled_views_plot(runs, "depth", _depth_points, xlabel="needle depth (fraction of context)",
                              ylabel="accuracy", ylim=(-0.05, 1.05),
                              title="NIAH accuracy by depth (pooled over clients)")


def ce_vs_position(runs: Sequence[RunRecord]) -> bytes | None:
    return _pooled_views_plot(runs, "position", lambda pooled: (pooled.bin_start, pooled.relative),
                              xlabel="token position (bin start)", ylabel="CE relative to first bin",
                              title="streaming CE by position", zero_line=True)


def memory_vs_length(bench: list[dict[str, Any]] | None) -> bytes | None:
    """From ``fednl bench inference-memory --json``: rows with a context length and peak memory per model."""
    if not bench:
        return None
    groups: dict[str, list[tuple[float, float]]] = {}
    for row in bench:
        length = row.get("tokens")
        mem = row.get("stream_peak_rss_mb") or row.get("peak_rss_mb")
        if length is None or mem is None:
            continue
        name = str(row.get("model", "model"))
        groups.setdefault(name, []).append((float(length), float(mem)))
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, pts in sorted(groups.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("peak memory (MB)")
    ax.set_title("inference memory vs context length")
    ax.legend(fontsize=7)
    return _png(fig)


def cumulative_bytes(runs: Sequence[RunRecord]) -> bytes | None:
    series = [(r.label, r.rounds) for r in runs if r.rounds]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for label, rounds in series:
        total, xs, ys = 0, [], []
        for rec in sorted(rounds, key=lambda x: x.round):
            total += rec.bytes_up + rec.bytes_down
            xs.append(rec.round)
            ys.append(total)
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative bytes (up + down)")
    ax.set_title("communication")
    ax.legend(fontsize=7)
    return _png(fig)
