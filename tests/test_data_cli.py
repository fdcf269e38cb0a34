"""`fednl data build`: overrides, report output, JSONL export, clear errors."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from fednl.cli.data import apply_overrides, parse_override, register


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    root = typer.Typer()
    register(root)

    @root.callback()
    def _main() -> None:  # keep "data" a sub-command group
        pass

    return root


def test_overrides_parse_toml_values():
    assert parse_override("quickstart=true") == (["quickstart"], True)
    assert parse_override("partition.alpha=0.3") == (["partition", "alpha"], 0.3)
    assert parse_override("templates=[\"passkey\"]") == (["templates"], ["passkey"])
    assert parse_override("data_dir=some/folder") == (["data_dir"], "some/folder")
    assert apply_overrides({"name": "x", "partition": {"kind": "iid"}}, ["partition.n_clients=3"]) == {
        "name": "x", "partition": {"kind": "iid", "n_clients": 3}}
    with pytest.raises(ValueError, match="key=value"):
        parse_override("novalue")


def test_build_prints_report_and_writes_jsonl(app, tmp_path):
    out = tmp_path / "niah.jsonl"
    res = CliRunner().invoke(app, ["data", "build", "niah7", "--set", "quickstart=true", "--set", "n_train=4",
                                   "--set", "n_test=2", "--set", "heldout=[\"counter\"]", "--seed", "2",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "passkey: 4 train, 2 test" in res.output and "counter (heldout): 4 train, 2 test" in res.output
    assert "pooled entropy" in res.output and "fingerprint " in res.output
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 7 * 6 and {r["client"] for r in recs if r["heldout"]} == {"counter"}


def test_bad_input_exits_with_a_message(app, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["data", "build", "niah7", "--set", "bogus=1"])
    assert res.exit_code == 2 and "task.bogus: Extra inputs are not permitted" in res.output
    res = runner.invoke(app, ["data", "build", "mmlu5", "--set", f"data_dir={tmp_path / 'nope'}"])
    assert res.exit_code == 2 and "path does not exist" in res.output
    res = runner.invoke(app, ["data", "build", "niah7", "--model", "gpt2"])
    assert res.exit_code == 2 and "--model must be 'byte' or 'smollm2'" in res.output
