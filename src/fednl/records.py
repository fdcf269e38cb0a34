"""Typed records of a run directory: the lines of ``metrics.jsonl`` (round, eval, stop), ``results.json`` and the
evaluation report ``eval.json``.

Every writer builds these types and every reader loads the files through them (:meth:`Results.load`,
:func:`read_metrics`, :meth:`EvalReport.load`). The JSON on disk is the same as before the types existed (same keys,
values and number types), so old run directories load; a file that is not such a record fails with a
:class:`RecordError` naming the file (and line) and the fields that are wrong.

Metric values stay a name -> number mapping (``accuracy``, ``answer_loglik``, ``exact_match``, ``ce``, ``n``,
``tokens``, ``mc/accuracy`` ...): metric names are data, not schema. :data:`PRIMARY_METRIC` and
:data:`HIGHER_IS_BETTER` say which one a task kind reports and in which direction it improves.

Records of the round loop (round, stop, results) keep fields a newer writer adds (``extra="allow"``); the
evaluation report and its parts are closed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_serializer, model_validator

from fednl.util.atomic import atomic_write_json

PRIMARY_METRIC = {"mc": "accuracy", "qa": "exact_match", "text": "ce"}
HIGHER_IS_BETTER = {"accuracy": True, "exact_match": True, "answer_loglik": True, "ce": False}

RESULTS_NAME = "results.json"
METRICS_NAME = "metrics.jsonl"
EVAL_NAME = "eval.json"

Metrics = dict[str, float | int]  # one client's metrics by name


class RecordError(ValueError):
    """A run file that does not hold the record it should; the message names the file and the fields."""


class Record(BaseModel):
    """Base of every record: ``to_json()`` is the exact JSON object written to disk (optional fields listed in
    ``OMIT_NONE`` are left out while unset, as the writers always did)."""

    model_config = ConfigDict(extra="forbid")
    OMIT_NONE: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: Any) -> Any:
        data = handler(self)
        for key in self.OMIT_NONE:
            if data.get(key) is None:
                data.pop(key, None)
        return data

    def to_json(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """The record in the JSON file ``path`` (``FileNotFoundError`` / :class:`RecordError` naming it)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        return cls.parse(read_json(path), source=str(path))

    def write(self, path: str | Path) -> None:
        """Write the record as indented JSON, atomically."""
        atomic_write_json(path, self.to_json())

    @classmethod
    def parse(cls, data: Any, *, source: str) -> Self:
        """Validate a JSON object into this record; :class:`RecordError` names ``source`` and the bad fields."""
        if not isinstance(data, dict):
            raise RecordError(f"{source}: expected a JSON object, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RecordError(f"{source}: {explain(exc, cls.__doc__ or cls.__name__)}") from None


def explain(exc: ValidationError, what: str) -> str:
    """``"<what> lacks ['a', 'b']"`` for missing fields, ``"field: reason"`` for the others."""
    name = what.strip().split("\n")[0].split(":")[0].rstrip(".")
    missing = [".".join(map(str, e["loc"])) for e in exc.errors() if e["type"] == "missing"]
    other = [f"{'.'.join(map(str, e['loc'])) or '<record>'}: {e['msg']}"
             for e in exc.errors() if e["type"] != "missing"]
    parts = ([f"{name} lacks {missing}"] if missing else []) + other
    return "; ".join(parts)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RecordError(f"{path}: not valid JSON ({exc})") from None


# ---------------------------------------------------------------------------------------------- metrics.jsonl
class RoundRecord(Record):
    """round record: one line of metrics.jsonl per finished round. ``dropped``: sampled clients that did not
    answer, ``dropped_reason`` why (``dropout``, ``deadline: ...``, ``node unavailable: ...``); ``rejected`` /
    ``clipped`` / ``krum_dropped`` / ``dp``: what the update guard did (only when it did); ``skipped``: the round
    was not aggregated (fewer accepted updates than ``engine.min_clients``)."""

    model_config = ConfigDict(extra="allow")
    OMIT_NONE = ("dropped", "dropped_reason", "rejected", "clipped", "krum_dropped", "dp", "skipped")

    type: Literal["round"] = "round"
    round: int
    clients: list[str]
    train_loss: float
    bytes_up: int
    bytes_down: int
    s_round: float
    peak_mem_mb: float
    client_train: dict[str, Metrics]
    dropped: list[str] | None = None
    dropped_reason: dict[str, str] | None = None
    rejected: list[dict[str, Any]] | None = None
    clipped: dict[str, float] | None = None
    krum_dropped: list[str] | None = None
    dp: dict[str, Any] | None = None
    skipped: dict[str, Any] | None = None


class EvalRecord(Record):
    """eval record: one client's metrics after an evaluated round (on disk the metrics sit next to the keys)."""

    type: Literal["eval"] = "eval"
    round: int
    client: str
    heldout: bool = False
    metrics: Metrics

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, data: Any) -> Any:
        if isinstance(data, dict) and "metrics" not in data:
            keys = {"type", "round", "client", "heldout"}
            return {**{k: v for k, v in data.items() if k in keys},
                    "metrics": {k: v for k, v in data.items() if k not in keys}}
        return data

    @model_serializer(mode="plain")
    def _flat(self) -> dict[str, Any]:
        head: dict[str, Any] = {"type": self.type, "round": self.round, "client": self.client}
        if self.heldout:
            head["heldout"] = True
        return {**head, **self.metrics}


