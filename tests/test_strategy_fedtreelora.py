"""FedTreeLoRA: tree / cuts / silhouette by hand, cluster and external experts by hand, τ → one cluster ≡ FedAvg,
per-client payloads, server-state round trip, and the treelora model's parity and frozen external expert."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from fednl.client.state import ClientState
from fednl.models import LoRALinear
from fednl.models.seeding import named_generator
from fednl.models.treelora import TreeLoRALinear, TreeMix, block_index, block_prefix, treelora_modules
from fednl.strategies.base import ClientReply, Payload, StrategyError
from fednl.strategies.fedtreelora import (
    OWN_PREFIX,
    FedTreeLoRA,
    build_tree,
    choose_cuts,
    cut_tree,
    frobenius_distances,
    silhouette,
)
from test_engine_toy import toy_task
from test_strategy_harness import build_for, final_state, hand_ctx, run_sim

X0 = [0.0, 1.0, 2.0, 3.0]  # block 0: clients evenly spread (weak structure)
X1 = [0.0, 1.0, 10.0, 12.0]  # block 1: two clear groups {0, 1} and {2, 3}
D0 = np.abs(np.subtract.outer(X0, X0))
D1 = np.abs(np.subtract.outer(X1, X1))
SIL0_2 = (0.6 + 1 / 3 + 1 / 3 + 0.6) / 4  # {0,1},{2,3} on D0: a = 1; b = 2.5, 1.5, 1.5, 2.5
SIL1_2 = (10 / 11 + 9 / 10 + 7.5 / 9.5 + 9.5 / 11.5) / 4  # on D1: a = 1, 1, 2, 2; b = 11, 10, 9.5, 11.5
SIL1_3 = (9 / 10 + 8 / 9 + 0 + 0) / 4  # {0,1},{2},{3} on D1: b = 10, 9; singletons score 0


# ---------------------------------------------------------------------------------------------- tree maths
def test_frobenius_distances_by_hand() -> None:
    d = frobenius_distances([torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 1.0]])])
    assert np.allclose(d, [[0, 5, 1], [5, 0, math.sqrt(18)], [1, math.sqrt(18), 0]])


def test_tree_and_cuts_by_hand() -> None:
    # D = (D0 + D1) / 2; average linkage merges {0,1} at 1, {2,3} at 1.5, then the two at (6 + 7.5 + 5 + 6.5)/4
    Z = build_tree((D0 + D1) / 2, "average")
    assert np.allclose(Z[:, 2], [1.0, 1.5, 6.25])
    assert cut_tree(Z, 4, 1) == [0, 0, 0, 0]
    assert cut_tree(Z, 4, 2) == [0, 0, 1, 1]
    assert cut_tree(Z, 4, 3) == [0, 0, 1, 2]
    assert cut_tree(Z, 4, 4) == [0, 1, 2, 3]


def test_silhouette_by_hand_and_against_a_loop() -> None:
    assert silhouette(D0, [0, 0, 1, 1]) == pytest.approx(SIL0_2)
    assert silhouette(D1, [0, 0, 1, 1]) == pytest.approx(SIL1_2)
    assert silhouette(D1, [0, 0, 1, 2]) == pytest.approx(SIL1_3)
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(7, 3))
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    labels = [0, 0, 1, 1, 1, 2, 0]
    ref = []
    for i in range(7):
        same = [d[i, j] for j in range(7) if labels[j] == labels[i] and j != i]
        if not same:
            ref.append(0.0)  # a singleton scores 0
            continue
        a = sum(same) / len(same)
        b = min(np.mean([d[i, j] for j in range(7) if labels[j] == c]) for c in set(labels) - {labels[i]})
        ref.append((b - a) / max(a, b))
    assert silhouette(d, labels) == pytest.approx(float(np.mean(ref)))
    with pytest.raises(StrategyError, match="needs 2..3 clusters"):
        silhouette(D0, [0, 0, 0, 0])


def test_layer_cuts_are_monotone_and_use_tau() -> None:
    Z = build_tree((D0 + D1) / 2, "average")
    # τ = 0.5: block 0 stays shared (0.467 < 0.5); block 1 splits (0.856); block 2 may go to 3 but 0.447 < 0.856
    cuts, scores = choose_cuts(Z, 4, [D0, D1, D1], tau=0.5, max_growth=1)
    assert cuts == [1, 2, 2]
    assert scores[0] == pytest.approx({1: 0.5, 2: SIL0_2}) and scores[2] == pytest.approx({2: SIL1_2, 3: SIL1_3})
    # τ = 0.4 splits block 0 already; τ = 1 (no silhouette beats it) keeps every block at the root
    assert choose_cuts(Z, 4, [D0, D1, D1], tau=0.4, max_growth=1)[0] == [2, 2, 2]
    assert choose_cuts(Z, 4, [D0, D1, D1], tau=1.0, max_growth=2)[0] == [1, 1, 1]
    # growth per block is bounded: from 1, at most max_growth more (and never above N − 1)
    assert choose_cuts(Z, 4, [D1], tau=-1.0, max_growth=1)[0] == [2]
    assert choose_cuts(Z, 4, [D1, D0], tau=-1.0, max_growth=5)[0][1] >= 2


def test_two_clients_never_split() -> None:
    Z = build_tree(np.array([[0.0, 3.0], [3.0, 0.0]]))
    assert choose_cuts(Z, 2, [np.array([[0.0, 3.0], [3.0, 0.0]])], tau=-1.0, max_growth=3)[0] == [1]


# ---------------------------------------------------------------------------------------------- strategy
def names(l: int) -> dict[str, str]:
    p = f"model.layers.{l}"
    return {"A": f"{p}.m.lora_A", "B": f"{p}.m.lora_B", "eA": f"{p}.m.ext_A", "eB": f"{p}.m.ext_B",
            "gate": f"{p}.treelora_mix.gate", "rho": f"{p}.treelora_mix.rho"}


N0, N1 = names(0), names(1)
GROUPS = {
    "frozen": set(),
    "lora": {N0["A"], N0["B"], N1["A"], N1["B"]},
    "tree_ext": {N0["eA"], N0["eB"], N0["gate"], N1["eA"], N1["eB"], N1["gate"]},
    "tree_mix": {N0["rho"], N1["rho"]},
}
CLIENTS = ["c0", "c1", "c2", "c3"]
NUM = [1, 3, 1, 1]


def upload(i: int) -> dict[str, torch.Tensor]:
    """Client i's warm-up LoRA: A = [[i, 0]] in both blocks, B = [[X0_i], [0]] and [[X1_i], [0]]."""
    a = torch.tensor([[float(i), 0.0]])
    return {N0["A"]: a, N0["B"]: torch.tensor([[X0[i]], [0.0]]),
            N1["A"]: a.clone(), N1["B"]: torch.tensor([[X1[i]], [0.0]])}


