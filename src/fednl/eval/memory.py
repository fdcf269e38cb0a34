"""What the memory carries beyond the window: CE by position range for the four twins of one converted model.

For a run whose model has a windowed softmax path (``memory.attn_window``), :func:`memory_views` scores text
examples token by token under four conditions that differ in one part only:

* ``memory``      — the trained model as it is (window + sinks + memory);
* ``zeroed``      — the same, with the memory output forced to zero (gate kept): removes only the memory's content;
* ``window``      — the softmax path alone (gate 0): window + sink tokens, no memory at all;
* ``full``        — full causal attention, memory off: the ceiling the window is measured against.

A model with a sparse cache (``memory.cache`` = C) has three more, all with the memory not mixed in (gate 0):
``cache`` (window + sinks + the cache), and two twins that spend the same C extra key/value slots without the
memory's choice: ``random_cache`` (C evicted tokens chosen by a fixed hash of position and head), ``wider``
(window W + C, sinks) and ``more_sinks`` (window W, sinks + C: the first tokens).
``window`` and ``full`` turn the cache off, so the window + sinks baseline stays the same.

CE is reported per position range (default ``[1, W)`` inside the window, ``[W, 256)``, ``[256, end)`` beyond) and
per bin, token-weighted over every example. ``carried = gain beyond - gain inside``, where ``gain`` is the CE drop
of ``memory`` vs ``window`` in that range: a memory that only adapts to the text lowers CE everywhere, so only the
gain beyond the window in excess of the gain inside it counts as carried information.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from fednl.client.batching import collate, encode_cached
from fednl.client.trainer import model_device, model_logits
from fednl.eval.position import place_token_ce, position_grid, token_ce

CONDITIONS = ("memory", "zeroed", "window", "full")
CACHE_CONDITION = "cache"
CACHE_CONDITIONS = (CACHE_CONDITION, "random_cache", "wider", "more_sinks")


@contextlib.contextmanager
def condition(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Put every converted layer of ``model`` into one of :data:`CONDITIONS` for the block; restores it after."""
    from fednl.models.titans import titans_layers

    layers = titans_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no converted (Titans) attention layers")
    if name not in (*CONDITIONS, *CACHE_CONDITIONS):
        raise ValueError(f"unknown condition {name!r}; expected one of {(*CONDITIONS, *CACHE_CONDITIONS)}")
    if name in CACHE_CONDITIONS and not any(layer.cache_size for layer in layers):
        raise ValueError(f"condition {name!r} needs a model with a sparse cache (memory.cache > 0)")
    saved = [(layer.window, layer.sinks, layer.gate_override, layer.memory_zero, layer.cache_size, layer.cache_select)
             for layer in layers]
    for layer in layers:
        if name == "zeroed":
            layer.memory_zero = True
        elif name != "memory":
            layer.gate_override = 0.0
        if name == "random_cache":
            layer.cache_select = "random"
        if name == "wider" and layer.window is not None:
            layer.window += layer.cache_size
        elif name == "more_sinks" and layer.window is not None:
            layer.sinks += layer.cache_size
        if name in ("window", "full", "wider", "more_sinks"):
            layer.cache_size = 0
        if name == "full":
            layer.window = None
    try:
        yield
    finally:
        for layer, (window, sinks, override, zero, cache, select) in zip(layers, saved):
            layer.window, layer.sinks, layer.gate_override, layer.memory_zero, layer.cache_size = (
                window, sinks, override, zero, cache)
            layer.cache_select = select


