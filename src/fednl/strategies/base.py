"""The strategy contract: Level 0 (server) plus the client-side hooks of Level 1.

A strategy names parameters and does arithmetic on named tensors. It never touches data loaders, files or
transport, so the same object runs in the in-process simulator and inside Flower's ServerApp/ClientApp.

One round, as every engine runs it::

    server:  names  = strategy.shared_names()            # what crosses the wire
             for cid in strategy.sample(rnd, clients, rng):
                 down[cid] = strategy.configure_train(rnd, cid, global_params)        -> Payload
    client:  (engine loads the client's persisted local parameters into the shared model first)
             strategy.client_receive(ctx, down[cid])     # copy received tensors into the live parameters
             for each batch:  loss = strategy.client_loss(ctx, task_loss); loss.backward()
                              strategy.client_after_backward(ctx); optimiser.step()
             up = strategy.client_reply(ctx)                                           -> Payload
    server:  global_params = strategy.aggregate_train(rnd, [ClientReply...], global_params)

Parameter names are the converted model's ``named_parameters()`` names; ``groups`` maps each group name
(``frozen``, ``lora``, ``rule``, ``gate`` and any group a model conversion adds) to the set of names in it.
"""

from __future__ import annotations

import random
from abc import ABC
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from fednl.models.spec import ModelSpec

Params = dict[str, torch.Tensor]
Scalar = int | float | str | bool
MeanFn = Callable[[list[Params], list[float]], Params]  # (tensor sets, weights) -> their average


class StrategyError(ValueError):
    """Raised for a malformed client update or an impossible strategy configuration."""


@dataclass
class Payload:
    """What crosses the wire in one direction: named tensors plus a small metadata record."""

    tensors: Params
    meta: dict[str, Scalar] = field(default_factory=dict)


@dataclass
class ClientReply:
    """A client's answer to one training round, as the server receives it."""

    cid: str
    payload: Payload
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ClientContext:
    """What the client-side hooks may see and change during one local round.

    ``params`` are the *live* trainable parameters of the shared model (name -> nn.Parameter); writing to
    them (under ``torch.no_grad()``) changes the model. ``state`` is this client's persisted storage:
    tensors under ``state.tensors`` and JSON-able values under ``state.info`` survive across rounds, are
    checkpointed with the run and counted in the client-state size report. ``forward_loss`` and
    ``batches`` let a hook run extra passes on local data (FedALA's weight learning, FedSSI's importance).
    """

    cid: str
    rnd: int
    params: dict[str, torch.nn.Parameter]
    groups: Mapping[str, set[str]]
    state: Any  # fednl.client.state.ClientState (kept loose here to avoid an import cycle)
    num_examples: int
    generator: torch.Generator
    forward_loss: Callable[[Any], torch.Tensor] | None = None
    batches: Callable[[int], Iterator[Any]] | None = None
    scratch: dict[str, Any] = field(default_factory=dict)  # per-round, not persisted


