"""Heterogeneity report: how far each client's label mix is from the federation's.

For client ``c`` with label distribution ``p_c`` and the pooled distribution ``q``:

* ``entropy_bits`` = ``-sum p log2 p`` (0 for a one-label client, ``log2(L)`` for a uniform one);
* ``tv`` = total variation ``0.5 * sum |p_c - q|`` in [0, 1]. With labels as unordered categories (ground
  distance 1 between different labels) this is also the earth mover's distance, so it is reported once as
  ``tv`` (= ``emd``);
* ``js_bits`` = Jensen-Shannon divergence (base 2, in [0, 1]).

The summary adds the size-weighted mean TV, the max TV, and the coefficient of variation of client sizes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence


def _entropy(p: Sequence[float]) -> float:
    return max(0.0, -sum(x * math.log2(x) for x in p if x > 0))


def _js(p: Sequence[float], q: Sequence[float]) -> float:
    m = [(a + b) / 2 for a, b in zip(p, q)]
    kl = lambda a, b: sum(x * math.log2(x / y) for x, y in zip(a, b) if x > 0)  # noqa: E731
    return max(0.0, 0.5 * kl(p, m) + 0.5 * kl(q, m))


def heterogeneity_report(client_labels: Mapping[str, Sequence[str]], heldout: Sequence[str] = ()) -> dict:
    """Per-client label counts, entropy and distances to the pooled label mix (a JSON-able dict)."""
    labels = sorted({str(x) for labs in client_labels.values() for x in labs})
    pooled = Counter(str(x) for labs in client_labels.values() for x in labs)
    n_total = sum(pooled.values())
    q = [pooled[lab] / n_total for lab in labels] if n_total else [0.0] * len(labels)
    clients: dict[str, dict] = {}
    for name, labs in client_labels.items():
        counts = Counter(str(x) for x in labs)
        n = sum(counts.values())
        p = [counts[lab] / n for lab in labels] if n else [0.0] * len(labels)
        clients[name] = {
            "n": n,
            "heldout": name in heldout,
            "counts": {lab: counts[lab] for lab in labels if counts[lab]},
            "entropy_bits": round(_entropy(p), 6),
            "tv": round(0.5 * sum(abs(a - b) for a, b in zip(p, q)), 6) if n else None,
            "js_bits": round(_js(p, q), 6) if n else None,
        }
    sizes = [c["n"] for c in clients.values()]
    mean_size = sum(sizes) / len(sizes) if sizes else 0.0
    cv = math.sqrt(sum((s - mean_size) ** 2 for s in sizes) / len(sizes)) / mean_size if mean_size else 0.0
    weighted_tv = sum(c["n"] * c["tv"] for c in clients.values() if c["tv"] is not None) / n_total if n_total else 0.0
    return {
        "labels": labels,
        "pooled": {lab: pooled[lab] for lab in labels},
        "clients": clients,
        "summary": {
            "n_clients": len(clients),
            "n_examples": n_total,
            "n_labels": len(labels),
            "pooled_entropy_bits": round(_entropy(q), 6),
            "mean_tv": round(weighted_tv, 6),
            "max_tv": max((c["tv"] for c in clients.values() if c["tv"] is not None), default=0.0),
            "size_cv": round(cv, 6),
        },
    }


def format_report(report: dict, max_labels: int = 8) -> str:
    """A plain-text table: one row per client (size, entropy, TV, JS, top label counts) and a summary line."""
    rows = [("client", "n", "H bits", "TV", "JS bits", "label counts")]
    for name, c in report["clients"].items():
        top = sorted(c["counts"].items(), key=lambda kv: (-kv[1], kv[0]))
        shown = ", ".join(f"{lab}:{cnt}" for lab, cnt in top[:max_labels])
        if len(top) > max_labels:
            shown += f", ... (+{len(top) - max_labels} labels)"
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        rows.append((name + (" (heldout)" if c["heldout"] else ""), str(c["n"]), fmt(c["entropy_bits"]),
                     fmt(c["tv"]), fmt(c["js_bits"]), shown))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(r[i].ljust(widths[i]) if i == 0 else r[i].rjust(widths[i]) for i in range(5)) + "  " + r[5]
             for r in rows]
    s = report["summary"]
    lines.append(
        f"{s['n_clients']} clients, {s['n_examples']} examples, {s['n_labels']} labels; pooled entropy "
        f"{s['pooled_entropy_bits']:.3f} bits; size-weighted mean TV {s['mean_tv']:.3f}, max TV {s['max_tv']:.3f}; "
        f"client-size CV {s['size_cv']:.3f}"
    )
    return "\n".join(lines)
