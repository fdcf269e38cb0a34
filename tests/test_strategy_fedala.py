"""FedALA: the ALA update by hand, lower/top layer split, the start phase, persistence and evaluation blend."""

from __future__ import annotations

import pytest
import torch

from fednl.client.state import ClientState
from fednl.strategies.base import Payload, StrategyError
from fednl.strategies.fedala import LOCAL_PREFIX, START_KEY, WEIGHT_PREFIX, FedALA, ala_step, top_block_names
from test_strategy_harness import build_for, final_state, hand_ctx, run_sim

LOW, TOP = "model.layers.0.w", "model.layers.1.w"
GROUPS = {"frozen": set(), "lora": {LOW, TOP}}
TARGET = torch.tensor([1.0, 1.0], dtype=torch.float64)


class Batch:
    input_ids = torch.zeros(1, 3)  # one example per batch


def make_ctx(state: ClientState) -> object:
    """θ_top is fitted to TARGET: L = ||θ_top − t||² (θ_low does not enter the loss)."""
    holder = {}

    def forward_loss(batch) -> torch.Tensor:
        p = holder["ctx"].params
        return (p[TOP] - TARGET).pow(2).sum() + 0.0 * p[LOW].sum()

    def batches(n):
        for _ in range(n):
            yield Batch()

    ctx = hand_ctx({LOW: torch.zeros(2), TOP: torch.zeros(2)}, groups=GROUPS, state=state,
                   forward_loss=forward_loss, batches=batches, num_examples=2)
    holder["ctx"] = ctx
    return ctx


GLOBAL = Payload({LOW: torch.tensor([5.0, 5.0]), TOP: torch.tensor([1.0, 0.0])})


def test_ala_step_by_hand() -> None:
    # W = 1, g = [0.5, −2], θ_glob = [1, 0], θ_loc = [0, 2], η = 1 → diff = [1, −2], g·diff = [0.5, 4]
    w, theta = ala_step({"x": torch.ones(2)}, {"x": torch.tensor([0.5, -2.0])}, {"x": torch.tensor([1.0, 0.0])},
                        {"x": torch.tensor([0.0, 2.0])}, eta=1.0)
    assert torch.allclose(w["x"], torch.tensor([0.5, 0.0]))  # clip(1 − 0.5) , clip(1 − 4)
    assert torch.allclose(theta["x"], torch.tensor([0.5, 2.0]))  # θ_loc + diff ⊙ W


def test_top_block_names() -> None:
    names = {"m.layers.0.a", "m.layers.1.a", "m.layers.2.a", "m.layers.2.b", "lm_head.lora_B"}
    assert top_block_names(names, 1) == {"m.layers.2.a", "m.layers.2.b", "lm_head.lora_B"}
    assert top_block_names(names, 2) == names - {"m.layers.0.a"}


