"""The Flower adapter through the real ServerApp/ClientApp code paths on an in-process Grid (no Ray, no sockets).

Messages are put through Flower's own object serialisation on both hops (see ``fednl.flower.launch.LocalGrid``).
Checks: bf16 payloads bit-exact (and the run equal to the in-process one), node-local data (each node reads only
its client folder, nothing builds the task, a node refuses another client's data), held-out clients on their own
nodes, client state on the node's disk (not in Context.state), resume after a failed round, and clear errors.
Every strategy's equality with the in-process simulator is in test_flower_strategies.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from fednl.config import load_config  # noqa: E402
from fednl.engine import wire  # noqa: E402
from fednl.experiment import build_simulator, run_config  # noqa: E402
from fednl.flower.codec import TENSORS, decode_payload  # noqa: E402
from fednl.flower.data import ForeignClientError, read_client_folder, split_task  # noqa: E402
from fednl.flower.launch import AppSettings, LocalGrid, partition_configs, run_local  # noqa: E402
from fednl.flower.node import build_client_app, handle_query, handle_train  # noqa: E402
from fednl.flower.protocol import RUN, RunRecord  # noqa: E402
from fednl.flower.server import FlowerRunError, check_isolation, server_main  # noqa: E402
from flower_tiny import assert_flower_equals_inprocess, tiny_config  # noqa: E402

# No thread pin here: both the in-process run and the Flower nodes train on the config's engine.threads (1 in
# tiny_config), whatever this process uses; a node that ignored it split reductions differently and differed in the
# last bits (seen on the held-out-clients test when run alone, on two threads).

CONFIG = tiny_config(seed=3, rounds=2, method="fedavg")
N = 2


def silent(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "run.toml"
    path.write_text(CONFIG)
    return path


def run_inprocess(config_path: Path, overrides: list[str], out: Path) -> dict:
    return run_config(load_config(str(config_path), overrides), out, log=silent)


def run_flower(config_path: Path, overrides: list[str], out: Path, grid: LocalGrid | None = None,
               resume: bool = False) -> tuple[dict, LocalGrid]:
    grid = grid or LocalGrid(build_client_app(simulation=True), partition_configs(N))
    settings = AppSettings(config=str(config_path), overrides=overrides, out=str(out), resume=resume,
                           wait_nodes_s=5)
    return server_main(grid, settings, log=silent), grid


def split(config_path: Path, overrides: list[str], out: Path) -> list[Path]:
    """The task's client folders, one per partition (what `fednl flower split-data` writes)."""
    cfg = load_config(str(config_path), overrides)
    task = build_simulator(cfg, out / "probe", log=silent).task
    return [folder for _, _, folder in split_task(task, out)]


def test_bf16_payloads_cross_bit_exactly(config_path, tmp_path):
    overrides = ["method=fednl", "engine.wire_dtype=bf16"]
    run_inprocess(config_path, overrides, tmp_path / "inproc")
    _, grid = run_flower(config_path, overrides, tmp_path / "flower")
    assert_flower_equals_inprocess(tmp_path / "inproc", tmp_path / "flower")
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


def test_node_local_data_equals_inprocess_and_nothing_builds_the_task(config_path, tmp_path, monkeypatch):
    """Each node reads only its own client folder; the ServerApp holds no data; no process builds the task."""
    overrides = ["method=fednl"]
    run_inprocess(config_path, overrides, tmp_path / "inproc")
    folders = split(config_path, overrides, tmp_path / "data")
    assert [read_client_folder(f)[0].client.name for f in folders] == ["client00", "client01"]
    built: list[str] = []

    def no_task(self, *args, **kwargs):
        built.append(self.name)
        raise AssertionError("the task must not be built during a node-local Flower run")

    from fednl.data.config import TaskConfigBase

    monkeypatch.setattr(TaskConfigBase, "build", no_task)
    _, grid = run_local(AppSettings(config=str(config_path), overrides=overrides, out=str(tmp_path / "flower"),
                                    wait_nodes_s=5), N, data_dirs=folders)
    assert built == []
    assert_flower_equals_inprocess(tmp_path / "inproc", tmp_path / "flower")
    # each node was asked only for its own client
    for msg in grid.delivered:
        if msg.metadata.message_type != MessageType.QUERY:
            node = grid.contexts[msg.metadata.dst_node_id].node_config
            assert RunRecord.from_content(msg.content).cid == f"client{node['partition-id']:02d}"


