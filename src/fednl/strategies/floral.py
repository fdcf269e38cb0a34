"""FLoRAL (Almansoori, Horváth, Takáč; CPAL 2025): federated mixtures of low-rank adaptors with private routers.

Model (kind ``"floral"``, :mod:`fednl.models.floral`): per adapted linear, C adaptors (``A_c``, ``B_c``, bias
``b_c``); per client a router θ_k ∈ R^C, π_k = softmax(θ_k); layer output ``m(x) + s Σ_c π_kc LoRA_c(x)``.

Aggregation (reference: ``fedavg_router.py`` + ``floralavg.py``), with the clients of the round::

    p(k) = n_k / Σ_j n_j,   p(c|k) = π_kc,   p(k,c) = p(k) π_kc,   p(c) = Σ_k p(k,c),   p(k|c) = p(k,c) / p(c)
    adaptor c  ←  Σ_k p(k|c) · adaptor_{k,c}          (every tensor of adaptor c: A_c, B_c, b_c)
    other shared parameters (base, if trainable)  ←  Σ_k p(k) · w_k         (FedAvg)

* The router parameter θ_k never leaves the client: it is a local parameter persisted in its ``ClientState``.
  The server needs only π_k (C numbers, plain softmax, no noise), which the reply carries as metadata
  (``floral_pi_<c>``) — the reference server computes the same softmax from the routers it receives.
* Router training: its own plain SGD step with ``router_lr`` (reference default 0.1, no weight decay), taken in
  :meth:`client_after_backward`; its gradient is then cleared so the trainer's optimiser never touches it.
* ScaledGD preconditioning (``precondition``, reference default on): before every step, per adaptor,
  ``g_A ← (BᵀB + εI)⁻¹ g_A`` and ``g_B ← g_B (AAᵀ + εI)⁻¹`` (ε = 1e-5, linear solves, no explicit inverse).
* ``oracle_router``: θ_k fixed to a one-hot (margin 1e4, so π is exactly one-hot) on adaptor ``index(k) mod C``
  where ``index(k)`` is k's position in the server's client list (or ``oracle_map``); never trained.
* ``train_router = False``: the router keeps its value (zeros at init → uniform π).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import ClassVar

import torch
from pydantic import BaseModel, Field

from fednl.models.floral import DEFAULT_ADAPTORS
from fednl.models.spec import ModelSpec
from fednl.strategies import register
from fednl.strategies.base import ClientContext, ClientReply, Params, Payload, Strategy, StrategyError, check_replies

PI_KEY = "floral_pi_"
ORACLE_KEY = "floral_oracle"
ORACLE_MARGIN = 1.0e4


def routing_weights(num_examples: list[float], pis: list[list[float]]) -> torch.Tensor:
    """``p(k|c)`` as a ``[K, C]`` float64 tensor (columns sum to 1; a column with ``p(c) = 0`` is all zeros).

    Computed as ``n_k π_kc / Σ_j n_j π_jc``, which equals ``p(k) p(c|k) / p(c)`` (the common factor ``Σ n`` of
    ``p(k)`` cancels) and, for C = 1, gives exactly FedAvg's weights ``n_k / Σ_j n_j``."""
    n = torch.tensor(num_examples, dtype=torch.float64)
    pi = torch.tensor(pis, dtype=torch.float64)
    if pi.ndim != 2 or pi.shape[0] != n.shape[0]:
        raise StrategyError(f"routing weights: {n.shape[0]} clients but π has shape {tuple(pi.shape)}")
    mass = n[:, None] * pi  # n_k π_kc  (∝ p(k, c))
    p_c = mass.sum(0)
    out = torch.zeros_like(mass)
    nz = p_c > 0
    out[:, nz] = mass[:, nz] / p_c[nz]
    return out


