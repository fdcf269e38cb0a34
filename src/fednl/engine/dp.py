"""Client-level differential privacy for the aggregated parameters (DP-FedAvg with server-side fixed clipping).

Each round, for the ``m`` clients sampled (a number fixed by the config, public, independent of the data):

1. every accepted update ``Δ_k = reply_k − reference`` is clipped to ``||Δ_k||₂ ≤ C`` (``clip_norm``);
2. the clipped updates are **summed**, with equal weight (``num_examples`` is ignored: a weighted sum would give
   a client more than ``C`` of influence), and Gaussian noise ``N(0, (z·C)² I)`` is added to the sum
   (``z = noise_multiplier``): one Gaussian mechanism of L2 sensitivity ``C`` under adding or removing one
   client;
3. the noisy sum is divided by ``m`` — the *sampled* count, not the number that answered (McMahan et al. 2018's
   fixed-denominator estimator; a dropped or rejected client then counts as a zero update), so the noise on the
   mean has standard deviation ``z·C/m`` (Flower's ``compute_stdv``) and the new mean is
   ``reference + (Σ_k clip(Δ_k) + N(0, (zC)²)) / m``.

The noise is drawn from a ``torch.Generator`` the engine seeds per round (``derive_seed(seed, "dp", round)``), in
float64 and name order, so a run and its resume add the same noise. What the server releases each round is a
function of that noisy mean only for strategies whose ``Strategy.private_mean`` holds (server optimisers and
MT-DAO's outer momentum run on the noisy mean: post-processing).

**Accountant.** Flower's RDP accountant (``flwr.serverapp.RdpAccountant``, on Google's ``dp-accounting``) composes
one ``GaussianPrivacyEvent(z, m, N)`` per round, with the add-or-remove-one relation and *no* amplification by
sampling: the simulator samples a fixed-size subset, not Poisson, so the subsampling bound of either relation
does not apply as stated — the ε reported is that of ``T`` full-participation Gaussian releases, an upper bound
for any sampling. ``ε(δ)`` after every round comes from :meth:`ClientDP.spent`; with ``max_epsilon`` set, the
engine stops before the round whose release would pass it (:meth:`ClientDP.would_exceed`). The server sees each
raw update (central DP with a trusted server: no secure aggregation, see ``docs/FLOWER.md``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fednl.engine.robust import MeanFn, clip_replies
from fednl.strategies.base import ClientReply, Params, StrategyError

INFO_KEY = "dp"


class DPConfig(BaseModel):
    """``[dp]``: clip norm ``C``, noise multiplier ``z``, the δ ε is reported at, and an optional ε budget."""

    model_config = ConfigDict(extra="forbid")

    clip_norm: float = Field(gt=0)
    noise_multiplier: float = Field(gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    max_epsilon: float | None = Field(None, gt=0)  # stop before the round that would spend more

    @model_validator(mode="after")
    def _finite(self) -> DPConfig:
        for key in ("clip_norm", "noise_multiplier", "max_epsilon"):
            v = getattr(self, key)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"{key} must be a finite number")
        return self


def noise_std(cfg: DPConfig, m: int) -> float:
    """Standard deviation of the noise on the mean of ``m`` sampled clients: ``z·C/m`` (Flower's
    ``compute_stdv``)."""
    from flwr.supercore.differential_privacy import compute_stdv

    return float(compute_stdv(float(cfg.noise_multiplier), float(cfg.clip_norm), int(m)))


def dp_mean(cfg: DPConfig, reference: Params, m: int, generator: torch.Generator) -> MeanFn:
    """The noisy mean that replaces :meth:`Strategy.mean` for one round: ``reference + (Σ Δ_k + noise) / m`` on
    the (already clipped) tensor sets, weights ignored. It may run once per round (one release)."""
    if m < 1:
        raise StrategyError(f"DP: the sampled count must be >= 1, got {m}")
    released = False
    sum_std = float(cfg.noise_multiplier) * float(cfg.clip_norm)

    def mean(tensor_sets: list[Params], weights: list[float]) -> Params:
        nonlocal released
        del weights
        if released:
            raise StrategyError("DP: the strategy averaged twice in one round; each average is a release the "
                                "accountant does not count")
        released = True
        if len(tensor_sets) > m:
            raise StrategyError(f"DP: {len(tensor_sets)} updates for {m} sampled clients")
        out: Params = {}
        for n in sorted(reference):
            ref = reference[n].detach().to("cpu", torch.float64)
            acc = torch.zeros_like(ref)
            for ts in tensor_sets:
                acc += ts[n].detach().to("cpu", torch.float64) - ref
            acc += torch.randn(ref.shape, generator=generator, dtype=torch.float64) * sum_std
            out[n] = (ref + acc / m).to(reference[n].dtype)
        missing = set(tensor_sets[0]) - set(out) if tensor_sets else set()
        if missing:
            raise StrategyError(f"DP: averaged tensors without a reference: {sorted(missing)[:3]}")
        return out

    return mean


class ClientDP:
    """Clipping, the noisy mean and Flower's RDP accountant for a federation of ``n_clients``."""

    def __init__(self, cfg: DPConfig, n_clients: int):
        if n_clients < 1:
            raise ValueError(f"DP needs at least one client, got {n_clients}")
        self.cfg, self.n_clients = cfg, int(n_clients)
        self.accountant = _new_accountant(cfg, self.n_clients)

    # ------------------------------------------------------------------ mechanism
    def clip(self, replies: list[ClientReply], reference: Params, *,
             received: Mapping[str, Mapping[str, torch.Tensor]] | None = None
             ) -> tuple[list[ClientReply], dict[str, float]]:
        """Every update clipped to ``clip_norm``; ``{cid: norm before}`` of the clipped ones."""
        return clip_replies(replies, reference, float(self.cfg.clip_norm), received=received)

    def mean(self, reference: Params, m: int, generator: torch.Generator) -> MeanFn:
        return dp_mean(self.cfg, reference, m, generator)

    # ------------------------------------------------------------------ accounting
    def _event(self, m: int) -> Any:
        from flwr.serverapp import GaussianPrivacyEvent

        return GaussianPrivacyEvent(noise_multiplier=float(self.cfg.noise_multiplier), sample_size=int(m),
                                    population_size=self.n_clients)

    def would_exceed(self, m: int) -> bool:
        """Whether one more release (``m`` sampled clients) would take ε past ``max_epsilon`` (False without one)."""
        if self.cfg.max_epsilon is None:
            return False
        return bool(self.accountant.would_exceed(self._event(m), float(self.cfg.max_epsilon)))

    def record(self, m: int) -> None:
        """Compose the round's release."""
        self.accountant.compose(self._event(m))

    def spent(self) -> dict[str, Any]:
        """``{"epsilon", "delta", "releases", "noise_multiplier", "clip_norm"}`` after the releases so far."""
        releases = int(self.accountant.num_releases)
        eps = float(self.accountant.get_privacy_spent(float(self.cfg.delta)).epsilon) if releases else 0.0
        return {"epsilon": eps, "delta": float(self.cfg.delta), "releases": releases,
                "noise_multiplier": float(self.cfg.noise_multiplier), "clip_norm": float(self.cfg.clip_norm)}

    def state(self) -> dict[str, Any]:
        """JSON-able accountant state (checkpointed with the run)."""
        return self.accountant.state_dict()

    def load_state(self, state: Mapping[str, Any] | None) -> None:
        """Restore :meth:`state` (``None``: nothing spent yet); the config must be the same."""
        self.accountant = _new_accountant(self.cfg, self.n_clients)
        if state:
            try:
                self.accountant.load_state_dict(dict(state))
            except ValueError as exc:
                raise ValueError(f"cannot restore the DP accountant from the checkpoint: {exc}") from None


def _new_accountant(cfg: DPConfig, n_clients: int) -> Any:
    try:
        from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
    except ImportError as exc:
        raise ImportError("client-level DP uses Flower's RDP accountant: install the flower extra "
                          f"(pip install 'fednl[flower]', which brings flwr[dp]): {exc}") from None
    config = PrivacyConfig(target_delta=float(cfg.delta), population_size=int(n_clients),
                           neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                           sampling_method=SamplingMethod.NO_AMPLIFICATION)  # the budget is passed per check, so a
    # resume may change max_epsilon (Flower's load_state_dict wants the same PrivacyConfig)
    try:
        return RdpAccountant(config)
    except ImportError as exc:
        raise ImportError(f"client-level DP needs Google's dp-accounting (pip install 'flwr[dp]'): {exc}") from None
