"""MT-DAO (Iacob et al., ICLR 2026, "Multi-Timescale Distributed Adaptive Optimizers with Local Updates"):
several first momenta with different timescales, combined quasi-hyperbolically, at the outer (round) level.

The paper's family keeps, next to the gradient, ``J`` first momenta of different decay rates — fast ones that
follow the latest updates and slow ones (β close to 1) that remember the trajectory across infrequent
synchronisations — and steps on a quasi-hyperbolic combination of them (the paper's method section; its
SGD-momentum variant is the one with convergence guarantees). Here that optimiser is applied DiLoCo-style to the
round's pseudo-gradient ``g = x − a`` (``x`` the global parameters the round started from, ``a`` the clients'
``N_k``-weighted mean)::

    u_j ← β_j u_j + (1 − β_j) g                      j = 1 .. J      (EMA momenta, u_j = 0 before round 1)
    d   = (1 − Σ_j ω_j) g + Σ_j ω_j u_j                             (quasi-hyperbolic combination)
    x   ← x − lr · d                                  (computed as a + (g − lr·d): exactly a when lr·d == g)

What we did not implement: the paper runs the momenta inside the workers' *local* (adaptive) optimiser and
synchronises parameters and each momentum at their own frequencies; this strategy keeps the clients' optimiser as
configured (``[train]``) and the momenta on the server, so nothing extra crosses the wire. No public code
exists to check against, and this docstring cites no equation numbers: the update above is what is implemented. With one timescale and ``ω = 1`` the update is EMA momentum,
``server_opt = {name = "fedavgm", momentum = β, dampening = β}`` on FedAvg — the same arithmetic, tested bit for
bit through the simulator. Defaults (ours, at round granularity): ``betas = [0.5, 0.9]``, ``weights = [0.4,
0.4]``, ``lr = 1``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator

from fednl.strategies.server_opt import momentum, outer_update, pseudo_gradients
from fednl.strategies import register
from fednl.strategies.base import ClientReply, Params, Strategy, StrategyError


@register
class MTDAO(Strategy):
    """FedAvg clients; the server steps with J EMA momenta of different timescales, quasi-hyperbolically mixed."""

    name: ClassVar[str] = "mtdao"
    model_kind: ClassVar[str] = "lora"
    accepts_server_opt: ClassVar[bool] = False  # it is a server optimiser itself

    class Options(Strategy.Options):
        lr: float = Field(1.0, gt=0)
        betas: list[float] = Field(default_factory=lambda: [0.5, 0.9], min_length=1)
        weights: list[float] = Field(default_factory=lambda: [0.4, 0.4], min_length=1)

        @model_validator(mode="after")
        def _timescales(self) -> MTDAO.Options:
            if len(self.betas) != len(self.weights):
                raise ValueError(f"weights: one per timescale ({len(self.betas)} betas), got {len(self.weights)}")
            if any(not 0 <= b < 1 for b in self.betas):
                raise ValueError(f"betas: each must be in [0, 1), got {self.betas}")
            if any(w < 0 for w in self.weights) or sum(self.weights) > 1 + 1e-12:
                raise ValueError(f"weights: each >= 0 and their sum <= 1 (the rest weighs the pseudo-gradient), "
                                 f"got {self.weights}")
            return self

    def __init__(self, options: Any = None, *, groups: Any):
        super().__init__(options, groups=groups)
        self._u: Params = {}
        self._steps = 0

    def aggregate_train(self, rnd: int, replies: list[ClientReply], global_params: Params) -> Params:
        aggregate = super().aggregate_train(rnd, replies, global_params)
        betas, weights = list(self.options.betas), list(self.options.weights)
        rest = 1.0 - sum(weights)
        out = {}
        for n, g in pseudo_gradients(global_params, aggregate).items():
            d: torch.Tensor | None = g.mul(rest) if rest != 0 else None
            for j, (beta, w) in enumerate(zip(betas, weights)):
                term = momentum(self._u, f"u{j}|{n}", g, beta, beta).mul(w)
                d = term if d is None else d.add(term)
            assert d is not None
            out[n] = outer_update(aggregate[n], g, d.mul(float(self.options.lr)))
        self._steps += 1
        return out

    def server_state(self) -> tuple[Params, dict[str, Any]]:
        return dict(self._u), {"steps": self._steps, "timescales": len(self.options.betas)}

    def load_server_state(self, tensors: Params, info: dict[str, Any]) -> None:
        if tensors and int(info.get("timescales", -1)) != len(self.options.betas):
            raise StrategyError(f"MT-DAO checkpoint has {info.get('timescales')} timescales, the config "
                                f"{len(self.options.betas)}")
        self._u = dict(tensors)
        self._steps = int(info.get("steps", 0))
