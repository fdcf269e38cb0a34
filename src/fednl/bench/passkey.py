"""Benchmark: passkey retrieval with the key beyond the window (digit accuracy), memory vs window vs full attention.

Each prompt states a seeded 5-digit pass key, then ``filler`` tokens of the embedded book (from a seeded offset),
then asks for the key; the model answers greedily (streamed: the memory state, the sinks and the window are all it
carries). Digit accuracy is the fraction of the 5 digits right in position (chance 0.1). The conditions of
:mod:`fednl.eval.memory` run on the same model and prompts: ``memory`` (the rule as trained), ``window`` (gate 0:
window + sinks alone) and ``full`` (full attention, the ceiling); with a sparse cache (``cache`` > 0) also ``cache``
(window + sinks + the cache, memory not mixed in) and its equal-budget twins ``random_cache`` (C evicted tokens
not chosen by the memory), ``wider`` (window + C) and ``more_sinks`` (sinks + C). ``depth`` puts part of the filler before the key, so that extra sinks cannot hold it.
"""

from __future__ import annotations

import json
import random
import re
import time
from typing import Any

INTRO = "There is a pass key hidden in this text. Remember it. The pass key is {key}. Remember it: {key} is the pass key."
# The blank line and "the number" matter: with " What is the pass key? The pass key is" glued to the filler,
# SmolLM2-Instruct with full attention answered only 0.10 of the digits (it often echoed the phrase instead).
QUESTION = "\n\nWhat is the pass key mentioned at the start of this text? The pass key is the number"


def prompts(tokenizer: Any, *, n: int, filler: int, seed: int, depth: float = 0.0) -> list[tuple[str, list[int]]]:
    """``n`` (key, token ids) pairs: intro + ``filler`` tokens of book text + question; with ``depth`` > 0 the
    first ``depth * filler`` filler tokens come before the intro (the key is then not among the first tokens, so
    extra sink tokens cannot hold it)."""
    if not 0.0 <= depth < 1.0:
        raise ValueError(f"depth must be in [0, 1), got {depth}")
    from fednl.data.text import load_books

    book = "".join(load_books(None)[0].pieces)
    ids = tokenizer.encode(book)
    rng = random.Random(f"passkey|{seed}")
    out = []
    for _ in range(n):
        key = "".join(str(rng.randrange(10)) for _ in range(5))
        start = rng.randrange(0, len(ids) - filler - 1)
        fill, before = ids[start : start + filler], int(depth * filler)
        intro = tokenizer.encode((" " if before else "") + INTRO.format(key=key) + " ")
        body = fill[:before] + intro + fill[before:] + tokenizer.encode(QUESTION)
        out.append((key, body))
    return out


def digit_accuracy(key: str, answer: str) -> float:
    digits = re.sub(r"\D", "", answer)[: len(key)]
    return sum(a == b for a, b in zip(key, digits)) / len(key)


def run(*, rule: str = "default", model: str | None = None, window: int = 64, sinks: int = 4, n: int = 20,
        filler: int = 560, seed: int = 0, threads: int = 2, conditions: tuple[str, ...] | None = None,
        json_out: bool = False, cache: int = 0, cache_every: int = 16, depth: float = 0.0) -> dict[str, Any]:
    import torch

    from fednl.eval.memory import condition
    from fednl.eval.score import prepare
    from fednl.models.streaming import StreamingLM

    torch.set_num_threads(threads)
    net, tok, loaded = prepare(rule=rule, model=model, window=window, sinks=sinks, cache=cache, cache_every=cache_every)
    items = prompts(tok, n=n, filler=filler, seed=seed, depth=depth)
    if conditions is None:
        conditions = (("memory", "cache", "random_cache", "wider", "more_sinks", "window", "full") if cache
                      else ("memory", "window", "full"))
    res: dict[str, Any] = {"rule": rule if loaded is None else str(loaded.origin), "window": window, "sinks": sinks,
                           "cache": cache, "cache_every": cache_every, "depth": depth, "n": n, "filler": filler,
                           "seed": seed, "prompt_tokens": len(items[0][1]), "conditions": {}}
    for cond in conditions:
        t0 = time.perf_counter()
        accs = []
        with condition(net, cond):
            for key, ids in items:
                lm = StreamingLM(net)
                new = lm.generate(torch.tensor([ids]), max_new_tokens=8)
                accs.append(digit_accuracy(key, tok.decode(new[0].tolist())))
        res["conditions"][cond] = {"digit_accuracy": sum(accs) / len(accs), "exact": sum(a == 1.0 for a in accs) / len(accs),
                     "seconds": round(time.perf_counter() - t0, 1)}
    if json_out:
        print(json.dumps(res))
    else:
        print(f"passkey beyond the window: {n} prompts of {res['prompt_tokens']} tokens, window {window} + {sinks} "
              f"sinks" + (f" + a cache of {cache}" if cache else "") + f", key at depth {depth}, rule {res['rule']} "
              "(chance: 0.10 digit accuracy)")
        for cond in conditions:
            r = res["conditions"][cond]
            print(f"  {cond:<10} digit accuracy {r['digit_accuracy']:.3f}   exact {r['exact']:.2f}   ({r['seconds']} s)")
    return res
