"""Every registered strategy runs through the Flower adapter and ends exactly where the in-process simulator does.

The Flower path is the real ServerApp/ClientApp code on an in-process Grid (``fednl.engine.flower_local``): every
message goes through Flower's object serialisation, every node rebuilds its client from the config it receives
and keeps its state on disk. Compared: per-client metrics, the byte ledger (per round and parameter group), and
the hop bytes (payload of every message) against the ledger.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from flwr.app import MessageType  # noqa: E402

from fednl.config import load_config  # noqa: E402
from fednl.engine.experiment import run_config  # noqa: E402
from fednl.engine.flower_codec import decode_payload  # noqa: E402
from fednl.engine.flower_local import run_local  # noqa: E402
from fednl.engine.flower_protocol import RunRecord  # noqa: E402
from fednl.engine.flower_settings import AppSettings  # noqa: E402
from fednl.strategies import available  # noqa: E402
from flower_tiny import tiny_config  # noqa: E402

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
    """Run both engines; assert equal metrics, ledgers and hop payloads; return (results, train messages).
    ``shares=False``: the strategy sends no parameter (local-only training), so the ledger must be empty."""
    expected = run_config(load_config(str(config_path), overrides), tmp_path / "inproc", log=silent)
    got, grid = run_local(AppSettings(config=str(config_path), overrides=overrides, out=str(tmp_path / "flower"),
                                      wait_nodes_s=5), N)

    # same per-client metrics and the same ledger (bytes per round, direction and parameter group)
    assert got["comm"] == expected["comm"] and (expected["comm"]["bytes_up"] > 0) == shares
    assert set(got["clients"]) == set(expected["clients"]) and expected["clients"]
    for cid, metrics in expected["clients"].items():
        for k, v in metrics.items():
            assert got["clients"][cid][k] == pytest.approx(v, rel=1e-6, abs=1e-6), (cid, k)

    # the hop carried exactly the ledger's payload bytes, message by message summed per round and direction
    record = json.loads((tmp_path / "flower" / "flower.json").read_text())
    for per in expected["comm"]["per_round"]:
        rows = [h for h in record["hop"] if h["round"] == per["round"] and h["kind"] == "train"]
        assert sum(h["payload"] for h in rows if h["direction"] == "down") == per["bytes_down"]
        assert sum(h["payload"] for h in rows if h["direction"] == "up") == per["bytes_up"]
    assert all(h["overhead"] > 0 for h in record["hop"])

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
