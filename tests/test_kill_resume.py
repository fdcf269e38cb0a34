"""Kill the server process with SIGKILL at named points and at a random moment, resume with the documented
command, and end bit-identical to the uninterrupted run (tiny model, 3 clients, 3 rounds, 30 % drop-out).

One run directory goes through the whole chain — each step is a real ``fednl run`` subprocess that kills itself
(``FEDNL_KILL_AT``, :mod:`fednl.util.faults`) or is killed from outside:

1. killed in round 1 after the first reply was stored: no checkpoint exists yet;
2. ``fednl run --resume DIR``: starts from round 0, reuses that reply (the client is not trained again), and is
   killed right after round 1's metrics line — the case of the issue: metrics.jsonl shows round 1, no checkpoint;
3. resumed, killed while writing round 2's checkpoint (its files half written in a temporary folder);
4. resumed, killed after round 3's checkpoint folder got its name but before ``LATEST`` pointed at it;
5. resumed, killed after the last checkpoint, before results.json;
6. resumed to the end.

A second run is killed from outside (``kill -9``) a random delay after it started (wrote its config) and resumed
to the end. Then, for both, every
tensor of the final checkpoint (global parameters, client states), the schedule, the ledger, every
metrics.jsonl record but its timing fields and results.json but ``wall_s`` equal the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flower_tiny import tiny_config
from typer.testing import CliRunner

from fednl.cli import app
from fednl.config import load_config
from fednl.engine.journal import JOURNAL_DIR
from fednl.engine.runstate import load_checkpoint
from fednl.experiment import run_config
from fednl.util.faults import ENV

pytestmark = pytest.mark.slow
FEDNL = str(Path(sys.executable).parent / "fednl")
TIMING = {"s_round", "peak_mem_mb"}


def env(kill_at: str | None) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != ENV}
    e.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    if kill_at:
        e[ENV] = kill_at
    return e


def killed(args: list[str], kill_at: str) -> str:
    """Run ``fednl ARGS`` until it kills itself at ``kill_at``; returns its output."""
    p = subprocess.run([FEDNL, *args], env=env(kill_at), capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == -signal.SIGKILL, f"rc {p.returncode}, expected SIGKILL at {kill_at}:\n{out[-3000:]}"
    assert f"{ENV}: killing process" in out and f"at {kill_at.split(':')[0]}" in out, out[-2000:]
    return out


def records(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING}
            for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def latest(run: Path) -> str | None:
    p = run / "checkpoint" / "LATEST"
    return p.read_text().strip() if p.is_file() else None


def test_killed_at_any_point_resumes_bit_identical(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(tiny_config(seed=5, rounds=3, method="fednl", n_clients=3, extra="dropout = 0.34\n"))
    reference = tmp_path / "reference"
    run_config(load_config(str(config)), reference, log=lambda _m: None)
    run = tmp_path / "run"

    # 1. killed in round 1 after the first reply was stored, before any checkpoint
    t0 = time.perf_counter()
    killed(["run", str(config), "--out", str(run)], "reply_stored:1:1")
    first_s = time.perf_counter() - t0  # start-up and one client's round: the scale of the random kill below
    assert latest(run) is None
    stored = sorted((run / JOURNAL_DIR / "round-0001").iterdir())
    assert len(stored) == 1
    first = stored[0].stem
    # 2. the documented command; the stored reply is reused; killed after round 1's metrics line
    out = killed(["run", "--resume", str(run)], "metrics_written:1")
    assert "no checkpoint was written yet, starting from round 0 (stored replies are reused)" in out
    assert f"round 1: reusing the stored replies of 1 client(s): {first}" in out
    assert [r["round"] for r in records(run) if r["type"] == "round"] == [1] and latest(run) is None
    # 3. killed while writing round 2's checkpoint
    killed(["run", "--resume", str(run)], "checkpoint_writing:2")
    assert latest(run) == "round-0001" and list((run / "checkpoint").glob("round-0002.tmp-*"))
    # 4. killed between the rename of round 3's checkpoint and LATEST
    killed(["run", "--resume", str(run)], "checkpoint_renamed:3")
    assert latest(run) == "round-0002" and (run / "checkpoint" / "round-0003").is_dir()
    assert not list((run / "checkpoint").glob("*.tmp-*"))  # the next save removed the half-written folder
    # 5. killed after the last checkpoint, before results.json
    killed(["run", "--resume", str(run)], "results")
    assert latest(run) == "round-0003" and not (run / "results.json").exists()
    # 6. to the end
    res = CliRunner().invoke(app, ["run", "--resume", str(run)])
    assert res.exit_code == 0, res.output
    assert_same_run(reference, run)

    # and a second run, killed from outside (kill -9) at a random moment, then resumed to the end
    other = tmp_path / "random"
    proc = subprocess.Popen([FEDNL, "run", str(config), "--out", str(other)], env=env(None),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (other / "config.resolved.toml").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the run has started (before this there is nothing to resume)
    delay = random.Random().uniform(0.0, 1.5) * first_s
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    res = CliRunner().invoke(app, ["run", "--resume", str(other)])
    assert res.exit_code == 0, f"killed after {delay:.2f} s:\n{res.output}"
    assert_same_run(reference, other)


def assert_same_run(reference: Path, run: Path) -> None:
    a, b = load_checkpoint(reference / "checkpoint"), load_checkpoint(run / "checkpoint")
    assert a.round == b.round == 3
    assert a.global_params.keys() == b.global_params.keys() and a.global_params
    assert all(torch.equal(a.global_params[n], b.global_params[n]) for n in a.global_params)
    assert a.clients.keys() == b.clients.keys()
    for cid in a.clients:
        ta, tb = a.clients[cid].tensors, b.clients[cid].tensors
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), cid
        assert a.clients[cid].info == b.clients[cid].info
    assert a.schedule == b.schedule and a.ledger.to_json() == b.ledger.to_json()
    assert records(reference) == records(run)
    assert any(r.get("dropped") for r in records(run))  # the drop-outs were on throughout
    ra, rb = (json.loads((p / "results.json").read_text()) for p in (reference, run))
    ra.pop("wall_s"), rb.pop("wall_s")
    assert ra == rb
    assert not (run / JOURNAL_DIR).exists()
