#!/usr/bin/env python3
"""Pool ``fednl memory-eval`` results over seeds: one row per condition, mean ± sample std of the held-out CE
beyond the last range start (pooled over the evaluated clients) and of the share of the window-to-full gap it closes.

    python scripts/memory_seeds.py runs/reproduce-memory/memory/fednl-s{0,1,2}/memory_eval-heldout-cache128.json

Each file must hold the ``window`` and ``full`` conditions (the gap is measured per seed, inside the same file).
Prints a markdown table; ``--json`` prints the same numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def load(path: Path) -> dict[str, float]:
    """Condition -> CE beyond the last range start, pooled over clients."""
    try:
        pooled = json.loads(path.read_text())["pooled"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise SystemExit(f"error: {path}: not a memory-eval result ({exc})") from None
    out = {c: v["ranges"][-1]["ce"] for c, v in pooled.items() if isinstance(v, dict) and "ranges" in v}
    missing = [c for c in ("window", "full") if c not in out]
    if missing:
        raise SystemExit(f"error: {path}: lacks the condition(s) {missing} needed for the gap")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    runs = [load(f) for f in args.files]
    common = [c for c in runs[0] if all(c in r for r in runs)]
    rows = {}
    for c in common:
        ce = [r[c] for r in runs]
        closed = [100.0 * (r["window"] - r[c]) / (r["window"] - r["full"]) for r in runs]
        gain = [r["window"] - r[c] for r in runs]
        rows[c] = {"ce": mean_std(ce), "gain": mean_std(gain), "closed": mean_std(closed), "per_seed": ce}
    if args.json:
        print(json.dumps({"files": [str(f) for f in args.files], "rows": rows}, indent=2))
        return 0
    print(f"{len(runs)} seed(s); CE beyond the last range start, pooled over clients; mean ± sample std\n")
    print("| condition | CE | gain over window + sinks | gap closed % | per seed |")
    print("|---|---|---|---|---|")
    for c, r in sorted(rows.items(), key=lambda kv: -kv[1]["ce"][0]):
        print(f"| {c} | {r['ce'][0]:.4f} ± {r['ce'][1]:.4f} | {r['gain'][0]:+.4f} ± {r['gain'][1]:.4f} | "
              f"{r['closed'][0]:.1f} ± {r['closed'][1]:.1f} | {' / '.join(f'{x:.4f}' for x in r['per_seed'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
