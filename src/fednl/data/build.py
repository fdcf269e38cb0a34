"""The registered tasks as one config type, and the pipeline every task goes through: natural clients ->
partition -> held-out clients -> heterogeneity report.

``TaskConfig`` is the union of every registered task config (discriminated by ``name``), gathered from
``fednl/data/tasks/`` by :data:`fednl.data.tasks.base.TASKS`; :func:`parse_task_config` validates a dict into
one; ``cfg.build(tokenizer, seed)`` (= :func:`federate`) builds it; :func:`build_task` does both.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any, Union

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from fednl.data.config import PartitionConfig, TaskConfigBase
from fednl.data.partition import choose_heldout, partition
from fednl.data.report import heterogeneity_report
from fednl.data.tasks.base import TASKS, NaturalTask, rng_for
from fednl.data.types import ClientData, Example, FederatedTask

TASK_NAMES: tuple[str, ...] = tuple(TASKS.names())
TaskConfig = Annotated[Union[tuple(cls for _, cls in TASKS.items())], Field(discriminator="name")]  # noqa: UP007
_ADAPTER: TypeAdapter[Any] = TypeAdapter(TaskConfig)


def parse_task_config(data: dict[str, Any] | BaseModel) -> TaskConfigBase:
    """Validate a dict (with a ``name`` key) into the matching task config; errors name the bad field."""
    if isinstance(data, TaskConfigBase):
        return data
    if not isinstance(data, dict) or "name" not in data:
        raise ValueError(f"task config needs a 'name' (one of {list(TASK_NAMES)})")
    if data["name"] not in TASK_NAMES:
        raise ValueError(f"unknown task name {data['name']!r}; known tasks: {list(TASK_NAMES)}")
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as err:
        lines = [
            f"task.{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in err.errors()
        ]
        raise ValueError("invalid task config: " + "; ".join(lines)) from None


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
    return parse_task_config(cfg).build(tokenizer, seed)


def federate(cfg: TaskConfigBase, tokenizer: Any, seed: int) -> FederatedTask:
    """The federated task of ``cfg``: its natural clients, re-dealt by ``cfg.partition``, minus the held-out ones,
    with the heterogeneity report in ``info``."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if cfg.measures_tokens and not callable(getattr(tokenizer, "encode", None)):
        raise ValueError(
            f"task {cfg.name!r} measures lengths in tokens: pass a tokenizer with encode(str) -> list[int]"
        )
    natural = cfg.natural(tokenizer, seed)
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
