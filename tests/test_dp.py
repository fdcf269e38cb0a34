"""Client-level DP: clipping and the noise scale against hand computations, seeded noise, and Flower's RDP
accountant against the RDP-to-(ε, δ) conversion computed here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from fednl.engine.dp import ClientDP, DPConfig, dp_mean, noise_std
from fednl.strategies.base import ClientReply, Payload, StrategyError
from fednl.strategies.fedavg import FedAvg


def rep(cid: str, x: list[float], n: int = 1) -> ClientReply:
    return ClientReply(cid, Payload({"x": torch.tensor(x)}), n)


def test_noise_std_is_z_c_over_m() -> None:
    assert noise_std(DPConfig(clip_norm=0.5, noise_multiplier=1.1), 4) == pytest.approx(0.1375, abs=1e-15)
    assert noise_std(DPConfig(clip_norm=2.0, noise_multiplier=0.5), 1) == 1.0


def test_clipping_and_the_mean_by_hand_with_zero_noise_weight() -> None:
    """Clip to C = 1: update (3, 4) -> (0.6, 0.8); update (0.3, 0.4) stays. The mean divides by m = 4 sampled
    clients although two answered; num_examples is ignored. The noise is the only other term: subtract it by
    replaying the generator."""
    cfg = DPConfig(clip_norm=1.0, noise_multiplier=2.0)
    dp = ClientDP(cfg, n_clients=10)
    ref = {"x": torch.tensor([1.0, 1.0], dtype=torch.float64)}
    replies = [ClientReply("a", Payload({"x": torch.tensor([4.0, 5.0], dtype=torch.float64)}), 1),
               ClientReply("b", Payload({"x": torch.tensor([1.3, 1.4], dtype=torch.float64)}), 1000)]
    clipped, norms = dp.clip(replies, ref)
    assert norms == {"a": 5.0}
    assert torch.allclose(clipped[0].payload.tensors["x"], torch.tensor([1.6, 1.8], dtype=torch.float64))
    assert clipped[1] is replies[1]
    out = dp.mean(ref, 4, torch.Generator().manual_seed(7))([r.payload.tensors for r in clipped], [1, 1000])
    noise = torch.randn(2, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * (2.0 * 1.0)
    want = torch.tensor([1.0, 1.0], dtype=torch.float64) + (torch.tensor([0.6 + 0.3, 0.8 + 0.4],
                                                                         dtype=torch.float64) + noise) / 4
    assert torch.allclose(out["x"], want, rtol=0, atol=1e-12)


def test_noise_std_over_many_draws() -> None:
    """One release on a 200,000-coordinate tensor: the empirical std of (noisy mean − clean mean) is z·C/m."""
    cfg = DPConfig(clip_norm=0.5, noise_multiplier=1.2)
    ref = {"x": torch.zeros(200_000)}
    ups = [{"x": torch.full((200_000,), 1e-6)} for _ in range(3)]
    out = dp_mean(cfg, ref, 5, torch.Generator().manual_seed(0))(ups, [1, 1, 1])
    err = out["x"].double() - 3e-6 / 5
    want = 1.2 * 0.5 / 5  # 0.12
    assert float(err.std()) == pytest.approx(want, rel=0.01)  # sampling error of the std: ~0.16 %
    assert abs(float(err.mean())) < 5 * want / math.sqrt(200_000)


def test_noise_is_seeded_and_released_once() -> None:
    cfg = DPConfig(clip_norm=1.0, noise_multiplier=1.0)
    ref = {"x": torch.zeros(8), "y": torch.zeros(2, 2)}
    ups = [{"x": torch.ones(8) * 0.1, "y": torch.ones(2, 2) * 0.1}]
    a = dp_mean(cfg, ref, 2, torch.Generator().manual_seed(3))(ups, [1])
    b = dp_mean(cfg, ref, 2, torch.Generator().manual_seed(3))(ups, [1])
    c = dp_mean(cfg, ref, 2, torch.Generator().manual_seed(4))(ups, [1])
    assert all(torch.equal(a[n], b[n]) for n in ref) and not torch.equal(a["x"], c["x"])
    fn = dp_mean(cfg, ref, 2, torch.Generator().manual_seed(3))
    fn(ups, [1])
    with pytest.raises(StrategyError, match="twice"):
        fn(ups, [1])
    with pytest.raises(StrategyError, match="3 updates for 2"):
        dp_mean(cfg, ref, 2, torch.Generator())(ups * 3, [1, 1, 1])


def test_dp_mean_through_a_strategy() -> None:
    """FedAvg's aggregate under the DP mean equals the hand formula (weights ignored)."""
    s = FedAvg(groups={"frozen": set(), "lora": {"x"}})
    ref = {"x": torch.tensor([0.5, -0.5])}
    cfg = DPConfig(clip_norm=10.0, noise_multiplier=0.5)
    with s.averaging(dp_mean(cfg, ref, 2, torch.Generator().manual_seed(11))):
        got = s.aggregate_train(1, [rep("a", [1.5, -0.5], n=1), rep("b", [0.5, 0.5], n=9)], ref)["x"]
    noise = torch.randn(2, generator=torch.Generator().manual_seed(11), dtype=torch.float64) * 5.0
    want = (torch.tensor([0.5, -0.5], dtype=torch.float64) + (torch.tensor([1.0, 1.0], dtype=torch.float64)
                                                              + noise) / 2).float()
    assert torch.equal(got, want)


