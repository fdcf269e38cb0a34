"""Typed task configuration: one pydantic model per task, discriminated by ``name``.

``TaskConfig`` is the union used by ``RunConfig.task``; :func:`parse_task_config` validates a plain dict (TOML /
``--set`` overrides). Every model forbids unknown keys, and data paths are checked when the config is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

NIAH_TEMPLATES = ("passkey", "uuid", "name_date", "phrase", "counter", "mk_niah", "mv_niah")
NiahTemplate = Literal["passkey", "uuid", "name_date", "phrase", "counter", "mk_niah", "mv_niah"]
Lengths = list[PositiveInt] | Literal["auto"]

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


class _TaskBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    heldout: Annotated[int, Field(ge=0)] | list[str] = 0
    """Clients that never train: a number (picked with the task seed) or a list of client names."""

    @field_validator("data_dir", "haystack_dir", "path", mode="after", check_fields=False)
    @classmethod
    def _path_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not Path(value).expanduser().exists():
            raise ValueError(f"path does not exist: {value}")
        return None if value is None else Path(value).expanduser()


def _unique(values: list, what: str) -> list:
    dupes = sorted({str(v) for v in values if values.count(v) > 1})
    if dupes:
        raise ValueError(f"{what} lists {dupes} more than once")
    return values


def _apply_quickstart(data: Any, defaults: dict[str, Any]) -> Any:
    """Fill options the user did not set with the quickstart values when ``quickstart`` is true."""
    if isinstance(data, dict) and data.get("quickstart"):
        return {**defaults, **data}
    return data


class Mmlu5Config(_TaskBase):
    """Non-IID MMLU, 5 domain clients (FedNL paper Table 3); see docs/DATA.md for the subject mapping."""

    name: Literal["mmlu5"] = "mmlu5"
    data_dir: Path | None = None
    """MMLU folder holding ``cais_hf_csv/`` or ``hendrycks_original/``, one of those folders, or a HF
    ``datasets`` copy saved with ``save_to_disk``. Default: the shared data folder when present."""
    layout: Literal["auto", "cais_hf_csv", "hendrycks_original", "hf"] = "auto"
    pool: list[Literal["test", "dev", "val"]] = Field(default_factory=lambda: ["test"], min_length=1)
    test_fraction: float = Field(1 / 6, gt=0, lt=1)
    max_train: PositiveInt = 2000
    max_test: PositiveInt = 200
    split_rule: Literal["holdout_first", "proportional"] = "holdout_first"
    separator: Literal["newline", "space"] = "newline"

    @field_validator("pool")
    @classmethod
    def _unique_pool(cls, pool: list[str]) -> list[str]:
        return _unique(pool, "pool")


class Niah7Config(_TaskBase):
    """Multi-needle NIAH, 7 template clients (FedNL paper Table 4) in a Gutenberg haystack."""

    name: Literal["niah7"] = "niah7"
    data_dir: Path | None = None
    """A ``.txt`` book or a folder of them (haystacks). Default: the embedded book (never the shared folder)."""
    templates: list[NiahTemplate] = Field(default_factory=lambda: list(NIAH_TEMPLATES), min_length=1)
    n_train: int = Field(750, ge=0)
    n_test: int = Field(15, ge=0)
    n_long_test: int = Field(10, ge=0)
    train_lengths: Lengths = Field(default_factory=lambda: [1024, 2048, 4096])
    test_lengths: Lengths = Field(default_factory=lambda: [1024, 2048, 4096])
    long_test_lengths: list[PositiveInt] = Field(default_factory=lambda: [8192, 16384])
    depths: list[float] = Field(default_factory=lambda: [0.10, 0.30, 0.50, 0.70], min_length=4)
    counter_events: int = Field(6, ge=1)
    bin_size: PositiveInt = 1024
    """Position bin (tokens) of ``fednl evaluate``'s CE-by-position over the test prompts (paper Fig. 5)."""
    quickstart: bool = False

    @model_validator(mode="before")
    @classmethod
    def _quickstart(cls, data: Any) -> Any:
        return _apply_quickstart(
            data,
            {"n_train": 24, "n_test": 8, "n_long_test": 0, "train_lengths": "auto", "test_lengths": "auto",
             "long_test_lengths": [], "counter_events": 4, "bin_size": 64},
        )

    @field_validator("templates")
    @classmethod
    def _unique_templates(cls, templates: list[str]) -> list[str]:
        return _unique(templates, "templates")

    @field_validator("depths")
    @classmethod
    def _depths_ok(cls, depths: list[float]) -> list[float]:
        if any(not 0.0 < d < 1.0 for d in depths) or sorted(set(depths)) != list(depths):
            raise ValueError(f"depths must be strictly increasing fractions in (0, 1), got {depths}")
        return depths

    @model_validator(mode="after")
    def _long_lengths(self) -> Niah7Config:
        if self.n_long_test and not self.long_test_lengths:
            raise ValueError("n_long_test > 0 needs long_test_lengths")
        return self