class _Stop(Record):
    """Why and where a run ended before its last round: ``round`` could not run, ``rounds_completed`` did."""

    reason: str
    rounds_completed: int
    round: int
    message: str


class BudgetStop(_Stop):
    """stop record: the traffic budget (``engine.max_bytes``) would have been crossed."""

    reason: Literal["max_bytes"] = "max_bytes"
    max_bytes: int
    bytes: int
    bytes_needed: int


class PrivacyStop(_Stop):
    """stop record: the privacy budget (``dp.max_epsilon``) would have been crossed."""

    reason: Literal["max_epsilon"] = "max_epsilon"
    max_epsilon: float
    epsilon: float
    delta: float | None


Stop = Annotated[BudgetStop | PrivacyStop, Field(discriminator="reason")]
_STOP: TypeAdapter[Any] = TypeAdapter(Stop)


class StopRecord(Record):
    """stop record: the metrics.jsonl line of a stop (on disk the stop's fields sit next to ``type``)."""

    type: Literal["stop"] = "stop"
    stop: Stop

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, data: Any) -> Any:
        if isinstance(data, dict) and "stop" not in data:
            return {"type": data.get("type", "stop"), "stop": {k: v for k, v in data.items() if k != "type"}}
        return data

    @model_serializer(mode="plain")
    def _flat(self) -> dict[str, Any]:
        return {"type": self.type, **self.stop.to_json()}


def read_metrics(path: str | Path) -> tuple[list[RoundRecord], list[EvalRecord], list[StopRecord]]:
    """The round, eval and stop records of a metrics.jsonl; a bad line raises naming ``path:line``."""
    path = Path(path)
    kinds: dict[str, type[Record]] = {"round": RoundRecord, "eval": EvalRecord, "stop": StopRecord}
    out: dict[str, list[Any]] = {k: [] for k in kinds}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecordError(f"{path}:{i}: corrupted metrics line ({exc.msg})") from None
        kind = rec.get("type") if isinstance(rec, dict) else None
        if kind not in kinds:
            raise RecordError(f"{path}:{i}: expected an object with type 'round', 'eval' or 'stop'")
        out[kind].append(kinds[kind].parse(rec, source=f"{path}:{i}"))
    return out["round"], out["eval"], out["stop"]


