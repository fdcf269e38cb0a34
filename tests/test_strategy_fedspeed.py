"""FedSpeed: two clients, two rounds by hand (extra ascent step, quasi-gradient, prox term and its correction,
x̂ = x_K − λ ĝ); the ascent gradient comes from the client's data hooks; it runs, persists ĝ and resumes."""

from __future__ import annotations

import pytest
import torch

from fednl.client.state import ClientState
from fednl.strategies.base import ClientReply, Payload, StrategyError
from fednl.strategies.fedspeed import GHAT, FedSpeed
from test_resume import assert_same_run
from test_strategy_harness import hand_ctx
from toy_sim import final, same_globals, toy_sim

pytestmark = pytest.mark.usefixtures("one_thread")

GROUPS = {"frozen": set(), "lora": {"p"}}
TARGET = {"A": 2.0, "B": -2.0}  # f_i(p) = (p - t_i)^2 / 2
OPTS = FedSpeed.Options(lam=2.0, rho=0.5, alpha=0.5)


def local_round(strat: FedSpeed, cid: str, x: float, state: ClientState) -> tuple[float, list[float]]:
    """K = 2 SGD steps (η = 0.5) through the hooks; the loss hook evaluates f_i at the live parameter."""
    ctx = hand_ctx({"p": torch.zeros(1)}, cid=cid, groups=GROUPS, state=state,
                   forward_loss=lambda batch: (0.5 * (ctx.params["p"] - TARGET[cid]) ** 2).sum(),
                   batches=lambda n: iter([None] * min(n, 100)))
    strat.client_receive(ctx, Payload({"p": torch.tensor([x])}))
    p, stepped = ctx.params["p"], []
    for _ in range(2):
        ctx.forward_loss(None).backward()
        strat.client_after_backward(ctx)
        stepped.append(float(p.grad))
        with torch.no_grad():
            p -= 0.5 * p.grad
        p.grad = None
    return float(strat.client_reply(ctx).tensors["p"]), stepped


def test_two_clients_two_rounds_by_hand() -> None:
    strat, states = FedSpeed(OPTS, groups=GROUPS), {c: ClientState(c) for c in "AB"}
    # round 1, A (x = 0, ĝ = 0): step 0: g1 = -2, x̆ = 0 + 0.5 * -2 = -1, g2 = -3, quasi = -2.5, prox 0 -> p = 1.25
    #   step 1: g1 = -0.75, x̆ = 0.875, g2 = -1.125, quasi = -0.9375, prox (1/λ)(1.25 - 0) = 0.625 -> -0.3125,
    #   p = 1.40625; ĝ = 0 - (1.40625 - 0) / 2 = -0.703125; x̂ = 1.40625 - 2 ĝ = 2.8125. B mirrors A.
    xa, ga = local_round(strat, "A", 0.0, states["A"])
    xb, gb = local_round(strat, "B", 0.0, states["B"])
    assert ga == [-2.5, -0.3125] and gb == [2.5, 0.3125] and (xa, xb) == (2.8125, -2.8125)
    assert states["A"].tensors[GHAT + "p"].tolist() == [-0.703125]
    x = strat.aggregate_train(1, [ClientReply("A", Payload({"p": torch.tensor([xa])}), 1),
                                  ClientReply("B", Payload({"p": torch.tensor([xb])}), 3)], {"p": torch.zeros(1)})
    assert x["p"].tolist() == [-1.40625]  # 1/4 * 2.8125 + 3/4 * -2.8125
    # round 2, A (x = -1.40625, ĝ = -0.703125): step 0: g1 = -3.40625, x̆ = -3.109375, g2 = -5.109375,
    #   quasi = -4.2578125, - ĝ = +0.703125 -> -3.5546875, p = 0.37109375; step 1: g1 = -1.62890625,
    #   g2 = -2.443359375, quasi = -2.0361328125, + 0.703125 + (0.37109375 + 1.40625) / 2 -> -0.4443359375,
    #   p = 0.59326171875; ĝ = -0.703125 - (0.59326171875 + 1.40625) / 2 = -1.702880859375;
    #   x̂ = 0.59326171875 + 2 * 1.702880859375 = 3.9990234375
    xa, ga = local_round(strat, "A", -1.40625, states["A"])
    xb, gb = local_round(strat, "B", -1.40625, states["B"])
    assert ga == [-3.5546875, -0.4443359375] and xa == 3.9990234375
    assert gb == [0.0390625, 0.0048828125] and xb == -2.8564453125
    x = strat.aggregate_train(2, [ClientReply("A", Payload({"p": torch.tensor([xa])}), 1),
                                  ClientReply("B", Payload({"p": torch.tensor([xb])}), 3)], x)
    assert x["p"].tolist() == [-1.142578125]


def test_no_extra_gradient_without_rho_and_clear_errors() -> None:
    strat = FedSpeed(FedSpeed.Options(lam=2.0, rho=0.0), groups=GROUPS)
    ctx = hand_ctx({"p": torch.zeros(1)}, groups=GROUPS)
    strat.client_receive(ctx, Payload({"p": torch.tensor([1.0])}))
    with torch.no_grad():
        ctx.params["p"].fill_(3.0)
    ctx.params["p"].grad = torch.tensor([0.5], dtype=torch.float64)
    strat.client_after_backward(ctx)  # no data hooks needed: 0.5 + (3 - 1) / 2
    assert ctx.params["p"].grad.tolist() == [1.5]
    with pytest.raises(StrategyError, match="data hooks"):
        strat = FedSpeed(OPTS, groups=GROUPS)
        strat.client_receive(ctx, Payload({"p": torch.tensor([1.0])}))
        strat.client_after_backward(ctx)
    with pytest.raises(StrategyError, match="before client_receive"):
        FedSpeed(groups=GROUPS).client_reply(hand_ctx({"p": torch.zeros(1)}, groups=GROUPS))


def test_runs_through_the_simulator_and_resumes(tmp_path) -> None:
    toy_sim(tmp_path / "avg", "fedavg", rounds=3, optimizer="sgd").run()
    toy_sim(tmp_path / "straight", "fedspeed", rounds=3, optimizer="sgd").run()
    assert not same_globals(tmp_path / "avg", tmp_path / "straight")
    st = final(tmp_path / "straight")
    assert all(GHAT + "rule_k" in c.tensors for c in st.clients.values())
    toy_sim(tmp_path / "broken", "fedspeed", rounds=3, optimizer="sgd").run(stop_after=2)
    toy_sim(tmp_path / "broken", "fedspeed", rounds=3, optimizer="sgd").run(resume=True)
    assert_same_run(tmp_path / "straight", tmp_path / "broken")
