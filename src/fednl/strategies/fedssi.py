"""FedSSI (Li et al., ICML 2025): synaptic-intelligence regularisation with a Personalised Surrogate Model (PSM).

FedSSI is a continual-FL method: SI (Zenke et al. 2017) protects the parameters that mattered for earlier
tasks, and FedSSI computes the SI importance along the training path of a PSM that mixes local and global
knowledge, which is what makes SI work under heterogeneous clients. The server is FedAvg; nothing extra is sent.

Per client, at the start of each *task period* (``task_rounds`` rounds; the runs here have one data set per
client, so a task period is a block of rounds and the default is every round — see docs/STRATEGIES.md):

1. PSM: ``v`` starts at the received global ``w``; ``psm_steps`` SGD steps (lr ``psm_lr``) on
   ``F_k(v) + q(λ)/2 ||v − w||²`` with ``q(λ) = (1 − λ)/λ`` (λ = 1: purely local, plain SI; smaller λ pulls the
   PSM toward the global model), accumulating the SI path integral of the *task* loss
   ``ω_i = Σ_steps −g_i Δv_i``.
2. Importance ``Ω_i ← Ω_i + max(ω_i, 0) / ((v_i − w_i)² + ξ)`` (accumulated over task periods as in SI; negative
   path integrals are clipped to 0 so that the penalty is a proper quadratic).
3. Anchor ``w̃ = w``; local objective ``F_k(θ) + c Σ_i Ω_i (θ_i − w̃_i)²``.

The live parameters are reset to ``w`` after the PSM pass; local training starts from the global model as in
FedAvg. State in ``ClientState.tensors``: ``fedssi/omega/<name>``, ``fedssi/anchor/<name>``;
``info["fedssi_task"]`` is the task period the importance was last computed for. ``c = 0`` is FedAvg.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from fednl.strategies import register
from fednl.strategies.base import ClientContext, Params, Payload, Strategy, StrategyError

OMEGA_PREFIX = "fedssi/omega/"
ANCHOR_PREFIX = "fedssi/anchor/"
TASK_KEY = "fedssi_task"


def psm_path_integral(
    start: Params, grad_fn, steps: int, lr: float, q: float
) -> tuple[Params, Params]:
    """Run the PSM and return ``(ω, v_end)``.

    ``grad_fn(v) -> {name: ∂F/∂v}`` evaluates the task-loss gradient at ``v`` (one mini-batch per call). Each
    step: ``Δ = −lr (g + q (v − start))``, ``ω += −g ⊙ Δ``, ``v += Δ``."""
    v = {n: t.detach().clone() for n, t in start.items()}
    omega = {n: torch.zeros_like(t) for n, t in start.items()}
    for _ in range(steps):
        g = grad_fn(v)
        for n in v:
            delta = -lr * (g[n] + q * (v[n] - start[n]))
            omega[n] -= g[n] * delta
            v[n] = v[n] + delta
    return omega, v


def si_importance(omega: Params, start: Params, end: Params, xi: float) -> Params:
    """``max(ω, 0) / ((end − start)² + ξ)`` per name."""
    return {n: omega[n].clamp_min(0) / ((end[n] - start[n]).pow(2) + xi) for n in omega}


def si_penalty(params: dict[str, torch.Tensor], omega: Params, anchor: Params) -> torch.Tensor:
    """``Σ_i Ω_i (θ_i − w̃_i)²`` over the names of ``omega`` (differentiable in ``params``)."""
    total: torch.Tensor | None = None
    for n, om in omega.items():
        term = (om * (params[n] - anchor[n]).pow(2)).sum()
        total = term if total is None else total + term
    if total is None:
        raise StrategyError("SI penalty over an empty set of parameters")
    return total


@register
class FedSSI(Strategy):
    """FedAvg server; clients regularise with SI importances computed along a personalised surrogate model."""

    name: ClassVar[str] = "fedssi"
    model_kind: ClassVar[str] = "lora"

    class Options(Strategy.Options):
        si_c: float = Field(1.0, ge=0.0)  # c, strength of the SI penalty
        lam: float = Field(0.5, gt=0.0, le=1.0)  # λ: PSM weight of the local loss vs the global anchor
        psm_steps: int = Field(8, ge=1)  # PSM mini-batch SGD steps per task period
        psm_lr: float = Field(1e-3, gt=0.0)
        xi: float = Field(0.1, gt=0.0)  # SI damping ξ
        task_rounds: int = Field(1, ge=1)  # rounds per task period (importance recomputed once per period)
        accumulate: bool = True  # Ω summed over task periods (SI); False: replaced

    def task_period(self, rnd: int) -> int:
        return (int(rnd) - 1) // int(self.options.task_rounds)

    def client_receive(self, ctx: ClientContext, payload: Payload) -> None:
        super().client_receive(ctx, payload)
        if float(self.options.si_c) == 0.0:
            return  # no penalty, so no importance to estimate: exactly FedAvg
        names = sorted(n for n in payload.tensors if n in ctx.params)
        period = self.task_period(ctx.rnd)
        if ctx.state.info.get(TASK_KEY) == period and all(OMEGA_PREFIX + n in ctx.state.tensors for n in names):
            return
        if ctx.forward_loss is None or ctx.batches is None:
            raise StrategyError("FedSSI needs ctx.forward_loss and ctx.batches to train its surrogate model")
        opt = self.options
        start = {n: ctx.params[n].detach().clone() for n in names}
        batches = iter(ctx.batches(int(opt.psm_steps)))

        def grad_fn(v: Params) -> Params:
            with torch.no_grad():
                for n in names:
                    ctx.params[n].copy_(v[n])
            loss = ctx.forward_loss(next(batches))
            grads = torch.autograd.grad(loss, [ctx.params[n] for n in names], allow_unused=True)
            return {n: (torch.zeros_like(v[n]) if g is None else g.detach()) for n, g in zip(names, grads)}

        q = (1.0 - float(opt.lam)) / float(opt.lam)
        omega, end = psm_path_integral(start, grad_fn, int(opt.psm_steps), float(opt.psm_lr), q)
        new = si_importance(omega, start, end, float(opt.xi))
        with torch.no_grad():
            for n in names:
                ctx.params[n].copy_(start[n])
        for n in names:
            old = ctx.state.tensors.get(OMEGA_PREFIX + n)
            total = new[n] if (old is None or not opt.accumulate) else old.to(new[n]) + new[n]
            ctx.state.tensors[OMEGA_PREFIX + n] = total.detach().to("cpu").clone()
            ctx.state.tensors[ANCHOR_PREFIX + n] = start[n].detach().to("cpu").clone()
        ctx.state.info[TASK_KEY] = period

    def client_loss(self, ctx: ClientContext, task_loss: torch.Tensor) -> torch.Tensor:
        c = float(self.options.si_c)
        if c == 0.0:
            return task_loss
        omega, anchor = ctx.scratch.get("fedssi/omega"), ctx.scratch.get("fedssi/anchor")
        if omega is None:
            omega, anchor = {}, {}
            for key, t in ctx.state.tensors.items():
                if key.startswith(OMEGA_PREFIX):
                    n = key[len(OMEGA_PREFIX):]
                    p = ctx.params[n]
                    omega[n] = t.to(device=p.device, dtype=p.dtype)
                    anchor[n] = ctx.state.tensors[ANCHOR_PREFIX + n].to(device=p.device, dtype=p.dtype)
            if not omega:
                raise StrategyError(f"client {ctx.cid}: FedSSI loss before client_receive computed the importances")
            ctx.scratch["fedssi/omega"], ctx.scratch["fedssi/anchor"] = omega, anchor
        return task_loss + c * si_penalty(ctx.params, omega, anchor).to(task_loss.dtype)
