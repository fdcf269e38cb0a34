"""The ClientExecutor seam: the one round loop with an executor that answers only some jobs (drop-outs).

The loop must aggregate over the clients that answered (weights renormalised over them), count downlink bytes for
every sampled client and uplink bytes only for replies that arrived, record who dropped out, and refuse replies
it did not ask for.
"""

from __future__ import annotations

import json

import pytest
import torch

from fednl.engine.executor import ClientExecutor, Federation, TrainReply
from fednl.engine.simulator import RoundLoop
from fednl.strategies.base import StrategyError
from test_engine_simulator import make

pytestmark = pytest.mark.usefixtures("one_thread")


class Dropping(ClientExecutor):
    """``inner``'s answers minus those of ``drop`` (their replies are lost on the way); keeps what it returned."""

    def __init__(self, inner: ClientExecutor, drop: set[str]):
        self.inner, self.drop = inner, drop
        self.federation = inner.federation
        self.returned: list[TrainReply] = []

    def train(self, rnd, jobs, state):
        self.returned = [r for r in self.inner.train(rnd, jobs, state) if r.cid not in self.drop]
        return self.returned

    def evaluate(self, rnd, cids, state):
        return self.inner.evaluate(rnd, cids, state)


def loop_with(sim, executor, out) -> RoundLoop:
    sim.spec.out = out
    return RoundLoop(sim.model, sim.strategy, sim.spec, executor, log=lambda _m: None)


def test_a_dropped_client_is_left_out_of_aggregate_ledger_and_loss(tmp_path) -> None:
    sim = make(tmp_path, strategy="fedavg", rounds=1)
    start = {n: t.clone() for n, t in sim._fresh.global_params.items()}
    executor = Dropping(sim.executor, {"client1"})
    loop = loop_with(sim, executor, tmp_path / "dropped")
    res = loop.run()
    answered = executor.returned
    assert [r.cid for r in answered] == ["client0", "client2"]
    # the aggregate is the N_k-weighted mean over the two clients that answered (fp32 wire: exact tensors)
    n = [r.num_examples for r in answered]
    assert n == [4, 6]
    for name, t in loop.state.global_params.items():
        expected = (answered[0].payload.tensors[name] * n[0] + answered[1].payload.tensors[name] * n[1]) / sum(n)
        assert torch.allclose(t, expected, atol=1e-6), name
        assert not torch.equal(t, start[name]), name
    # downlink to all three (sent), uplink from the two that answered (received)
    entries = loop.state.ledger.entries
    assert {e.cid for e in entries if e.direction == "down"} == {"client0", "client1", "client2"}
    assert {e.cid for e in entries if e.direction == "up"} == {"client0", "client2"}
    assert res["comm"]["bytes_up"] * 3 == res["comm"]["bytes_down"] * 2
    # the round record says who dropped; the loss is weighted over the answers only
    rounds = [json.loads(x) for x in (tmp_path / "dropped" / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["type"] == "round"]
    assert rounds[0]["clients"] == ["client0", "client1", "client2"] and rounds[0]["dropped"] == ["client1"]
    assert set(rounds[0]["client_train"]) == {"client0", "client2"}
    losses = [r.metrics["train_loss"] for r in answered]
    assert rounds[0]["train_loss"] == pytest.approx((losses[0] * 4 + losses[1] * 6) / 10)


def test_no_dropout_record_when_everyone_answers(tmp_path) -> None:
    sim = make(tmp_path, strategy="fedavg", rounds=1)
    loop_with(sim, Dropping(sim.executor, set()), tmp_path / "all").run()
    first = json.loads((tmp_path / "all" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["type"] == "round" and "dropped" not in first


class Extra(Dropping):
    """Every answer, plus ``also(jobs, replies)``."""

    def __init__(self, inner, also):
        super().__init__(inner, set())
        self.also = also

    def train(self, rnd, jobs, state):
        replies = self.inner.train(rnd, jobs, state)
        return replies + self.also(jobs, replies)


def test_replies_the_loop_did_not_ask_for_are_refused(tmp_path) -> None:
    sim = make(tmp_path, strategy="fedavg", rounds=1, fraction=0.34)  # one client sampled
    twice = Extra(sim.executor, lambda jobs, replies: replies)
    with pytest.raises(StrategyError, match="unexpected or repeated reply of client 'client"):
        loop_with(sim, twice, tmp_path / "twice").run()
    sim = make(tmp_path, strategy="fedavg", rounds=1, fraction=0.34)
    stranger = Extra(sim.executor, lambda jobs, replies: [TrainReply("ghost", replies[0].payload, 1)])
    with pytest.raises(StrategyError, match="unexpected or repeated reply of client 'ghost'"):
        loop_with(sim, stranger, tmp_path / "ghost").run()


def test_a_round_nobody_answers_fails_clearly(tmp_path) -> None:
    sim = make(tmp_path, strategy="fedavg", rounds=1)
    with pytest.raises(RuntimeError, match="none of the 3 sampled clients answered"):
        loop_with(sim, Dropping(sim.executor, {"client0", "client1", "client2"}), tmp_path / "none").run()


def test_federation_rejects_bad_client_sets() -> None:
    with pytest.raises(ValueError, match="not unique"):
        Federation("t", "mc", "accuracy", ("a", "b"), heldout=("a",))
    with pytest.raises(ValueError, match="no clients"):
        Federation("t", "mc", "accuracy", ())
    with pytest.raises(ValueError, match="not training clients"):
        Federation("t", "mc", "accuracy", ("a",), tested=("z",))
