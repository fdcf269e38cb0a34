"""SCAFFOLD (Karimireddy et al., ICML 2020): stochastic controlled averaging, Algorithm 1 with option II.

Server state: the global model ``x`` (the shared trained parameters) and a control variate ``c`` per parameter;
client ``i`` keeps its own ``c_i`` in its :class:`~fednl.client.state.ClientState` (``scaffold/c_i/<name>``).
One round, as Algorithm 1 writes it:

* the server sends ``(x, c)``: ``c`` travels as extra tensors ``scaffold.c/<name>`` (so SCAFFOLD's downlink
  is twice FedAvg's; the ledger counts them in the ``other`` group);
* corrected local steps ``y_i ← y_i − η_l (g_i(y_i) − c_i + c)``: :meth:`client_after_backward` adds
  ``c − c_i`` to every shared parameter's gradient before the optimiser step;
* option II: ``c_i⁺ = c_i − c + (x − y_i) / (K η_l)``; the client sends ``(y_i, Δc_i = c_i⁺ − c_i)`` (``y_i``
  itself rather than ``Δy_i = y_i − x``: the same information) and keeps ``c_i ← c_i⁺``;
* server: ``x ← x + η_g Δx`` with ``Δx`` the mean of ``y_i − x``, and ``c ← c + (|S| / N) Δc`` with ``Δc`` the
  mean of ``Δc_i`` over the ``|S|`` sampled clients (``N`` = all clients), which keeps ``c = mean_i c_i``.

Choices. ``(x − y_i) / (K η_l)`` is computed as the mean of the *raw* mini-batch gradients of the K local steps:
under plain SGD (no momentum, weight decay or clipping) ``x − y_i = η_l Σ_k (g_k − c_i + c)``, so option II is
exactly ``c_i⁺ = (1/K) Σ_k g_k``; unlike the displacement formula this stays a gradient estimate under AdamW,
per-group learning rates or schedules (where ``y_i`` is not ``K η_l`` times a gradient). ``Δx`` is
``N_k``-weighted like every other method here (the paper: a plain mean), ``Δc`` is the paper's plain mean.
``freeze_controls = true`` holds every control variate at zero: the corrections are then exactly zero and
SCAFFOLD is FedAvg (with server step ``η_g``), bit for bit through the simulator (tested).
"""

from __future__ import annotations

import random
from typing import Any, ClassVar

import torch
from pydantic import Field

from fednl.strategies.server_opt import outer_update
from fednl.strategies import register
from fednl.strategies.base import (
    ClientContext,
    ClientReply,
    Params,
    Payload,
    Strategy,
    StrategyError,
    check_replies,
)

C_DOWN = "scaffold.c/"  # payload: the server control variate c
DC_UP = "scaffold.dc/"  # reply: Δc_i
C_I = "scaffold/c_i/"  # client state: c_i
_SCRATCH = "scaffold"


