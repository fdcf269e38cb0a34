"""Every registered strategy runs through the Flower adapter and ends exactly where the in-process simulator does.

The Flower path is the real ServerApp/ClientApp code on an in-process Grid (``fednl.flower.launch.LocalGrid``):
every message goes through Flower's object serialisation, every node rebuilds its model from the config it
receives, serves its partition and keeps its client state on disk. Compared bit for bit
(:func:`flower_tiny.assert_flower_equals_inprocess`): results, every metrics record, the final global and server
tensors, and the hop bytes (payload of every message) against the ledger.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from flwr.app import MessageType  # noqa: E402

from fednl.config import load_config  # noqa: E402
from fednl.experiment import run_config  # noqa: E402
from fednl.flower.codec import decode_payload  # noqa: E402
from fednl.flower.launch import AppSettings, run_local  # noqa: E402
from fednl.flower.protocol import RunRecord  # noqa: E402
from fednl.strategies import available  # noqa: E402
from flower_tiny import assert_flower_equals_inprocess, tiny_config  # noqa: E402

CONFIG = tiny_config(seed=5, rounds=1, method="fedavg")
N = 2

# options that make each strategy exercise its own machinery within the tiny budget
STRATEGY_OPTIONS = {
    "fedtreelora": ["rounds=2", "method.warmup_rounds=1"],  # round 2 runs on the tree: per-client payloads
    "floral": ["method.n_adaptors=2"],
    "fedala": ["method.max_init_epochs=2"],
    "fedssi": ["method.psm_steps=1"],
}


def silent(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "run.toml"
    path.write_text(CONFIG)
    return path


def test_every_registered_strategy_is_covered():
    assert set(STRATEGY_OPTIONS) <= set(available())
    assert {"fednl", "fedavg", "fedtreelora", "floral"} <= set(available())


def check_parity(config_path: Path, tmp_path: Path, overrides: list[str], *, shares: bool = True) -> tuple[dict, list]:
    """Run both engines and :func:`assert_flower_equals_inprocess`; return (results, train messages).
    ``shares=False``: the strategy sends no parameter (local-only training), so the ledger must be empty."""
    expected = run_config(load_config(str(config_path), overrides), tmp_path / "inproc", log=silent)
    _, grid = run_local(AppSettings(config=str(config_path), overrides=overrides, out=str(tmp_path / "flower"),
                                    wait_nodes_s=5), N)
    assert_flower_equals_inprocess(tmp_path / "inproc", tmp_path / "flower")
    assert (expected["comm"]["bytes_up"] > 0) == shares
    trains = [m for m in grid.delivered if m.metadata.message_type == MessageType.TRAIN]
    return expected, trains


@pytest.mark.parametrize("method", available())
def test_strategy_on_flower_equals_inprocess(config_path, tmp_path, method):
    expected, trains = check_parity(config_path, tmp_path, [f"method={method}", *STRATEGY_OPTIONS.get(method, [])],
                                    shares=method != "local")
    assert len(trains) == N * expected["rounds"]
    if method == "fedtreelora":  # after the tree the server sends each client its own payload
        last = [decode_payload(m.content) for m in trains if m.metadata.group_id == "2"]
        assert len(last) == N and all(p.tensors for p in last)


def test_partial_participation_sends_only_to_sampled_clients(config_path, tmp_path):
    expected, trains = check_parity(config_path, tmp_path, ["method=fedavg", "method.fraction_fit=0.5", "rounds=2"])
    assert len(trains) == 2  # one sampled client per round, the same ones as in-process
    run = json.loads((tmp_path / "inproc" / "checkpoint" / "round-0002" / "run.json").read_text())
    schedule = {str(s["round"]): s["clients"] for s in run["schedule"]}
    for m in trains:
        assert [RunRecord.from_content(m.content).cid] == schedule[m.metadata.group_id]