def warmed_up(**opts) -> FedTreeLoRA:
    strat = FedTreeLoRA(FedTreeLoRA.Options(tau=0.5, **opts), groups=GROUPS)
    strat.sample(1, CLIENTS, random.Random(0))
    glob = {n: torch.zeros_like(t) for n, t in upload(0).items()}
    replies = [ClientReply(c, Payload(upload(i)), NUM[i]) for i, c in enumerate(CLIENTS)]
    strat._last_global = strat.aggregate_train(1, replies, glob)
    return strat


def test_warmup_then_tree_and_experts_by_hand() -> None:
    # Execute
    strat = warmed_up()
    # Assert: block 0 (weak structure) stays at the root, block 1 splits into {c0, c1} and {c2, c3}
    assert strat.cuts() == {0: 1, 1: 2}
    assert strat.labels(1) == {"c0": 0, "c1": 0, "c2": 1, "c3": 1}
    # root expert of block 0 = N-weighted mean over all: B = (0·1 + 1·3 + 2 + 3)/6 = 4/3, A likewise
    p0 = strat.client_tensors("c0")
    assert torch.allclose(p0[N0["B"]], torch.tensor([[4 / 3], [0.0]])) and N0["eB"] not in p0 and N0["gate"] not in p0
    # block 1: cluster {c0, c1}: B = (0·1 + 1·3)/4 = 0.75; external = cluster {c2, c3}: B = (10 + 12)/2 = 11,
    # A = (2 + 3)/2 = 2.5; gate 1
    assert torch.allclose(p0[N1["B"]], torch.tensor([[0.75], [0.0]]))
    assert torch.allclose(p0[N1["eB"]], torch.tensor([[11.0], [0.0]]))
    assert torch.allclose(p0[N1["eA"]], torch.tensor([[2.5, 0.0]]))
    assert float(p0[N1["gate"]]) == 1.0
    p3 = strat.client_tensors("c3")
    assert torch.allclose(p3[N1["B"]], torch.tensor([[11.0], [0.0]]))
    assert torch.allclose(p3[N1["eB"]], torch.tensor([[0.75], [0.0]]))
    # the returned global model is the all-client weighted mean: block 1 B = (0 + 3 + 10 + 12)/6
    assert torch.allclose(strat._last_global[N1["B"]], torch.tensor([[25 / 6], [0.0]]))
    assert strat.configure_train(2, "c2", strat._last_global).meta["treelora_phase"] == "tree"


