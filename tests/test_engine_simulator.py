"""The in-process simulator: one shared model, exact ledger bytes, sampling, personalised evaluation, outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fednl.client.state import ClientState
from fednl.config import EngineConfig, TrainConfig
from fednl.data.types import ClientData, FederatedTask
from fednl.engine.simulator import RunSpec, Simulator, derive_seed, model_fingerprint
from fednl.client.metrics import evaluate_examples
from fednl.strategies.fedavg import FedAvg
from fednl.strategies.fednl import FedNL
from test_engine_toy import ToyMemoryLM, mc_example, tokenizer, toy_task

pytestmark = pytest.mark.usefixtures("one_thread")

RULE_NUMEL, GATE_NUMEL, LORA_NUMEL = 16 * 16 + 1, 1, 2 * 16 + 16 * 2


class NoCopyLM(ToyMemoryLM):
    def __deepcopy__(self, memo):
        raise AssertionError("the engine must never copy the model")


def make(tmp_path, strategy="fednl", rounds=2, wire="fp32", fraction=1.0, eval_every=0, task=None, lines=None):
    model = NoCopyLM(seed=2)
    cls = FedNL if strategy == "fednl" else FedAvg
    strat = cls(cls.Options(fraction_fit=fraction), groups=model.groups())
    spec = RunSpec(rounds=rounds, seed=5, train=TrainConfig(batch_size=2, seq_len=32, lr=0.05),
                   engine=EngineConfig(wire_dtype=wire, eval_every=eval_every, progress=False), out=tmp_path / "o",
                   method=strategy, model_name="toy")
    log = lines.append if lines is not None else (lambda s: None)
    return Simulator(model, tokenizer(), task or toy_task(), strat, spec, log=log)


@pytest.mark.parametrize("wire,item", [("fp32", 4), ("fp16", 2), ("bf16", 2)])
def test_ledger_counts_exact_bytes_fednl(tmp_path, wire, item) -> None:
    res = make(tmp_path, wire=wire).run()
    per_client = (RULE_NUMEL + GATE_NUMEL) * item  # rule_k 16x16 + rule_beta 1, gate 1; LoRA stays local
    assert res["comm"]["bytes_up"] == res["comm"]["bytes_down"] == per_client * 3 * 2
    assert res["comm"]["per_round"] == [{"round": r, "bytes_up": per_client * 3, "bytes_down": per_client * 3}
                                        for r in (1, 2)]
    assert res["comm"]["by_group"] == {"gate": {"bytes_up": 6 * item, "bytes_down": 6 * item},
                                       "rule": {"bytes_up": 6 * RULE_NUMEL * item, "bytes_down": 6 * RULE_NUMEL * item}}


def test_fedavg_sends_lora_too_and_ratio_is_counted(tmp_path) -> None:
    avg = make(tmp_path / "a", strategy="fedavg", rounds=1).run()
    nl = make(tmp_path / "n", strategy="fednl", rounds=1).run()
    assert avg["comm"]["bytes_up"] == (RULE_NUMEL + GATE_NUMEL + LORA_NUMEL) * 4 * 3
    assert set(avg["comm"]["by_group"]) == {"gate", "lora", "rule"}
    from fednl.experiment import traffic_ratio

    assert traffic_ratio([nl, avg]) == pytest.approx((RULE_NUMEL + 1 + LORA_NUMEL) / (RULE_NUMEL + 1))


def test_sampling_schedule_and_untouched_clients(tmp_path) -> None:
    sim = make(tmp_path, fraction=0.34, rounds=3)
    sim.run()
    schedule = sim.state.schedule
    assert [len(s["clients"]) for s in schedule] == [1, 1, 1]
    trained = {c: sim.state.clients[c].info.get("rounds_trained", 0) for c in sim.client_names}
    assert sum(trained.values()) == 3
    for s in schedule:
        cid = s["clients"][0]
        assert s["seeds"][cid] == str(derive_seed(5, "client", s["round"], cid))
    assert {e.cid for e in sim.state.ledger.entries} == {s["clients"][0] for s in schedule}


def test_personalised_evaluation_uses_each_clients_local_lora(tmp_path) -> None:
    sim = make(tmp_path)
    res = sim.run()
    st = sim.state
    loras = [st.clients[c].local_params()["lora_A"] for c in sim.client_names]
    assert not torch.equal(loras[0], loras[1])  # personal adapters differ
    fresh = ToyMemoryLM(seed=2)
    with torch.no_grad():
        for cid in sim.client_names:
            params = dict(fresh.named_parameters())
            for n, t in {**st.clients[cid].local_params(), **st.global_params}.items():
                params[n].copy_(t)
            direct = evaluate_examples(fresh, tokenizer(), sim.data[cid].test, seq_len=32, batch_size=2)
            assert res["clients"][cid] == direct
    assert res["mean"]["accuracy"] == pytest.approx(sum(m["accuracy"] for m in res["clients"].values()) / 3)


def test_outputs_and_console_lines(tmp_path) -> None:
    lines: list[str] = []
    base = toy_task()
    held = ClientData("stranger", train=[mc_example("s/0", 7, "B")], test=[mc_example("s/1", 8, "A")])
    task = FederatedTask(base.name, base.kind, base.clients, [held], {})
    res = make(tmp_path, eval_every=1, task=task, lines=lines).run()
    out = tmp_path / "o"
    assert set(json.loads((out / "results.json").read_text())) == {
        "method", "model", "task", "rounds", "clients", "mean", "comm", "wall_s", "seed"}
    assert res["rounds"] == 2 and res["seed"] == 5 and res["task"] == "toy" and res["model"] == "toy"
    assert set(res["clients"]) == {"client0", "client1", "client2"}  # held-out clients are not in the mean
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in recs if r["type"] == "round"]
    evals = [r for r in recs if r["type"] == "eval"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert set(rounds[0]["client_train"]) == {"client0", "client1", "client2"}
    assert rounds[0]["client_train"]["client1"]["num_examples"] == 5
    assert len(evals) == 8 and sum(1 for r in evals if r.get("heldout")) == 2
    assert len(lines) == 2 and lines[0].startswith("round   1/2 | loss ") and "| accuracy 0." in lines[0]
    assert "↑ 3.02 KB ↓ 3.02 KB" in lines[0]  # 258 floats x 4 B x 3 clients = 3096 B and "s/round | peak mem" in lines[0]


def test_invalid_tasks_and_strategies(tmp_path) -> None:
    t = toy_task()
    dup = FederatedTask("d", "mc", [t.clients[0], copy.copy(t.clients[0])], [], {})
    with pytest.raises(ValueError, match="client names are not unique"):
        make(tmp_path, task=dup)
    with pytest.raises(ValueError, match="has no clients"):
        make(tmp_path, task=FederatedTask("e", "mc", [], [], {}))
    sim = make(tmp_path)
    sim.strategy.sample = lambda rnd, clients, rng: ["ghost"]
    with pytest.raises(ValueError, match="sampled an invalid client set"):
        sim.run()


def test_client_state_sizes_are_reported(tmp_path) -> None:
    sim = make(tmp_path, rounds=1)
    sim.run()
    sizes = {c: s.nbytes() for c, s in sim.state.clients.items()}
    assert sizes == {c: LORA_NUMEL * 4 for c in sim.client_names}
    assert isinstance(sim.state.clients["client0"], ClientState)


def test_train_client_matches_the_round_loop(tmp_path) -> None:
    """The public per-client step reproduces round 1 of a run, in any client order and whatever the global RNG."""
    from fednl.engine import wire

    ran = make(tmp_path / "a", rounds=1)
    ran.run()
    sim = make(tmp_path / "b", rounds=1)
    glob = sim._fresh.global_params
    for cid in reversed(sim.client_names):
        torch.manual_seed(1234)  # the step forks and seeds the global RNG itself
        client = ClientState(cid)
        down = wire.decode(wire.encode(sim.strategy.configure_train(1, cid, glob), "fp32"))
        reply = sim.train_client(1, cid, down, client, initial_local=sim.initial_local)
        assert reply.num_examples == len(sim.data[cid].train)
        mine, theirs = client.local_params(), ran.state.clients[cid].local_params()
        assert mine and set(mine) == set(theirs)
        assert all(torch.equal(mine[n], theirs[n]) for n in mine)
    assert sim.client_seeds(1, "client0") == (derive_seed(5, "client", 1, "client0"),
                                              derive_seed(5, "torch", 1, "client0"))


class _Fixed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7)
        self.b = torch.nn.Parameter(torch.tensor([0.5, -1.25], dtype=torch.bfloat16))
        self.h = torch.nn.Parameter(torch.linspace(-1, 1, 4, dtype=torch.float16).reshape(1, 2, 2))
        self.e = torch.nn.Parameter(torch.zeros(0, 3))


def test_model_fingerprint_is_unchanged_for_existing_models() -> None:
    # Regression guard: this value was computed with the fingerprint code from before the 0-dim fix
    # (``t.view(torch.uint8)`` without ``reshape(-1)``). Checkpoints store the fingerprint and resume compares
    # it, so it must not change for any model whose parameters all have ndim >= 1.
    assert model_fingerprint(_Fixed()) == "f29a34e3438db9ab9e7b055671afdb5b342421c42217b39f8999709f3189502d"


def test_model_fingerprint_handles_0_dim_parameters() -> None:
    def scalar(v: float) -> torch.nn.Module:
        m = _Fixed()
        m.s = torch.nn.Parameter(torch.tensor(v))
        return m

    a = model_fingerprint(scalar(1.5))
    assert a == model_fingerprint(scalar(1.5)) and len(a) == 64
    assert a != model_fingerprint(scalar(-1.5)) and a != model_fingerprint(_Fixed())
    one = _Fixed()
    one.s = torch.nn.Parameter(torch.tensor([1.5]))  # same bytes, different shape
    assert a != model_fingerprint(one)
