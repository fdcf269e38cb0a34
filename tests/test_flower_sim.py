"""The suite's one Flower/Ray simulation (slow): `fednl flower simulate` vs the in-process simulator.

Runs the CLI in its own process group with a private Ray temp folder; afterwards (pass or fail) it kills that group
and any process whose command line names the private Ray folder, and checks that none is left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from flower_tiny import assert_flower_equals_inprocess, tiny_config  # noqa: E402

pytest.importorskip("flwr")
pytest.importorskip("ray")

TIMEOUT_S = 300
CONFIG = tiny_config(seed=2, rounds=2, method="fednl", n_clients=3, parts_per_book=3,
                     extra='wire_dtype = "bf16"\n[flower]\nnum_cpus = 1\nray_num_cpus = 2\n')


def _pids_naming(marker: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd and int(entry.name) != os.getpid():
                out.append(int(entry.name))
    return out


def _stop(group: int, marker: str) -> list[int]:
    """SIGTERM then SIGKILL the process group and the processes naming ``marker``; returns survivors."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            pass
        for pid in _pids_naming(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while _pids_naming(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
    return _pids_naming(marker)


@pytest.mark.slow
def test_flower_simulation_equals_inprocess(tmp_path):
    from fednl.config import load_config
    from fednl.experiment import run_config

    config = tmp_path / "run.toml"
    config.write_text(CONFIG)
    out = tmp_path / "sim"
    ray_tmp = tempfile.mkdtemp(prefix="fnr", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "FLWR_HOME": str(tmp_path / "flwr-home"), "HF_HUB_OFFLINE": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    cmd = [str(Path(sys.executable).parent / "fednl"), "flower", "simulate", str(config), "--out", str(out),
           "--num-gpus", "0"]  # resources from the config's [flower] table, one overridden here
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
        log += f"\n[test] killed after {TIMEOUT_S} s"
    finally:
        survivors = _stop(proc.pid, ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not survivors, f"processes left running: {survivors}"
    assert proc.returncode == 0, log[-4000:]

    run_config(load_config(str(config)), tmp_path / "inproc", log=lambda _m: None)
    got = assert_flower_equals_inprocess(tmp_path / "inproc", out)
    assert got["comm"]["bytes_up"] > 0 and len(got["clients"]) == 3

    flower = json.loads((out / "flower.json").read_text())
    timing = flower["timing"]
    assert timing["backend_config"]["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert timing["backend_config"]["init_args"]["num_cpus"] == 2
    assert set(timing["rounds"]) == {"1", "2"}
    assert timing["simulation_wall_s"] > timing["server_total_s"] > timing["startup_s"] > timing["build_s"] > 0
    assert timing["ray_outside_server_s"] > 0 and timing["prepare_s"] > 0
    for pid in range(3):  # client state on the (virtual) nodes' disk, keyed by partition id
        folder = out / "node-state" / flower["run_uid"] / f"partition-{pid}"
        assert (folder / "round-00002.safetensors").is_file()