@torch.no_grad()
def token_ce_matrix(model: torch.nn.Module, tokenizer: Any, examples: Sequence[Any], *, seq_len: int,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ce, scored)`` ``[N, L]``: the CE of the token at position ``t`` (0-based in the document) and whether it
    is scored. Only ``text`` examples."""
    if not examples:
        raise ValueError("no examples to score")
    bad = sorted({e.kind for e in examples} - {"text"})
    if bad:
        raise ValueError(f"memory views score text examples only; got kinds {bad}")
    was_training = model.training
    model.eval()
    device = model_device(model)
    enc = [encode_cached(e, tokenizer, seq_len) for e in examples]
    values, mask = position_grid(enc)
    for start in range(0, len(enc), batch_size):
        batch = collate(enc[start : start + batch_size], int(tokenizer.eos_id)).to(device)
        place_token_ce(values, mask, start, token_ce(model_logits(model, batch.input_ids), batch.targets), batch.targets)
    model.train(was_training)
    return values, mask


def default_ranges(window: int, far: int = 256) -> list[tuple[int, int | None]]:
    """``[1, W)`` (inside the window), ``[W, far)`` and ``[far, end)`` (``far`` raised to ``W`` if smaller)."""
    far = max(far, window)
    ranges: list[tuple[int, int | None]] = [(1, window)]
    if far > window:
        ranges.append((window, far))
    ranges.append((far, None))
    return ranges


def range_means(values: np.ndarray, mask: np.ndarray, ranges: Sequence[tuple[int, int | None]]) -> list[dict[str, Any]]:
    """Token-weighted mean CE of each ``[start, end)`` position range (``end=None``: to the end)."""
    out = []
    for start, end in ranges:
        v, m = values[:, start:end], mask[:, start:end]
        n = int(m.sum())
        out.append({"start": int(start), "end": None if end is None else int(end), "tokens": n,
                    "ce": float(v[m].sum() / n) if n else float("nan")})
    return out


def _with_gains(out: dict[str, Any]) -> dict[str, Any]:
    """Add ``gain_inside`` / ``gain_beyond`` (CE drop of ``memory`` vs ``window`` in the first / last range),
    ``carried`` (their difference) and ``gap_closed`` (the beyond gain over the window-to-full gap)."""
    if "memory" in out and "window" in out:
        inside = out["window"]["ranges"][0]["ce"] - out["memory"]["ranges"][0]["ce"]
        beyond = out["window"]["ranges"][-1]["ce"] - out["memory"]["ranges"][-1]["ce"]
        out["gain_inside"], out["gain_beyond"], out["carried"] = inside, beyond, beyond - inside
        if "full" in out:
            gap = out["window"]["ranges"][-1]["ce"] - out["full"]["ranges"][-1]["ce"]
            out["gap_closed"] = beyond / gap if gap > 0 else float("nan")
    return out


def memory_views(model: torch.nn.Module, tokenizer: Any, examples: Sequence[Any], *, seq_len: int, batch_size: int,
                 window: int, conditions: Sequence[str] = CONDITIONS, bin_size: int = 64,
                 far: int = 256, log: Any = None, label: str = "") -> dict[str, Any]:
    """CE by range and by bin for each condition, the memory's gains and the share of the window's gap it closes.
    ``log``: called with one progress line per condition (its CE beyond ``far`` and its seconds)."""
    import time

    ranges = default_ranges(window, far)
    out: dict[str, Any] = {"ranges": [list(r) for r in ranges], "bin_size": bin_size, "n": len(examples)}
    for i, name in enumerate(conditions, 1):
        t0 = time.perf_counter()
        with condition(model, name):
            values, mask = token_ce_matrix(model, tokenizer, examples, seq_len=seq_len, batch_size=batch_size)
        bins = [(s, s + bin_size) for s in range(0, values.shape[1], bin_size)]
        out[name] = {"ranges": range_means(values, mask, ranges),
                     "bins": [b for b in range_means(values, mask, bins) if b["tokens"]]}
        if log is not None:
            log(f"  {label}{name} ({i}/{len(conditions)}): CE beyond {ranges[-1][0]} "
                f"{out[name]['ranges'][-1]['ce']:.4f}  {time.perf_counter() - t0:.0f} s")
    return _with_gains(out)


def run_memory_views(run_dir: Any, *, clients: str = "heldout", max_examples: int | None = None,
                     conditions: Sequence[str] = CONDITIONS, cache: int = 0, cache_every: int = 16,
                     log: Any = print) -> dict[str, Any]:
    """:func:`memory_views` on a finished run: its held-out clients (``clients="heldout"``: the global rule, as a
    newcomer gets it) or its training clients' test splits (``"train"``: each client's personalised model), pooled
    over clients. Needs a converted model with ``memory.attn_window`` and a text task. ``cache`` > 0 evaluates the
    trained model with a sparse cache of that many evicted tokens per KV head (``memory.cache``; inference only)
    and adds the ``cache`` condition."""
    import time

    from fednl.client.state import ClientState
    from fednl.engine.runstate import RunState
    from fednl.client.metrics import eval_seq_len
    from fednl.eval.protocol import load_run

    sim, state = load_run(run_dir, log=log)
    window = getattr(_first_layer(sim.model), "window", None)
    if window is None:
        raise ValueError(f"{run_dir}: the run's model has no attention window (memory.attn_window); nothing is "
                         "beyond a full-attention window")
    if cache:
        set_cache(sim.model, cache, cache_every)
        if conditions is CONDITIONS:  # the default: every condition, the cache's included
            conditions = (*CONDITIONS, *CACHE_CONDITIONS)
    seq_len = eval_seq_len(sim.spec)
    bs = int(sim.spec.engine.eval_batch_size or sim.spec.train.batch_size)
    if clients == "heldout":
        groups = {c.name: [*c.train, *c.test] for c in sim.task.heldout}
        if not groups:
            raise ValueError(f"{run_dir}: the task has no held-out clients")
    elif clients == "train":
        groups = {cid: sim.data[cid].test for cid in sim.client_names if sim.data[cid].test}
    else:
        raise ValueError(f"clients must be 'heldout' or 'train', got {clients!r}")
    t0 = time.time()
    per_client: dict[str, Any] = {}
    for cid, examples in groups.items():
        examples = examples[:max_examples] if max_examples else examples
        if clients == "heldout":
            st = RunState(state.round, state.global_params, state.initial_local, {cid: ClientState(cid)})
            sim.install_client(cid, state.global_params, st)
        else:
            sim.install_client(cid, state.global_params, state)
        views = memory_views(sim.model, sim.tokenizer, examples, seq_len=seq_len, batch_size=bs, window=int(window),
                             conditions=conditions, log=log, label=f"{cid}: ")
        per_client[cid] = views
        log(f"memory views {cid}: " + "  ".join(
            f"{c} {views[c]['ranges'][-1]['ce']:.4f}" for c in conditions) + f"  (beyond position "
            f"{views['ranges'][-1][0]}, {len(examples)} docs)")
    pooled = _pool(per_client, conditions)
    return {"run": str(run_dir), "clients": clients, "window": int(window), "cache": int(cache),
            "cache_every": int(cache_every), "per_client": per_client,
            "pooled": pooled, "seconds": round(time.time() - t0, 1)}


def set_cache(model: torch.nn.Module, size: int, every: int = 16) -> None:
    """Give every converted layer of ``model`` a sparse cache of ``size`` evicted tokens per KV head, updated every
    ``every`` tokens (``MemoryConfig.cache``); the layers must write evicted tokens (``memory.write = "evicted"``)."""
    from fednl.models.titans import titans_layers

    if size < 0 or every < 1:
        raise ValueError(f"cache size must be >= 0 and its update interval >= 1; got {size}, {every}")
    layers = titans_layers(model)
    if size and any(layer.memory_cfg.write != "evicted" or layer.window is None for layer in layers):
        raise ValueError("a sparse cache needs a windowed memory that writes evicted tokens "
                         "(memory.attn_window and memory.write = 'evicted')")
    for layer in layers:
        layer.cache_size, layer.cache_every = int(size), int(every)


def _first_layer(model: torch.nn.Module) -> Any:
    from fednl.models.titans import titans_layers

    layers = titans_layers(model)
    return layers[0] if layers else None


def _pool(per_client: dict[str, Any], conditions: Sequence[str]) -> dict[str, Any]:
    """Token-weighted pooling of the per-client range CEs (and the derived gains)."""
    first = next(iter(per_client.values()))
    out: dict[str, Any] = {"ranges": first["ranges"]}
    for c in conditions:
        rows = []
        for i in range(len(first["ranges"])):
            n = sum(v[c]["ranges"][i]["tokens"] for v in per_client.values())
            ce = sum(v[c]["ranges"][i]["ce"] * v[c]["ranges"][i]["tokens"] for v in per_client.values()) / max(n, 1)
            rows.append({**first[c]["ranges"][i], "tokens": n, "ce": ce})
        out[c] = {"ranges": rows}
    return _with_gains(out)