class Strategy(ABC):
    """Base class: FedAvg semantics on the shared names, N_k-weighted. Subclasses override what differs.

    Class attributes a subclass sets:
      * ``name``: registry key used in configs (``method.name``).
      * ``Options``: a pydantic model of the strategy's own settings (``[method]`` table), validated at load.
      * ``model_kind``: which model the engine builds for it — ``"titans"`` (dual-path memory model + LoRA) or
        ``"lora"`` (the plain backbone + LoRA), or another kind a model module registers. A strategy whose model
        shape depends on its options (FLoRAL's number of adaptors) overrides :meth:`model_spec` to pass them as
        the kind's parameters.
      * ``accepts_server_opt``: see below.
    """

    name: ClassVar[str] = ""
    model_kind: ClassVar[str] = "lora"
    # whether the engine may put a server optimiser ([server_opt]) on top of ``aggregate_train``'s result; False
    # for strategies whose global parameters are not what the next round sends (FedTreeLoRA's cluster experts)
    # or which run their own outer optimiser (MT-DAO)
    accepts_server_opt: ClassVar[bool] = True
    # how the engine's robust aggregation and client-level DP compose with the strategy (docs/ROBUSTNESS.md):
    # ``robust_select``: ``aggregate_train`` takes any non-empty subset of the sampled clients' replies, and replies
    # whose updates were scaled down (Krum, norm clipping); ``robust_means``: every average of client tensors goes
    # through :meth:`mean` (the coordinate-wise median or trimmed mean can replace it); ``private_mean``: what the
    # server releases is a function of one :meth:`mean` per round only (client-level DP noises that mean)
    robust_select: ClassVar[bool] = True
    robust_means: ClassVar[bool] = True
    private_mean: ClassVar[bool] = True
    _mean: MeanFn | None = None  # set by :meth:`averaging` for one round

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        fraction_fit: float = 1.0  # fraction of clients sampled per round (at least one)

    @classmethod
    def model_spec(cls, options: BaseModel | None) -> ModelSpec:
        """The model to build for these options: ``model_kind`` without parameters by default."""
        del options
        return ModelSpec(kind=cls.model_kind)

    def __init__(self, options: BaseModel | None = None, *, groups: Mapping[str, set[str]]):
        self.options = options if options is not None else self.Options()
        self.groups = {k: set(v) for k, v in groups.items()}
        missing = {"frozen"} - set(self.groups)
        if missing:
            raise StrategyError(f"model parameter groups lack {sorted(missing)}; got {sorted(self.groups)}")

    # ------------------------------------------------------------------ what is trained / shared
    def trainable_groups(self) -> set[str]:
        """Groups trained on the client. Default: everything except ``frozen``."""
        return set(self.groups) - {"frozen"}

    def shared_groups(self) -> set[str]:
        """Groups that cross the wire (both directions). Default: everything trained."""
        return self.trainable_groups()

    def _names(self, group_names: Iterable[str]) -> set[str]:
        out: set[str] = set()
        for gname in group_names:
            if gname not in self.groups:
                raise StrategyError(
                    f"strategy {self.name!r} needs parameter group {gname!r}, the model has {sorted(self.groups)}"
                )
            out |= self.groups[gname]
        return out

    def trainable_names(self) -> set[str]:
        return self._names(self.trainable_groups())

    def shared_names(self) -> set[str]:
        names = self._names(self.shared_groups())
        not_trained = names - self.trainable_names()
        if not_trained:
            raise StrategyError(f"shared parameters that are never trained: {sorted(not_trained)[:5]}")
        return names

    def local_names(self) -> set[str]:
        """Trained but never sent: persisted per client by the engine (personal parameters)."""
        return self.trainable_names() - self.shared_names()

    # ------------------------------------------------------------------ server side (Level 0)
    def init_server(self, initial: Params) -> Params:
        """Return the initial global parameters (the shared names, taken from the initial model)."""
        return {n: initial[n].detach().clone() for n in sorted(self.shared_names())}

    def sample(self, rnd: int, clients: list[str], rng: random.Random) -> list[str]:
        """Choose the clients of round ``rnd`` (default: a seeded fraction, order kept)."""
        frac = float(getattr(self.options, "fraction_fit", 1.0))
        n = max(1, round(frac * len(clients)))
        if n >= len(clients):
            return list(clients)
        chosen = set(rng.sample(clients, n))
        return [c for c in clients if c in chosen]

    def configure_train(self, rnd: int, cid: str, global_params: Params) -> Payload:
        """The payload sent to client ``cid`` (default: the global shared tensors)."""
        return Payload({n: t for n, t in global_params.items()}, {"round": rnd})

    def aggregate_train(self, rnd: int, replies: list[ClientReply], global_params: Params) -> Params:
        """New global parameters from the replies (default: :meth:`mean`, N_k-weighted, of every shared tensor)."""
        check_replies(replies, expected=set(global_params), reference=global_params)
        return self.mean([r.payload.tensors for r in replies], [r.num_examples for r in replies])

    def mean(self, tensor_sets: list[Params], weights: list[float]) -> Params:
        """The average of client tensors every aggregation goes through: :func:`weighted_mean`, unless the engine
        put a robust or differentially private one in place for the round (:meth:`averaging`)."""
        return weighted_mean(tensor_sets, weights) if self._mean is None else self._mean(tensor_sets, weights)

    @contextmanager
    def averaging(self, mean: MeanFn | None) -> Iterator[None]:
        """Within the block, :meth:`mean` is ``mean`` (``None``: :func:`weighted_mean`)."""
        before = self._mean
        self._mean = mean
        try:
            yield
        finally:
            self._mean = before

    def reply_like(self, global_params: Params) -> Params:
        """Tensors with the names, shapes and dtypes a well-formed reply has (default: the global parameters'; a
        strategy that sends back more says so). The engine screens every reply against them."""
        return global_params

    def eval_params(self, cid: str, global_params: Params, client_state: Any) -> Params:
        """Parameter values client ``cid`` is evaluated with, installed *after* its local parameters (default:
        the global shared ones). Personalising strategies override it (FedTreeLoRA: the client's cluster and
        external adaptors; FedALA: the blend of the global model with the client's model and last weights)."""
        del cid, client_state
        return global_params

    def server_state(self) -> tuple[Params, dict[str, Any]]:
        """Tensors and JSON-able values the server must checkpoint to resume (default: none)."""
        return {}, {}

    def load_server_state(self, tensors: Params, info: dict[str, Any]) -> None:
        if tensors or info:
            raise StrategyError(f"strategy {self.name!r} keeps no server state, but the checkpoint has some")

    # ------------------------------------------------------------------ client side (Level 1 hooks)
    def client_receive(self, ctx: ClientContext, payload: Payload) -> None:
        """Install the received tensors into the live parameters (default: plain copy)."""
        with torch.no_grad():
            for n, t in payload.tensors.items():
                if n not in ctx.params:
                    raise StrategyError(f"client {ctx.cid}: received unknown parameter {n!r}")
                ctx.params[n].copy_(t.to(ctx.params[n].dtype))

    def client_loss(self, ctx: ClientContext, task_loss: torch.Tensor) -> torch.Tensor:
        """The local objective (default: the task loss; FedProx adds its proximal term here)."""
        return task_loss

    def client_after_backward(self, ctx: ClientContext) -> None:
        """Adjust gradients before the optimiser step (SCAFFOLD corrections, ScaledGD preconditioning)."""

    def client_reply(self, ctx: ClientContext) -> Payload:
        """What the client sends back (default: the current values of the shared parameters)."""
        return Payload({n: ctx.params[n].detach().clone() for n in sorted(self.shared_names())}, {"round": ctx.rnd})


