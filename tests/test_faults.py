"""Drop-outs, stragglers, min_clients, stale or replayed replies, and replies kept across a crash (the toy model,
in process; the Flower side is in tests/test_flower_faults.py, real process kills in tests/test_kill_resume.py)."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from fednl.engine.executor import TrainReply
from fednl.engine.journal import JOURNAL_DIR, ReplyJournal
from fednl.strategies.base import weighted_mean
from lost_replies import lose_replies
from test_resume import assert_same_run
from toy_sim import final, toy_sim

pytestmark = pytest.mark.usefixtures("one_thread")
CLIENTS = ["client0", "client1", "client2"]
ANY_DIGEST = "0" * 64


def rounds_of(out: Path) -> dict[int, dict[str, Any]]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["round"]: r for r in recs if r["type"] == "round"}


def spy_replies(sim) -> dict[int, list[TrainReply]]:
    """Record the replies the executor hands back, per round."""
    seen: dict[int, list[TrainReply]] = {}
    inner = sim.executor.train

    def train(rnd, jobs, state):
        out = inner(rnd, jobs, state)
        seen.setdefault(rnd, []).extend(out)
        return out

    sim.executor.train = train  # type: ignore[method-assign]
    return seen


# ---------------------------------------------------------------------------------------------- drop-outs
def test_dropout_is_seeded_reweighted_counted_and_resumes_bit_identical(tmp_path: Path) -> None:
    engine = {"dropout": 0.34}  # round(0.34 * 3) = 1 client offline per round
    sim = toy_sim(tmp_path / "full", rounds=3, engine=engine)
    seen = spy_replies(sim)
    before: dict[int, dict[str, torch.Tensor]] = {}
    inner_agg = sim._aggregate

    def agg(rnd, replies, state, **kw):
        before[rnd] = {n: t.clone() for n, t in state.global_params.items()}
        return inner_agg(rnd, replies, state, **kw)

    sim._aggregate = agg  # type: ignore[method-assign]
    sim.run()
    recs = rounds_of(tmp_path / "full")
    ledger = final(tmp_path / "full").ledger
    gone = {}
    for rnd in (1, 2, 3):
        rec = recs[rnd]
        assert len(rec["dropped"]) == 1 and rec["dropped_reason"] == {rec["dropped"][0]: "dropout"}
        gone[rnd] = rec["dropped"][0]
        assert rec["dropped"] == sim.offline(rnd, CLIENTS)  # the seeded draw, the same in any process
        assert {r.cid for r in seen[rnd]} == set(CLIENTS) - {gone[rnd]}  # it was never asked to train
        # an offline client gets nothing and sends nothing: no ledger entry in either direction
        assert {e.cid for e in ledger.entries if e.round == rnd} == set(CLIENTS) - {gone[rnd]}
    assert len(set(gone.values())) > 1  # a fresh draw every round
    # FedAvg over the clients that answered, N_k-weighted (fp32 wire: the tensors the clients sent)
    replies = seen[1]
    want = weighted_mean([r.payload.tensors for r in replies], [r.num_examples for r in replies])
    sim2 = toy_sim(tmp_path / "one", rounds=1, engine=engine)
    sim2.run()
    got = final(tmp_path / "one").global_params
    assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in want)
    # killed after round 1 and resumed: bit-identical to the straight run, drop-outs included
    assert toy_sim(tmp_path / "resumed", rounds=3, engine=engine).run(stop_after=1) is None
    toy_sim(tmp_path / "resumed", rounds=3, engine=engine).run(resume=True)
    assert_same_run(tmp_path / "full", tmp_path / "resumed")


def test_a_straggler_past_the_deadline_counts_as_dropped(tmp_path: Path) -> None:
    """An injected delay makes client1 slower than ``engine.deadline_s``: its reply is discarded (no uplink bytes,
    not aggregated, reason recorded), the round goes on; the global parameters equal those of a run in which
    client1 never answered."""
    sim = toy_sim(tmp_path / "slow", rounds=1, engine={"deadline_s": 1.0})
    inner = sim.runtime.round

    def slow_round(rnd, cid, *args, **kw):
        if cid == "client1":
            time.sleep(1.3)
        return inner(rnd, cid, *args, **kw)

    sim.runtime.round = slow_round  # type: ignore[method-assign]
    lines: list[str] = []
    sim.log = lines.append
    sim.run()
    rec = rounds_of(tmp_path / "slow")[1]
    assert rec["dropped"] == ["client1"] and rec["dropped_reason"]["client1"].startswith("deadline: answered after")
    assert set(rec["client_train"]) == {"client0", "client2"}
    ledger = final(tmp_path / "slow").ledger
    assert {e.cid for e in ledger.entries if e.direction == "down"} == set(CLIENTS)  # it was sent its payload
    assert {e.cid for e in ledger.entries if e.direction == "up"} == {"client0", "client2"}
    assert any("dropped client1 (deadline: answered after" in ln for ln in lines)
    silent = toy_sim(tmp_path / "silent", rounds=1)
    lose_replies(silent, {(1, "client1")})  # the run's only round
    silent.run()
    ga, gb = final(tmp_path / "slow").global_params, final(tmp_path / "silent").global_params
    assert all(torch.equal(ga[n], gb[n]) for n in ga)


def test_below_min_clients_the_round_is_skipped_and_the_reason_recorded(tmp_path: Path) -> None:
    """Round 1 with 2 of 3 clients online and ``min_clients = 3``: skipped (global state unchanged, reason in
    metrics.jsonl and on the console line); round 2 is aggregated as usual from the unchanged state."""
    sim = toy_sim(tmp_path / "r", rounds=1, engine={"dropout": 0.34, "min_clients": 3})
    start = {n: t.clone() for n, t in sim._fresh.global_params.items()}
    lines: list[str] = []
    sim.log = lines.append
    sim.run()
    rec = rounds_of(tmp_path / "r")[1]
    assert rec["skipped"] == {"reason": "min_clients", "accepted": 2, "min_clients": 3, "sampled": 3,
                              "message": "2 accepted update(s) of 3 sampled < engine.min_clients 3"}
    assert all(torch.equal(final(tmp_path / "r").global_params[n], start[n]) for n in start)
    [line] = [ln for ln in lines if ln.startswith("round")]
    assert "skipped: 2 accepted update(s) of 3 sampled < engine.min_clients 3" in line
    # min_clients = 2 is met by the same two replies
    toy_sim(tmp_path / "ok", rounds=1, engine={"dropout": 0.34, "min_clients": 2}).run()
    assert "skipped" not in rounds_of(tmp_path / "ok")[1]
    assert not all(torch.equal(final(tmp_path / "ok").global_params[n], start[n]) for n in start)


def test_screened_out_updates_count_against_min_clients(tmp_path: Path) -> None:
    sim = toy_sim(tmp_path / "r", rounds=1, engine={"min_clients": 3})
    honest = sim.executor.train
    nan = lambda t: torch.full_like(t, float("nan"))  # noqa: E731
    sim.executor.train = lambda rnd, jobs, state: [  # type: ignore[method-assign]
        replace(r, payload=replace(r.payload, tensors={n: nan(t) for n, t in r.payload.tensors.items()}))
        if r.cid == "client0" else r for r in honest(rnd, jobs, state)]
    sim.run()
    rec = rounds_of(tmp_path / "r")[1]
    assert rec["skipped"]["accepted"] == 2 and [r["check"] for r in rec["rejected"]] == ["nonfinite"]


# ---------------------------------------------------------------------------------------------- stale / replay
def tamper_run(out: Path, tamper) -> None:
    sim = toy_sim(out, rounds=2)
    honest = sim.executor.train
    kept: dict[int, list[TrainReply]] = {}

    def train(rnd, jobs, state):
        replies = honest(rnd, jobs, state)
        kept[rnd] = replies
        return tamper(rnd, replies, kept)

    sim.executor.train = train  # type: ignore[method-assign]
    sim.run()


@pytest.mark.parametrize("attack,check", [
    ("old_round", "stale"),    # client1 replays its round-1 reply (round 1, its nonce) in round 2
    ("wrong_round", "stale"),  # its round-2 reply claims round 1
    ("nonce", "replay"),       # the right round, another nonce
    ("twice", "replay"),       # its round-2 reply sent twice: the first is kept, the copy refused
])
def test_stale_and_replayed_replies_are_refused(tmp_path: Path, attack: str, check: str) -> None:
    def hostile(rnd, replies, kept):
        if rnd != 2:
            return replies
        out = []
        for r in replies:
            if r.cid != "client1":
                out.append(r)
            elif attack == "old_round":
                out.append(next(x for x in kept[1] if x.cid == "client1"))
            elif attack == "wrong_round":
                out.append(replace(r, round=1))
            elif attack == "nonce":
                out.append(replace(r, nonce="0" * 16))
            else:
                out += [r, r]
        return out

    def silent(rnd, replies, kept):
        return [r for r in replies if (rnd, r.cid) != (2, "client1")]

    tamper_run(tmp_path / "hostile", hostile)
    tamper_run(tmp_path / "silent", silent)
    rec = rounds_of(tmp_path / "hostile")[2]
    assert [(r["client"], r["check"]) for r in rec["rejected"]] == [("client1", check)]
    ga = final(tmp_path / "hostile").global_params
    if attack == "twice":  # the genuine reply counts: the run is the honest one
        tamper_run(tmp_path / "honest", lambda rnd, replies, kept: replies)
        gb = final(tmp_path / "honest").global_params
    else:  # the refused reply never reaches the aggregate: as if client1 had not answered
        gb = final(tmp_path / "silent").global_params
        assert "client1" not in rec["client_train"] and "dropped" not in rec
    assert all(torch.equal(ga[n], gb[n]) for n in ga)


# ---------------------------------------------------------------------------------------------- the journal
class Crash(Exception):
    """Stands for the process dying (the subprocess kills are in tests/test_kill_resume.py)."""


def test_replies_stored_before_a_crash_are_reused_not_retrained(tmp_path: Path) -> None:
    """The run dies in round 2 while client2 trains: client0's and client1's replies are in the journal. The resumed
    run reuses them (their clients are not trained again, their states are restored), trains only client2, ends
    bit-identical to the straight run, and the journal is gone once round 2's checkpoint is written."""
    toy_sim(tmp_path / "straight", rounds=3, options={}).run()
    sim = toy_sim(tmp_path / "run", rounds=3)
    inner = sim.runtime.round

    def dies(rnd, cid, *args, **kw):
        if (rnd, cid) == (2, "client2"):
            raise Crash
        return inner(rnd, cid, *args, **kw)

    sim.runtime.round = dies  # type: ignore[method-assign]
    with pytest.raises(Crash):
        sim.run()
    journal = tmp_path / "run" / JOURNAL_DIR / "round-0002"
    assert sorted(p.name for p in journal.iterdir()) == ["client0.safetensors", "client1.safetensors"]
    assert final(tmp_path / "run").round == 1
    lines: list[str] = []
    resumed = toy_sim(tmp_path / "run", rounds=3, log=lines.append)
    trained: list[tuple[int, str]] = []
    inner2 = resumed.runtime.round

    def count(rnd, cid, *args, **kw):
        trained.append((rnd, cid))
        return inner2(rnd, cid, *args, **kw)

    resumed.runtime.round = count  # type: ignore[method-assign]
    resumed.run(resume=True)
    assert [t for t in trained if t[0] == 2] == [(2, "client2")]
    assert "round 2: reusing the stored replies of 2 client(s): client0, client1" in lines
    assert not (tmp_path / "run" / JOURNAL_DIR).exists()
    assert_same_run(tmp_path / "straight", tmp_path / "run")


