"""SCAFFOLD: two clients, two rounds by hand (option II, server control update); frozen controls ≡ FedAvg bit for
bit through the simulator; control variates in client/server state and resumed bit-identically."""

from __future__ import annotations

import random

import pytest
import torch

from fednl.client.state import ClientState
from fednl.strategies.base import ClientReply, Payload, StrategyError
from fednl.strategies.scaffold import C_DOWN, C_I, DC_UP, Scaffold
from test_resume import assert_same_run
from test_strategy_harness import hand_ctx
from toy_sim import final, same_globals, toy_sim

pytestmark = pytest.mark.usefixtures("one_thread")

GROUPS = {"frozen": set(), "lora": {"p"}}
TARGET = {"A": 2.0, "B": -1.0}  # f_i(p) = (p - t_i)^2 / 2, gradient p - t_i
N_K = {"A": 1, "B": 3}


def local_round(strat: Scaffold, cid: str, payload: Payload, state) -> tuple[Payload, list[float]]:
    """K = 2 plain SGD steps (η = 0.5) through the hooks, as the trainer runs them; returns the reply and the
    corrected gradients the optimiser stepped on."""
    ctx = hand_ctx({"p": torch.zeros(1)}, cid=cid, groups=GROUPS, state=state)
    strat.client_receive(ctx, payload)
    p, stepped = ctx.params["p"], []
    for _ in range(2):
        (0.5 * (p - TARGET[cid]) ** 2).sum().backward()
        strat.client_after_backward(ctx)
        stepped.append(float(p.grad))
        with torch.no_grad():
            p -= 0.5 * p.grad
        p.grad = None
    reply = strat.client_reply(ctx)
    return Payload({n: t.float() for n, t in reply.tensors.items()}), stepped


def test_two_clients_two_rounds_by_hand() -> None:
    strat = Scaffold(groups=GROUPS)
    states = {c: ClientState(c) for c in "AB"}
    x = {"p": torch.zeros(1)}
    assert strat.sample(1, ["A", "B", "C"], random.Random(0)) == ["A", "B", "C"]  # N = 3, C sits out below
    # round 1: x = 0, c = 0, c_i = 0 -> plain SGD. A: p 0 -> 1 -> 1.5, raw grads -2, -1 -> c_A+ = -1.5 (option II:
    # 0 - 0 + (0 - 1.5) / (2 * 0.5)); B: p 0 -> -0.5 -> -0.75, grads 1, 0.5 -> c_B+ = 0.75
    down = strat.configure_train(1, "A", x)
    assert down.tensors[C_DOWN + "p"].tolist() == [0.0]
    rA, gA = local_round(strat, "A", down, states["A"])
    rB, gB = local_round(strat, "B", strat.configure_train(1, "B", x), states["B"])
    assert gA == [-2.0, -1.0] and gB == [1.0, 0.5]
    assert rA.tensors["p"].tolist() == [1.5] and rA.tensors[DC_UP + "p"].tolist() == [-1.5]
    assert rB.tensors["p"].tolist() == [-0.75] and rB.tensors[DC_UP + "p"].tolist() == [0.75]
    assert states["A"].tensors[C_I + "p"].tolist() == [-1.5]
    # server: x = 1/4 * 1.5 + 3/4 * (-0.75) = -0.1875; c = 0 + (2/3) * mean(-1.5, 0.75) = -0.25
    x = strat.aggregate_train(1, [ClientReply("A", rA, 1), ClientReply("B", rB, 3)], x)
    assert x["p"].tolist() == [-0.1875] and strat.server_state()[0]["c/p"].tolist() == [-0.25]
    # round 2: A's correction c - c_A = 1.25: raw -2.1875 -> -0.9375, p -> 0.28125; raw -1.71875 -> -0.46875,
    # p -> 0.515625; c_A+ = mean raw = -1.953125 (= -1.5 + 0.25 + (-0.1875 - 0.515625) / 1), Δc_A = -0.453125.
    # B: c - c_B = -1: raw 0.8125 -> -0.1875, p -> -0.09375; raw 0.90625 -> -0.09375, p -> -0.046875;
    # c_B+ = 0.859375, Δc_B = 0.109375
    rA, gA = local_round(strat, "A", strat.configure_train(2, "A", x), states["A"])
    rB, gB = local_round(strat, "B", strat.configure_train(2, "B", x), states["B"])
    assert gA == [-0.9375, -0.46875] and gB == [-0.1875, -0.09375]
    assert rA.tensors["p"].tolist() == [0.515625] and rA.tensors[DC_UP + "p"].tolist() == [-0.453125]
    assert rB.tensors["p"].tolist() == [-0.046875] and rB.tensors[DC_UP + "p"].tolist() == [0.109375]
    # server: x = 1/4 * 0.515625 + 3/4 * (-0.046875) = 0.09375; c = -0.25 + (2/3) * (-0.171875)
    x = strat.aggregate_train(2, [ClientReply("A", rA, 1), ClientReply("B", rB, 3)], x)
    assert x["p"].tolist() == [0.09375]
    assert strat.server_state()[0]["c/p"].item() == pytest.approx(-0.25 - 2 / 3 * 0.171875)