def test_heldout_clients_are_evaluated_on_their_own_nodes(tmp_path):
    """Held-out clients get a node each (after the training partitions) and only evaluate messages; the run
    equals the in-process one, held-out records included — simulation nodes and node-local folders alike."""
    config = tmp_path / "run.toml"
    config.write_text(tiny_config(seed=4, rounds=1, method="fednl", n_clients=3, parts_per_book=3, heldout=1))
    expected = run_inprocess(config, [], tmp_path / "inproc")
    held = [json.loads(x) for x in (tmp_path / "inproc" / "metrics.jsonl").read_text().splitlines()
            if json.loads(x).get("heldout")]
    assert len(expected["clients"]) == 2 and len(held) == 1
    run_local(AppSettings(config=str(config), out=str(tmp_path / "sim"), wait_nodes_s=5), 3)
    assert_flower_equals_inprocess(tmp_path / "inproc", tmp_path / "sim")
    folders = split(config, [], tmp_path / "data")
    assert read_client_folder(folders[2])[0].heldout
    _, grid = run_local(AppSettings(config=str(config), out=str(tmp_path / "local"), wait_nodes_s=5), 3,
                        data_dirs=folders)
    assert_flower_equals_inprocess(tmp_path / "inproc", tmp_path / "local")
    held_node = max(grid.contexts)
    kinds = {m.metadata.message_type for m in grid.delivered if m.metadata.dst_node_id == held_node}
    assert kinds == {MessageType.QUERY, MessageType.EVALUATE}


def _ctx(node_config: dict) -> Context:
    return Context(run_id=7, node_id=1001, node_config=node_config, state=RecordDict(), run_config={})


def test_a_node_refuses_another_clients_data(config_path, tmp_path):
    folders = split(config_path, [], tmp_path / "data")
    nodes = partition_configs(N, folders)
    # the isolation check: every node asked to train the other node's client refuses
    grid = LocalGrid(build_client_app(), nodes)
    settings = AppSettings(config=str(config_path), out=str(tmp_path / "iso"), wait_nodes_s=5)
    record = check_isolation(grid, settings, log=silent)
    assert record["refused"] == record["nodes"] == N
    assert record["clients"]["client00"]["asked_for"] == "client01"
    assert "holds the data of client 'client00' only" in record["clients"]["client00"]["reason"]
    assert json.loads((tmp_path / "iso" / "isolation.json").read_text()) == record
    # ... and the check fails when a node serves whatever it is asked
    leaky = ClientApp()
    leaky.query()(handle_query)
    leaky.train()(lambda msg, ctx: Message(RecordDict(), reply_to=msg))
    with pytest.raises(FlowerRunError, match=r"did not refuse another client's data"):
        check_isolation(LocalGrid(leaky, nodes), settings, log=silent)
    # the refusal comes before anything is built or read from the message
    ask = RunRecord(op="train", run_uid="u", round=1, cid="client01")
    msg = Message(RecordDict({RUN: ask.to_record()}), dst_node_id=1001, message_type=MessageType.TRAIN, group_id="1")
    with pytest.raises(ForeignClientError, match=r"holds the data of client 'client00' only .* refuses to train "
                                                 r"client 'client01'"):
        handle_train(msg, _ctx(nodes[0]))


def test_a_deployed_node_reads_only_its_own_checked_folder(config_path, tmp_path):
    folders = split(config_path, [], tmp_path / "data")
    hello = Message(RecordDict({RUN: RunRecord(op="hello", run_uid="u").to_record()}), dst_node_id=1001,
                    message_type=MessageType.QUERY, group_id="hello")
    with pytest.raises(ValueError, match="names no data-dir: a deployed node reads its client's data from its own"):
        handle_query(hello, _ctx({"partition-id": 0, "num-partitions": N}))
    reply = handle_query(hello, _ctx(partition_configs(N, folders)[1]))
    info = dict(reply.content["fednl.node"])
    assert (info["client"], info["partition_id"], info["heldout"], info["task"]) == ("client01", 1, False, "stream")
    assert set(info) == {"partition_id", "num_partitions", "client", "heldout", "task", "kind", "n_train", "n_test",
                         "pid"}  # names and counts only
    with pytest.raises(ValueError, match="holds partition 0 of 2, but this SuperNode's node config says "
                                         "partition-id=1"):
        handle_query(hello, _ctx({"partition-id": 1, "num-partitions": N, "data-dir": str(folders[0])}))
    test_file = folders[0] / "test.jsonl"
    test_file.write_text(test_file.read_text().replace("a", "b", 1))
    with pytest.raises(ValueError, match="do not match the sha256"):
        read_client_folder(folders[0])
    with pytest.raises(FileNotFoundError, match="client.json does not exist"):
        read_client_folder(tmp_path)


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

    def pull_messages(self, message_ids):
        replies = super().pull_messages(message_ids)
        if replies and replies[0].metadata.group_id == self.crash_round:
            replies[-1] = Message(Error(code=2, reason="node crashed"), reply_to=self.delivered[-1])
        return replies


