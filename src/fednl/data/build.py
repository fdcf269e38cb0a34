"""``build_task(cfg, tokenizer, seed)``: task builder -> partition -> held-out clients -> report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from fednl.data.config import PartitionConfig, parse_task_config
from fednl.data.partition import choose_heldout, partition
from fednl.data.report import heterogeneity_report
from fednl.data.tasks.base import NaturalTask, rng_for
from fednl.data.types import ClientData, Example, FederatedTask

MEASURED = ("niah7", "stream", "babilong")  # tasks whose lengths are counted with the tokenizer


def _builders() -> dict[str, Callable[..., NaturalTask]]:
    from fednl.data.tasks.babilong import build_babilong
    from fednl.data.tasks.jsonl import build_jsonl
    from fednl.data.tasks.mmlu5 import build_mmlu5
    from fednl.data.tasks.niah7 import build_niah7
    from fednl.data.tasks.stream import build_stream

    return {"mmlu5": build_mmlu5, "niah7": build_niah7, "stream": build_stream, "babilong": build_babilong,
            "jsonl": build_jsonl}


def repartition(natural: NaturalTask, cfg: PartitionConfig, seed: int) -> list[ClientData]:
    """Pool every example (keeping its train/test split) and re-deal the pool by ``natural.label_key``.

    Clients are named ``client00``, ``client01``, ...; each example's ``meta["client"]`` becomes its new client
    and ``meta["natural_client"]`` keeps the task's own client.
    """
    pool: list[tuple[str, Example]] = [
        (split, ex) for c in natural.clients for split, exs in (("train", c.train), ("test", c.test)) for ex in exs
    ]
    if not pool:
        raise ValueError("the task built no examples to partition")
    missing = [ex.uid for _, ex in pool if natural.label_key not in ex.meta]
    if missing:
        raise ValueError(f"examples lack the partition label meta[{natural.label_key!r}], e.g. {missing[0]}")
    # Partitioners may split each label's examples in the order given: shuffle the pool (seeded) first so the
    # order of the natural clients and of the train/test splits does not decide who gets what.
    order = list(range(len(pool)))
    rng_for("repartition", seed).shuffle(order)
    labels = [str(pool[j][1].meta[natural.label_key]) for j in order]
    parts = [sorted(order[i] for i in part) for part in partition(labels, cfg, seed)]
    width = max(2, len(str(len(parts) - 1)))
    clients = []
    for c, idx in enumerate(parts):
        name = f"client{c:0{width}d}"
        moved = {"train": [], "test": []}
        for j in idx:
            split, ex = pool[j]
            meta = {**ex.meta, "client": name, "natural_client": ex.meta.get("client")}
            moved[split].append(replace(ex, meta=meta))
        clients.append(ClientData(name=name, train=moved["train"], test=moved["test"]))
    return clients


def build_task(cfg: Any, tokenizer: Any, seed: int) -> FederatedTask:
    """Build the federated task described by ``cfg`` (a task config or a dict with ``name``).

    Token lengths are measured with ``tokenizer`` (``encode(str) -> list[int]``). The same ``cfg`` and ``seed``
    give byte-identical examples (see :func:`fednl.data.types.task_fingerprint`).
    """
    cfg = parse_task_config(cfg)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if cfg.name in MEASURED and not callable(getattr(tokenizer, "encode", None)):
        raise ValueError(
            f"task {cfg.name!r} measures lengths in tokens: pass a tokenizer with encode(str) -> list[int]"
        )
    natural = _builders()[cfg.name](cfg, tokenizer, seed)
    clients = natural.clients if cfg.partition.kind == "natural" else repartition(natural, cfg.partition, seed)
    held = set(choose_heldout([c.name for c in clients], cfg.heldout, seed))
    training = [c for c in clients if c.name not in held]
    heldout = [c for c in clients if c.name in held]
    report = heterogeneity_report(
        {c.name: [str(ex.meta.get(natural.label_key)) for ex in c.train] for c in clients}, heldout=sorted(held)
    )
    info = {
        "task": cfg.name,
        "kind": natural.kind,
        "seed": seed,
        "label_key": natural.label_key,
        "config": cfg.model_dump(mode="json"),
        "counts": {c.name: {"train": len(c.train), "test": len(c.test), "heldout": c.name in held} for c in clients},
        "heterogeneity": report,
        **natural.info,
    }
    return FederatedTask(name=cfg.name, kind=natural.kind, clients=training, heldout=heldout, info=info)
