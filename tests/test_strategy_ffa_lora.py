"""FFA-LoRA: A frozen at its shared init (never trained, never sent), only B averaged; half the traffic."""

from __future__ import annotations

import pytest
import torch

from fednl.engine.ledger import strategy_round_bytes
from fednl.models import LoraConfig
from fednl.strategies.base import ClientReply, Payload, StrategyError
from fednl.strategies.ffa_lora import FFALoRA, split_lora_names
from test_strategy_harness import build_for, final_state, run_sim

SQUARE = LoraConfig(targets=["q_proj", "o_proj"], r=2, alpha=4.0)  # 32x32 layers: in == out


def test_split_lora_names() -> None:
    a, b = split_lora_names(["x.q_proj.lora_A", "x.q_proj.lora_B", "x.q_proj.weight", "y.lora_A"])
    assert a == {"x.q_proj.lora_A", "y.lora_A"} and b == {"x.q_proj.lora_B"}


def test_only_b_is_trained_and_shared() -> None:
    model, strat = build_for("ffa_lora")
    lora = strat.groups["lora"]
    assert strat.trainable_names() == {n for n in lora if n.endswith("lora_B")}
    assert strat.shared_names() == strat.trainable_names() and not strat.local_names()
    assert strat.frozen_a_names() == {n for n in lora if n.endswith("lora_A")}


def test_aggregation_of_b_by_hand_and_exact_product() -> None:
    # Prepare: one layer, shared A; B_1 = [[1],[2]] (N=1), B_2 = [[3],[6]] (N=3)
    groups = {"frozen": set(), "lora": {"m.lora_A", "m.lora_B"}}
    strat = FFALoRA(groups=groups)
    A = torch.tensor([[2.0, -1.0]])
    b1, b2 = torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0], [6.0]])
    glob = {"m.lora_B": torch.zeros(2, 1)}
    # Execute
    new = strat.aggregate_train(1, [ClientReply("c1", Payload({"m.lora_B": b1}), 1),
                                    ClientReply("c2", Payload({"m.lora_B": b2}), 3)], glob)
    # Assert: 1/4 b1 + 3/4 b2 = [[2.5], [5.0]]; mean(B) A == mean(B A) exactly (A is common)
    assert torch.allclose(new["m.lora_B"], torch.tensor([[2.5], [5.0]]))
    assert torch.allclose(new["m.lora_B"] @ A, 0.25 * (b1 @ A) + 0.75 * (b2 @ A))
    with pytest.raises(StrategyError, match="unexpected names"):
        strat.aggregate_train(1, [ClientReply("c1", Payload({"m.lora_A": A}), 1)], glob)


def test_a_never_changes_and_b_moves(tmp_path) -> None:
    # Prepare
    model, strat = build_for("ffa_lora")
    a0 = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("lora_A")}
    # Execute: two rounds through the simulator
    run_sim(model, strat, tmp_path, rounds=2)
    # Assert: every A is bit-identical to its seeded init and absent from the global state; B trained
    live = dict(model.named_parameters())
    assert all(torch.equal(live[n].detach(), a0[n]) for n in a0)
    glob = final_state(tmp_path).global_params
    assert not any(n.endswith("lora_A") for n in glob)
    assert all(glob[n].abs().sum() > 0 for n in glob if n.endswith("lora_B"))


def test_bytes_are_half_of_fedavg_on_square_layers() -> None:
    _, ffa = build_for("ffa_lora", lora=SQUARE)
    model, avg = build_for("fedavg", lora=SQUARE)
    b_ffa = strategy_round_bytes(ffa, model, "fp32")["total"]
    b_avg = strategy_round_bytes(avg, model, "fp32")["total"]
    assert b_ffa["bytes_up"] * 2 == b_avg["bytes_up"] and b_ffa["bytes_down"] * 2 == b_avg["bytes_down"]
    # 2 blocks x 2 layers x (32 x 2) fp32 values of B
    assert b_ffa["bytes_up"] == 2 * 2 * 32 * 2 * 4


def test_needs_lora_a_and_b() -> None:
    with pytest.raises(StrategyError, match="needs parameter group 'lora'"):
        FFALoRA(groups={"frozen": set()})
    with pytest.raises(StrategyError, match="found 0 A"):
        FFALoRA(groups={"frozen": set(), "lora": {"m.lora_B"}})
