"""The ClientExecutor seam: the one round loop with an executor that answers only some jobs (drop-outs).

The loop must aggregate over the clients that answered (weights renormalised over them), count downlink bytes for
every sampled client and uplink bytes only for replies that arrived, record who dropped out, refuse replies
it did not ask for, and skip (not fail) a round nobody answered.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from fednl.engine.executor import ClientExecutor, Federation, TrainReply
from fednl.engine.simulator import RoundLoop
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


def _round_record(out) -> dict:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if json.loads(x)["type"] == "round"][0]


def test_replies_the_loop_did_not_ask_for_are_refused(tmp_path) -> None:
    """A second reply to one job and a reply from a client that got no job are refused (check ``replay``), their
    bytes counted; the round goes on and ends exactly as without them."""
    sim = make(tmp_path, strategy="fedavg", rounds=1, fraction=0.34)  # one client sampled
    plain = loop_with(sim, Dropping(sim.executor, set()), tmp_path / "plain")
    plain.run()
    sim = make(tmp_path, strategy="fedavg", rounds=1, fraction=0.34)
    twice = loop_with(sim, Extra(sim.executor, lambda jobs, replies: replies), tmp_path / "twice")
    twice.run()
    sim = make(tmp_path, strategy="fedavg", rounds=1, fraction=0.34)
    ghost = loop_with(sim, Extra(sim.executor, lambda jobs, replies: [replace(replies[0], cid="ghost")]),
                      tmp_path / "ghost")
    ghost.run()
    for loop, who in ((twice, None), (ghost, "ghost")):
        assert all(torch.equal(loop.state.global_params[n], plain.state.global_params[n])
                   for n in plain.state.global_params)
        [rej] = _round_record(loop.out)["rejected"]
        assert rej["check"] == "replay" and (who is None or rej["client"] == who), rej
        up = plain.state.ledger.total("up")
        assert loop.state.ledger.total("up") == 2 * up  # the refused copy crossed too


def test_a_round_nobody_answers_is_skipped_and_recorded(tmp_path) -> None:
    sim = make(tmp_path, strategy="fedavg", rounds=1)
    before = {n: t.clone() for n, t in sim._fresh.global_params.items()}
    lines: list[str] = []
    loop = loop_with(sim, Dropping(sim.executor, {"client0", "client1", "client2"}), tmp_path / "none")
    loop.log = lines.append
    loop.run()
    assert all(torch.equal(loop.state.global_params[n], before[n]) for n in before)
    rec = _round_record(tmp_path / "none")
    assert rec["dropped"] == ["client0", "client1", "client2"]
    assert rec["dropped_reason"] == {c: "no reply" for c in rec["dropped"]}
    assert rec["skipped"]["reason"] == "min_clients" and rec["skipped"]["accepted"] == 0
    [line] = [ln for ln in lines if ln.startswith("round")]
    assert "skipped: 0 accepted update(s) of 3 sampled < engine.min_clients 1" in line


def test_federation_rejects_bad_client_sets() -> None:
    with pytest.raises(ValueError, match="not unique"):
        Federation("t", "mc", "accuracy", ("a", "b"), heldout=("a",))
    with pytest.raises(ValueError, match="no clients"):
        Federation("t", "mc", "accuracy", ())
    with pytest.raises(ValueError, match="not training clients"):
        Federation("t", "mc", "accuracy", ("a",), tested=("z",))