def test_tree_round_reaverages_only_the_clusters_that_took_part() -> None:
    strat = warmed_up()
    glob = strat._last_global
    r0, r1 = upload(0), upload(1)
    r0[N1["B"]], r1[N1["B"]] = torch.tensor([[2.0], [0.0]]), torch.tensor([[4.0], [0.0]])
    strat.aggregate_train(2, [ClientReply("c0", Payload(r0), 1), ClientReply("c1", Payload(r1), 3)], glob)
    assert torch.allclose(strat.client_tensors("c0")[N1["B"]], torch.tensor([[3.5], [0.0]]))  # (2·1 + 4·3)/4
    assert torch.allclose(strat.client_tensors("c2")[N1["B"]], torch.tensor([[11.0], [0.0]]))  # nobody: kept
    assert torch.allclose(strat.client_tensors("c2")[N1["eB"]], torch.tensor([[3.5], [0.0]]))
    # block 0 (root) is re-averaged over the participants: (0·1 + 1·3)/4
    assert torch.allclose(strat.client_tensors("c2")[N0["B"]], torch.tensor([[0.75], [0.0]]))


def test_warmup_payloads_and_client_restore() -> None:
    strat = FedTreeLoRA(FedTreeLoRA.Options(warmup_rounds=2), groups=GROUPS)
    strat.sample(1, CLIENTS, random.Random(0))
    glob = {n: torch.zeros_like(t) for n, t in upload(0).items()}
    first = strat.configure_train(1, "c1", glob)
    assert set(first.tensors) == set(glob) and not first.meta["treelora_restore"]
    strat.aggregate_train(1, [ClientReply(c, Payload(upload(i)), NUM[i]) for i, c in enumerate(CLIENTS)], glob)
    again = strat.configure_train(2, "c1", glob)
    assert again.tensors == {} and again.meta["treelora_restore"]  # local warm-up: nothing is sent down
    # the client continues from its own copy, saved by client_reply during warm-up
    all_names = set().union(*GROUPS.values())
    st = ClientState("c1")
    ctx = hand_ctx({n: torch.zeros(1) if "mix" in n else upload(1).get(n, torch.zeros(2, 1)) for n in all_names},
                   cid="c1", groups=GROUPS, state=st)
    strat.client_receive(ctx, first)
    with torch.no_grad():
        ctx.params[N1["B"]].fill_(7.0)
    strat.client_reply(ctx)
    with torch.no_grad():
        ctx.params[N1["B"]].fill_(-1.0)
    ctx.scratch.clear()
    strat.client_receive(ctx, again)
    assert float(ctx.params[N1["B"]].detach()[0, 0]) == 7.0 and OWN_PREFIX + N1["B"] in st.tensors


def test_first_tree_round_sets_lambda_and_drops_the_warmup_copy() -> None:
    strat = warmed_up(lambda_init=0.8)
    all_names = set().union(*GROUPS.values())
    st = ClientState("c0", {OWN_PREFIX + N1["B"]: torch.zeros(2, 1)})
    shapes = {**{n: t for n, t in upload(0).items()}, N0["eA"]: torch.zeros(1, 2), N1["eA"]: torch.zeros(1, 2),
              N0["eB"]: torch.zeros(2, 1), N1["eB"]: torch.zeros(2, 1)}
    ctx = hand_ctx({n: shapes.get(n, torch.zeros(1)) for n in all_names}, groups=GROUPS, state=st)
    strat.client_receive(ctx, strat.configure_train(2, "c0", strat._last_global))
    assert torch.sigmoid(ctx.params[N1["rho"]].detach()).item() == pytest.approx(0.8)
    assert float(ctx.params[N1["gate"]].detach()) == 1.0 and float(ctx.params[N0["gate"]].detach()) == 0.0
    assert not any(k.startswith(OWN_PREFIX) for k in st.tensors)


