"""Update screening: the checks every client reply passes before any strategy aggregates it.

A reply is *rejected* — left out of the round, never touching the global state — when

=================  ==============================================================================================
``num_examples``   its example count is not a positive integer (the weight of a weighted mean)
``names``          its tensor names differ from the expected set (a missing or an unknown tensor)
``shape``          a tensor's shape differs from the expected one
``dtype``          a tensor's dtype differs from the expected one
``nonfinite``      a tensor holds NaN or ±Inf
``norm``           (``[screen] norm_k`` set) the L2 norm of its update ``Δ = reply − reference`` is above
                   ``norm_k ×`` the median update norm of the round's replies that passed the checks above
=================  ==============================================================================================

The first five are always on: a malformed or non-finite update is dropped and the round goes on with the rest.
The norm check is off by default (``[screen] norm_k = 10`` turns it on).

Before these, :func:`check_fresh` refuses replies that do not answer one of the round's jobs (always on):

=================  ==============================================================================================
``stale``          the reply answers another round (its ``round`` is not the round in progress)
``replay``         its nonce is not its job's, it is a second reply to one job, or no job of the round was sent to
                   that client
=================  ==============================================================================================

* The update norm is taken over the names the reply shares with its reference (the parameters the client was
  sent); extra reply tensors a strategy defines (SCAFFOLD's control-variate deltas) are checked for name, shape,
  dtype and finiteness only.
* The median is :func:`statistics.median` (the mean of the two middle values for an even count). With one reply
  the ratio is 1; with two, the median is their mean, so one outlier among two is never more than 2× the median —
  the norm check needs three or more replies to single one out. A median of 0 (most replies did not move) rejects
  nothing.
* A :class:`Rejection` carries the client, the check and the numbers (``to_record`` gives the JSON for
  ``metrics.jsonl``; ``message`` the console text).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fednl.engine.executor import TrainReply
from fednl.strategies.base import ClientReply, Params

CHECKS = ("stale", "replay", "num_examples", "names", "shape", "dtype", "nonfinite", "norm")


class ScreenConfig(BaseModel):
    """``[screen]``: the optional norm check (the structural checks are always on)."""

    model_config = ConfigDict(extra="forbid")

    norm_k: float | None = Field(None, gt=1)  # reject an update whose L2 norm is > norm_k × the round's median

    @model_validator(mode="after")
    def _finite(self) -> ScreenConfig:
        if self.norm_k is not None and not math.isfinite(self.norm_k):
            raise ValueError("norm_k must be a finite number > 1")
        return self


@dataclass(frozen=True)
class TensorSpec:
    """The shape and dtype a reply tensor must have."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def spec_of(params: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """The expected reply of a strategy that sends back exactly ``params``' names, shapes and dtypes."""
    return {n: TensorSpec(tuple(t.shape), t.dtype) for n, t in params.items()}


@dataclass
class Rejection:
    """One rejected reply: the client, the failed check (one of :data:`CHECKS`), a message and the numbers."""

    cid: str
    check: str
    message: str
    numbers: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        return {"client": self.cid, "check": self.check, "message": self.message, **self.numbers}


@dataclass
class ScreenResult:
    """Accepted replies (input order kept), rejections, and the update norms the norm check looked at."""

    accepted: list[ClientReply]
    rejected: list[Rejection]
    norms: dict[str, float] = field(default_factory=dict)  # cid -> ||Δ|| of every structurally valid reply
    median_norm: float | None = None


def check_fresh(rnd: int, nonces: Mapping[str, str], replies: Sequence[TrainReply]
                ) -> tuple[dict[str, TrainReply], list[tuple[TrainReply, Rejection]]]:
    """Split ``replies`` into the one fresh answer per job of round ``rnd`` (``nonces``: client -> its job's
    nonce) and the refused ones, each with its :class:`Rejection` (``stale`` or ``replay``), in arrival order."""
    fresh: dict[str, TrainReply] = {}
    refused: list[tuple[TrainReply, Rejection]] = []
    for r in replies:
        if r.cid not in nonces:
            refused.append((r, Rejection(r.cid, "replay", f"round {rnd} sent no job to client {r.cid!r}",
                                         {"round": r.round})))
        elif r.round != rnd:
            refused.append((r, Rejection(r.cid, "stale", f"the reply answers round {r.round}, not round {rnd}",
                                         {"round": r.round, "expected": rnd})))
        elif r.nonce != nonces[r.cid]:
            refused.append((r, Rejection(r.cid, "replay", "the reply's nonce is not its job's",
                                         {"nonce": str(r.nonce)[:32]})))
        elif r.cid in fresh:
            refused.append((r, Rejection(r.cid, "replay", f"a second reply to the round-{rnd} job of {r.cid!r}",
                                         {"round": r.round})))
        else:
            fresh[r.cid] = r
    return fresh, refused


