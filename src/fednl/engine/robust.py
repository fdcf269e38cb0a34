"""Robust aggregation: one ``[robust]`` option over any strategy's mean.

=================  ==============================================================================================
``clip_norm = C``  norm clipping: every accepted update ``Δ = reply − reference`` is scaled to ``||Δ||₂ ≤ C``
                   (``reply ← reference + Δ · min(1, C / ||Δ||)``) before the strategy sees it
``rule = "krum"``  (multi-)Krum selection (Blanchard et al. 2017): each reply's score is the sum of squared
                   distances to its ``n − f − 2`` nearest replies (``f = num_malicious``); the ``select`` lowest
                   scores are kept (``select = 1``: Krum) and the strategy aggregates them its usual way
``rule = "median"``  the strategy's mean becomes the coordinate-wise median of the replies
``rule = "trimmed_mean"``  the strategy's mean becomes the coordinate-wise mean after cutting ``int(trim · n)``
                   values at each end
=================  ==============================================================================================

``clip_norm`` combines with any rule. Clipping and Krum act on the list of replies, so they compose with every
strategy whose ``Strategy.robust_select`` holds; median and trimmed mean replace :meth:`Strategy.mean`, the one
average every aggregation goes through, for strategies whose ``Strategy.robust_means`` holds (see
``docs/ROBUSTNESS.md`` for the table). Median and trimmed mean ignore ``num_examples`` (an attacker could inflate
it), as Flower's ``FedMedian`` and ``FedTrimmedAvg`` do; Krum's survivors keep their weights in the strategy's
own aggregation, as in Flower's ``MultiKrum``.

The computations are Flower's: ``flwr.server.strategy.aggregate.aggregate_median``,
``flwr.serverapp.strategy.fedtrimmedavg.trim_mean`` and ``flwr.serverapp.strategy.multikrum.select_multikrum``,
called on float64 NumPy copies of the tensors (the results are cast back to each tensor's dtype). Flower is
imported when one of them runs (the ``flower`` extra).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fednl.strategies.base import ClientReply, MeanFn, Params, Payload, StrategyError

RULES = ("mean", "median", "trimmed_mean", "krum")


class RobustConfig(BaseModel):
    """``[robust]``: a rule (``mean`` = the strategy's own mean) and optional norm clipping."""

    model_config = ConfigDict(extra="forbid")

    rule: Literal["mean", "median", "trimmed_mean", "krum"] = "mean"
    trim: float | None = Field(None, ge=0, lt=0.5)  # trimmed_mean: fraction cut at each end (default 0.2)
    num_malicious: int | None = Field(None, ge=0)  # krum: f, the Byzantine clients tolerated (default 1)
    select: int | None = Field(None, ge=1)  # krum: replies kept (1 = Krum, > 1 = Multi-Krum; default 1)
    clip_norm: float | None = Field(None, gt=0)  # scale every update to an L2 norm <= clip_norm

    @model_validator(mode="after")
    def _consistent(self) -> RobustConfig:
        if self.clip_norm is not None and not math.isfinite(self.clip_norm):
            raise ValueError("clip_norm must be a finite number > 0")
        if self.rule == "mean" and self.clip_norm is None:
            raise ValueError("rule 'mean' without clip_norm changes nothing: set rule = 'median', 'trimmed_mean' "
                             "or 'krum', or clip_norm (or drop [robust])")
        defaults = {"trim": ("trimmed_mean", 0.2), "num_malicious": ("krum", 1), "select": ("krum", 1)}
        for key, (rule, default) in defaults.items():
            if self.rule == rule:
                if getattr(self, key) is None:
                    setattr(self, key, default)
            elif getattr(self, key) is not None:
                raise ValueError(f"{key} applies to rule = {rule!r}, not {self.rule!r}")
        return self

    @property
    def replaces_mean(self) -> bool:
        return self.rule in ("median", "trimmed_mean")

    @property
    def selects(self) -> bool:
        return self.rule == "krum" or self.clip_norm is not None


@dataclass
class RobustOutcome:
    """What the reply-level steps did: the replies to aggregate, the clipped clients (norm before clipping)
    and the clients Krum left out."""

    replies: list[ClientReply]
    clipped: dict[str, float] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)

    def to_record(self) -> dict[str, Any]:
        return {"clipped": dict(self.clipped), "krum_dropped": list(self.dropped)}


# ---------------------------------------------------------------------------------------------- flower
def _flower(what: str) -> Any:
    try:
        import flwr.server.strategy.aggregate as legacy_aggregate
        import flwr.serverapp.strategy.fedtrimmedavg as trimmed
        import flwr.serverapp.strategy.multikrum as multikrum
        from flwr.app import Array, ArrayRecord, RecordDict
    except ImportError as exc:  # pragma: no cover - the flower extra is part of every locked install
        raise StrategyError(f"robust aggregation ({what}) uses Flower's implementation; install the flower "
                            f"extra (pip install 'fednl[flower]'): {exc}") from None
    return {"median": legacy_aggregate.aggregate_median, "trim_mean": trimmed.trim_mean,
            "select_multikrum": multikrum.select_multikrum, "Array": Array, "ArrayRecord": ArrayRecord,
            "RecordDict": RecordDict}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _back(arr: Any, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(arr, dtype=np.float64)).reshape(like.shape).to(like.dtype)