def test_resume_after_a_failed_round_ends_where_an_uninterrupted_run_does(config_path, tmp_path, fednl_run):
    overrides = ["method=fednl"]
    run_inprocess(config_path, overrides, tmp_path / "inproc")
    out = tmp_path / "resumed"
    crashing = CrashingGrid(build_client_app(simulation=True), partition_configs(N), crash_round=2)
    with pytest.raises(FlowerRunError, match="node crashed"):
        run_flower(config_path, overrides, out, grid=crashing)
    assert (out / "checkpoint" / "LATEST").read_text().strip() == "round-0001"
    uid = json.loads((out / "flower.json").read_text())["run_uid"]
    # the nodes finished round 2 before the crash: the re-run must start from round 1's state, not this one
    assert (out / "node-state" / uid / "partition-0" / "round-00002.safetensors").is_file()
    with pytest.raises(ValueError, match="already holds a run"):
        run_flower(config_path, overrides, out)
    got, _ = run_flower(config_path, overrides, out, resume=True)  # round 2 re-runs from the round-1 states
    assert got == fednl_run[0] | {"wall_s": got["wall_s"]}
    assert_flower_equals_inprocess(tmp_path / "inproc", out)


def test_federation_mismatches_are_reported(config_path, tmp_path):
    nodes = partition_configs(N)
    cases = [
        ([{"num-partitions": N}] + nodes[1:], "lacks 'partition-id'"),
        (nodes + [{"partition-id": 1, "num-partitions": N}], "both serve partition-id=1"),
        (partition_configs(4), f"num-partitions=4 but the task has {N} training"),
        (nodes[:1], r"missing partition-id\(s\) \[1\]"),
    ]
    for k, (node_configs, message) in enumerate(cases):
        grid = LocalGrid(build_client_app(simulation=True), node_configs)
        settings = AppSettings(config=str(config_path), out=str(tmp_path / f"o{k}"), wait_nodes_s=0.5)
        with pytest.raises((FlowerRunError, ValueError), match=message):
            server_main(grid, settings, log=silent)


def test_node_rejects_messages_it_cannot_serve(fednl_run):
    grid = fednl_run[1]
    train = next(m for m in grid.delivered if m.metadata.message_type == MessageType.TRAIN)
    ctx = _ctx({"partition-id": 0, "num-partitions": N})

    def with_run(**changes) -> Message:
        rec = {**dict(train.content[RUN]), **changes}
        content = RecordDict({**{k: v for k, v in train.content.items() if k != RUN}, RUN: ConfigRecord(rec)})
        return Message(content, dst_node_id=1001, message_type=MessageType.TRAIN, group_id="1")

    def train_sim(msg: Message, context: Context = ctx) -> Message:
        return handle_train(msg, context, simulation=True)

    assert RunRecord.from_content(train.content).cid == "client00"
    with pytest.raises(ValueError, match="fingerprint"):
        train_sim(with_run(fingerprint="0" * 64, cid="client00"))
    with pytest.raises(ForeignClientError, match="holds the data of client 'client00' only"):
        train_sim(with_run(cid="client01"))
    with pytest.raises(ValueError, match="sha256"):
        train_sim(with_run(config_json=train.content[RUN]["config_json"] + " "))
    with pytest.raises(ValueError, match="unknown field"):
        train_sim(with_run(extra=1))
    no_run = Message(RecordDict({k: v for k, v in train.content.items() if k != RUN}), dst_node_id=1001,
                     message_type=MessageType.TRAIN, group_id="1")
    with pytest.raises(ValueError, match="lacks the 'fednl.run' record"):
        train_sim(no_run)
    with pytest.raises(ValueError, match="outside"):
        train_sim(with_run(cid="client00"), _ctx({"partition-id": 5, "num-partitions": N}))