def test_server_step_size_and_state_roundtrip() -> None:
    strat = Scaffold(Scaffold.Options(server_lr=2.0), groups=GROUPS)
    strat.sample(1, ["A", "B"], random.Random(0))
    replies = [ClientReply("A", Payload({"p": torch.tensor([1.0]), DC_UP + "p": torch.tensor([2.0])}), 1),
               ClientReply("B", Payload({"p": torch.tensor([3.0]), DC_UP + "p": torch.tensor([4.0])}), 1)]
    x = strat.aggregate_train(1, replies, {"p": torch.tensor([1.0])})
    assert x["p"].tolist() == [3.0]  # 1 + 2 * (2 - 1)
    other = Scaffold(groups=GROUPS)
    other.load_server_state(*strat.server_state())
    assert other.server_state()[0]["c/p"].tolist() == [3.0] and other.server_state()[1] == {"n_clients": 2}
    with pytest.raises(StrategyError, match="unexpected names"):
        strat.aggregate_train(1, [ClientReply("A", Payload({"p": torch.ones(1)}), 1)], {"p": torch.ones(1)})
    ctx = hand_ctx({"p": torch.zeros(1)}, groups=GROUPS)
    with pytest.raises(StrategyError, match="control variates"):
        strat.client_receive(ctx, Payload({"p": torch.zeros(1)}))


def test_frozen_controls_are_fedavg_bit_for_bit(tmp_path) -> None:
    toy_sim(tmp_path / "avg", "fedavg", optimizer="sgd").run()
    toy_sim(tmp_path / "sc", "scaffold", options={"freeze_controls": True}, optimizer="sgd").run()
    assert same_globals(tmp_path / "avg", tmp_path / "sc")
    st = final(tmp_path / "sc")
    assert all(float(t.abs().sum()) == 0 for t in st.server_tensors.values()) and st.server_tensors
    assert not any(k.startswith(C_I) for c in st.clients.values() for k in c.tensors)


def test_controls_change_the_run_persist_and_resume(tmp_path) -> None:
    toy_sim(tmp_path / "avg", "fedavg", rounds=3, optimizer="sgd").run()
    res = toy_sim(tmp_path / "straight", "scaffold", rounds=3, optimizer="sgd").run()
    assert not same_globals(tmp_path / "avg", tmp_path / "straight")
    st = final(tmp_path / "straight")
    assert all(C_I + "rule_k" in c.tensors for c in st.clients.values())
    # downlink: x and c (twice FedAvg's); uplink: y_i and Δc_i; c and Δc are counted in the "other" group
    assert res["comm"]["by_group"]["other"]["bytes_down"] == res["comm"]["by_group"]["rule"]["bytes_down"] + sum(
        res["comm"]["by_group"][g]["bytes_down"] for g in ("gate", "lora"))
    toy_sim(tmp_path / "broken", "scaffold", rounds=3, optimizer="sgd").run(stop_after=1)
    toy_sim(tmp_path / "broken", "scaffold", rounds=3, optimizer="sgd").run(resume=True)
    assert_same_run(tmp_path / "straight", tmp_path / "broken")