def floral_aggregate(
    tensor_sets: list[Params], num_examples: list[float], pis: list[list[float]], adaptor_names: set[str],
    previous: Params,
) -> Params:
    """Adaptor tensors (leading dim C): slice c ← Σ_k p(k|c) t_k[c] (kept from ``previous`` when p(c) = 0);
    every other tensor: the N_k-weighted mean."""
    w_kc = routing_weights(num_examples, pis)
    total = float(sum(num_examples))
    out: Params = {}
    for name, ref in tensor_sets[0].items():
        if name in adaptor_names:
            C = w_kc.shape[1]
            if ref.shape[0] != C:
                raise StrategyError(f"adaptor tensor {name} has leading dim {ref.shape[0]}, expected C={C}")
            acc = torch.zeros_like(ref, dtype=torch.float64)
            for k, ts in enumerate(tensor_sets):
                acc += ts[name].to(torch.float64) * w_kc[k].view(C, *([1] * (ref.ndim - 1)))
            dead = w_kc.sum(0) == 0
            if bool(dead.any()):
                acc[dead] = previous[name].to(torch.float64)[dead]
            out[name] = acc.to(ref.dtype)
        else:
            acc = torch.zeros_like(ref, dtype=torch.float64)
            for ts, n in zip(tensor_sets, num_examples):
                acc += ts[name].to(torch.float64) * (float(n) / total)
            out[name] = acc.to(ref.dtype)
    return out


def scaled_gd_(a: torch.Tensor, b: torch.Tensor, eps: float) -> None:
    """In-place ScaledGD preconditioning of ``a.grad`` ``[..., r, in]`` and ``b.grad`` ``[..., out, r]``."""
    eye = torch.eye(a.shape[-2], dtype=a.dtype, device=a.device)
    A, B = a.detach(), b.detach()
    if a.grad is not None:
        gram_b = B.transpose(-1, -2) @ B + eps * eye  # [..., r, r]
        a.grad.copy_(torch.linalg.solve(gram_b, a.grad))
    if b.grad is not None:
        gram_a = A @ A.transpose(-1, -2) + eps * eye  # symmetric: g_B G^{-1} = (G^{-1} g_Bᵀ)ᵀ
        b.grad.copy_(torch.linalg.solve(gram_a, b.grad.transpose(-1, -2)).transpose(-1, -2))


def scaled_gd_reference(g_a: torch.Tensor, g_b: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float):
    """Readable reference of :func:`scaled_gd_` for one adaptor (explicit inverses, float64)."""
    r = a.shape[0]
    eye = torch.eye(r, dtype=torch.float64)
    a64, b64 = a.double(), b.double()
    new_a = torch.inverse(b64.T @ b64 + eps * eye) @ g_a.double()
    new_b = g_b.double() @ torch.inverse(a64 @ a64.T + eps * eye)
    return new_a, new_b


