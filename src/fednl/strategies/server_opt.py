"""Server (outer) optimisers: the round's aggregate becomes a pseudo-gradient and an optimiser takes the step.

For any strategy whose ``aggregate_train`` returns new global parameters ``a`` (``Strategy.accepts_server_opt``),
the engine replaces them with ``x − step(g)``, where ``x`` are the global parameters the round started from and
``g = x − a`` is the pseudo-gradient (DiLoCo's outer gradient; Reddi et al.'s ``Δ_t`` is ``−g``). The new value is
computed as ``a + (g − step)``, which is ``x − step`` and is exactly ``a`` whenever ``step == g`` (lr 1, no
momentum), so those settings reproduce the plain aggregate bit for bit.

=============== ==========================================================================================
``fedavgm``     Hsu et al. 2019: ``v ← μ v + (1 − d) g``, step ``lr · v`` (``d`` = dampening, torch's SGD
                name; ``v`` starts at zero, so round 1 gives ``(1 − d) g``)
``diloco``      Douillard et al. 2023, outer SGD with Nesterov momentum (torch semantics):
                ``v ← μ v + g``, step ``lr · (g + μ v)``; DiLoCo's values lr 0.7, μ 0.9
``fedadam``     Reddi et al. 2021, Algorithm 2: ``m ← β1 m + (1 − β1) g``, ``v ← β2 v + (1 − β2) g²``
``fedyogi``     ``v ← v − (1 − β2) g² sign(v − g²)``
``fedadagrad``  ``v ← v + g²``
=============== ==========================================================================================

The adaptive three step ``lr · m / (√v + τ)`` with ``m₀ = 0``, ``v₀ = τ²`` (Algorithm 2's ``v₋₁ ≥ τ²``) and no bias
correction, as in the paper. (Flower's FedAdam scales its step by Adam's bias correction and starts ``v`` at zero;
its FedYogi and FedAdagrad follow the paper as here.) The state lives in the run's server state
(``RunState.engine_tensors`` under ``opt|<slot>|<name>``, the step count in ``engine_info``), so a resumed run
continues bit-identically.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fednl.strategies.base import Params, StrategyError

PREFIX = "opt|"
INFO_KEY = "server_opt"


class _OptConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FedAvgMConfig(_OptConfig):
    name: Literal["fedavgm"]
    lr: float = Field(1.0, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    dampening: float = Field(0.0, ge=0, lt=1)


class DiLoCoConfig(_OptConfig):
    name: Literal["diloco"]
    lr: float = Field(0.7, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)


class _AdamFamilyConfig(_OptConfig):
    name: str
    lr: float = Field(0.1, gt=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)


class FedAdamConfig(_AdamFamilyConfig):
    name: Literal["fedadam"]


class FedYogiConfig(_AdamFamilyConfig):
    name: Literal["fedyogi"]
    lr: float = Field(0.01, gt=0)


class FedAdagradConfig(_OptConfig):
    name: Literal["fedadagrad"]
    lr: float = Field(0.1, gt=0)
    beta1: float = Field(0.0, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)


ServerOptConfig = Annotated[
    FedAvgMConfig | DiLoCoConfig | FedAdamConfig | FedYogiConfig | FedAdagradConfig,
    Field(discriminator="name"),
]
SERVER_OPT_NAMES = ("fedavgm", "diloco", "fedadam", "fedyogi", "fedadagrad")


# ---------------------------------------------------------------------------------------------- shared maths
def momentum(tensors: Params, key: str, g: torch.Tensor, beta: float, dampening: float) -> torch.Tensor:
    """``v ← β v + (1 − d) g`` with ``v`` starting at zero; stored under ``key`` and returned."""
    prev = tensors.get(key)
    buf = torch.zeros_like(g) if prev is None else prev
    new = buf.mul(beta).add(g, alpha=1.0 - dampening)
    tensors[key] = new
    return new


def outer_update(aggregate: torch.Tensor, g: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``x − step`` written as ``a + (g − step)``: exactly ``a`` when ``step == g``."""
    return aggregate + (g - step)


def pseudo_gradients(global_params: Params, aggregate: Params) -> Params:
    """``g = x − a`` per name (the aggregate must name exactly the global parameters)."""
    if set(aggregate) != set(global_params):
        extra, lack = sorted(set(aggregate) - set(global_params))[:3], sorted(set(global_params) - set(aggregate))[:3]
        raise StrategyError(f"server_opt: the aggregate names {extra} not in the global parameters / lacks {lack}")
    return {n: global_params[n].to(aggregate[n].dtype) - aggregate[n] for n in aggregate}


def _slot(tensors: Params, slot: str, name: str, init: torch.Tensor) -> torch.Tensor:
    return tensors.get(f"{PREFIX}{slot}|{name}", init)


def _step(cfg: Any, name: str, g: torch.Tensor, tensors: Params) -> torch.Tensor:
    if isinstance(cfg, FedAvgMConfig):
        return momentum(tensors, f"{PREFIX}v|{name}", g, cfg.momentum, cfg.dampening).mul(cfg.lr)
    if isinstance(cfg, DiLoCoConfig):
        v = momentum(tensors, f"{PREFIX}v|{name}", g, cfg.momentum, 0.0)
        return g.add(v, alpha=cfg.momentum).mul(cfg.lr)
    m = momentum(tensors, f"{PREFIX}m|{name}", g, cfg.beta1, cfg.beta1)
    v = _slot(tensors, "v", name, torch.full_like(g, cfg.tau**2))
    g2 = g * g
    if isinstance(cfg, FedAdamConfig):
        v = v.mul(cfg.beta2).add(g2, alpha=1.0 - cfg.beta2)
    elif isinstance(cfg, FedYogiConfig):
        v = v - (1.0 - cfg.beta2) * g2 * torch.sign(v - g2)
    else:
        v = v + g2
    tensors[f"{PREFIX}v|{name}"] = v
    return m.div(v.sqrt().add(cfg.tau)).mul(cfg.lr)


def server_step(cfg: Any, global_params: Params, aggregate: Params, tensors: Params, info: dict[str, Any]) -> Params:
    """The new global parameters for ``cfg`` (a :data:`ServerOptConfig`); ``tensors`` / ``info`` hold the
    optimiser state (the run's ``engine_tensors`` / ``engine_info``) and are updated in place."""
    grads = pseudo_gradients(global_params, aggregate)
    out = {n: outer_update(aggregate[n], g, _step(cfg, n, g, tensors)) for n, g in grads.items()}
    info[INFO_KEY] = {"name": cfg.name, "steps": int(info.get(INFO_KEY, {}).get("steps", 0)) + 1}
    return out
