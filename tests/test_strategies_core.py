"""FedAvg-LoRA and FedNL: aggregation maths against hand-computed values, and FedNL's sharing scope."""

from __future__ import annotations

import pydantic
import pytest
import torch

from fednl.strategies.base import ClientReply, Payload, StrategyError
from fednl.strategies.fedavg import FedAvg
from fednl.strategies.fednl import FedNL

GROUPS = {
    "frozen": {"emb"},
    "lora": {"l.A", "l.B"},
    "rule": {"r.w"},
    "gate": {"g"},
}


def reply(cid: str, n: int, **tensors: list) -> ClientReply:
    return ClientReply(cid, Payload({k.replace("_", "."): torch.tensor(v) for k, v in tensors.items()}), n)


def test_fedavg_weighted_mean_by_hand() -> None:
    s = FedAvg(groups={"frozen": {"emb"}, "lora": {"l.A", "l.B"}})
    assert s.shared_names() == {"l.A", "l.B"} and s.local_names() == set()
    glob = {"l.A": torch.zeros(2), "l.B": torch.zeros(1, 1)}
    # N = (1, 3): A = (1*[1,2] + 3*[5,6]) / 4 = [4, 5];  B = (1*0 + 3*4) / 4 = 3
    out = s.aggregate_train(1, [reply("a", 1, l_A=[1.0, 2.0], l_B=[[0.0]]),
                                reply("b", 3, l_A=[5.0, 6.0], l_B=[[4.0]])], glob)
    assert torch.equal(out["l.A"], torch.tensor([4.0, 5.0]))
    assert torch.equal(out["l.B"], torch.tensor([[3.0]]))


def test_fedavg_three_clients_by_hand() -> None:
    s = FedAvg(groups={"frozen": set(), "lora": {"x"}})
    glob = {"x": torch.zeros(3)}
    # N = (2, 2, 4), total 8: x = (2*[8,0,0] + 2*[0,8,0] + 4*[0,0,2]) / 8 = [2, 2, 1]
    out = s.aggregate_train(1, [ClientReply("a", Payload({"x": torch.tensor([8.0, 0, 0])}), 2),
                                ClientReply("b", Payload({"x": torch.tensor([0.0, 8, 0])}), 2),
                                ClientReply("c", Payload({"x": torch.tensor([0.0, 0, 2])}), 4)], glob)
    assert torch.equal(out["x"], torch.tensor([2.0, 2.0, 1.0]))


def test_fednl_rules_scope_shares_only_rule_and_gate() -> None:
    s = FedNL(groups=GROUPS)
    assert s.options.scope == "rules"
    assert s.trainable_names() == {"l.A", "l.B", "r.w", "g"}
    assert s.shared_names() == {"r.w", "g"}
    assert s.local_names() == {"l.A", "l.B"}
    glob = s.init_server({"emb": torch.ones(1), "l.A": torch.ones(2), "l.B": torch.ones(1), "r.w": torch.zeros(2),
                          "g": torch.zeros(1)})
    assert set(glob) == {"r.w", "g"}  # LoRA never reaches the server
    # N = (1, 3): r.w = (1*[0,4] + 3*[4,0]) / 4 = [3, 1];  g = (1*1 + 3*(-1)) / 4 = -0.5
    out = s.aggregate_train(1, [reply("a", 1, r_w=[0.0, 4.0], g=[1.0]), reply("b", 3, r_w=[4.0, 0.0], g=[-1.0])], glob)
    assert torch.equal(out["r.w"], torch.tensor([3.0, 1.0]))
    assert torch.equal(out["g"], torch.tensor([-0.5]))


def test_fednl_rules_scope_rejects_an_update_carrying_lora() -> None:
    s = FedNL(groups=GROUPS)
    glob = {"r.w": torch.zeros(2), "g": torch.zeros(1)}
    bad = reply("a", 1, r_w=[0.0, 0.0], g=[0.0], l_A=[1.0, 1.0])
    with pytest.raises(StrategyError, match="unexpected names"):
        s.aggregate_train(1, [bad], glob)


def test_fednl_rules_plus_lora_scope_shares_lora_too() -> None:
    s = FedNL(FedNL.Options(scope="rules+lora"), groups=GROUPS)
    assert s.shared_names() == {"r.w", "g", "l.A", "l.B"}
    assert s.local_names() == set()
    glob = {"r.w": torch.zeros(1), "g": torch.zeros(1), "l.A": torch.zeros(1), "l.B": torch.zeros(1)}
    # N = (3, 1): every tensor (3*2 + 1*6) / 4 = 3
    out = s.aggregate_train(1, [reply("a", 3, r_w=[2.0], g=[2.0], l_A=[2.0], l_B=[2.0]),
                                reply("b", 1, r_w=[6.0], g=[6.0], l_A=[6.0], l_B=[6.0])], glob)
    assert all(torch.equal(t, torch.tensor([3.0])) for t in out.values())


def test_fednl_extra_model_group_stays_local() -> None:
    s = FedNL(groups={**GROUPS, "decay": {"d"}})
    assert "d" in s.local_names() and "d" not in s.shared_names()


def test_fednl_needs_rule_groups() -> None:
    s = FedNL(groups={"frozen": set(), "lora": {"a"}})
    with pytest.raises(StrategyError, match="needs parameter group '(rule|gate)'"):
        s.shared_names()


def test_options_are_validated() -> None:
    with pytest.raises(pydantic.ValidationError, match="scope"):
        FedNL.Options(scope="everything")
    with pytest.raises(pydantic.ValidationError, match="Extra inputs"):
        FedNL.Options(scope="rules", lr=1)
    with pytest.raises(pydantic.ValidationError, match="Extra inputs"):
        FedAvg.Options(scope="rules")


def test_registration_and_model_kinds() -> None:
    from fednl.strategies import get_strategy

    assert get_strategy("fednl") is FedNL and FedNL.model_spec(None).kind == "titans"
    assert get_strategy("fedavg") is FedAvg and FedAvg.model_spec(None).kind == "lora"


def test_sampling_fraction_is_seeded_and_keeps_order() -> None:
    import random

    s = FedNL(FedNL.Options(fraction_fit=0.5), groups=GROUPS)
    clients = [f"c{i}" for i in range(6)]
    a = s.sample(1, clients, random.Random(7))
    b = s.sample(1, clients, random.Random(7))
    assert a == b and len(a) == 3 and a == sorted(a, key=clients.index)
    assert FedNL(groups=GROUPS).sample(1, clients, random.Random(0)) == clients
