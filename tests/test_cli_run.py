"""`fednl run` / `fednl presets` end to end (tiny model), and bad configs exiting non-zero with a clear message."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from fednl.cli import app

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULT_KEYS = {"method", "model", "task", "rounds", "clients", "mean", "comm", "wall_s", "seed"}


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_fednl_run_tiny_end_to_end(tmp_path) -> None:
    out = tmp_path / "tiny"
    res = invoke("run", "tiny", "--out", str(out))
    assert res.exit_code == 0, res.output
    # one console line per round, torchtitan style
    lines = [ln for ln in res.output.splitlines() if ln.startswith("round ")]
    assert len(lines) == 2
    for ln in lines:
        fields = [f.strip() for f in ln.split("|")]
        assert fields[0].startswith("round") and fields[1].startswith("loss") and fields[2].startswith("accuracy")
        assert "↑" in fields[3] and "↓" in fields[3] and fields[4].endswith("s/round")
        assert fields[5].startswith("peak mem")
    assert {p.name for p in out.iterdir()} == {"config.resolved.toml", "metrics.jsonl", "results.json", "checkpoint"}
    results = json.loads((out / "results.json").read_text())
    assert set(results) == RESULT_KEYS
    assert results["method"] == "fednl" and results["rounds"] == 2 and results["seed"] == 0
    assert results["model"] == "tiny/titans" and results["task"] == "niah7"
    assert set(results["clients"]) == {"passkey", "uuid", "counter"}
    assert set(results["comm"]) == {"bytes_up", "bytes_down", "per_round", "by_group"}
    # FedNL scope=rules: only rule and gate cross the wire, the same bytes every round and both ways
    assert set(results["comm"]["by_group"]) == {"rule", "gate"}
    per = results["comm"]["per_round"]
    assert len(per) == 2 and per[0] == {"round": 1, "bytes_up": per[0]["bytes_up"], "bytes_down": per[0]["bytes_up"]}
    assert results["comm"]["bytes_up"] == sum(r["bytes_up"] for r in per)
    assert 0.0 <= results["mean"]["accuracy"] <= 1.0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records if r["type"] == "round"] == [1, 2]
    assert sorted(r["client"] for r in records if r["type"] == "eval") == ["counter", "passkey", "uuid"]
    # an existing run is never silently replaced
    again = invoke("run", str(out / "config.resolved.toml"), "--out", str(out))
    assert again.exit_code == 2 and "already holds a run" in again.output and "--overwrite" in again.output
    (out / "notes.txt").write_text("mine")
    again = invoke("run", str(out / "config.resolved.toml"), "--out", str(out), "--overwrite", "--set", "rounds=1")
    assert again.exit_code == 0, again.output
    assert json.loads((out / "results.json").read_text())["rounds"] == 1
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own outputs were replaced


@pytest.mark.parametrize("args,message", [
    (["--set", "colour=blue"], "colour: Extra inputs are not permitted"),
    (["--set", "rounds=-1"], "rounds: Input should be greater than or equal to 1"),
    (["--set", "task.data_dir=/no/such/books"], "task.data_dir: path does not exist: /no/such/books"),
    (["--set", "train.lr=0"], "train.lr: Input should be greater than 0"),
    (["--set", "method=nosuch"], "method.name: unknown method 'nosuch'"),
])
def test_bad_configs_exit_nonzero_naming_the_problem(tmp_path, args, message) -> None:
    res = invoke("run", "tiny", "--out", str(tmp_path / "x"), *args)
    assert res.exit_code == 2
    assert message in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "x").exists()  # nothing written for an invalid config


def test_missing_inputs_are_clear_errors(tmp_path) -> None:
    res = invoke("run", str(tmp_path / "absent.toml"), "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "config file not found" in res.output
    res = invoke("run", "tiny")
    assert res.exit_code == 2 and "missing --out" in res.output
    res = invoke("run", "--resume", str(tmp_path / "nothing"))
    assert res.exit_code == 2 and "config.resolved.toml does not exist" in res.output
    res = invoke("run", "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "missing CONFIG" in res.output


def test_presets_command_lists_descriptions() -> None:
    res = invoke("presets")
    assert res.exit_code == 0
    names = {ln.split()[0] for ln in res.output.splitlines() if ln.strip()}
    assert {"tiny", "quickstart"} <= names
    assert all(len(ln.split(maxsplit=1)) == 2 for ln in res.output.splitlines() if ln.strip())
