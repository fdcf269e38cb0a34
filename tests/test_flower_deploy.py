"""Real deployment on loopback (slow): TLS SuperLink + SuperNode authentication + 2 authenticated SuperNodes, each
reading its own data folder, and a server that holds no data.

The module fixture copies the book the task is cut from, runs the in-process reference, writes one client folder
per node (``fednl flower split-data``), then *deletes the book*: from then on the examples exist only in the two
node folders. One run of ``deploy/loopback_smoke.sh --data`` serves the tests: 2 rounds of FedNL on the tiny
model must end exactly where the in-process simulator ends (bit for bit, hop payload bytes = ledger bytes); every
node must refuse to train the other node's client (the isolation check, ``deploy/isolation``); a SuperNode whose
ECDSA key was never registered must be refused by the SuperLink. The script stops everything it starts; the
fixture also kills the script's process group and every process group the script recorded, whatever happened,
and checks that none survives.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from flower_tiny import assert_flower_equals_inprocess, tiny_config  # noqa: E402

pytest.importorskip("flwr")

from fednl.util.procs import group_alive, stop_groups  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "deploy" / "loopback_smoke.sh"
TIMEOUT_S = 600


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not all(shutil.which(t) for t in ("openssl", "ssh-keygen", "setsid")),
                       reason="needs openssl, ssh-keygen and setsid"),
]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    from fednl.config import load_config
    from fednl.data.paths import EMBEDDED_BOOK
    from fednl.experiment import run_config

    root = tmp_path_factory.mktemp("deploy")
    book = root / "book" / EMBEDDED_BOOK.name
    book.parent.mkdir()
    shutil.copyfile(EMBEDDED_BOOK, book)
    config = root / "run.toml"
    config.write_text(tiny_config(seed=11, rounds=2, method="fednl", data=str(book)))
    out = root / "out"
    run_config(load_config(str(config)), root / "inproc", log=lambda _m: None)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "HF_HUB_OFFLINE": "1", "RUN_TIMEOUT_S": str(TIMEOUT_S - 60)}
    split = subprocess.run([str(Path(sys.executable).parent / "fednl"), "flower", "split-data", str(config), "--out",
                            str(root / "data")], env=env, capture_output=True, text=True, timeout=120)
    assert split.returncode == 0, split.stdout + split.stderr
    book.unlink()  # the examples now exist only in the nodes' folders
    proc = subprocess.Popen(["bash", str(SCRIPT), str(config), str(out), "--data", str(root / "data")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    recorded: list[int] = []
    try:
        try:
            log, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stop_groups([proc.pid])
            log, _ = proc.communicate()
            log += f"\n[test] killed after {TIMEOUT_S} s"
    finally:
        pgid_file = out / "loopback" / "pgids"
        recorded = [int(x) for x in pgid_file.read_text().split()] if pgid_file.is_file() else []
        stop_groups([proc.pid, *recorded])
    survivors = [g for g in [proc.pid, *recorded] if group_alive(g)]
    yield {"rc": proc.returncode, "log": log, "out": out, "config": config, "survivors": survivors,
           "pgids": recorded, "root": root, "book": book, "split": split.stdout}


def test_tls_deployment_with_node_local_data_equals_inprocess(deployment):
    assert deployment["rc"] == 0, deployment["log"][-4000:]
    assert not deployment["survivors"], f"process groups still alive: {deployment['survivors']}"
    assert len(deployment["pgids"]) == 1 + 2 + 1  # SuperLink, two SuperNodes, the intruder
    assert not deployment["book"].exists()  # nobody could have built the task from the config
    out: Path = deployment["out"]
    got = assert_flower_equals_inprocess(deployment["root"] / "inproc", out)
    assert got["rounds"] == 2 and set(got["clients"]) == {"client00", "client01"}
    flower = json.loads((out / "flower.json").read_text())
    assert len(set(flower["nodes"].values())) == 2
    # each SuperNode read its own client folder (from its --node-config) and kept its state in its own state-dir
    data = deployment["root"] / "data"
    lines = [line.split("\t") for line in deployment["split"].splitlines()]
    assert [(p, c) for p, c, _ in lines] == [("0", "client00"), ("1", "client01")]
    for pid in range(2):
        spec = json.loads((data / f"partition-{pid}" / "client.json").read_text())
        assert spec["client"] == f"client{pid:02d}" and spec["partition-id"] == pid
        folder = out / "loopback" / f"node-state-{pid}" / flower["run_uid"] / f"partition-{pid}"
        assert (folder / "round-00002.safetensors").is_file(), folder
    assert [p.name for p in out.rglob("*.jsonl")] == ["metrics.jsonl"]  # no example reached the server's side
    superlink_log = (out / "loopback" / "logs" / "superlink.log").read_text()
    assert "Uvicorn running on https://127.0.0.1:" in superlink_log  # TLS, loopback only
    assert superlink_log.count("RegisterNode] Created node_id") == 2  # the intruder's key was never registered


def test_each_node_refuses_the_other_clients_data(deployment):
    assert deployment["rc"] == 0, deployment["log"][-4000:]
    record = json.loads((deployment["out"] / "isolation.json").read_text())
    assert record["nodes"] == record["refused"] == 2
    for holder, other in (("client00", "client01"), ("client01", "client00")):
        check = record["clients"][holder]
        assert check["asked_for"] == other and check["refused"]
        assert f"holds the data of client '{holder}' only" in check["reason"]
        assert f"refuses to train client '{other}'" in check["reason"]


def test_unregistered_supernode_is_refused(deployment):
    work: Path = deployment["out"] / "loopback"
    assert (work / "intruder.json").is_file(), deployment["log"][-4000:]
    assert json.loads((work / "intruder.json").read_text())["refused"] is True
    log = (work / "logs" / "intruder.log").read_text()
    assert "Failed to activate SuperNode" in log and "305" in log
    # and the run never saw it: exactly the two registered nodes served the two partitions
    flower = json.loads((deployment["out"] / "flower.json").read_text())
    assert sorted(flower["nodes"]) == ["client00", "client01"]
