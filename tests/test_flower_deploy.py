"""Real deployment on loopback (slow): TLS SuperLink + SuperNode authentication + 2 authenticated SuperNodes.

One run of ``deploy/loopback_smoke.sh`` (module fixture) serves both tests: 2 rounds of FedNL on the tiny model
must end exactly where the in-process simulator ends (metrics within 1e-5, identical ledger, hop payload bytes =
ledger bytes), and a SuperNode whose ECDSA key was never registered must be refused by the SuperLink. The script
stops everything it starts; the fixture also kills the script's process group and every process group the
script recorded, whatever happened, and checks that none survives.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flower_tiny import tiny_config  # noqa: E402

pytest.importorskip("flwr")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "deploy" / "loopback_smoke.sh"
TIMEOUT_S = 420

CONFIG = tiny_config(seed=11, rounds=2, method="fednl")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not all(shutil.which(t) for t in ("openssl", "ssh-keygen", "setsid")),
                       reason="needs openssl, ssh-keygen and setsid"),
]


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_groups(pgids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for g in pgids:
            try:
                os.killpg(g, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + 10
        while any(_alive(g) for g in pgids) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    config = root / "run.toml"
    config.write_text(CONFIG)
    out = root / "out"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "HF_HUB_OFFLINE": "1", "RUN_TIMEOUT_S": str(TIMEOUT_S - 60)}
    proc = subprocess.Popen(["bash", str(SCRIPT), str(config), str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    recorded: list[int] = []
    try:
        try:
            log, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill_groups([proc.pid])
            log, _ = proc.communicate()
            log += f"\n[test] killed after {TIMEOUT_S} s"
    finally:
        pgid_file = out / "loopback" / "pgids"
        recorded = [int(x) for x in pgid_file.read_text().split()] if pgid_file.is_file() else []
        _kill_groups([proc.pid, *recorded])
    survivors = [g for g in [proc.pid, *recorded] if _alive(g)]
    yield {"rc": proc.returncode, "log": log, "out": out, "config": config, "survivors": survivors,
           "pgids": recorded}


def test_tls_deployment_two_rounds_equals_inprocess(deployment, tmp_path):
    from fednl.config import load_config
    from fednl.engine.experiment import run_config

    assert deployment["rc"] == 0, deployment["log"][-4000:]
    assert not deployment["survivors"], f"process groups still alive: {deployment['survivors']}"
    assert len(deployment["pgids"]) == 1 + 2 + 1  # SuperLink, two SuperNodes, the intruder
    out: Path = deployment["out"]
    got = json.loads((out / "results.json").read_text())
    expected = run_config(load_config(str(deployment["config"])), tmp_path / "inproc", log=lambda _m: None)
    assert got["rounds"] == 2 and got["comm"] == expected["comm"]
    assert set(got["clients"]) == set(expected["clients"]) == {"client00", "client01"}
    for cid, metrics in expected["clients"].items():
        for k, v in metrics.items():
            assert got["clients"][cid][k] == pytest.approx(v, abs=1e-5, rel=1e-5), (cid, k)
    flower = json.loads((out / "flower.json").read_text())
    assert flower["hop_bytes"]["train_down"]["payload"] == got["comm"]["bytes_down"]
    assert flower["hop_bytes"]["train_up"]["payload"] == got["comm"]["bytes_up"]
    assert len(set(flower["nodes"].values())) == 2
    # each SuperNode kept its client's state in its own state-dir (from its --node-config)
    for pid in range(2):
        folder = out / "loopback" / f"node-state-{pid}" / flower["run_uid"] / f"partition-{pid}"
        assert (folder / "round-00002.safetensors").is_file(), folder
    superlink_log = (out / "loopback" / "logs" / "superlink.log").read_text()
    assert "Uvicorn running on https://127.0.0.1:" in superlink_log  # TLS, loopback only
    assert superlink_log.count("RegisterNode] Created node_id") == 2  # the intruder's key was never registered


def test_unregistered_supernode_is_refused(deployment):
    work: Path = deployment["out"] / "loopback"
    assert (work / "intruder.json").is_file(), deployment["log"][-4000:]
    assert json.loads((work / "intruder.json").read_text())["refused"] is True
    log = (work / "logs" / "intruder.log").read_text()
    assert "Failed to activate SuperNode" in log and "305" in log
    # and the run never saw it: exactly the two registered nodes served the two partitions
    flower = json.loads((deployment["out"] / "flower.json").read_text())
    assert sorted(flower["nodes"]) == ["client00", "client01"]
