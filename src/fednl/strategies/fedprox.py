"""FedProx (Li et al., MLSys 2020): FedAvg plus a proximal term in every client's local objective.

Local objective of client k in round r (θ^r the received global shared parameters)::

    h_k(θ) = F_k(θ) + (μ / 2) · ||θ − θ^r||²

summed over the *trained shared* parameters (the ones the server sent and will average). The server side is
plain FedAvg (``N_k``-weighted mean), so ``μ = 0`` is exactly FedAvg. The received global copy is kept in
``ctx.scratch`` for the round (never persisted, never sent).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from fednl.strategies import register
from fednl.strategies.base import ClientContext, Params, Payload, Strategy, StrategyError

ANCHOR_KEY = "fedprox/anchor"


def proximal_term(params: dict[str, torch.Tensor], anchor: Params) -> torch.Tensor:
    """``Σ_n ||params[n] − anchor[n]||²`` over the names of ``anchor`` (differentiable in ``params``)."""
    if not anchor:
        raise StrategyError("proximal term over an empty set of parameters")
    total: torch.Tensor | None = None
    for n, a in anchor.items():
        if n not in params:
            raise StrategyError(f"proximal anchor names {n!r}, which is not a live parameter")
        sq = (params[n] - a.to(params[n].dtype)).pow(2).sum()
        total = sq if total is None else total + sq
    assert total is not None
    return total


@register
class FedProx(Strategy):
    """FedAvg with ``μ/2 ||θ − θ_global||²`` added to the local loss (``mu`` = μ; default 0.01)."""

    name: ClassVar[str] = "fedprox"
    model_kind: ClassVar[str] = "lora"

    class Options(Strategy.Options):
        mu: float = Field(0.01, ge=0.0)  # FedProx's grid is {0.001, 0.01, 0.1, 1}

    def client_receive(self, ctx: ClientContext, payload: Payload) -> None:
        super().client_receive(ctx, payload)
        trained = self.trainable_names()
        ctx.scratch[ANCHOR_KEY] = {
            n: t.detach().to(ctx.params[n].dtype).clone() for n, t in payload.tensors.items() if n in trained
        }

    def client_loss(self, ctx: ClientContext, task_loss: torch.Tensor) -> torch.Tensor:
        mu = float(self.options.mu)
        if mu == 0.0:
            return task_loss
        anchor = ctx.scratch.get(ANCHOR_KEY)
        if anchor is None:
            raise StrategyError(f"client {ctx.cid}: FedProx loss before client_receive stored the global copy")
        if not anchor:
            return task_loss
        return task_loss + 0.5 * mu * proximal_term(ctx.params, anchor).to(task_loss.dtype)