def test_a_stored_reply_that_does_not_answer_the_job_is_not_reused(tmp_path: Path) -> None:
    """An entry whose nonce or downlink digest is not the job's is ignored: the client trains again."""
    sim = toy_sim(tmp_path / "run", rounds=2)
    inner = sim.runtime.round

    def dies(rnd, cid, *args, **kw):
        if (rnd, cid) == (1, "client1"):
            raise Crash
        return inner(rnd, cid, *args, **kw)

    sim.runtime.round = dies  # type: ignore[method-assign]
    with pytest.raises(Crash):
        sim.run()
    lines: list[str] = []
    journal = ReplyJournal(tmp_path / "run" / JOURNAL_DIR)
    assert journal.load(1, {"client0": (sim.job_nonce(1, "client0"), ANY_DIGEST)}) == {}  # another downlink
    stored = journal._read(journal.path(1, "client0"))
    assert stored is not None
    digest = stored[1]
    assert set(journal.load(1, {"client0": (sim.job_nonce(1, "client0"), digest)})) == {"client0"}
    assert journal.load(1, {"client0": ("0" * 16, digest)}) == {}  # another nonce
    other = toy_sim(tmp_path / "run", rounds=2, seed=4, log=lines.append)  # another seed: other nonces
    other.run(resume=True)
    assert not any("reusing" in ln for ln in lines)
    assert any("no checkpoint was written yet, starting from round 0" in ln for ln in lines)


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path: Path) -> None:
    toy_sim(tmp_path / "straight", rounds=2).run()
    assert toy_sim(tmp_path / "run", rounds=2).run(stop_after=1) is None
    with open(tmp_path / "run" / "metrics.jsonl", "a") as fh:
        fh.write('{"type": "round", "round": 2, "cli')  # killed in the middle of the round-2 append
    toy_sim(tmp_path / "run", rounds=2).run(resume=True)
    assert_same_run(tmp_path / "straight", tmp_path / "run")


def test_kill_point_specs_are_checked() -> None:
    from fednl.util.faults import parse

    assert parse("reply_stored:2:3") == ("reply_stored", 2, 3)
    assert parse("results") == ("results", None, 1)
    assert parse("checkpoint_writing::2") == ("checkpoint_writing", None, 2)
    for bad, msg in (("nowhere", "expected <point>"), ("results:x", "must be integers"),
                     ("results:1:0", "count must be >= 1"), ("results:1:2:3", "expected <point>")):
        with pytest.raises(ValueError, match=msg):
            parse(bad)
