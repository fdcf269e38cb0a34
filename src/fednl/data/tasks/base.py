"""What a task builder returns before partitioning: its natural clients and the label used to re-deal them."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from fednl.data.types import ClientData


@dataclass
class NaturalTask:
    """A task's own clients (domain, template, book, bAbI task, JSONL ``client``).

    ``label_key`` names the ``Example.meta`` entry used as the label by non-natural partitions and by the
    heterogeneity report; ``info`` holds JSON-able facts about the build (sources, counts, resolved options).
    """

    kind: str
    label_key: str
    clients: list[ClientData]
    info: dict = field(default_factory=dict)


def rng_for(*parts: object) -> random.Random:
    """A ``random.Random`` seeded from the parts' string form (stable across processes and Python runs)."""
    return random.Random("|".join(str(p) for p in parts))
