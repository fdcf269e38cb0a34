"""FedSSI: the PSM path integral, SI importance and penalty by hand; task periods; c = 0 ≡ FedAvg."""

from __future__ import annotations

import pytest
import torch

from fednl.client.state import ClientState
from fednl.strategies.base import Payload, StrategyError
from fednl.strategies.fedssi import (
    ANCHOR_PREFIX,
    OMEGA_PREFIX,
    TASK_KEY,
    FedSSI,
    psm_path_integral,
    si_importance,
    si_penalty,
)
from test_strategy_harness import build_for, final_state, hand_ctx, run_sim

GROUPS = {"frozen": set(), "lora": {"w"}}
T = torch.tensor([1.0, -2.0], dtype=torch.float64)  # the local optimum of L(v) = ½||v − t||²


def test_psm_path_integral_and_importance_by_hand() -> None:
    # Prepare: v0 = w = [0, 0], lr 0.5, q(λ=0.5) = 1, two steps of Δ = −lr (g + q (v − w)), g = v − t
    start = {"w": torch.zeros(2, dtype=torch.float64)}
    # Execute
    omega, end = psm_path_integral(start, lambda v: {"w": v["w"] - T}, steps=2, lr=0.5, q=1.0)
    imp = si_importance(omega, start, end, xi=0.25)
    # Assert (element 0): g = −1, Δ = 0.5, ω = 0.5, v = 0.5; then g = −0.5, Δ = −0.5(−0.5 + 0.5) = 0
    #        (element 1): g = 2,  Δ = −1,  ω = 2,   v = −1;  then g = 1,    Δ = −0.5(1 − 1) = 0
    assert torch.allclose(omega["w"], torch.tensor([0.5, 2.0], dtype=torch.float64))
    assert torch.allclose(end["w"], torch.tensor([0.5, -1.0], dtype=torch.float64))
    # Ω = ω / (Δ² + ξ) = 0.5 / (0.25 + 0.25) = 1;  2 / (1 + 0.25) = 1.6
    assert torch.allclose(imp["w"], torch.tensor([1.0, 1.6], dtype=torch.float64))


def test_negative_path_integral_is_clipped() -> None:
    imp = si_importance({"w": torch.tensor([-3.0, 2.0])}, {"w": torch.zeros(2)}, {"w": torch.ones(2)}, xi=1.0)
    assert torch.allclose(imp["w"], torch.tensor([0.0, 1.0]))


def test_si_penalty_and_gradient_by_hand() -> None:
    theta = {"w": torch.tensor([1.0, 1.0], requires_grad=True)}
    pen = si_penalty(theta, {"w": torch.tensor([1.0, 1.6])}, {"w": torch.zeros(2)})
    pen.backward()
    assert pen.item() == pytest.approx(2.6)  # 1·1² + 1.6·1²
    assert torch.allclose(theta["w"].grad, torch.tensor([2.0, 3.2]))  # 2 Ω (θ − w̃)


def make_ctx(rnd: int, state: ClientState):
    holder = {}

    def forward_loss(batch) -> torch.Tensor:
        return 0.5 * (holder["ctx"].params["w"] - T).pow(2).sum()

    def batches(n):
        yield from range(n)

    ctx = hand_ctx({"w": torch.zeros(2)}, rnd=rnd, groups=GROUPS, state=state, forward_loss=forward_loss,
                   batches=batches)
    holder["ctx"] = ctx
    return ctx


def test_client_flow_by_hand() -> None:
    # Prepare: the global model w = [0, 0]; PSM as in the hand test above (λ = 0.5, lr 0.5, 2 steps, ξ = 0.25)
    opts = FedSSI.Options(si_c=2.0, lam=0.5, psm_steps=2, psm_lr=0.5, xi=0.25, task_rounds=2)
    strat = FedSSI(opts, groups=GROUPS)
    st = ClientState("c0")
    ctx = make_ctx(1, st)
    # Execute
    strat.client_receive(ctx, Payload({"w": torch.zeros(2)}))
    # Assert: importance and anchor stored; training starts from the global model again
    assert torch.allclose(st.tensors[OMEGA_PREFIX + "w"], torch.tensor([1.0, 1.6], dtype=torch.float64))
    assert torch.equal(st.tensors[ANCHOR_PREFIX + "w"], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(ctx.params["w"].detach(), torch.zeros(2, dtype=torch.float64)) and st.info[TASK_KEY] == 0
    with torch.no_grad():
        ctx.params["w"].copy_(torch.tensor([1.0, 1.0]))
    loss = strat.client_loss(ctx, torch.tensor(0.0, dtype=torch.float64))
    assert loss.item() == pytest.approx(2.0 * 2.6)  # c Σ Ω (θ − w̃)²

    # Round 2 is in the same task period (task_rounds = 2): nothing recomputed, the anchor stays at round 1's
    ctx2 = make_ctx(2, st)
    strat.client_receive(ctx2, Payload({"w": torch.tensor([9.0, 9.0])}))
    assert torch.allclose(st.tensors[OMEGA_PREFIX + "w"], torch.tensor([1.0, 1.6], dtype=torch.float64))
    assert torch.equal(st.tensors[ANCHOR_PREFIX + "w"], torch.zeros(2, dtype=torch.float64))

    # Round 3 opens period 1: a new PSM from w = [0, 0] adds the same importance (SI accumulates)
    ctx3 = make_ctx(3, st)
    strat.client_receive(ctx3, Payload({"w": torch.zeros(2)}))
    assert torch.allclose(st.tensors[OMEGA_PREFIX + "w"], torch.tensor([2.0, 3.2], dtype=torch.float64))
    assert st.info[TASK_KEY] == 1


def test_loss_before_receive_and_missing_hooks_are_errors() -> None:
    strat = FedSSI(groups=GROUPS)
    ctx = hand_ctx({"w": torch.zeros(2)}, groups=GROUPS)
    with pytest.raises(StrategyError, match="before client_receive"):
        strat.client_loss(ctx, torch.tensor(0.0))
    with pytest.raises(StrategyError, match="forward_loss"):
        strat.client_receive(ctx, Payload({"w": torch.zeros(2)}))


def test_c0_is_fedavg_bit_for_bit(tmp_path) -> None:
    m_avg, s_avg = build_for("fedavg")
    m_ssi, s_ssi = build_for("fedssi", FedSSI.Options(si_c=0.0))
    run_sim(m_avg, s_avg, tmp_path / "avg")
    run_sim(m_ssi, s_ssi, tmp_path / "ssi")
    a, s = final_state(tmp_path / "avg"), final_state(tmp_path / "ssi")
    assert all(torch.equal(a.global_params[n], s.global_params[n]) for n in a.global_params)


def test_runs_through_the_simulator(tmp_path) -> None:
    model, strat = build_for("fedssi", FedSSI.Options(psm_steps=2, task_rounds=1))
    run_sim(model, strat, tmp_path, rounds=2)
    st = final_state(tmp_path)
    for cid, cs in st.clients.items():
        omegas = {k: t for k, t in cs.tensors.items() if k.startswith(OMEGA_PREFIX)}
        assert set(k[len(OMEGA_PREFIX):] for k in omegas) == strat.shared_names()
        assert all(bool((t >= 0).all()) for t in omegas.values())
        assert cs.info[TASK_KEY] == 1  # rounds 1, 2 → periods 0, 1