# ---------------------------------------------------------------------------------------------- means
def coordinate_median(tensor_sets: list[Params], weights: list[float] | None = None) -> Params:
    """Coordinate-wise median of every tensor (weights ignored), via Flower's ``aggregate_median``."""
    del weights
    if not tensor_sets:
        raise StrategyError("no client tensors to take the median of")
    names = list(tensor_sets[0])
    median = _flower("median")["median"]
    layers = median([([_np(ts[n]) for n in names], 1) for ts in tensor_sets])
    return {n: _back(arr, tensor_sets[0][n]) for n, arr in zip(names, layers)}


def trimmed_mean(tensor_sets: list[Params], trim: float, weights: list[float] | None = None) -> Params:
    """Coordinate-wise mean after cutting ``int(trim · n)`` values at each end (weights ignored), via Flower's
    ``trim_mean``."""
    del weights
    if not tensor_sets:
        raise StrategyError("no client tensors to take the trimmed mean of")
    trim_mean = _flower("trimmed mean")["trim_mean"]
    return {n: _back(trim_mean(np.stack([_np(ts[n]) for ts in tensor_sets]), float(trim)), tensor_sets[0][n])
            for n in tensor_sets[0]}


def robust_mean(cfg: RobustConfig | None) -> MeanFn | None:
    """The mean that replaces :meth:`Strategy.mean` under ``cfg`` (``None``: the strategy's own)."""
    if cfg is None or not cfg.replaces_mean:
        return None
    if cfg.rule == "median":
        return lambda tensor_sets, weights: coordinate_median(tensor_sets, weights)
    trim = float(cfg.trim or 0.0)
    return lambda tensor_sets, weights: trimmed_mean(tensor_sets, trim, weights)


# ---------------------------------------------------------------------------------------------- replies
def _ref(cid: str, reference: Params, received: Mapping[str, Mapping[str, torch.Tensor]] | None
         ) -> Mapping[str, torch.Tensor]:
    if received is not None and cid in received:
        return {**reference, **received[cid]}
    return reference


def clip_update(reply: ClientReply, reference: Mapping[str, torch.Tensor], max_norm: float
                ) -> tuple[ClientReply, float]:
    """``reply`` with its update scaled to L2 norm ``<= max_norm`` over the names it shares with ``reference``,
    and the norm before clipping. An update already within the bound is returned unchanged (the same object)."""
    names = sorted(set(reply.payload.tensors) & set(reference))
    deltas = {n: reply.payload.tensors[n].detach().to("cpu", torch.float64)
              - reference[n].detach().to("cpu", torch.float64) for n in names}
    norm = math.sqrt(sum(float(torch.sum(d * d)) for d in deltas.values()))
    if norm <= max_norm:
        return reply, norm
    scale = max_norm / norm
    tensors = dict(reply.payload.tensors)
    for n, d in deltas.items():
        ref = reference[n].detach().to("cpu", torch.float64)
        tensors[n] = (ref + d * scale).to(reply.payload.tensors[n].dtype)
    clipped = ClientReply(reply.cid, Payload(tensors, dict(reply.payload.meta)), reply.num_examples,
                          dict(reply.metrics))
    return clipped, norm


def clip_replies(replies: list[ClientReply], reference: Params, max_norm: float, *,
                 received: Mapping[str, Mapping[str, torch.Tensor]] | None = None
                 ) -> tuple[list[ClientReply], dict[str, float]]:
    """Every reply's update clipped to ``max_norm``; returns the replies and ``{cid: norm before}`` of those that
    were scaled down."""
    out, clipped = [], {}
    for r in replies:
        c, norm = clip_update(r, _ref(r.cid, reference, received), max_norm)
        out.append(c)
        if c is not r:
            clipped[r.cid] = norm
    return out, clipped


def krum_select(replies: list[ClientReply], reference: Params, num_malicious: int, select: int, *,
                received: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> list[ClientReply]:
    """The ``select`` replies with the lowest Krum scores (input order kept), via Flower's ``select_multikrum``
    on the updates. With ``select >= len(replies)`` every reply is kept."""
    if select >= len(replies):
        return list(replies)
    fl = _flower("krum")
    contents = []
    for r in replies:
        ref = _ref(r.cid, reference, received)
        names = sorted(set(r.payload.tensors) & set(ref))
        arrays = {n: fl["Array"](_np(r.payload.tensors[n]) - _np(ref[n])) for n in names}
        contents.append(fl["RecordDict"]({"update": fl["ArrayRecord"](array_dict=arrays)}))
    chosen = fl["select_multikrum"](contents, num_malicious_nodes=int(num_malicious), num_nodes_to_select=int(select))
    keep = {id(c) for c in chosen}
    return [r for r, c in zip(replies, contents) if id(c) in keep]


def apply_robust(replies: list[ClientReply], reference: Params, cfg: RobustConfig | None, *,
                 received: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> RobustOutcome:
    """The reply-level steps of ``cfg``: clip every update (``clip_norm``), then Krum's selection."""
    if cfg is None:
        return RobustOutcome(list(replies))
    out, clipped = list(replies), {}
    if cfg.clip_norm is not None:
        out, clipped = clip_replies(out, reference, float(cfg.clip_norm), received=received)
    dropped: list[str] = []
    if cfg.rule == "krum" and out:
        kept = krum_select(out, reference, int(cfg.num_malicious or 0), int(cfg.select or 1), received=received)
        ids = {id(r) for r in kept}
        dropped = [r.cid for r in out if id(r) not in ids]
        out = kept
    return RobustOutcome(out, clipped, dropped)
