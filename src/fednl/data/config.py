"""Typed task configuration: the partition settings and :class:`TaskConfigBase`, which every task's config extends.

Each task's config lives in its own file (``fednl/data/tasks/<name>.py``), registers itself with
:func:`fednl.data.tasks.base.register_task` and builds its task: ``cfg.build(tokenizer, seed)``. ``TaskConfig``
(the union used by ``RunConfig.task``, discriminated by ``name``) and :func:`parse_task_config` are in
:mod:`fednl.data.build`. Every model forbids unknown keys, and data paths are checked when the config is loaded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationInfo, field_validator, model_validator

if TYPE_CHECKING:
    from fednl.data.tasks.base import NaturalTask
    from fednl.data.types import FederatedTask

# Options of each partition kind (anything else set explicitly is an error, so typos do not pass silently).
_PARTITION_OPTIONS = {
    "natural": set(),
    "iid": {"n_clients"},
    "dirichlet": {"n_clients", "alpha", "min_size", "backend"},
    "pathological": {"n_clients", "k", "backend"},
    "long_tail": {"n_clients", "law", "exponent", "backend"},
}


class PartitionConfig(BaseModel):
    """How examples are dealt to clients.

    ``natural`` keeps the task's own clients (MMLU domain, NIAH template, book, bAbI task, JSONL ``client``).
    The other kinds pool every example and re-deal it over ``n_clients`` clients by the task's label:
    ``iid`` (seeded shuffle, equal sizes), ``dirichlet`` (per-label client shares ~ Dir(alpha)),
    ``pathological`` (each client holds exactly ``k`` labels), ``long_tail`` (client sizes proportional to
    ``exp(i)`` or ``i**-exponent`` for i = 1..n_clients).
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["natural", "iid", "dirichlet", "pathological", "long_tail"] = "natural"
    n_clients: PositiveInt | None = None
    alpha: float = Field(0.5, gt=0)
    min_size: int = Field(1, ge=0)
    k: PositiveInt = 2
    law: Literal["exponential", "zipf"] = "exponential"
    exponent: float = Field(1.0, gt=0)
    backend: Literal["auto", "flwr", "python"] = "auto"

    @model_validator(mode="after")
    def _check_kind_options(self) -> PartitionConfig:
        allowed = _PARTITION_OPTIONS[self.kind] | {"kind"}
        # An option of another kind set to a non-default value is a mistake; its default (as in a dumped config)
        # is harmless.
        fields = type(self).model_fields
        extra = sorted(f for f in self.model_fields_set - allowed if getattr(self, f) != fields[f].default)
        if extra:
            raise ValueError(
                f"partition option(s) {extra} do not apply to kind={self.kind!r} (it takes {sorted(allowed)})"
            )
        if self.kind != "natural" and self.n_clients is None:
            raise ValueError(f"partition kind={self.kind!r} needs n_clients")
        return self


class TaskConfigBase(BaseModel, ABC):
    """What every task config has: its ``name`` (a ``Literal``, the registry key), the partition and the held-out
    clients. A task's config adds its own options and :meth:`natural`, the builder of its natural clients;
    ``measures_tokens`` says whether its lengths are counted with the tokenizer."""

    model_config = ConfigDict(extra="forbid")
    measures_tokens: ClassVar[bool] = False

    name: str
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    heldout: Annotated[int, Field(ge=0)] | list[str] = 0
    """Clients that never train: a number (picked with the task seed) or a list of client names."""

    @abstractmethod
    def natural(self, tokenizer: Any, seed: int) -> NaturalTask:
        """The task's own clients before partitioning."""

    def build(self, tokenizer: Any, seed: int) -> FederatedTask:
        """The federated task: :meth:`natural`, then the partition, the held-out clients and the heterogeneity
        report (:func:`fednl.data.build.federate`)."""
        from fednl.data.build import federate

        return federate(self, tokenizer, seed)

    @field_validator("data_dir", "haystack_dir", "path", mode="after", check_fields=False)
    @classmethod
    def _path_exists(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        local = (info.context or {}).get("local_paths", True)  # False: the data is on other machines
        if value is not None and local and not Path(value).expanduser().exists():
            raise ValueError(f"path does not exist: {value}")
        return None if value is None else Path(value).expanduser()


def unique(values: list, what: str) -> list:
    """``values`` unchanged, or a ``ValueError`` naming the entries listed more than once."""
    dupes = sorted({str(v) for v in values if values.count(v) > 1})
    if dupes:
        raise ValueError(f"{what} lists {dupes} more than once")
    return values


def apply_quickstart(data: Any, defaults: dict[str, Any]) -> Any:
    """Fill options the user did not set with the quickstart values when ``quickstart`` is true."""
    if isinstance(data, dict) and data.get("quickstart"):
        return {**defaults, **data}
    return data