@register
class Scaffold(Strategy):
    """FedAvg with client/server control variates correcting client drift (option II)."""

    name: ClassVar[str] = "scaffold"
    model_kind: ClassVar[str] = "lora"
    # the control variates are a mean of the clients' corrections, sent to every client: a robust mean (median,
    # trimmed mean) replaces it as it replaces the model average; client-level DP would leave them un-noised
    private_mean: ClassVar[bool] = False

    class Options(Strategy.Options):
        server_lr: float = Field(1.0, gt=0)  # η_g (Algorithm 1's global step size)
        freeze_controls: bool = False  # c = c_i = 0 throughout: FedAvg through SCAFFOLD's code paths

    def __init__(self, options: Any = None, *, groups: Any):
        super().__init__(options, groups=groups)
        self._c: Params = {}
        self._n_clients = 0

    # ------------------------------------------------------------------ server
    def sample(self, rnd: int, clients: list[str], rng: random.Random) -> list[str]:
        self._n_clients = len(clients)
        return super().sample(rnd, clients, rng)

    def _controls(self, global_params: Params) -> Params:
        for n, t in global_params.items():
            if n not in self._c:
                self._c[n] = torch.zeros_like(t, dtype=torch.float32)
        return self._c

    def configure_train(self, rnd: int, cid: str, global_params: Params) -> Payload:
        payload = super().configure_train(rnd, cid, global_params)
        payload.tensors.update({C_DOWN + n: c for n, c in self._controls(global_params).items()})
        return payload

    def reply_like(self, global_params: Params) -> Params:
        extra = {DC_UP + n: torch.empty(t.shape, dtype=torch.float32, device="meta") for n, t in global_params.items()}
        return {**global_params, **extra}

    def aggregate_train(self, rnd: int, replies: list[ClientReply], global_params: Params) -> Params:
        names = set(global_params)
        check_replies(replies, expected=names | {DC_UP + n for n in names})
        models = self.mean([{n: r.payload.tensors[n] for n in names} for r in replies],
                           [r.num_examples for r in replies])
        eta = float(self.options.server_lr)
        new = {}
        for n, a in models.items():
            g = global_params[n].to(a.dtype) - a  # −Δx
            new[n] = outer_update(a, g, g.mul(eta))  # x + η_g Δx, exactly the mean when η_g = 1
        if self._n_clients <= 0:
            raise StrategyError("SCAFFOLD: aggregate before sample() told the number of clients")
        controls = self._controls(global_params)
        dcs = [{n: r.payload.tensors[DC_UP + n].to(torch.float32) for n in names} for r in replies]
        if self._mean is None:  # the paper's plain mean
            dc_mean = {n: torch.stack([d[n] for d in dcs]).mean(dim=0) for n in names}
        else:  # a robust mean (median, trimmed mean) covers the corrections too: one client cannot steer c
            dc_mean = self.mean(dcs, [1.0] * len(dcs))
        for n in names:
            controls[n] = controls[n] + dc_mean[n].to(torch.float32) * (len(replies) / self._n_clients)
        return new

    def server_state(self) -> tuple[Params, dict[str, Any]]:
        return {f"c/{n}": t for n, t in self._c.items()}, {"n_clients": self._n_clients}

    def load_server_state(self, tensors: Params, info: dict[str, Any]) -> None:
        bad = [k for k in tensors if not k.startswith("c/")]
        if bad or ("n_clients" not in info and tensors):
            raise StrategyError(f"SCAFFOLD checkpoint: unexpected server state {bad[:3] or sorted(info)}")
        self._c = {k[2:]: t.to(torch.float32) for k, t in tensors.items()}
        self._n_clients = int(info.get("n_clients", 0))

    # ------------------------------------------------------------------ client
    def client_receive(self, ctx: ClientContext, payload: Payload) -> None:
        shared = self.shared_names()
        c = {n[len(C_DOWN):]: t for n, t in payload.tensors.items() if n.startswith(C_DOWN)}
        if set(c) != shared:
            raise StrategyError(f"client {ctx.cid}: SCAFFOLD payload has control variates for {sorted(c)[:3]}..., "
                                f"expected the shared parameters")
        super().client_receive(ctx, Payload({n: t for n, t in payload.tensors.items() if not n.startswith(C_DOWN)},
                                            payload.meta))
        freeze = bool(self.options.freeze_controls)
        corr, c_i = {}, {}
        for n in sorted(shared):
            p = ctx.params[n]
            c_i[n] = torch.zeros_like(p) if freeze else ctx.state.tensors.get(C_I + n, torch.zeros(p.shape)).to(p)
            corr[n] = (torch.zeros_like(p) if freeze else c[n].to(p)) - c_i[n]
        ctx.scratch[_SCRATCH] = {"corr": corr, "c_i": c_i, "grad_sum": {}, "steps": 0}

    def client_after_backward(self, ctx: ClientContext) -> None:
        s = ctx.scratch[_SCRATCH]
        for n, corr in s["corr"].items():
            p = ctx.params[n]
            raw = torch.zeros_like(p) if p.grad is None else p.grad.detach()
            s["grad_sum"][n] = raw.clone() if n not in s["grad_sum"] else s["grad_sum"][n] + raw
            p.grad = raw.clone() + corr if p.grad is None else p.grad.add_(corr)  # g − c_i + c
        s["steps"] += 1

    def client_reply(self, ctx: ClientContext) -> Payload:
        reply = super().client_reply(ctx)
        s = ctx.scratch.get(_SCRATCH)
        if s is None or s["steps"] == 0:
            raise StrategyError(f"client {ctx.cid}: SCAFFOLD reply without local steps")
        for n, c_i in s["c_i"].items():
            new = c_i if self.options.freeze_controls else s["grad_sum"][n] / s["steps"]  # option II
            reply.tensors[DC_UP + n] = (new - c_i).detach().to("cpu", torch.float32)
            if not self.options.freeze_controls:
                ctx.state.tensors[C_I + n] = new.detach().to("cpu", torch.float32).clone()
        return reply