def append_metrics(path: str | Path, records: Sequence[Record]) -> None:
    """Append records to a metrics.jsonl, one sorted-key JSON object per line, in one write (a process killed
    mid-write leaves at most a torn last line, which a resume drops)."""
    text = "".join(json.dumps(r.to_json(), sort_keys=True) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


# ---------------------------------------------------------------------------------------------- results.json
class CommRound(Record):
    model_config = ConfigDict(extra="allow")

    round: int
    bytes_up: int
    bytes_down: int


class Comm(Record):
    """comm block: bytes of the run's ledger, per round and per parameter group."""

    model_config = ConfigDict(extra="allow")

    bytes_up: int
    bytes_down: int
    per_round: list[CommRound]
    by_group: dict[str, dict[str, int]]

    @property
    def total(self) -> int:
        return self.bytes_up + self.bytes_down

    def bytes_per_round(self) -> float | None:
        """Mean bytes (both directions) per recorded round; ``None`` without rounds."""
        if not self.per_round:
            return None
        return sum(r.bytes_up + r.bytes_down for r in self.per_round) / len(self.per_round)


class Results(Record):
    """results: the last evaluation of every client, their mean, the traffic and the wall time of a run."""

    model_config = ConfigDict(extra="allow")
    OMIT_NONE = ("stopped",)

    method: str
    model: str = "?"
    task: str
    rounds: int = 0
    clients: dict[str, Metrics]
    mean: dict[str, float]
    comm: Comm
    wall_s: float
    seed: int | None = None
    stopped: Stop | None = None

    def primary_metric(self) -> str:
        """The task's reported metric: the first of :data:`PRIMARY_METRIC`'s that the mean has."""
        for key in PRIMARY_METRIC.values():
            if key in self.mean:
                return key
        return sorted(self.mean)[0] if self.mean else "accuracy"


# ---------------------------------------------------------------------------------------------- eval.json
class Summary(Record):
    """summary of one metric over clients: mean, worst client and population std."""

    metric: str
    mean: float | None
    worst: float | None
    worst_client: str | None
    std: float | None
    n_clients: int


class View(Record):
    clients: dict[str, Metrics]
    summary: Summary


class Drop(Record):
    """aggregation drop of one client: locally fine-tuned vs aggregated (positive drop = aggregation hurt)."""

    local: float
    aggregated: float
    delta: float
    drop: float
    local_train_loss: float


class AggregationDrop(Record):
    round: int
    clients: dict[str, Drop]
    summary: Summary | None


class DepthCell(Record):
    accuracy: float
    n: float


class DepthView(Record):
    clients: dict[str, dict[str, DepthCell]]
    pooled: dict[str, DepthCell]


class McRow(Record):
    correct: int
    answer_loglik: float
    depth: float | None


class PositionCurve(Record):
    """CE by position bin of one client (``mc``: the per-example answers of a mixed test split)."""

    OMIT_NONE = ("mc",)

    bin_size: int
    bin_start: list[int]
    ce: list[float]
    relative: list[float]
    tokens: int
    n: int
    ce_mean: float
    mc: list[McRow] | None = None


class PooledCurve(Record):
    bin_start: list[int]
    ce: list[float]
    relative: list[float]


class PositionView(Record):
    clients: dict[str, PositionCurve]
    pooled: PooledCurve


class EvalReport(Record):
    """evaluation report: the views, aggregation drop, NIAH by depth and CE by position of a finished run."""

    run_dir: str
    method: str
    model: str
    task: str
    task_kind: str
    rounds: int
    seed: int
    metric: str
    higher_is_better: bool
    titans: bool
    views: dict[str, View]
    aggregation_drop: AggregationDrop
    depth: dict[str, DepthView]
    position: dict[str, PositionView]
    wall_s: float

    def view_mean(self, view: str) -> float | None:
        """The mean of ``view``'s summary (``None`` when the view was not evaluated)."""
        v = self.views.get(view)
        return None if v is None else v.summary.mean