# ---------------------------------------------------------------------------------------------- helpers
def check_replies(replies: list[ClientReply], *, expected: set[str], reference: Params | None = None) -> None:
    """Validate client updates: non-empty, the expected names, matching shapes, finite values, N_k > 0."""
    if not replies:
        raise StrategyError("no client replies to aggregate")
    for r in replies:
        got = set(r.payload.tensors)
        if got != expected:
            extra, lack = sorted(got - expected)[:3], sorted(expected - got)[:3]
            raise StrategyError(f"client {r.cid}: update has unexpected names {extra} / lacks {lack}")
        if r.num_examples <= 0:
            raise StrategyError(f"client {r.cid}: num_examples must be > 0, got {r.num_examples}")
        for n, t in r.payload.tensors.items():
            if reference is not None and tuple(t.shape) != tuple(reference[n].shape):
                raise StrategyError(
                    f"client {r.cid}: {n} has shape {tuple(t.shape)}, expected {tuple(reference[n].shape)}"
                )
            if not torch.isfinite(t).all():
                raise StrategyError(f"client {r.cid}: {n} contains NaN or Inf")


def weighted_mean(tensor_sets: list[Params], weights: list[float]) -> Params:
    """``sum_k w_k x_k / sum_k w_k`` per name, accumulated in float64 and returned in each tensor's dtype."""
    total = float(sum(weights))
    if total <= 0:
        raise StrategyError("aggregation weights sum to zero")
    out: Params = {}
    for n in tensor_sets[0]:
        acc = torch.zeros_like(tensor_sets[0][n], dtype=torch.float64)
        for ts, w in zip(tensor_sets, weights):
            acc += ts[n].to(torch.float64) * (float(w) / total)
        out[n] = acc.to(tensor_sets[0][n].dtype)
    return out
