"""Benchmark: seconds and tokens per second of one Level-1 training step, per objective.

Builds the converted model of a preset (default ``memory-cpu``: SmolLM2-135M, window 64 + 4 sinks), makes the
rule and gate trainable as FedNL does, and times ``repeats`` optimiser steps on one ``B x T`` batch of the embedded
book for each objective: ``attention_transfer`` (per-layer MSE to the frozen full-attention output; the backward
pass stays inside each layer's memory path) and ``lm`` (next-token loss back-propagated through the whole model and
the memory trajectory). The first step is a warm-up and is not counted; the median of the rest is reported.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any


def run(*, preset: str = "memory-cpu", sets: list[str] | None = None, batch: int = 1, tokens: int = 512,
        repeats: int = 3, threads: int = 2, json_out: bool = False) -> list[dict[str, Any]]:
    import torch

    from fednl.client.batching import Batch, collate, encode_cached
    from fednl.client.trainer import task_loss, transfer_objective_loss
    from fednl.config import load_config
    from fednl.data.text import load_books
    from fednl.data.types import Example
    from fednl.models import build_model, load_backbone
    from fednl.models.groups import param_groups

    torch.set_num_threads(threads)
    cfg = load_config(preset, list(sets or []))
    model = build_model("titans", cfg.model, cfg.memory, cfg.lora, seed=cfg.seed)
    _, tok = load_backbone(cfg.model)
    groups = param_groups(model)
    names = groups["rule"] | groups["gate"]
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    params = [p for n, p in model.named_parameters() if n in names]
    text = "".join(load_books(None)[0].pieces)
    ex = [Example(uid=f"b{i}", kind="text", prompt=text[i * 20000:(i + 1) * 20000]) for i in range(batch)]
    b: Batch = collate([encode_cached(e, tok, tokens) for e in ex], int(tok.eos_id))
    opt = torch.optim.AdamW(params, lr=1e-3)
    records = []
    for objective in ("attention_transfer", "lm"):
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = transfer_objective_loss(model, b) if objective == "attention_transfer" else task_loss(model, b)
            loss.backward()
            opt.step()
            if i:
                times.append(time.perf_counter() - t0)
        sec = statistics.median(times)
        n_tok = int(b.input_ids.numel())
        records.append({"objective": objective, "preset": preset, "batch": batch, "tokens": n_tok,
                        "threads": threads, "seconds": round(sec, 6), "tokens_per_s": round(n_tok / sec, 1),
                        "trainable_params": sum(p.numel() for p in params)})
    if json_out:
        print(json.dumps(records))
    else:
        print(f"one training step, preset {preset}, {batch} x {tokens} tokens, {threads} threads "
              f"({records[0]['trainable_params']:,} trainable parameters)")
        for r in records:
            print(f"  {r['objective']:<20} {r['seconds']:8.2f} s   {r['tokens_per_s']:8.1f} tokens/s")
    return records
