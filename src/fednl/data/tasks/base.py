"""What a task builder returns before partitioning (its natural clients and the label used to re-deal them), and
the task registry: each task file registers its config class with :func:`register_task`."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from fednl.data.types import ClientData
from fednl.util.registry import Registry

if TYPE_CHECKING:
    from fednl.data.config import TaskConfigBase

C = TypeVar("C", bound="type[TaskConfigBase]")

TASKS: Registry[type[TaskConfigBase]] = Registry("task", "fednl.data.tasks")


def register_task(cls: C) -> C:
    """Class decorator: register a task config under the default of its ``name`` field."""
    name = cls.model_fields["name"].default
    if not isinstance(name, str):
        raise TypeError(f"{cls.__name__}.name needs a default (its Literal task name)")
    TASKS.register(name, cls)
    return cls


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