def _eps_by_hand(z: float, releases: int, delta: float, orders: tuple[float, ...]) -> float:
    """RDP of ``releases`` Gaussian mechanisms with noise multiplier z: ε_α = releases · α / (2 z²); to (ε, δ) by
    ε = min_α ε_α + log((α − 1)/α) − (log δ + log α)/(α − 1) (Balle et al. 2020, Canonne et al. 2020)."""
    a = np.asarray(orders, dtype=np.float64)
    eps = releases * a / (2 * z * z) + np.log((a - 1) / a) - (math.log(delta) + np.log(a)) / (a - 1)
    return float(max(0.0, eps.min()))


@pytest.mark.parametrize(("z", "rounds"), [(1.0, 1), (1.0, 10), (0.5, 20), (2.0, 100)])
def test_accountant_epsilon_matches_the_rdp_conversion(z: float, rounds: int) -> None:
    dp = ClientDP(DPConfig(clip_norm=1.0, noise_multiplier=z, delta=1e-5), n_clients=7)
    for _ in range(rounds):
        dp.record(7)
    got = dp.spent()
    assert got["releases"] == rounds and got["delta"] == 1e-5
    assert got["epsilon"] == pytest.approx(_eps_by_hand(z, rounds, 1e-5, dp.accountant._orders), rel=1e-9)
    # and within 0.1 % of the minimum over a fine continuous grid of orders (the accountant's orders are discrete)
    fine = tuple(np.linspace(1.001, 2000.0, 400_000))
    assert got["epsilon"] == pytest.approx(_eps_by_hand(z, rounds, 1e-5, fine), rel=1e-3)


def test_known_value_one_gaussian_release() -> None:
    """z = 1, one release, δ = 1e-5: ε ≈ 4.7285 (the conversion minimised over α by hand: α* ≈ 5.43); the classic
    conversion ε = min_α α/2 + log(1/δ)/(α − 1) gives 5.2985, an upper bound."""
    dp = ClientDP(DPConfig(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5), n_clients=3)
    assert dp.spent()["epsilon"] == 0.0 and dp.spent()["releases"] == 0
    dp.record(3)
    eps = dp.spent()["epsilon"]
    assert eps == pytest.approx(4.7285, abs=2e-4)
    assert eps < 0.5 + math.sqrt(2 * math.log(1e5)) < 5.2986  # classic bound at its optimum α = 1 + sqrt(2 log 1/δ)


def test_budget_stop_and_state_round_trip() -> None:
    cfg = DPConfig(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5)
    probe = ClientDP(cfg, 5)
    for _ in range(3):
        probe.record(5)
    eps3 = probe.spent()["epsilon"]
    dp = ClientDP(DPConfig(**{**cfg.model_dump(), "max_epsilon": eps3 + 1e-9}), 5)
    for _ in range(3):
        assert not dp.would_exceed(5)
        dp.record(5)
    assert dp.would_exceed(5)  # a fourth release would pass the budget
    assert not ClientDP(cfg, 5).would_exceed(5)  # no budget, no stop
    # resume: the state restores ε; a resume may change max_epsilon
    again = ClientDP(DPConfig(**{**cfg.model_dump(), "max_epsilon": 100.0}), 5)
    again.load_state(dp.state())
    assert again.spent() == {**dp.spent()} and not again.would_exceed(5)
    with pytest.raises(ValueError, match="accountant"):
        ClientDP(DPConfig(clip_norm=1.0, noise_multiplier=1.0, delta=1e-6), 5).load_state(dp.state())


def test_dp_config_validation() -> None:
    for bad in ({"clip_norm": 1.0}, {"noise_multiplier": 1.0}, {"clip_norm": 0, "noise_multiplier": 1},
                {"clip_norm": 1, "noise_multiplier": 0}, {"clip_norm": 1, "noise_multiplier": 1, "delta": 1},
                {"clip_norm": float("inf"), "noise_multiplier": 1}, {"clip_norm": 1, "noise_multiplier": 1, "eps": 1}):
        with pytest.raises(ValidationError):
            DPConfig.model_validate(bad)