class StreamConfig(_TaskBase):
    """PG-19-style streaming text: books cut into documents of ``doc_length`` tokens."""

    name: Literal["stream"] = "stream"
    data_dir: Path | None = None
    """A ``.txt`` book or a folder of them. Default: the embedded book."""
    books: list[str] | None = None
    doc_length: PositiveInt = 2048
    parts_per_book: PositiveInt = 1
    test_fraction: float = Field(0.1, gt=0, lt=1)
    max_train: PositiveInt | None = None
    max_test: PositiveInt | None = None
    bin_size: PositiveInt = 1024
    quickstart: bool = False
    pooled: bool = False
    """Centralised training: all non-held-out clients merged into one client ``"pooled"`` (held-out clients must
    then be given by name)."""

    @model_validator(mode="before")
    @classmethod
    def _quickstart(cls, data: Any) -> Any:
        return _apply_quickstart(
            data, {"doc_length": 256, "parts_per_book": 3, "max_train": 16, "max_test": 4, "bin_size": 64}
        )

    @model_validator(mode="after")
    def _pooled_heldout(self) -> StreamConfig:
        if self.pooled and isinstance(self.heldout, int) and self.heldout:
            raise ValueError("pooled = true needs the held-out clients by name (heldout = ['book', ...]), not a count")
        return self


class BabilongConfig(_TaskBase):
    """BABILong-style: bAbI facts scattered in order through book text; one client per bAbI task."""

    name: Literal["babilong"] = "babilong"
    data_dir: Path | None = None
    """The bAbI ``en`` folder (``qa1_*_train.txt`` ...). Default: the shared ``babi-en`` folder when present."""
    haystack_dir: Path | None = None
    """A ``.txt`` book or a folder of them. Default: the embedded book."""
    tasks: list[Annotated[int, Field(ge=1, le=20)]] = Field(default_factory=lambda: list(range(1, 21)), min_length=1)
    n_train: int = Field(100, ge=0)
    n_test: int = Field(20, ge=0)
    train_lengths: list[PositiveInt] = Field(default_factory=lambda: [1024])
    test_lengths: list[PositiveInt] = Field(default_factory=lambda: [1024, 4096])

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, tasks: list[int]) -> list[int]:
        return _unique(tasks, "tasks")


class JsonlConfig(_TaskBase):
    """Your own data: JSONL multiple-choice or exact-match QA records (format in docs/DATA.md)."""

    name: Literal["jsonl"] = "jsonl"
    path: Path
    """A ``.jsonl`` file or a folder whose ``*.jsonl`` files are read in name order."""
    format: Literal["auto", "mc", "qa"] = "auto"
    test_fraction: float = Field(0.2, gt=0, lt=1)
    label_field: str | None = None
    """Record field used as the label by dirichlet/pathological partitioning and the heterogeneity report
    (default: the ``client`` field)."""
    max_train: PositiveInt | None = None
    max_test: PositiveInt | None = None
    separator: Literal["newline", "space"] = "newline"


TaskConfig = Annotated[
    Mmlu5Config | Niah7Config | StreamConfig | BabilongConfig | JsonlConfig, Field(discriminator="name")
]
TASK_NAMES = ("mmlu5", "niah7", "stream", "babilong", "jsonl")
_ADAPTER: TypeAdapter[Any] = TypeAdapter(TaskConfig)


AnyTaskConfig = Mmlu5Config | Niah7Config | StreamConfig | BabilongConfig | JsonlConfig


def parse_task_config(data: dict[str, Any] | BaseModel) -> AnyTaskConfig:
    """Validate a dict (with a ``name`` key) into the matching task config; errors name the bad field."""
    if isinstance(data, BaseModel):
        return data  # type: ignore[return-value]
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
