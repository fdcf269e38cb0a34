"""FedSpeed (Sun, Shen, Huang, Ding, Tao; ICLR 2023): prox-correction plus a merged extra-gradient local step.

Algorithm 1 of the paper, per client ``i`` in round ``t`` (``x^t`` the received global model, ``ĝ_i`` the
client's prox-correction term, kept in its :class:`~fednl.client.state.ClientState` as ``fedspeed/ghat/<name>``,
zero before its first round), for each local step k:

* ``g₁ = ∇f_i(x_k)``; extra ascent step ``x̆_k = x_k + ρ g₁``; ``g₂ = ∇f_i(x̆_k)``;
* quasi-gradient ``g = (1 − α) g₁ + α g₂``;
* local step on ``g − ĝ_i + (1/λ)(x_k − x^t)`` (the prox term and its correction):
  :meth:`client_after_backward` leaves exactly that in ``.grad`` and the trainer's optimiser steps on it;

then ``ĝ_i ← ĝ_i − (1/λ)(x_K − x^t)`` and the client sends ``x̂_i = x_K − λ ĝ_i``; the server averages the ``x̂_i``.

Choices. The trainer computes ``g₁`` on its own mini-batch and does not show that batch to strategies, so ``g₂``
is computed on the next batch of a second stream over the client's data (``ctx.batches``): an unbiased stochastic
gradient at ``x̆_k``, as Algorithm 1 requires, but not the same sample as ``g₁``. The perturbation is the paper's
``ρ g₁`` (the authors' code uses a normalised SAM step); it moves every trained parameter, the prox term and its
correction only the shared ones. The server mean is ``N_k``-weighted (the paper: a plain mean). Defaults: ``ρ =
0.1`` and ``λ = 10`` are the authors' code defaults (``--rho 0.1``, ``--lamb 0.1``, which is ``1/λ``); ``α = 0.5``
is ours (the paper tunes it). ``α = 0`` (or ``ρ = 0``) skips the extra gradient.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from fednl.strategies import register
from fednl.strategies.base import ClientContext, Payload, Strategy, StrategyError

GHAT = "fedspeed/ghat/"  # client state: the prox-correction term ĝ_i
_SCRATCH = "fedspeed"
_ENDLESS = 1 << 62


@register
class FedSpeed(Strategy):
    """Prox term with its correction ĝ_i, and a quasi-gradient merged from an extra ascent step."""

    name: ClassVar[str] = "fedspeed"
    model_kind: ClassVar[str] = "lora"

    class Options(Strategy.Options):
        lam: float = Field(10.0, gt=0)  # λ: the prox term is (1/λ)(x − x^t); the client sends x_K − λ ĝ_i
        rho: float = Field(0.1, ge=0)  # ρ: extra ascent step x + ρ g₁
        alpha: float = Field(0.5, ge=0, le=1)  # α: quasi-gradient (1 − α) g₁ + α g₂

    def client_receive(self, ctx: ClientContext, payload: Payload) -> None:
        super().client_receive(ctx, payload)
        anchor, ghat = {}, {}
        for n in sorted(self.shared_names()):
            p = ctx.params[n]
            anchor[n] = p.detach().clone()
            ghat[n] = ctx.state.tensors.get(GHAT + n, torch.zeros(p.shape)).to(p)
        ctx.scratch[_SCRATCH] = {"anchor": anchor, "ghat": ghat, "stream": None}

    def _extra_gradient(self, ctx: ClientContext, s: dict) -> None:
        """Replace every trained parameter's gradient g₁ by ``(1 − α) g₁ + α ∇f(x + ρ g₁)``."""
        rho, alpha = float(self.options.rho), float(self.options.alpha)
        if ctx.forward_loss is None or ctx.batches is None:
            raise StrategyError(f"client {ctx.cid}: FedSpeed's extra gradient needs the trainer's data hooks")
        if s["stream"] is None:
            s["stream"] = ctx.batches(_ENDLESS)
        g1 = {n: p.grad.detach().clone() for n, p in ctx.params.items() if p.grad is not None}
        here = {n: ctx.params[n].detach().clone() for n in g1}
        with torch.no_grad():
            for n, g in g1.items():
                ctx.params[n].add_(g, alpha=rho)
        for p in ctx.params.values():
            p.grad = None
        ctx.forward_loss(next(s["stream"])).backward()
        with torch.no_grad():
            for n, g in g1.items():
                p = ctx.params[n]
                p.copy_(here[n])
                g2 = torch.zeros_like(g) if p.grad is None else p.grad
                p.grad = g.mul(1.0 - alpha).add(g2, alpha=alpha)

    def client_after_backward(self, ctx: ClientContext) -> None:
        s = ctx.scratch[_SCRATCH]
        if float(self.options.rho) > 0 and float(self.options.alpha) > 0:
            self._extra_gradient(ctx, s)
        inv = 1.0 / float(self.options.lam)
        with torch.no_grad():
            for n, x_t in s["anchor"].items():
                p = ctx.params[n]
                corr = (p.detach() - x_t).mul(inv) - s["ghat"][n]  # −ĝ_i + (1/λ)(x_k − x^t)
                p.grad = corr if p.grad is None else p.grad.add_(corr)

    def client_reply(self, ctx: ClientContext) -> Payload:
        s = ctx.scratch.get(_SCRATCH)
        if s is None:
            raise StrategyError(f"client {ctx.cid}: FedSpeed reply before client_receive")
        lam = float(self.options.lam)
        out = {}
        for n, x_t in s["anchor"].items():
            x_k = ctx.params[n].detach()
            ghat = s["ghat"][n] - (x_k - x_t).mul(1.0 / lam)
            ctx.state.tensors[GHAT + n] = ghat.to("cpu", torch.float32).clone()
            out[n] = (x_k - ghat.mul(lam)).to("cpu").clone()  # x̂_i = x_K − λ ĝ_i
        return Payload(out, {"round": ctx.rnd})
