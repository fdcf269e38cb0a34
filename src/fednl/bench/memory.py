"""``fednl bench memory``: fwd+bwd time of the delta rule, token-by-token recurrent vs chunkwise.

One record per sequence length T: ``{"T", "recurrent_s", "chunk_s", "speedup", "max_abs_err"}`` with the
median fwd+bwd seconds over ``repeats`` timed runs (after one untimed warm-up at a short length), and the
largest absolute difference between the two modes' outputs. Inputs: float32, random q and v, L2-normalised
k, beta in (0, 1), no decay, zero initial state, default chunk size; ``torch.set_num_threads(threads)``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fednl.memory import delta_rule
from fednl.util.threads import torch_threads

LENGTHS = (256, 1024, 4096)


def _inputs(batch: int, length: int, heads: int, dim: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, heads, dim, generator=gen)
    k = F.normalize(torch.randn(batch, length, heads, dim, generator=gen), dim=-1)
    v = torch.randn(batch, length, heads, dim, generator=gen)
    beta = torch.rand(batch, length, heads, generator=gen) * 0.98 + 0.01
    return [x.requires_grad_() for x in (q, k, v, beta)]


def _fwd_bwd(inputs: list[torch.Tensor], mode: str) -> tuple[float, torch.Tensor]:
    for x in inputs:
        x.grad = None
    start = time.perf_counter()
    o, s_t = delta_rule(*inputs, mode=mode)
    (o.sum() + s_t.sum()).backward()
    return time.perf_counter() - start, o.detach()


def measure(
    *,
    lengths: Sequence[int] = LENGTHS,
    batch: int = 4,
    heads: int = 4,
    dim: int = 64,
    repeats: int = 3,
    threads: int = 2,
    seed: int = 0,
) -> list[dict[str, float | int]]:
    """Time both modes at each length. Returns one record per length."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths must be a non-empty list of positive integers; got {list(lengths)}")
    with torch_threads(threads):
        warm = _inputs(batch, min(64, min(lengths)), heads, dim, seed)
        for mode in ("recurrent", "chunk"):
            _fwd_bwd(warm, mode)
        records: list[dict[str, float | int]] = []
        for length in lengths:
            inputs = _inputs(batch, length, heads, dim, seed)
            times: dict[str, list[float]] = {"recurrent": [], "chunk": []}
            outputs: dict[str, torch.Tensor] = {}
            for _ in range(repeats):
                for mode in ("recurrent", "chunk"):
                    seconds, outputs[mode] = _fwd_bwd(inputs, mode)
                    times[mode].append(seconds)
            rec_s, chunk_s = statistics.median(times["recurrent"]), statistics.median(times["chunk"])
            records.append(
                {
                    "T": int(length),
                    "recurrent_s": round(rec_s, 4),
                    "chunk_s": round(chunk_s, 4),
                    "speedup": round(rec_s / chunk_s, 2),
                    "max_abs_err": float((outputs["recurrent"] - outputs["chunk"]).abs().max()),
                }
            )
    return records


def _print_table(records: list[dict[str, float | int]], *, batch: int, heads: int, dim: int, repeats: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"delta rule fwd+bwd, B={batch} H={heads} D={dim}, float32, median of {repeats}")
    for column in ("T", "recurrent s", "chunk s", "speedup", "max |o_rec - o_chunk|"):
        table.add_column(column, justify="right")
    for r in records:
        table.add_row(
            str(r["T"]), f"{r['recurrent_s']:.3f}", f"{r['chunk_s']:.3f}", f"{r['speedup']:.1f}x",
            f"{r['max_abs_err']:.2e}",
        )  # fmt: skip
    Console().print(table)


def run(
    json_out: bool,
    repeats: int,
    *,
    lengths: Sequence[int] = LENGTHS,
    batch: int = 4,
    heads: int = 4,
    dim: int = 64,
    threads: int = 2,
) -> list[dict[str, float | int]]:
    """Measure and print: one JSON list with ``json_out``, else a table. Returns the records."""
    records = measure(lengths=lengths, batch=batch, heads=heads, dim=dim, repeats=repeats, threads=threads)
    if json_out:
        print(json.dumps(records))
    else:
        _print_table(records, batch=batch, heads=heads, dim=dim, repeats=repeats)
    return records