@register
class FLoRAL(Strategy):
    """C shared adaptors per layer averaged with p(k|c) ∝ n_k π_kc; private routers; optional ScaledGD."""

    name: ClassVar[str] = "floral"
    model_kind: ClassVar[str] = "floral"
    # adaptor slices are averaged with routing weights p(k|c), and the clients' mixture weights cross in clear
    robust_means: ClassVar[bool] = False
    private_mean: ClassVar[bool] = False

    class Options(Strategy.Options):
        n_adaptors: int = Field(DEFAULT_ADAPTORS, ge=1)  # C, passed to the "floral" model kind
        router_lr: float = Field(0.1, ge=0.0)  # reference default (0.3 in its 5%-data runs)
        train_router: bool = True
        oracle_router: bool = False
        oracle_map: dict[str, int] | None = None  # client -> adaptor for the oracle (default: index mod C)
        precondition: bool = True  # ScaledGD on the adaptor gradients
        precondition_eps: float = Field(1e-5, gt=0.0)

    @classmethod
    def model_spec(cls, options: BaseModel | None) -> ModelSpec:
        c = int(getattr(options, "n_adaptors", DEFAULT_ADAPTORS)) if options is not None else DEFAULT_ADAPTORS
        return ModelSpec(kind="floral", params={"n_adaptors": c})

    def __init__(self, options: BaseModel | None = None, *, groups: Mapping[str, set[str]]):
        super().__init__(options, groups=groups)
        self._router_names = self._names({"router"})
        if len(self._router_names) != 1:
            raise StrategyError(
                f"FLoRAL needs exactly one router parameter, the model has {sorted(self._router_names)}")
        self._adaptor_names = self._names({"lora"})
        if not self._adaptor_names:
            raise StrategyError("FLoRAL needs adaptor parameters (group 'lora'); the model has none")
        om = self.options.oracle_map
        if om is not None and any(not 0 <= v < self.options.n_adaptors for v in om.values()):
            raise StrategyError(f"oracle_map values must lie in [0, {self.options.n_adaptors}), got {om}")
        self._clients: list[str] = []

    @property
    def router_name(self) -> str:
        return next(iter(self._router_names))

    def shared_groups(self) -> set[str]:
        return self.trainable_groups() - {"router"}

    # ------------------------------------------------------------------ server
    def init_server(self, initial: Params) -> Params:
        C = int(self.options.n_adaptors)
        router = initial[self.router_name]
        if tuple(router.shape) != (C,):
            raise StrategyError(f"model router has shape {tuple(router.shape)} but n_adaptors={C}")
        for n in self._adaptor_names:
            if initial[n].shape[0] != C:
                raise StrategyError(f"adaptor {n} has leading dim {initial[n].shape[0]}, expected C={C}")
        return super().init_server(initial)

    def sample(self, rnd: int, clients: list[str], rng: random.Random) -> list[str]:
        self._clients = list(clients)
        return super().sample(rnd, clients, rng)

    def oracle_index(self, cid: str) -> int:
        C = int(self.options.n_adaptors)
        om = self.options.oracle_map
        if om is not None:
            if cid not in om:
                raise StrategyError(f"oracle_map has no entry for client {cid!r}")
            return int(om[cid])
        if cid not in self._clients:
            raise StrategyError(f"oracle router: client {cid!r} is not in the sampled client list {self._clients}")
        return self._clients.index(cid) % C

    def configure_train(self, rnd: int, cid: str, global_params: Params) -> Payload:
        payload = super().configure_train(rnd, cid, global_params)
        if self.options.oracle_router:
            payload.meta[ORACLE_KEY] = self.oracle_index(cid)
        return payload

    def aggregate_train(self, rnd: int, replies: list[ClientReply], global_params: Params) -> Params:
        check_replies(replies, expected=set(global_params), reference=global_params)
        pis = [self._reply_pi(r) for r in replies]
        return floral_aggregate([r.payload.tensors for r in replies], [float(r.num_examples) for r in replies], pis,
                                self._adaptor_names & set(global_params), global_params)

    def _reply_pi(self, reply: ClientReply) -> list[float]:
        C = int(self.options.n_adaptors)
        try:
            pi = [float(reply.payload.meta[f"{PI_KEY}{c}"]) for c in range(C)]
        except KeyError:
            raise StrategyError(
                f"client {reply.cid}: FLoRAL reply lacks its mixture weights ({PI_KEY}0..{C - 1})") from None
        if not all(math.isfinite(x) and x >= 0 for x in pi) or abs(sum(pi) - 1.0) > 1e-4:
            raise StrategyError(f"client {reply.cid}: mixture weights {pi} are not a probability vector")
        return pi

    # ------------------------------------------------------------------ client
    def client_receive(self, ctx: ClientContext, payload: Payload) -> None:
        super().client_receive(ctx, payload)
        if self.options.oracle_router:
            idx = payload.meta.get(ORACLE_KEY)
            if idx is None:
                raise StrategyError(f"client {ctx.cid}: oracle router on, but the payload names no adaptor")
            router = ctx.params[self.router_name]
            with torch.no_grad():
                router.zero_()
                router[int(idx)] = ORACLE_MARGIN

    def client_after_backward(self, ctx: ClientContext) -> None:
        router = ctx.params[self.router_name]
        if router.grad is not None:
            if self.options.train_router and not self.options.oracle_router and self.options.router_lr > 0:
                with torch.no_grad():
                    router.sub_(float(self.options.router_lr) * router.grad)
            router.grad = None  # the trainer's optimiser never updates the router
        if self.options.precondition:
            for a_name in sorted(self._adaptor_names):
                if a_name.endswith(".lora_A"):
                    b_name = a_name[: -len("lora_A")] + "lora_B"
                    if a_name in ctx.params and b_name in ctx.params:
                        scaled_gd_(ctx.params[a_name], ctx.params[b_name], float(self.options.precondition_eps))

    def client_reply(self, ctx: ClientContext) -> Payload:
        payload = super().client_reply(ctx)
        pi = torch.softmax(ctx.params[self.router_name].detach().to(torch.float64), dim=0)
        for c, v in enumerate(pi.tolist()):
            payload.meta[f"{PI_KEY}{c}"] = float(v)
        return payload