def test_server_state_round_trip() -> None:
    strat = warmed_up()
    tensors, info = strat.server_state()
    fresh = FedTreeLoRA(FedTreeLoRA.Options(tau=0.5), groups=GROUPS)
    fresh.load_server_state(tensors, __import__("json").loads(__import__("json").dumps(info)))
    for c in CLIENTS:
        a, b = strat.client_tensors(c), fresh.client_tensors(c)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(StrategyError, match="unexpected tensor"):
        fresh.load_server_state({"junk": torch.zeros(1)}, info)


def test_errors() -> None:
    strat = FedTreeLoRA(groups=GROUPS)
    strat.sample(1, CLIENTS, random.Random(0))
    glob = {n: torch.zeros_like(t) for n, t in upload(0).items()}
    strat.aggregate_train(1, [ClientReply("c0", Payload(upload(0)), 1)], glob)  # the others are missing:
    assert strat.in_warmup and strat.warmup_missing() == [c for c in CLIENTS if c != "c0"]  # warm-up goes on
    with pytest.raises(StrategyError, match="missing"):  # building by hand without them is refused
        strat.build()
    bad = upload(1)
    bad[N0["B"]] = torch.full((2, 1), float("inf"))
    with pytest.raises(StrategyError, match="NaN or Inf"):
        FedTreeLoRA(groups=GROUPS).aggregate_train(1, [ClientReply("c1", Payload(bad), 1)], glob)
    with pytest.raises(StrategyError, match="no external expert"):
        FedTreeLoRA(groups={"frozen": set(), "lora": {N0["A"]}, "tree_ext": set(), "tree_mix": set()})


# ---------------------------------------------------------------------------------------------- model
def test_block_names() -> None:
    assert block_index("model.layers.12.self_attn.q_proj.lora_A") == 12 and block_index("lm_head.weight") is None
    assert block_prefix("model.layers.3.mlp.up_proj") == "model.layers.3"


def tree_layer() -> TreeLoRALinear:
    g = torch.Generator().manual_seed(5)
    layer = TreeLoRALinear(torch.nn.Linear(6, 4), 2, 4.0, TreeMix(0.3), generator=named_generator(0, "blk.q_proj"))
    with torch.no_grad():
        for p in (layer.lora_B, layer.ext_A, layer.ext_B):
            p.copy_(torch.randn(p.shape, generator=g))
        layer.mix.gate.fill_(1.0)
    return layer


def test_treelora_forward_matches_merged_weights_values_and_gradients() -> None:
    layer = tree_layer()
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(6), requires_grad=True)
    params = [x, layer.lora_A, layer.lora_B, layer.mix.rho]
    out = layer(x)
    ref = torch.nn.functional.linear(x, layer.weight + layer.delta_weight(), layer.bias)
    w = torch.randn_like(out)
    g_out = torch.autograd.grad((out * w).sum(), params)
    g_ref = torch.autograd.grad((ref * w).sum(), params)
    assert torch.allclose(out, ref, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_out, g_ref))
    (layer(x) * w).sum().backward()
    assert layer.ext_A.grad is None and layer.ext_B.grad is None and layer.mix.gate.grad is None  # frozen


def test_gate_zero_is_plain_lora() -> None:
    layer = tree_layer()
    with torch.no_grad():
        layer.mix.gate.zero_()
    lora = LoRALinear(torch.nn.Linear(6, 4), 2, 4.0, generator=named_generator(0, "blk.q_proj"))
    with torch.no_grad():
        lora.weight.copy_(layer.weight), lora.bias.copy_(layer.bias), lora.lora_B.copy_(layer.lora_B)
    x = torch.randn(3, 6)
    assert torch.equal(layer.lora_A, lora.lora_A) and torch.equal(layer(x), lora(x))


