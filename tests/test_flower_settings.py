"""Flower run config <-> AppSettings, Ray resources, the hop ledger, the run record and the deploy app section."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, RecordDict  # noqa: E402

from fednl.config import FlowerResources  # noqa: E402
from fednl.flower.codec import MessageBytes  # noqa: E402
from fednl.flower.launch import RUN_CONFIG_KEYS, AppSettings, join_overrides, split_overrides  # noqa: E402
from fednl.flower.protocol import (  # noqa: E402
    RUN,
    RunRecord,
    config_sha,
    config_to_json,
    node_identity,
)
from fednl.flower.server import HopLedger  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_run_config_roundtrip_and_override_splitting():
    s = AppSettings(config="/cfg/run.toml", overrides=["rounds=3", 'method.scope="all"'], out="/runs/x",
                    resume=True, state_dir="/var/fednl", wait_nodes_s=60, round_timeout_s=900)
    rc = s.to_run_config()
    assert set(rc) == set(RUN_CONFIG_KEYS)
    assert rc["fednl-set"] == 'rounds=3; method.scope="all"'
    assert AppSettings.from_run_config(rc) == s
    assert split_overrides(" a=1 ;; b.c=x; ") == ["a=1", "b.c=x"]
    with pytest.raises(ValueError, match="contains ';'"):
        join_overrides(["a=1;b=2"])


def test_run_config_errors_name_the_key():
    with pytest.raises(ValueError, match="'fednl-config' is empty"):
        AppSettings.from_run_config({"fednl-config": "", "out-dir": "/x"})
    with pytest.raises(ValueError, match="'out-dir' is empty"):
        AppSettings.from_run_config({"fednl-config": "tiny"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['num-server-rounds'\]"):
        AppSettings.from_run_config({"fednl-config": "tiny", "out-dir": "/x", "num-server-rounds": 3})
    with pytest.raises(ValueError, match="wait-nodes-s: Input should be greater than 0"):
        AppSettings.from_run_config({"fednl-config": "tiny", "out-dir": "/x", "wait-nodes-s": -1})


@pytest.mark.parametrize("app_dir,serverapp", [("deploy", "serverapp"), ("deploy/isolation", "isolationapp")])
def test_deploy_pyproject_declares_exactly_the_keys_the_server_reads(app_dir, serverapp):
    import fednl.flower.app as flower_app

    data = tomllib.loads((REPO / app_dir / "pyproject.toml").read_text())
    flwr = data["tool"]["flwr"]["app"]
    assert flwr["components"] == {"serverapp": f"fednl.flower.app:{serverapp}",
                                  "clientapp": "fednl.flower.app:clientapp"}
    assert hasattr(flower_app, serverapp)
    assert set(flwr["config"]) == set(RUN_CONFIG_KEYS)
    assert "torch" not in " ".join(data["project"]["dependencies"])  # runtime install would pull a CUDA torch


def test_ray_resources():
    cfg = FlowerResources(num_cpus=2, num_gpus=0.25, ray_num_cpus=8, ray_num_gpus=1).backend_config()
    assert cfg["client_resources"] == {"num_cpus": 2, "num_gpus": 0.25}
    assert cfg["init_args"]["num_cpus"] == 8 and cfg["init_args"]["num_gpus"] == 1
    assert "num_cpus" not in FlowerResources().backend_config()["init_args"]
    with pytest.raises(ValueError):
        FlowerResources(num_cpus=0)
    with pytest.raises(ValueError):
        FlowerResources(gpus=1)  # type: ignore[call-arg]


def test_run_record_roundtrip_and_integrity():
    text = config_to_json({"rounds": 2, "method": {"name": "fednl"}})
    assert text == config_to_json({"method": {"name": "fednl"}, "rounds": 2})  # canonical: key order free
    rec = RunRecord(op="train", run_uid="u1", round=3, cid="c0", config_json=text, config_sha=config_sha(text),
                    seed_gen=2**62 + 5, seed_torch=7)
    back = RunRecord.from_content(RecordDict({RUN: rec.to_record()}))
    assert back == rec and back.seed_gen == 2**62 + 5
    with pytest.raises(ValueError, match="unknown op"):
        RunRecord(op="fit", run_uid="u")
    with pytest.raises(ValueError, match="sha256"):
        RunRecord(op="train", run_uid="u", config_json=text, config_sha="0" * 64)
    with pytest.raises(ValueError, match="lacks the 'fednl.run' record"):
        RunRecord.from_content(RecordDict({"other": ConfigRecord({"a": 1})}))


def test_node_identity_from_node_config():
    node = node_identity({"partition-id": 1, "num-partitions": 3, "state-dir": " /data/fednl "})
    assert (node.partition_id, node.num_partitions, node.state_dir) == (1, 3, "/data/fednl")
    assert node_identity({"partition-id": 0, "num-partitions": 1}).state_dir == ""
    assert node_identity({"partition-id": 0, "num-partitions": 1, "data-dir": " /d/c0 "}).data_dir == "/d/c0"
    with pytest.raises(ValueError, match="lacks 'num-partitions'"):
        node_identity({"partition-id": 0})
    with pytest.raises(ValueError, match="outside"):
        node_identity({"partition-id": 3, "num-partitions": 3})
    with pytest.raises(ValueError, match="integers"):
        node_identity({"partition-id": "a", "num-partitions": 3})


def test_hop_ledger_totals_truncation_and_json():
    hops = HopLedger()
    hops.add(1, "c0", "train", "down", MessageBytes(100, 10))
    hops.add(1, "c0", "train", "up", MessageBytes(100, 4))
    hops.add(2, "c1", "train", "down", MessageBytes(60, 10))
    hops.add(2, "c1", "evaluate", "down", MessageBytes(400, 30))
    s = hops.summary()
    assert s["train_down"] == {"payload": 160, "overhead": 20, "messages": 2}
    assert s["train_up"] == {"payload": 100, "overhead": 4, "messages": 1}
    assert s["evaluate_down"]["payload"] == 400 and s["evaluate_up"]["messages"] == 0
    assert hops.total("payload", kind="train", rnd=2) == 60
    again = HopLedger.from_json(hops.to_json())
    again.truncate(1)
    assert [r.round for r in again.rows] == [1, 1]
    with pytest.raises(ValueError, match="malformed hop record"):
        HopLedger.from_json([{"round": 1}])


def test_simulate_command_refuses_bad_invocations_before_starting_ray(tmp_path):
    from typer.testing import CliRunner

    from fednl.cli import app

    runner = CliRunner()
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")
    res = runner.invoke(app, ["flower", "simulate", "tiny", "--out", str(out)])
    assert res.exit_code == 2 and "already holds a run" in res.output and "--overwrite" in res.output
    res = runner.invoke(app, ["flower", "simulate", "--out", str(out)])
    assert res.exit_code == 2 and "missing CONFIG" in res.output
    res = runner.invoke(app, ["flower", "simulate", "--resume", str(out), "--out", str(tmp_path / "other")])
    assert res.exit_code == 2 and "name different directories" in res.output
    res = runner.invoke(app, ["flower", "simulate", "--resume", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "config.resolved.toml does not exist" in res.output


def test_run_config_command_prints_a_flwr_run_config_file(tmp_path):
    from typer.testing import CliRunner

    from fednl.cli import app

    res = CliRunner().invoke(app, ["flower", "run-config", "tiny", "--out", "/srv/runs/x", "--set", "rounds=3",
                                   "--set", 'method.scope="rules"', "--resume"])
    assert res.exit_code == 0, res.output
    parsed = tomllib.loads(res.output)
    assert AppSettings.from_run_config(parsed) == AppSettings(
        config="tiny", overrides=["rounds=3", 'method.scope="rules"'], out="/srv/runs/x", resume=True)


def test_clients_and_split_data_commands(tmp_path):
    """`fednl flower clients` counts training + held-out nodes; `split-data` writes one checked folder per node."""
    import json

    from typer.testing import CliRunner

    from fednl.cli import app
    from fednl.flower.data import read_client_folder
    from flower_tiny import tiny_config

    config = tmp_path / "run.toml"
    config.write_text(tiny_config(seed=4, rounds=1, method="fednl", n_clients=3, parts_per_book=3, heldout=1))
    runner = CliRunner()
    res = runner.invoke(app, ["flower", "clients", str(config)])
    assert res.exit_code == 0 and res.output.strip() == "3", res.output
    res = runner.invoke(app, ["flower", "split-data", str(config), "--out", str(tmp_path / "data")])
    assert res.exit_code == 0, res.output
    rows = [line.split("\t") for line in res.output.splitlines()]
    assert [r[0] for r in rows] == ["0", "1", "2"]
    specs = [json.loads((tmp_path / "data" / f"partition-{i}" / "client.json").read_text()) for i in range(3)]
    assert [s["heldout"] for s in specs] == [False, False, True]
    assert [s["client"] for s in specs] == [r[1] for r in rows]
    for i, spec in enumerate(specs):
        data, _ = read_client_folder(tmp_path / "data" / f"partition-{i}")
        assert data.client.name == spec["client"] and len(data.client.train) == spec["train"]
    res = runner.invoke(app, ["flower", "split-data", str(config), "--out", str(tmp_path / "data")])
    assert res.exit_code == 2 and "is not empty" in res.output
