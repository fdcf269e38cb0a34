"""FedALA (Zhang et al., AAAI 2023): Adaptive Local Aggregation of the received global model.

The server is FedAvg. Each client, before its local training, does not overwrite its previous local model
``θ_loc`` with the global ``θ_glob``; it blends them element-wise::

    θ_k = θ_loc + (θ_glob − θ_loc) ⊙ W,      W ∈ [0, 1]^{shape of θ}

* Lower layers take the global values outright (``W = 1`` implicitly); only the parameters of the top
  ``layer_idx`` transformer blocks are blended (parameters outside any block count as the topmost block).
* ``W`` starts at ones and is learned on ``rand_percent``% of the local training data by plain gradient descent
  on the local loss, clipped to ``[0, 1]`` after every batch (the published rule)::

        W ← clip(W − η · ∇_θ L(θ_k) ⊙ (θ_glob − θ_loc), 0, 1)

  In the first round ALA runs ("start phase") ``W`` is trained epoch after epoch until the standard deviation
  of the last ``num_pre_loss`` epoch losses drops below ``threshold`` (or ``max_init_epochs`` is reached);
  afterwards one pass per round.
* ALA is skipped the first time a client takes part (it has no local model yet: ``θ_k = θ_glob``).

Client state (``ClientState.tensors``): ``fedala/local/<name>`` (the client's trained values of the blended
parameters, saved in :meth:`client_reply`) and ``fedala/weight/<name>`` (``W``); ``info["fedala_start_phase"]``.
Nothing extra crosses the wire: traffic equals FedAvg's.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pydantic import Field

from fednl.models.treelora import block_index
from fednl.strategies import register
from fednl.strategies.base import ClientContext, Params, Payload, Strategy, StrategyError

LOCAL_PREFIX = "fedala/local/"
WEIGHT_PREFIX = "fedala/weight/"
START_KEY = "fedala_start_phase"


def top_block_names(names: set[str], layer_idx: int) -> set[str]:
    """Names in the top ``layer_idx`` blocks (by :func:`block_index`); names outside any block count as top."""
    blocks = sorted({b for n in names if (b := block_index(n)) is not None})
    top = set(blocks[-layer_idx:]) if layer_idx > 0 else set()
    return {n for n in names if (b := block_index(n)) is None or b in top}


def ala_step(
    weight: Params, grads: Params, global_params: Params, local_params: Params, eta: float
) -> tuple[Params, Params]:
    """One ALA update. Returns ``(new W, new blended θ)``::

    W' = clip(W − η · g ⊙ (θ_glob − θ_loc), 0, 1);   θ' = θ_loc + (θ_glob − θ_loc) ⊙ W'
    """
    new_w, new_theta = {}, {}
    for n, w in weight.items():
        diff = global_params[n] - local_params[n]
        new_w[n] = torch.clamp(w - eta * grads[n] * diff, 0.0, 1.0)
        new_theta[n] = local_params[n] + diff * new_w[n]
    return new_w, new_theta


def blend(weight: Params, global_params: Params, local_params: Params) -> Params:
    """``θ_loc + (θ_glob − θ_loc) ⊙ W`` per name."""
    return {n: local_params[n] + (global_params[n] - local_params[n]) * w for n, w in weight.items()}


@register
class FedALA(Strategy):
    """FedAvg server; each client adaptively blends the global model into its own before training."""

    name: ClassVar[str] = "fedala"
    model_kind: ClassVar[str] = "lora"

    class Options(Strategy.Options):
        eta: float = Field(1.0, gt=0.0)  # weight-learning rate (FedALA's default)
        rand_percent: float = Field(80.0, gt=0.0, le=100.0)  # % of local training data used to learn W
        layer_idx: int = Field(2, ge=1)  # number of top transformer blocks whose parameters are blended
        threshold: float = Field(0.1, gt=0.0)  # start phase: stop when std of recent epoch losses < threshold
        num_pre_loss: int = Field(10, ge=2)  # ... over this many most recent epochs
        max_init_epochs: int = Field(50, ge=1)  # hard cap on start-phase epochs (not in the paper; a safeguard)

    # ------------------------------------------------------------------ client side
    def ala_names(self, names: set[str]) -> set[str]:
        return top_block_names(names, int(self.options.layer_idx))

    def client_receive(self, ctx: ClientContext, payload: Payload) -> None:
        stored = {k[len(LOCAL_PREFIX):]: v for k, v in ctx.state.tensors.items() if k.startswith(LOCAL_PREFIX)}
        super().client_receive(ctx, payload)  # lower layers (and everything on a first visit): the global values
        if not stored:
            return  # first participation: no local model yet, ALA deactivated
        names = self.ala_names(set(payload.tensors) & set(ctx.params))
        missing = sorted(names - set(stored))
        if missing:
            raise StrategyError(f"client {ctx.cid}: FedALA local model lacks {missing[:3]}")
        if ctx.forward_loss is None or ctx.batches is None:
            raise StrategyError("FedALA needs ctx.forward_loss and ctx.batches to learn its aggregation weights")
        dev = {n: ctx.params[n] for n in names}
        glob = {n: payload.tensors[n].to(device=p.device, dtype=p.dtype) for n, p in dev.items()}
        loc = {n: stored[n].to(device=p.device, dtype=p.dtype) for n, p in dev.items()}
        weight = {}
        for n, p in dev.items():
            w = ctx.state.tensors.get(WEIGHT_PREFIX + n)
            weight[n] = torch.ones_like(p) if w is None else w.to(device=p.device, dtype=p.dtype)
        start_phase = bool(ctx.state.info.get(START_KEY, True))
        weight, theta = self.learn_weights(ctx, weight, glob, loc, start_phase)
        with torch.no_grad():
            for n, t in theta.items():
                ctx.params[n].copy_(t)
        for n, w in weight.items():
            ctx.state.tensors[WEIGHT_PREFIX + n] = w.detach().to("cpu").clone()
        ctx.state.info[START_KEY] = False

    def learn_weights(
        self, ctx: ClientContext, weight: Params, glob: Params, loc: Params, start_phase: bool
    ) -> tuple[Params, Params]:
        """Learn ``W`` on a fixed random ``rand_percent``% of the local data (the same batches every epoch)."""
        assert ctx.forward_loss is not None and ctx.batches is not None
        opt = self.options
        names = sorted(weight)
        subset = sample_batches(ctx, float(opt.rand_percent))
        theta = blend(weight, glob, loc)
        epoch_losses: list[float] = []
        max_epochs = int(opt.max_init_epochs) if start_phase else 1
        for _ in range(max_epochs):
            batch_losses = []
            for batch in subset:
                with torch.no_grad():
                    for n in names:
                        ctx.params[n].copy_(theta[n])
                loss = ctx.forward_loss(batch)
                grads = torch.autograd.grad(loss, [ctx.params[n] for n in names], allow_unused=True)
                g = {n: (torch.zeros_like(theta[n]) if gr is None else gr.detach()) for n, gr in zip(names, grads)}
                weight, theta = ala_step(weight, g, glob, loc, float(opt.eta))
                batch_losses.append(float(loss.detach()))
            epoch_losses.append(sum(batch_losses) / len(batch_losses))
            recent = epoch_losses[-int(opt.num_pre_loss):]
            if len(epoch_losses) >= int(opt.num_pre_loss) and _std(recent) < float(opt.threshold):
                break
        ctx.scratch["fedala/epochs"] = len(epoch_losses)
        ctx.scratch["fedala/losses"] = epoch_losses
        return weight, theta

    def eval_params(self, cid: str, global_params: Params, client_state: Any) -> Params:
        """The personalised model: the blend of the global model with the client's model and its last ``W``
        (no new weight learning at evaluation time); the global values where the client has none yet."""
        if client_state is None:
            return global_params
        out = dict(global_params)
        for n in self.ala_names(set(global_params)):
            loc = client_state.tensors.get(LOCAL_PREFIX + n)
            w = client_state.tensors.get(WEIGHT_PREFIX + n)
            if loc is not None and w is not None:
                g = global_params[n]
                out[n] = (loc.to(g) + (g - loc.to(g)) * w.to(g)).to(g.dtype)
        return out

    def client_reply(self, ctx: ClientContext) -> Payload:
        names = self.ala_names(self.shared_names())
        for n in names:
            ctx.state.tensors[LOCAL_PREFIX + n] = ctx.params[n].detach().to("cpu").clone()
        return super().client_reply(ctx)


def batch_len(batch: object) -> int:
    """Number of examples in a batch (``input_ids`` rows, a tensor's first dim, or ``len``)."""
    ids = getattr(batch, "input_ids", None)
    if isinstance(ids, torch.Tensor):
        return int(ids.shape[0])
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    return len(batch)  # type: ignore[arg-type]


def sample_batches(ctx: ClientContext, percent: float) -> list[object]:
    """The first batches of a fresh seeded shuffle of the local data until ``percent``% of the examples are
    covered (at least one batch). ``ctx.batches`` draws its permutation from ``ctx.generator``."""
    assert ctx.batches is not None
    target = max(1, math.ceil(ctx.num_examples * percent / 100.0))
    out: list[object] = []
    seen = 0
    for batch in ctx.batches(ctx.num_examples):  # at most one pass is ever needed
        out.append(batch)
        seen += batch_len(batch)
        if seen >= target:
            break
    if not out:
        raise StrategyError(f"client {ctx.cid}: ctx.batches yielded no batch")
    return out


def _std(xs: list[float]) -> float:
    """Population standard deviation (``numpy.std``'s default)."""
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))
