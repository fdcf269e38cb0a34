"""The one step between "replies received" and "aggregate": screening, robust aggregation, client-level DP.

``RoundLoop._aggregate`` (``engine/simulator.py``, the round loop of every engine: in process and on Flower) runs,
per round::

    if guard.budget_exhausted(n): stop            # [dp] max_epsilon: the next release would pass it (before the round)
    step = guard.prepare(rnd, replies, reference=global_params, like=strategy.reply_like(global_params),
                         m=m, noise_seed=..., received=sent)   # screen -> clip / Krum (or DP clipping) -> the mean
    if step.replies:
        with strategy.averaging(step.mean):
            new_global = strategy.aggregate_train(rnd, step.replies, global_params)
        step.privacy = guard.released(m)          # the accountant composes the round's release
    round record += step.to_record(); console line += step.console()

``m`` is the number of clients sampled for the round (public; DP's denominator). A rejected reply is only in
``step.rejected``: it never reaches the strategy; with every reply rejected the global state stays as it was. The
options must fit the strategy (:func:`composition_errors`, checked when the config loads).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fednl.engine.dp import INFO_KEY, ClientDP, DPConfig
from fednl.engine.robust import RobustConfig, apply_robust, robust_mean
from fednl.engine.screening import Rejection, ScreenConfig, screen_replies, spec_of
from fednl.strategies.base import ClientReply, MeanFn, Params, Strategy


def composition_errors(strategy_cls: type[Strategy], *, screen: ScreenConfig | None, robust: RobustConfig | None,
                       dp: DPConfig | None) -> list[tuple[str, str]]:
    """``(key, message)`` for every option that does not fit ``strategy_cls`` or the other options."""
    name = strategy_cls.name
    errors: list[tuple[str, str]] = []
    if robust is not None:
        if robust.replaces_mean and not strategy_cls.robust_means:
            errors.append(("robust.rule", f"method {name!r} does not aggregate through one mean of the replies, so "
                                          f"rule {robust.rule!r} cannot replace it (Krum or clip_norm can; see "
                                          "docs/ROBUSTNESS.md)"))
        if robust.selects and not strategy_cls.robust_select:
            errors.append(("robust", f"method {name!r} needs every sampled client's reply as sent (Krum and "
                                     "clip_norm change them; see docs/ROBUSTNESS.md)"))
    if dp is not None:
        if not strategy_cls.private_mean:
            errors.append(("dp", f"method {name!r} releases more than one mean of the clients' updates per round "
                                 "(or nothing at all), which client-level DP does not cover (see docs/ROBUSTNESS.md)"))
        if robust is not None:
            errors.append(("robust", "[dp] clips every update to dp.clip_norm and adds noise to their mean; the "
                                     "accountant does not cover a median, trimmed mean, Krum selection or a second "
                                     "clip (drop [robust] or [dp])"))
        if screen is not None and screen.norm_k is not None:
            errors.append(("screen.norm_k", "the norm check rejects a client by comparing it with the others, "
                                            "which the DP accountant does not cover; [dp] bounds every update by "
                                            "clipping instead (drop screen.norm_k)"))
    return errors


@dataclass
class GuardStep:
    """One round's outcome: the replies the strategy aggregates, the mean it aggregates with, and what was left
    out or changed on the way."""

    replies: list[ClientReply]
    mean: MeanFn | None
    rejected: list[Rejection] = field(default_factory=list)
    clipped: dict[str, float] = field(default_factory=dict)  # cid -> update norm before clipping
    krum_dropped: list[str] = field(default_factory=list)
    median_norm: float | None = None
    privacy: dict[str, Any] | None = None  # ClientDP.spent() after the round's release (DP runs)
    skipped: dict[str, Any] | None = None  # the round was not aggregated (engine.min_clients): why, with numbers

    def to_record(self) -> dict[str, Any]:
        """The round record's fields for ``metrics.jsonl``: only what happened (a plain round adds nothing)."""
        out: dict[str, Any] = {}
        if self.rejected:
            out["rejected"] = [r.to_record() for r in self.rejected]
        if self.clipped:
            out["clipped"] = dict(self.clipped)
        if self.krum_dropped:
            out["krum_dropped"] = list(self.krum_dropped)
        if self.privacy is not None:
            out["dp"] = dict(self.privacy)
        if self.skipped is not None:
            out["skipped"] = dict(self.skipped)
        return out

    def summary(self) -> str:
        """Short console text (empty when nothing was rejected, clipped or dropped)."""
        parts = [f"rejected {r.cid} ({r.check}: {r.message})" for r in self.rejected]
        if self.krum_dropped:
            parts.append(f"krum left out {', '.join(self.krum_dropped)}")
        if self.clipped:
            parts.append(f"clipped {len(self.clipped)}")
        return "; ".join(parts)

    def console(self) -> str:
        """What the round's console line gets appended (`` | ε 1.23 | rejected c3 (nonfinite: ...)``)."""
        parts = []
        if self.skipped is not None:
            parts.append(f"skipped: {self.skipped['message']}")
        if self.privacy is not None:
            parts.append(f"ε {self.privacy['epsilon']:.3g} (δ {self.privacy['delta']:g})")
        if self.summary():
            parts.append(self.summary())
        return "".join(f" | {p}" for p in parts)


class UpdateGuard:
    """Screening, robust aggregation and client-level DP of one run (``n_clients`` in the federation)."""

    def __init__(self, *, screen: ScreenConfig | None = None, robust: RobustConfig | None = None,
                 dp: DPConfig | None = None, n_clients: int):
        self.screen, self.robust = screen, robust
        self.dp = ClientDP(dp, n_clients) if dp is not None else None

    def budget_exhausted(self, m: int) -> bool:
        """Whether the round's release (``m`` sampled clients) would take ε past ``dp.max_epsilon``."""
        return self.dp is not None and self.dp.would_exceed(m)

    def prepare(self, rnd: int, replies: list[ClientReply], *, reference: Params, like: Params, m: int,
                noise_seed: int, received: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> GuardStep:
        """Screen ``replies`` against ``like`` (the strategy's :meth:`~Strategy.reply_like`), then apply the robust
        reply steps or DP's clipping, and build the round's mean (``None``: the strategy's own)."""
        del rnd
        screened = screen_replies(replies, spec_of(like), reference, self.screen, received=received)
        step = GuardStep(screened.accepted, None, screened.rejected, median_norm=screened.median_norm)
        if self.dp is not None:  # clipped and averaged against the global parameters (what every client is sent)
            step.replies, step.clipped = self.dp.clip(step.replies, reference)
            step.mean = self.dp.mean(reference, m, torch.Generator().manual_seed(int(noise_seed)))
            return step
        outcome = apply_robust(step.replies, reference, self.robust, received=received)
        step.replies, step.clipped, step.krum_dropped = outcome.replies, outcome.clipped, outcome.dropped
        step.mean = robust_mean(self.robust)
        return step

    def released(self, m: int) -> dict[str, Any] | None:
        """Compose the round's DP release; returns :meth:`spent` (``None`` without DP)."""
        if self.dp is None:
            return None
        self.dp.record(m)
        return self.dp.spent()

    def spent(self) -> dict[str, Any] | None:
        return None if self.dp is None else self.dp.spent()

    # ------------------------------------------------------------------ checkpoint
    def state(self) -> dict[str, Any]:
        """JSON-able state for the run's ``engine_info`` (the DP accountant)."""
        return {} if self.dp is None else {INFO_KEY: self.dp.state()}

    def load_state(self, info: Mapping[str, Any]) -> None:
        if self.dp is not None:
            self.dp.load_state(info.get(INFO_KEY))