def test_first_participation_is_a_plain_copy() -> None:
    strat = FedALA(FedALA.Options(layer_idx=1), groups=GROUPS)
    ctx = make_ctx(ClientState("c0"))
    strat.client_receive(ctx, GLOBAL)
    assert torch.equal(ctx.params[TOP].detach(), torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert not any(k.startswith(WEIGHT_PREFIX) for k in ctx.state.tensors)
    strat.client_reply(ctx)  # the trained local model of the top block is kept for next time
    assert torch.equal(ctx.state.tensors[LOCAL_PREFIX + TOP], torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert LOCAL_PREFIX + LOW not in ctx.state.tensors


def test_one_pass_after_the_start_phase_by_hand() -> None:
    # Prepare: local θ_top = [0, 2]; W = 1; not in the start phase
    st = ClientState("c0", {LOCAL_PREFIX + TOP: torch.tensor([0.0, 2.0])}, {START_KEY: False})
    strat = FedALA(FedALA.Options(layer_idx=1, rand_percent=50.0), groups=GROUPS)
    ctx = make_ctx(st)
    # Execute
    strat.client_receive(ctx, GLOBAL)
    # Assert: at θ = θ_glob = [1, 0]: g = 2(θ − t) = [0, −2]; diff = [1, −2]; W = clip(1 − g·diff) = [1, 0];
    #         θ_top = θ_loc + diff ⊙ W = [1, 2]; the lower block takes the global values
    assert torch.allclose(st.tensors[WEIGHT_PREFIX + TOP], torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(ctx.params[TOP].detach(), torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert torch.equal(ctx.params[LOW].detach(), torch.tensor([5.0, 5.0], dtype=torch.float64))
    assert ctx.scratch["fedala/epochs"] == 1


def test_start_phase_iterates_until_the_loss_settles() -> None:
    # Epoch 1 (θ = [1, 0]): loss 1, W → [1, 0], θ → [1, 2]; epoch 2 (θ = [1, 2]): loss 1, g = [0, 2],
    # W → clip([1, 0 + 4]) = [1, 1], θ → [1, 0]; std of the last 2 losses = 0 < 0.1 → stop.
    st = ClientState("c0", {LOCAL_PREFIX + TOP: torch.tensor([0.0, 2.0])})
    strat = FedALA(FedALA.Options(layer_idx=1, rand_percent=50.0, num_pre_loss=2), groups=GROUPS)
    ctx = make_ctx(st)
    strat.client_receive(ctx, GLOBAL)
    assert ctx.scratch["fedala/epochs"] == 2 and ctx.scratch["fedala/losses"] == [1.0, 1.0]
    assert torch.allclose(st.tensors[WEIGHT_PREFIX + TOP], torch.ones(2, dtype=torch.float64))
    assert torch.allclose(ctx.params[TOP].detach(), torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert st.info[START_KEY] is False


def test_eval_params_blend_with_the_last_weights() -> None:
    strat = FedALA(FedALA.Options(layer_idx=1), groups=GROUPS)
    st = ClientState("c0", {LOCAL_PREFIX + TOP: torch.tensor([0.0, 2.0]),
                            WEIGHT_PREFIX + TOP: torch.tensor([1.0, 0.5])})
    glob = {LOW: torch.tensor([5.0, 5.0]), TOP: torch.tensor([1.0, 0.0])}
    out = strat.eval_params("c0", glob, st)
    assert torch.allclose(out[TOP], torch.tensor([1.0, 1.0])) and torch.equal(out[LOW], glob[LOW])
    assert strat.eval_params("c1", glob, ClientState("c1")) == glob


def test_needs_forward_loss_and_a_complete_local_model() -> None:
    strat = FedALA(FedALA.Options(layer_idx=1), groups=GROUPS)
    ctx = hand_ctx({LOW: torch.zeros(2), TOP: torch.zeros(2)}, groups=GROUPS,
                   state=ClientState("c0", {LOCAL_PREFIX + TOP: torch.zeros(2)}))
    with pytest.raises(StrategyError, match="forward_loss"):
        strat.client_receive(ctx, GLOBAL)
    strat2 = FedALA(FedALA.Options(layer_idx=2), groups=GROUPS)
    with pytest.raises(StrategyError, match="local model lacks"):
        strat2.client_receive(make_ctx(ClientState("c0", {LOCAL_PREFIX + TOP: torch.zeros(2)})), GLOBAL)


def test_runs_through_the_simulator_with_fedavg_traffic(tmp_path) -> None:
    m_ala, s_ala = build_for("fedala", FedALA.Options(layer_idx=1, max_init_epochs=3))
    run_sim(m_ala, s_ala, tmp_path / "ala", rounds=2)
    m_avg, s_avg = build_for("fedavg")
    run_sim(m_avg, s_avg, tmp_path / "avg", rounds=2)
    ala, avg = final_state(tmp_path / "ala"), final_state(tmp_path / "avg")
    assert ala.ledger.total() == avg.ledger.total()
    for cid, st in ala.clients.items():
        weights = {k: t for k, t in st.tensors.items() if k.startswith(WEIGHT_PREFIX)}
        assert weights and all(k.split("/")[-1].startswith("model.layers.1.") for k in weights)  # top block only
        assert all(float(t.min()) >= 0.0 and float(t.max()) <= 1.0 for t in weights.values())
        assert st.info[START_KEY] is False
