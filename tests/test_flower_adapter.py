"""The Flower adapter through the real ServerApp/ClientApp code paths on an in-process Grid (no Ray, no sockets).

Messages are put through Flower's own object serialisation on both hops (see ``fednl.engine.flower_local``).
Checks: bf16 payloads bit-exact (and the run equal to the in-process one), client state on the node's disk (not
in Context.state), resume after a failed round, and clear errors. Every strategy's equality with the in-process
simulator is in test_flower_strategies.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict  # noqa: E402

from fednl.config import load_config  # noqa: E402
from fednl.engine import wire  # noqa: E402
from fednl.engine.experiment import build_simulator, run_config  # noqa: E402
from fednl.engine.flower_app import build_client_app, server_main  # noqa: E402
from fednl.engine.flower_client import handle_train  # noqa: E402
from fednl.engine.flower_codec import TENSORS, decode_payload  # noqa: E402
from fednl.engine.flower_local import LocalGrid  # noqa: E402
from fednl.engine.flower_protocol import RUN, RunRecord  # noqa: E402
from fednl.engine.flower_server import FlowerRunError  # noqa: E402
from fednl.engine.flower_settings import AppSettings  # noqa: E402
from flower_tiny import tiny_config  # noqa: E402

CONFIG = tiny_config(seed=3, rounds=2, method="fedavg")
N = 2


def silent(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "run.toml"
    path.write_text(CONFIG)
    return path


def nodes(n: int = N) -> list[dict]:
    return [{"partition-id": i, "num-partitions": n} for i in range(n)]


def run_inprocess(config_path: Path, overrides: list[str], out: Path) -> dict:
    return run_config(load_config(str(config_path), overrides), out, log=silent)


def run_flower(config_path: Path, overrides: list[str], out: Path, grid: LocalGrid | None = None,
               resume: bool = False) -> tuple[dict, LocalGrid]:
    grid = grid or LocalGrid(build_client_app(), nodes())
    settings = AppSettings(config=str(config_path), overrides=overrides, out=str(out), resume=resume,
                           wait_nodes_s=5)
    return server_main(grid, settings, log=silent), grid


def assert_same_results(a: dict, b: dict) -> None:
    assert a["comm"] == b["comm"]  # ledger: bytes up/down, per round, per parameter group
    assert set(a["clients"]) == set(b["clients"]) and a["clients"]
    for cid, metrics in a["clients"].items():
        assert set(metrics) == set(b["clients"][cid])
        for k, v in metrics.items():
            assert b["clients"][cid][k] == pytest.approx(v, rel=1e-6, abs=1e-6), (cid, k)


def hop_matches_ledger(out: Path, results: dict) -> None:
    record = json.loads((out / "flower.json").read_text())
    hops = record["hop_bytes"]
    assert hops["train_down"]["payload"] == results["comm"]["bytes_down"]
    assert hops["train_up"]["payload"] == results["comm"]["bytes_up"]
    # per round and direction as well
    for per in results["comm"]["per_round"]:
        rows = [h for h in record["hop"] if h["round"] == per["round"] and h["kind"] == "train"]
        assert sum(h["payload"] for h in rows if h["direction"] == "down") == per["bytes_down"]
        assert sum(h["payload"] for h in rows if h["direction"] == "up") == per["bytes_up"]
    assert all(h["overhead"] > 0 for h in record["hop"])  # keys + run record are reported, separately


def test_bf16_payloads_cross_bit_exactly(config_path, tmp_path):
    overrides = ["method=fednl", "engine.wire_dtype=bf16"]
    expected = run_inprocess(config_path, overrides, tmp_path / "inproc")
    got, grid = run_flower(config_path, overrides, tmp_path / "flower")
    assert_same_results(expected, got)
    # the first round's payload is the initial global rule parameters cast to bf16: compare the bits
    sim = build_simulator(load_config(str(config_path), overrides), tmp_path / "probe", log=silent)
    first = [m for m in grid.delivered if m.metadata.message_type == MessageType.TRAIN and m.metadata.group_id == "1"]
    assert len(first) == N
    for msg in first:
        cid = RunRecord.from_content(msg.content).cid
        sent = wire.encode(sim.strategy.configure_train(1, cid, sim._fresh.global_params), "bf16")
        received = decode_payload(msg.content)
        assert set(received.tensors) == set(sent.tensors) and received.tensors
        for n, t in sent.tensors.items():
            assert received.tensors[n].dtype == torch.bfloat16
            assert torch.equal(received.tensors[n].view(torch.int16), t.view(torch.int16)), n
        assert sum(len(a.data) for a in msg.content[TENSORS].values()) == wire.payload_bytes(sent)


@pytest.fixture(scope="module")
def fednl_run(config_path, tmp_path_factory) -> tuple[dict, LocalGrid, Path]:
    """One uninterrupted 2-round FedNL run through the adapter, shared by the tests below."""
    out = tmp_path_factory.mktemp("fednl") / "flower"
    results, grid = run_flower(config_path, ["method=fednl"], out)
    return results, grid, out


def test_client_state_is_on_the_node_disk_not_in_context_state(fednl_run):
    _, grid, out = fednl_run
    uid = json.loads((out / "flower.json").read_text())["run_uid"]
    for pid in range(N):
        folder = out / "node-state" / uid / f"partition-{pid}"
        assert sorted(p.name for p in folder.glob("*.safetensors")) == ["round-00001.safetensors",
                                                                       "round-00002.safetensors"]
        info = json.loads((folder / "round-00002.json").read_text())
        assert info["cid"] == f"client{pid:02d}" and info["info"]["rounds_trained"] == 2
    assert all(len(ctx.state) == 0 for ctx in grid.contexts.values())


class CrashingGrid(LocalGrid):
    """Nodes train round ``crash_round`` (and save its state), then the last reply is lost."""

    def __init__(self, *args, crash_round: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.crash_round = str(crash_round)

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        if replies and replies[0].metadata.group_id == self.crash_round:
            replies[-1] = Message(Error(code=2, reason="node crashed"), reply_to=self.delivered[-1])
        return replies


def test_resume_after_a_failed_round_ends_where_an_uninterrupted_run_does(config_path, tmp_path, fednl_run):
    overrides = ["method=fednl"]
    expected = fednl_run[0]
    out = tmp_path / "resumed"
    crashing = CrashingGrid(build_client_app(), nodes(), crash_round=2)
    with pytest.raises(FlowerRunError, match="node crashed"):
        run_flower(config_path, overrides, out, grid=crashing)
    assert (out / "checkpoint" / "LATEST").read_text().strip() == "round-0001"
    uid = json.loads((out / "flower.json").read_text())["run_uid"]
    # the nodes finished round 2 before the crash: the re-run must start from round 1's state, not this one
    assert (out / "node-state" / uid / "partition-0" / "round-00002.safetensors").is_file()
    with pytest.raises(ValueError, match="already holds a run"):
        run_flower(config_path, overrides, out)
    got, _ = run_flower(config_path, overrides, out, resume=True)  # round 2 re-runs from the round-1 states
    assert_same_results(expected, got)
    hop_matches_ledger(out, got)


def test_federation_mismatches_are_reported(config_path, tmp_path):
    cases = [
        ([{"num-partitions": N}] + nodes()[1:], "lacks 'partition-id'"),
        (nodes() + [{"partition-id": 1, "num-partitions": N}], "both serve partition-id=1"),
        ([{"partition-id": i, "num-partitions": 4} for i in range(N)], f"num-partitions=4, the task has {N}"),
        (nodes()[:1], r"missing partition-id\(s\) \[1\]"),
    ]
    for k, (node_configs, message) in enumerate(cases):
        grid = LocalGrid(build_client_app(), node_configs)
        settings = AppSettings(config=str(config_path), out=str(tmp_path / f"o{k}"), wait_nodes_s=0.5)
        with pytest.raises((FlowerRunError, ValueError), match=message):
            server_main(grid, settings, log=silent)


def test_node_rejects_messages_it_cannot_serve(fednl_run):
    grid = fednl_run[1]
    train = next(m for m in grid.delivered if m.metadata.message_type == MessageType.TRAIN)
    ctx = Context(run_id=7, node_id=1001, node_config={"partition-id": 0, "num-partitions": N}, state=RecordDict(),
                  run_config={})

    def with_run(**changes) -> Message:
        rec = {**dict(train.content[RUN]), **changes}
        content = RecordDict({**{k: v for k, v in train.content.items() if k != RUN}, RUN: ConfigRecord(rec)})
        return Message(content, dst_node_id=1001, message_type=MessageType.TRAIN, group_id="1")

    assert RunRecord.from_content(train.content).cid == "client00"
    with pytest.raises(ValueError, match="fingerprint"):
        handle_train(with_run(fingerprint="0" * 64, cid="client00"), ctx)
    with pytest.raises(ValueError, match="reached the SuperNode of partition 0"):
        handle_train(with_run(cid="client01"), ctx)
    with pytest.raises(ValueError, match="sha256"):
        handle_train(with_run(config_json=train.content[RUN]["config_json"] + " "), ctx)
    with pytest.raises(ValueError, match="unknown field"):
        handle_train(with_run(extra=1), ctx)
    no_run = Message(RecordDict({k: v for k, v in train.content.items() if k != RUN}), dst_node_id=1001,
                     message_type=MessageType.TRAIN, group_id="1")
    with pytest.raises(ValueError, match="lacks the 'fednl.run' record"):
        handle_train(no_run, ctx)
    bad_node = Context(run_id=7, node_id=1001, node_config={"partition-id": 5, "num-partitions": N},
                       state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="outside"):
        handle_train(with_run(cid="client00"), bad_node)
