"""MT-DAO (multi-timescale outer momenta): two clients, two rounds by hand; one timescale ≡ EMA-momentum FedAvgM
bit for bit through the simulator; momenta checkpointed and resumed; options validated."""

from __future__ import annotations

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from fednl.strategies.server_opt import ServerOptConfig
from fednl.strategies.base import ClientReply, Payload, StrategyError
from fednl.strategies.mtdao import MTDAO
from test_resume import assert_same_run
from toy_sim import final, same_globals, toy_sim

pytestmark = pytest.mark.usefixtures("one_thread")

GROUPS = {"frozen": set(), "lora": {"p"}}


def replies(a: list[float], b: list[float]) -> list[ClientReply]:
    return [ClientReply("c0", Payload({"p": torch.tensor(a)}), 1), ClientReply("c1", Payload({"p": torch.tensor(b)}), 3)]


def test_two_clients_two_rounds_by_hand() -> None:
    strat = MTDAO(MTDAO.Options(lr=1.0, betas=[0.5, 0.75], weights=[0.5, 0.25]), groups=GROUPS)
    # round 1: x0 = [1, 2]; a1 = 1/4 [0, 2] + 3/4 [1, 0] = [0.75, 0.5]; g1 = [0.25, 1.5]
    #   u1 = 0.5 g1 = [0.125, 0.75]; u2 = 0.25 g1 = [0.0625, 0.375]
    #   d = 0.25 g1 + 0.5 u1 + 0.25 u2 = [0.140625, 0.84375]; x1 = x0 - d = [0.859375, 1.15625]
    x = strat.aggregate_train(1, replies([0.0, 2.0], [1.0, 0.0]), {"p": torch.tensor([1.0, 2.0])})
    assert x["p"].tolist() == [0.859375, 1.15625]
    # round 2: a2 = 1/4 [0.5, 0.5] + 3/4 [0.75, 0.25] = [0.6875, 0.3125]; g2 = x1 - a2 = [0.171875, 0.84375]
    #   u1 = 0.5 u1 + 0.5 g2 = [0.1484375, 0.796875]; u2 = 0.75 u2 + 0.25 g2 = [0.08984375, 0.4921875]
    #   d = 0.25 g2 + 0.5 u1 + 0.25 u2 = [0.1396484375, 0.732421875]; x2 = x1 - d
    x = strat.aggregate_train(2, replies([0.5, 0.5], [0.75, 0.25]), x)
    assert x["p"].tolist() == [0.7197265625, 0.423828125]
    tensors, info = strat.server_state()
    assert tensors["u0|p"].tolist() == [0.1484375, 0.796875] and info == {"steps": 2, "timescales": 2}
    other = MTDAO(MTDAO.Options(lr=1.0, betas=[0.5, 0.75], weights=[0.5, 0.25]), groups=GROUPS)
    other.load_server_state(tensors, info)
    assert torch.equal(other.server_state()[0]["u1|p"], tensors["u1|p"])
    with pytest.raises(StrategyError, match="2 timescales, the config 1"):
        MTDAO(MTDAO.Options(betas=[0.5], weights=[1.0]), groups=GROUPS).load_server_state(tensors, info)


def test_one_timescale_is_ema_momentum_fedavgm_bit_for_bit(tmp_path) -> None:
    fedavgm = TypeAdapter(ServerOptConfig).validate_python(
        {"name": "fedavgm", "lr": 0.5, "momentum": 0.8, "dampening": 0.8})
    toy_sim(tmp_path / "avgm", "fedavg", rounds=3, server_opt=fedavgm).run()
    toy_sim(tmp_path / "mtdao", "mtdao", rounds=3, options={"lr": 0.5, "betas": [0.8], "weights": [1.0]}).run()
    assert same_globals(tmp_path / "avgm", tmp_path / "mtdao")
    toy_sim(tmp_path / "avg", "fedavg", rounds=3).run()
    assert not same_globals(tmp_path / "avg", tmp_path / "mtdao")


def test_momenta_resume_bit_identically(tmp_path) -> None:
    toy_sim(tmp_path / "straight", "mtdao", rounds=3).run()
    toy_sim(tmp_path / "broken", "mtdao", rounds=3).run(stop_after=1)
    assert set(final(tmp_path / "broken").server_tensors) == {f"u{j}|{n}" for j in (0, 1) for n in
                                                              ("gate", "lora_A", "lora_B", "rule_beta", "rule_k")}
    toy_sim(tmp_path / "broken", "mtdao", rounds=3).run(resume=True)
    assert_same_run(tmp_path / "straight", tmp_path / "broken")


@pytest.mark.parametrize("opts,match", [
    ({"betas": [0.5, 0.9], "weights": [0.5]}, "one per timescale"),
    ({"betas": [1.0], "weights": [0.5]}, r"in \[0, 1\)"),
    ({"betas": [0.5, 0.9], "weights": [0.6, 0.6]}, "sum <= 1"),
    ({"betas": [], "weights": []}, "at least 1 item"),
])
def test_options_are_validated(opts, match) -> None:
    with pytest.raises(ValidationError, match=match):
        MTDAO.Options(**opts)
