"""Screening, robust aggregation and client-level DP inside the round loop (the toy model, in process).

The central check: a rejected update never reaches the global parameters — a run in which one client sends a
hostile update ends bit-identical to the same run in which that client did not answer at all."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from fednl.config import EngineConfig, TrainConfig
from fednl.engine.dp import DPConfig
from fednl.engine.executor import TrainReply
from fednl.engine.robust import RobustConfig, coordinate_median
from fednl.engine.screening import ScreenConfig
from fednl.engine.simulator import RunSpec, Simulator
from fednl.strategies import get_strategy
from fednl.strategies.base import Payload
from test_engine_toy import ToyMemoryLM, tokenizer, toy_task
from test_resume import assert_same_run
from toy_sim import final

pytestmark = pytest.mark.usefixtures("one_thread")

POISON = 1.0e6
Tamper = Callable[[int, TrainReply], TrainReply | None]


def hostile_sim(out: Path, *, method: str = "fedavg", rounds: int = 2, n_clients: int = 3, tamper: Tamper | None = None,
                screen: ScreenConfig | None = None, robust: RobustConfig | None = None, dp: DPConfig | None = None
                ) -> Simulator:
    """The toy federation; ``tamper(rnd, reply)`` rewrites (or drops, returning None) each reply as it crosses the
    wire back to the server."""
    model = ToyMemoryLM(seed=1)
    with torch.no_grad():
        model.gate.fill_(1.0)
    cls = get_strategy(method)
    strategy = cls(cls.Options(), groups=model.groups())
    train = TrainConfig(batch_size=2, seq_len=32, lr=0.05, max_steps=2)
    eng = EngineConfig(progress=False)
    config = {"rounds": rounds, "method": method, "dp": None if dp is None else dp.model_dump()}
    spec = RunSpec(rounds=rounds, seed=3, train=train, engine=eng, out=out, method=method, model_name="toy",
                   config=config, screen=screen, robust=robust, dp=dp)
    sim = Simulator(model, tokenizer(), toy_task(n_clients=n_clients), strategy, spec, log=lambda s: None)
    if tamper is not None:
        honest = sim.executor.train

        def train(rnd, jobs, state):
            out_ = [tamper(rnd, r) for r in honest(rnd, jobs, state)]
            return [r for r in out_ if r is not None]

        sim.executor.train = train  # type: ignore[method-assign]
    return sim


def rewrite(reply: TrainReply, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> TrainReply:
    tensors = {n: fn(n, t) for n, t in reply.payload.tensors.items()}
    return replace(reply, payload=Payload(tensors, dict(reply.payload.meta)))


def nan_first(n: str, t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


ATTACKS: dict[str, tuple[Callable[[TrainReply], TrainReply], str]] = {
    "nan": (lambda r: rewrite(r, nan_first), "nonfinite"),
    "inf": (lambda r: rewrite(r, lambda n, t: torch.full_like(t, float("inf"))), "nonfinite"),
    "shape": (lambda r: rewrite(r, lambda n, t: torch.full((t.numel() + 1,), POISON)), "shape"),
    "dtype": (lambda r: rewrite(r, lambda n, t: torch.full(t.shape, 7, dtype=torch.int64)), "dtype"),
    "names": (lambda r: replace(r, payload=Payload({**r.payload.tensors, "evil": torch.tensor([POISON])})),
              "names"),
    "huge": (lambda r: rewrite(r, lambda n, t: t * POISON), "norm"),
}


def by_round(out: Path) -> dict[int, dict[str, Any]]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["round"]: r for r in recs if r["type"] == "round"}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_rejected_update_never_reaches_the_global_parameters(tmp_path: Path, attack: str) -> None:
    """Client client1 sends a hostile update in round 1. The run ends bit-identical (global parameters) to the run in
    which client1 sent nothing in round 1; the rejection is in metrics.jsonl with the client, the check and numbers."""
    corrupt, check = ATTACKS[attack]
    screen = ScreenConfig(norm_k=10)

    def hostile(rnd: int, r: TrainReply) -> TrainReply | None:
        return corrupt(r) if (rnd, r.cid) == (1, "client1") else r

    def silent(rnd: int, r: TrainReply) -> TrainReply | None:
        return None if (rnd, r.cid) == (1, "client1") else r

    hostile_sim(tmp_path / "hostile", rounds=1, tamper=hostile, screen=screen).run()
    hostile_sim(tmp_path / "silent", rounds=1, tamper=silent, screen=screen).run()
    ga, gb = final(tmp_path / "hostile").global_params, final(tmp_path / "silent").global_params
    assert all(torch.equal(ga[n], gb[n]) for n in ga), attack
    assert all(bool(torch.isfinite(t).all()) and float(t.abs().max()) < POISON / 10 for t in ga.values())
    rec = by_round(tmp_path / "hostile")[1]
    [rej] = rec["rejected"]
    assert rej["client"] == "client1" and rej["check"] == check, rej
    assert "client1" in rec["client_train"]  # it answered; its training metrics are kept
    assert math.isfinite(rec["train_loss"])


def test_a_reply_the_uplink_codec_did_not_write_is_refused_not_fatal(tmp_path: Path) -> None:
    """float64 tensors under the fp32 uplink codec: the reply is refused (check ``wire``), its bytes are in the
    ledger (they crossed), the round goes on and ends as if the client had not answered."""
    def f64(rnd: int, r: TrainReply) -> TrainReply | None:
        return rewrite(r, lambda n, t: t.double()) if (rnd, r.cid) == (1, "client0") else r

    def silent(rnd: int, r: TrainReply) -> TrainReply | None:
        return None if (rnd, r.cid) == (1, "client0") else r

    hostile_sim(tmp_path / "f64", rounds=1, tamper=f64).run()
    hostile_sim(tmp_path / "silent", rounds=1, tamper=silent).run()
    ga, gb = final(tmp_path / "f64").global_params, final(tmp_path / "silent").global_params
    assert all(torch.equal(ga[n], gb[n]) for n in ga)
    rec = by_round(tmp_path / "f64")[1]
    assert [(r["client"], r["check"]) for r in rec["rejected"]] == [("client0", "wire")] and "dropped" not in rec
    ledger = final(tmp_path / "f64").ledger
    up = {e.cid: 0 for e in ledger.entries}
    for e in ledger.entries:
        up[e.cid] += e.bytes if e.direction == "up" else 0
    assert up["client0"] == 2 * up["client1"]  # float64: twice the bytes of the fp32 reply, counted as they crossed


def test_every_reply_rejected_leaves_the_global_state_untouched(tmp_path: Path) -> None:
    sim = hostile_sim(tmp_path / "r", rounds=1, tamper=lambda rnd, r: ATTACKS["nan"][0](r))
    before = {n: t.clone() for n, t in sim._fresh.global_params.items()}
    sim.run()
    after = final(tmp_path / "r").global_params
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert len(by_round(tmp_path / "r")[1]["rejected"]) == 3


def test_the_console_line_names_the_rejected_client(tmp_path: Path) -> None:
    lines: list[str] = []
    sim = hostile_sim(tmp_path / "r", rounds=1,
                      tamper=lambda rnd, r: ATTACKS["shape"][0](r) if r.cid == "client2" else r)
    sim.log = lines.append
    sim.run()
    [line] = [ln for ln in lines if ln.startswith("round")]
    assert "rejected client2 (shape:" in line


def test_median_is_the_mean_the_strategy_aggregates_with(tmp_path: Path) -> None:
    """7 clients, 2 of them send (global − 10 × their update): the strategy's aggregate is the coordinate-wise
    median of exactly the replies it received."""
    seen: list[Any] = []

    def flip(rnd: int, r: TrainReply) -> TrainReply:
        return rewrite(r, lambda n, t: -10 * t) if r.cid in ("client3", "client5") else r

    sim = hostile_sim(tmp_path / "m", rounds=1, n_clients=7, tamper=flip, robust=RobustConfig(rule="median"))
    inner = sim.strategy.aggregate_train

    def spy(rnd, replies, global_params):
        out = inner(rnd, replies, global_params)
        seen.append(([r.payload.tensors for r in replies], out))
        return out

    sim.strategy.aggregate_train = spy  # type: ignore[method-assign]
    sim.run()
    [(tensor_sets, out)] = seen
    assert len(tensor_sets) == 7
    want = coordinate_median(tensor_sets)
    assert all(torch.equal(out[n], want[n]) for n in want)
    assert all(torch.equal(final(tmp_path / "m").global_params[n], want[n]) for n in want)


def test_krum_leaves_out_the_sign_flipped_clients(tmp_path: Path) -> None:
    def flip(rnd: int, r: TrainReply) -> TrainReply:
        return rewrite(r, lambda n, t: -10 * t) if r.cid in ("client3", "client5") else r

    hostile_sim(tmp_path / "k", rounds=1, n_clients=7, tamper=flip,
                robust=RobustConfig(rule="krum", num_malicious=2, select=3)).run()
    rec = by_round(tmp_path / "k")[1]
    assert {"client3", "client5"} <= set(rec["krum_dropped"]) and len(rec["krum_dropped"]) == 4


def test_dp_epsilon_every_round_budget_stop_and_bit_identical_resume(tmp_path: Path) -> None:
    dp = DPConfig(clip_norm=0.05, noise_multiplier=2.0, delta=1e-5)
    hostile_sim(tmp_path / "full", rounds=3, dp=dp).run()
    recs = by_round(tmp_path / "full")
    eps = [recs[r]["dp"]["epsilon"] for r in (1, 2, 3)]
    assert 0 < eps[0] < eps[1] < eps[2] and [recs[r]["dp"]["releases"] for r in (1, 2, 3)] == [1, 2, 3]
    assert recs[1]["clipped"]  # C = 0.05 is below the toy updates' norms: every update is clipped
    # the noise is seeded: a second run is bit-identical, and so is a run killed after round 1 and resumed
    hostile_sim(tmp_path / "again", rounds=3, dp=dp).run()
    assert_same_run(tmp_path / "full", tmp_path / "again")
    assert hostile_sim(tmp_path / "resumed", rounds=3, dp=dp).run(stop_after=1) is None
    hostile_sim(tmp_path / "resumed", rounds=3, dp=dp).run(resume=True)
    assert_same_run(tmp_path / "full", tmp_path / "resumed")
    # a budget between ε(2) and ε(3) stops the run cleanly after round 2 ...
    budget = DPConfig(**{**dp.model_dump(), "max_epsilon": (eps[1] + eps[2]) / 2})
    res = hostile_sim(tmp_path / "budget", rounds=3, dp=budget).run()
    assert res is not None and res["stopped"]["reason"] == "max_epsilon" and res["stopped"]["rounds_completed"] == 2
    assert res["stopped"]["epsilon"] == pytest.approx(eps[1])
    assert final(tmp_path / "budget").round == 2
    lines = [json.loads(x) for x in (tmp_path / "budget" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["type"] == "stop" and lines[-1]["reason"] == "max_epsilon"
    # ... and a resume with a larger budget (dp.max_epsilon may change) finishes like the run without one
    more = DPConfig(**{**dp.model_dump(), "max_epsilon": eps[2] * 2})
    hostile_sim(tmp_path / "budget", rounds=3, dp=more).run(resume=True)
    ga, gb = final(tmp_path / "full").global_params, final(tmp_path / "budget").global_params
    assert all(torch.equal(ga[n], gb[n]) for n in ga)


def test_plain_runs_write_no_new_fields(tmp_path: Path) -> None:
    hostile_sim(tmp_path / "p", rounds=1).run()
    rec = by_round(tmp_path / "p")[1]
    assert not {"rejected", "clipped", "krum_dropped", "dp"} & set(rec)