# ---------------------------------------------------------------------------------------------- end to end
def test_tau_forcing_one_cluster_is_fedavg_on_lora(tmp_path) -> None:
    # Prepare: FedTreeLoRA (τ = 1: no silhouette beats it; FedAvg warm-up) vs FedAvg on the plain LoRA model
    m_tree, s_tree = build_for("fedtreelora", FedTreeLoRA.Options(tau=1.0, warmup_mode="fedavg", warmup_rounds=1))
    m_avg, s_avg = build_for("fedavg")
    # Execute: 3 rounds (1 warm-up + 2 after the tree)
    run_sim(m_tree, s_tree, tmp_path / "tree", rounds=3)
    run_sim(m_avg, s_avg, tmp_path / "avg", rounds=3)
    # Assert: every block at the root; identical global LoRA and identical traffic
    assert set(s_tree.cuts().values()) == {1}
    t, a = final_state(tmp_path / "tree"), final_state(tmp_path / "avg")
    assert t.global_params.keys() == a.global_params.keys()
    assert all(torch.equal(t.global_params[n], a.global_params[n]) for n in a.global_params)
    assert t.ledger.total("up") == a.ledger.total("up") and t.ledger.total("down") == a.ledger.total("down")


def test_split_tree_end_to_end(tmp_path) -> None:
    # τ = −1: every silhouette beats it, so the 3 toy clients split into 2 clusters in every block
    model, strat = build_for("fedtreelora", FedTreeLoRA.Options(tau=-1.0, warmup_rounds=1))
    run_sim(model, strat, tmp_path, rounds=3)
    st = final_state(tmp_path)
    assert set(strat.cuts().values()) == {2}
    down3, up3 = st.ledger.total("down", 3), st.ledger.total("up", 3)
    assert down3 > 2 * up3  # cluster + external expert (+ gates) down, cluster expert up
    assert st.ledger.total("down", 2) == down3 and st.ledger.total("down", 1) > 0  # round 1: initial LoRA
    for cid, cs in st.clients.items():
        loc = cs.local_params()
        rhos = [v for k, v in loc.items() if k.endswith("treelora_mix.rho")]
        assert rhos and all(float(r) != 0.0 for r in rhos)  # λ was trained away from 0.5
        assert all(float(v) == 1.0 for k, v in loc.items() if k.endswith("treelora_mix.gate"))
    mods = treelora_modules(model)
    assert mods and all(m.mix is getattr(model.model.layers[block_index(n)], "treelora_mix") for n, m in mods.items())


def test_resume_after_the_warmup_is_bit_identical(tmp_path) -> None:
    # 3 rounds straight vs 1 (warm-up) + resume + 2: the tree, experts and λ must survive the checkpoint
    opts = FedTreeLoRA.Options(tau=-1.0, warmup_rounds=1)
    run_sim(*build_for("fedtreelora", opts), tmp_path / "straight", rounds=3)
    run_sim(*build_for("fedtreelora", opts), tmp_path / "resumed", rounds=3, stop_after=1)
    run_sim(*build_for("fedtreelora", opts), tmp_path / "resumed", rounds=3, resume=True)
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert all(torch.equal(a.global_params[n], b.global_params[n]) for n in a.global_params)
    assert a.server_info == b.server_info
    assert all(torch.equal(a.server_tensors[k], b.server_tensors[k]) for k in a.server_tensors)
    for cid in a.clients:
        ta, tb = a.clients[cid].tensors, b.clients[cid].tensors
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_a_client_missing_from_the_warmup_extends_it_until_it_has_uploaded(tmp_path) -> None:
    # c1's round-1 reply never arrives: the tree cannot be built after round 1 (it needs every client's upload),
    # so warm-up runs one more round; round 2 brings c1's upload and the tree is built over all three clients
    opts = FedTreeLoRA.Options(tau=-1.0, warmup_rounds=1)
    model, strat = build_for("fedtreelora", opts)
    clients = sorted(c.name for c in toy_task().clients)
    run_sim(model, strat, tmp_path / "dropped", rounds=3, stop_after=1, silent={(1, clients[1])})
    assert strat.in_warmup and strat.warmup_missing() == [clients[1]]
    model, strat = build_for("fedtreelora", opts)
    run_sim(model, strat, tmp_path / "dropped", rounds=3, resume=True)
    assert not strat.in_warmup and sorted(strat.labels(strat.block_ids[0])) == clients
    assert set(strat.cuts().values()) == {2}
    # with no one missing the tree comes after round 1, as before
    model, strat = build_for("fedtreelora", opts)
    run_sim(model, strat, tmp_path / "all", rounds=1)
    assert not strat.in_warmup
