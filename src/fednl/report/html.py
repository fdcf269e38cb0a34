"""``fednl report``: one self-contained HTML page comparing runs (plots embedded as base64 PNG; no external
URL, script or stylesheet). A panel whose data is missing is replaced by an explicit "not available" note."""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fednl.util.atomic import atomic_write_text
from fednl.engine.simulator import human_bytes
from fednl.report import panels
from fednl.report.load import RunRecord, load_run_dir
from fednl.report.rows import results_rows
from fednl.report.seeds import markdown_table, seed_groups

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1180px;color:#222}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin:22px 0 6px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px} th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left} th{background:#f3f3f3}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:12px} .panel{border:1px solid #e2e2e2;padding:8px}
.panel img{width:100%} .na{color:#a33;font-style:italic;padding:24px 8px} .meta{color:#666;font-size:12px}
"""


def read_bench(path: str | Path) -> list[dict[str, Any]]:
    """The JSON list printed by ``fednl bench inference-memory --json``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"memory bench file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: expected a JSON list of objects (the output of `fednl bench inference-memory "
                         "--json`)")
    return data


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{float(v):.{digits}f}"


def _table(runs: Sequence[RunRecord]) -> str:
    head = ("run", "task", "metric", "mean ± std", "worst", "global", "memory off", "held-out", "agg. drop",
            "bytes / round", "wall s")
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for row in results_rows(runs):
        cells = [row["run"], row["task"], row["metric"], f"{_fmt(row['mean'])} ± {_fmt(row['std'])}",
                 _fmt(row["worst"]), _fmt(row["global"]), _fmt(row["memory_off"]), _fmt(row["heldout"]),
                 _fmt(row["agg_drop"]), "–" if row["bytes_per_round"] is None else human_bytes(row["bytes_per_round"]),
                 _fmt(row["wall_s"], 1)]
        out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    out.append("</table><p class='meta'>global / memory off / held-out / agg. drop come from eval.json "
               "(<code>fednl evaluate RUN_DIR</code>); – = not evaluated. Agg. drop: locally fine-tuned minus "
               "aggregated, positive = aggregation hurt.</p>")
    return "\n".join(out)


PANELS: list[tuple[str, str, str]] = [
    ("per-client", "Per-client metric", "results.json has no per-client metric"),
    ("depth", "NIAH accuracy by depth", "no eval.json with depth data (run <code>fednl evaluate</code> on a NIAH run)"),
    ("position", "Streaming CE by position", "no eval.json with position data (run <code>fednl evaluate</code> on a "
                                              "stream run)"),
    ("memory", "Inference memory vs context length", "no memory bench given (<code>--memory-bench FILE</code>, "
                                                     "from <code>fednl bench inference-memory --json</code>)"),
    ("bytes", "Cumulative bytes per round", "no round records in metrics.jsonl"),
]


def _panel(key: str, title: str, missing: str, png: bytes | None) -> str:
    body = (f"<img alt='{html.escape(title)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
            if png is not None else f"<div class='na'>Not available: {missing}.</div>")
    return f"<div class='panel' id='panel-{key}'><h2>{html.escape(title)}</h2>{body}</div>"


def build_report(run_dirs: Sequence[str | Path], *, memory_bench: str | Path | None = None,
                 title: str = "fednl report") -> str:
    """The report's HTML text for ``run_dirs``."""
    if not run_dirs:
        raise ValueError("no run directories given")
    runs = [load_run_dir(d) for d in run_dirs]
    bench = read_bench(memory_bench) if memory_bench is not None else None
    makers: dict[str, Callable[[], bytes | None]] = {
        "per-client": lambda: panels.per_client_bars(runs),
        "depth": lambda: panels.accuracy_vs_depth(runs),
        "position": lambda: panels.ce_vs_position(runs),
        "memory": lambda: panels.memory_vs_length(bench),
        "bytes": lambda: panels.cumulative_bytes(runs),
    }
    blocks = [_panel(k, t, m, makers[k]()) for k, t, m in PANELS]
    groups = seed_groups(runs)
    seeds_html = ""
    if any(len(g["seeds"]) > 1 for g in groups):
        seeds_html = ("<h2>Across seeds (mean ± sample std over seeds)</h2><pre>"
                      f"{html.escape(markdown_table(groups))}</pre>")
    runs_meta = "".join(f"<li>{html.escape(r.label)}: {html.escape(str(r.path))} — model "
                        f"{html.escape(r.results.model)}, {r.results.rounds} rounds</li>" for r in runs)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><ul class='meta'>{runs_meta}</ul>"
            f"<h2>Results</h2>{_table(runs)}{seeds_html}<div class='grid'>{''.join(blocks)}</div></body></html>\n")


def write_report(run_dirs: Sequence[str | Path], out: str | Path, **kwargs: Any) -> Path:
    """Build the report and write it atomically to ``out``."""
    text = build_report(run_dirs, **kwargs)
    atomic_write_text(out, text)
    return Path(out)
