"""Fault drill on a real Flower deployment on loopback (slow): a SuperNode is killed (SIGKILL, its whole process
group) right after round 1; its reply never comes, the SuperLink reports the node unavailable once its heartbeats
stop (about a minute; the round deadline is set far above an honest round, so a loaded machine does not turn honest
nodes into stragglers), the client counts as dropped and the run goes on to the end. ``deploy/fault_drill.py`` runs the deployment (SuperLink, one SuperNode per
client reading its own client folder, ``flwr run``) and stops every process it started.

The run must end with exactly the global parameters of the in-process run in which that client sent nothing in
round 2 (bit for bit), with no uplink bytes from it in round 2, and with the drop recorded (``deadline: ...``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flower_tiny import tiny_config
from lost_replies import lose_replies

pytest.importorskip("flwr")

from fednl.config import load_config  # noqa: E402
from fednl.engine.runstate import load_checkpoint  # noqa: E402
from fednl.experiment import build_simulator  # noqa: E402
from fednl.util.procs import group_alive, stop_groups  # noqa: E402

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 300  # far above an honest round on a loaded 2-core machine (each message starts a ClientApp process)


def test_a_killed_supernode_is_dropped_and_the_run_goes_on(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(tiny_config(seed=5, rounds=2, method="fedavg", n_clients=3))
    out = tmp_path / "drill"
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(REPO / "deploy" / "fault_drill.py"), str(config), str(out), "--kill-node", "1",
           "--after-round", "1", "--deadline", str(DEADLINE_S), "--timeout", "560"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=600)
    finally:
        pgids = [int(x) for x in (out / "loopback" / "pgids").read_text().split()] \
            if (out / "loopback" / "pgids").is_file() else []
        stop_groups([proc.pid, *pgids])
    assert proc.returncode == 0, log[-4000:]
    assert len(pgids) == 1 + 3 + 1 and not [g for g in pgids if group_alive(g)]  # SuperLink, 3 SuperNodes, flwr run
    drill = json.loads((out / "drill.json").read_text())
    assert [e["event"] for e in drill["events"]][:3] == ["started", "SuperLink ready", "killed SuperNode"]
    assert drill["rounds_completed"] == 2 and drill["finished"]
    assert drill["dropped"]["1"] == {}
    [(victim, why)] = drill["dropped"]["2"].items()
    assert victim == "client01" and why.startswith("node unavailable: "), why  # its heartbeats stopped
    run = out / "run"
    results = json.loads((run / "results.json").read_text())
    assert sorted(results["clients"]) == ["client00", "client02"]  # the dead node was not evaluated either
    per = {r["round"]: r for r in results["comm"]["per_round"]}
    assert per[2]["bytes_up"] * 3 == per[2]["bytes_down"] * 2  # downlink to 3 nodes, uplink from 2
    # the same run in process, where client01's round-2 reply never arrives: the same global parameters
    sim = build_simulator(load_config(str(config)), tmp_path / "silent", log=lambda _m: None)
    lose_replies(sim, {(2, "client01")})
    sim.run()
    ga = load_checkpoint(run / "checkpoint").global_params
    gb = load_checkpoint(tmp_path / "silent" / "checkpoint").global_params
    assert ga.keys() == gb.keys() and all(torch.equal(ga[n], gb[n]) for n in ga)
