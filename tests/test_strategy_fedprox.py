"""FedProx: the proximal term and its gradient by hand, FedAvg aggregation, and FedProx(μ=0) ≡ FedAvg."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from fednl.strategies.base import ClientReply, Payload, StrategyError
from fednl.strategies.fedprox import ANCHOR_KEY, FedProx, proximal_term
from test_strategy_harness import build_for, final_state, hand_ctx, run_sim

GROUPS = {"frozen": set(), "lora": {"a", "b"}}


def test_proximal_loss_and_gradient_by_hand() -> None:
    # Prepare: θ_a = [1, 2], θ_b = [[3]]; received global a = [0, 1], b = [[1]]; μ = 0.5
    strat = FedProx(FedProx.Options(mu=0.5), groups=GROUPS)
    ctx = hand_ctx({"a": torch.zeros(2), "b": torch.zeros(1, 1)}, groups=GROUPS)
    strat.client_receive(ctx, Payload({"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([[1.0]])}))
    with torch.no_grad():
        ctx.params["a"].copy_(torch.tensor([1.0, 2.0]))
        ctx.params["b"].copy_(torch.tensor([[3.0]]))
    # Execute
    loss = strat.client_loss(ctx, torch.tensor(0.25, dtype=torch.float64))
    loss.backward()
    # Assert: ||θ − g||² = 1 + 1 + 4 = 6 → 0.25 + 0.5/2 · 6 = 1.75; ∇ = μ (θ − g) = [0.5, 0.5], [[1.0]]
    assert loss.item() == pytest.approx(1.75)
    assert torch.allclose(ctx.params["a"].grad, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.allclose(ctx.params["b"].grad, torch.tensor([[1.0]], dtype=torch.float64))


def test_receive_installs_global_and_keeps_a_detached_copy() -> None:
    strat = FedProx(groups=GROUPS)
    ctx = hand_ctx({"a": torch.zeros(2), "b": torch.zeros(1, 1)}, groups=GROUPS)
    strat.client_receive(ctx, Payload({"a": torch.tensor([4.0, 5.0]), "b": torch.tensor([[6.0]])}))
    assert torch.equal(ctx.params["a"].detach(), torch.tensor([4.0, 5.0], dtype=torch.float64))
    anchor = ctx.scratch[ANCHOR_KEY]
    with torch.no_grad():
        ctx.params["a"].add_(1.0)  # training moves θ, never the anchor
    assert torch.equal(anchor["a"], torch.tensor([4.0, 5.0], dtype=torch.float64))
    assert not anchor["a"].requires_grad


def test_proximal_term_rejects_unknown_names_and_empty_anchor() -> None:
    with pytest.raises(StrategyError, match="not a live parameter"):
        proximal_term({"a": torch.zeros(1)}, {"zz": torch.zeros(1)})
    with pytest.raises(StrategyError, match="empty"):
        proximal_term({"a": torch.zeros(1)}, {})


def test_loss_before_receive_is_an_error_and_mu_is_validated() -> None:
    strat = FedProx(groups=GROUPS)
    ctx = hand_ctx({"a": torch.zeros(2), "b": torch.zeros(1, 1)}, groups=GROUPS)
    with pytest.raises(StrategyError, match="before client_receive"):
        strat.client_loss(ctx, torch.tensor(0.0))
    with pytest.raises(ValidationError):
        FedProx.Options(mu=-0.1)


def test_server_aggregation_is_fedavg_by_hand() -> None:
    # Prepare: N = 1 and 3 → weights 1/4, 3/4
    strat = FedProx(groups=GROUPS)
    glob = {"a": torch.zeros(2), "b": torch.zeros(1, 1)}
    replies = [
        ClientReply("c0", Payload({"a": torch.tensor([4.0, 0.0]), "b": torch.tensor([[8.0]])}), 1),
        ClientReply("c1", Payload({"a": torch.tensor([0.0, 4.0]), "b": torch.tensor([[0.0]])}), 3),
    ]
    # Execute
    new = strat.aggregate_train(1, replies, glob)
    # Assert
    assert torch.allclose(new["a"], torch.tensor([1.0, 3.0])) and torch.allclose(new["b"], torch.tensor([[2.0]]))
    bad = [ClientReply("c0", Payload({"a": torch.tensor([float("nan"), 0.0]), "b": torch.zeros(1, 1)}), 1)]
    with pytest.raises(StrategyError, match="NaN"):
        strat.aggregate_train(1, bad, glob)


def test_fedprox_mu0_is_fedavg_bit_for_bit(tmp_path) -> None:
    # Prepare: the same tiny model, seed and data under FedAvg and FedProx(μ=0)
    m_avg, s_avg = build_for("fedavg")
    m_prox, s_prox = build_for("fedprox", FedProx.Options(mu=0.0))
    # Execute: 2 rounds each through the simulator
    run_sim(m_avg, s_avg, tmp_path / "avg")
    run_sim(m_prox, s_prox, tmp_path / "prox")
    # Assert: identical global parameters and ledgers
    a, p = final_state(tmp_path / "avg"), final_state(tmp_path / "prox")
    assert a.global_params.keys() == p.global_params.keys()
    assert all(torch.equal(a.global_params[n], p.global_params[n]) for n in a.global_params)
    assert a.ledger.total() == p.ledger.total()


def test_fedprox_mu_pulls_clients_toward_the_global_model(tmp_path) -> None:
    # A large μ keeps every client's update (and so the aggregate) closer to the previous global model.
    m0, s0 = build_for("fedprox", FedProx.Options(mu=0.0))
    m1, s1 = build_for("fedprox", FedProx.Options(mu=10.0))
    init = {n: p.detach().clone() for n, p in m0.named_parameters() if n.endswith("lora_B")}
    run_sim(m0, s0, tmp_path / "m0", rounds=1, optimizer="sgd", lr=0.05)
    run_sim(m1, s1, tmp_path / "m1", rounds=1, optimizer="sgd", lr=0.05)
    g0, g1 = final_state(tmp_path / "m0").global_params, final_state(tmp_path / "m1").global_params
    d0 = sum(float((g0[n] - init[n]).norm()) for n in init)
    d1 = sum(float((g1[n] - init[n]).norm()) for n in init)
    assert 0 < d1 < d0