def update_norm(tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """``||tensors − reference||₂`` over the names both hold, accumulated in float64."""
    total = 0.0
    for n in sorted(set(tensors) & set(reference)):
        d = tensors[n].detach().to("cpu", torch.float64) - reference[n].detach().to("cpu", torch.float64)
        total += float(torch.sum(d * d))
    return math.sqrt(total)


def structural_check(reply: ClientReply, expected: Mapping[str, TensorSpec]) -> Rejection | None:
    """The first failed always-on check of ``reply`` (``num_examples``, ``names``, ``shape``, ``dtype``,
    ``nonfinite``), or ``None``."""
    cid, n_ex = reply.cid, reply.num_examples
    if isinstance(n_ex, bool) or not isinstance(n_ex, int) or n_ex <= 0:
        return Rejection(cid, "num_examples", f"num_examples must be a positive integer, got {n_ex!r}",
                         {"num_examples": n_ex if isinstance(n_ex, (int, float)) else str(n_ex)})
    got = set(reply.payload.tensors)
    if got != set(expected):
        extra, lack = sorted(got - set(expected)), sorted(set(expected) - got)
        return Rejection(cid, "names", f"unexpected tensors {extra[:3]} / missing {lack[:3]}",
                         {"unexpected": extra[:10], "missing": lack[:10], "n_unexpected": len(extra),
                          "n_missing": len(lack)})
    for n in sorted(expected):
        t, spec = reply.payload.tensors[n], expected[n]
        if tuple(t.shape) != spec.shape:
            return Rejection(cid, "shape", f"{n} has shape {tuple(t.shape)}, expected {spec.shape}",
                             {"tensor": n, "shape": list(t.shape), "expected": list(spec.shape)})
        if t.dtype != spec.dtype:
            return Rejection(cid, "dtype", f"{n} has dtype {t.dtype}, expected {spec.dtype}",
                             {"tensor": n, "dtype": str(t.dtype).removeprefix("torch."),
                              "expected": str(spec.dtype).removeprefix("torch.")})
    for n in sorted(expected):
        t = reply.payload.tensors[n]
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                return Rejection(cid, "nonfinite", f"{n} holds {bad} NaN/Inf value(s) of {t.numel()}",
                                 {"tensor": n, "nonfinite": bad, "numel": int(t.numel())})
    return None


def screen_replies(replies: list[ClientReply], expected: Mapping[str, TensorSpec], reference: Params,
                   cfg: ScreenConfig | None = None, *,
                   received: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> ScreenResult:
    """Screen ``replies`` against the ``expected`` tensor specs and, with ``cfg.norm_k``, the norm check.

    ``reference`` is the round's global parameters; ``received[cid]`` (when given) is what client ``cid`` was
    sent, used instead of ``reference`` for its update (personalising strategies send different values)."""
    structural: list[ClientReply] = []
    rejected: list[Rejection] = []
    for r in replies:
        bad = structural_check(r, expected)
        if bad is None:
            structural.append(r)
        else:
            rejected.append(bad)
    norms = {r.cid: update_norm(r.payload.tensors, _ref(r.cid, reference, received)) for r in structural}
    median = statistics.median(norms.values()) if norms else None
    k = cfg.norm_k if cfg is not None else None
    if k is None or median is None or median <= 0:
        return ScreenResult(structural, rejected, norms, median)
    accepted = []
    for r in structural:
        norm = norms[r.cid]
        if norm > k * median:
            rejected.append(Rejection(r.cid, "norm", f"update norm {norm:.4g} > {k:g} × median {median:.4g}",
                                      {"norm": norm, "median": median, "k": k, "ratio": norm / median}))
        else:
            accepted.append(r)
    return ScreenResult(accepted, rejected, norms, median)


def _ref(cid: str, reference: Params, received: Mapping[str, Mapping[str, torch.Tensor]] | None
         ) -> Mapping[str, torch.Tensor]:
    if received is not None and cid in received:
        return {**reference, **received[cid]}
    return reference
