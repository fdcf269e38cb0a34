"""Drop-outs, stragglers, gone nodes, stale replies and a killed server on the Flower path (real ServerApp and
ClientApp code, Flower's serialisation on every hop, the in-process ``LocalGrid``; the killed SuperNode of a real
deployment is in tests/test_flower_drill.py).

* ``engine.dropout`` on Flower ends bit-identical to the same run in process (offline nodes get no message);
* a node that does not answer before the deadline, and a node the SuperLink reports gone (``NODE_UNAVAILABLE``),
  count as dropped: the round goes on, the run ends as the in-process run in which that client sent nothing;
* a node that replays its round-1 reply in round 2 is refused (``stale``);
* a server that dies in the middle of a round resumes without asking the nodes whose replies it stored again.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Error, Message, MessageType  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402

from fednl.config import load_config  # noqa: E402
from fednl.engine.runstate import load_checkpoint  # noqa: E402
from fednl.experiment import build_simulator, run_config  # noqa: E402
from fednl.flower.launch import AppSettings, LocalGrid, partition_configs  # noqa: E402
from fednl.flower.node import build_client_app, handle_evaluate, handle_query, handle_train  # noqa: E402
from fednl.flower.protocol import RunRecord  # noqa: E402
from fednl.flower.server import server_main  # noqa: E402
from flower_tiny import assert_flower_equals_inprocess, tiny_config  # noqa: E402
from lost_replies import lose_replies  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
N = 3
VICTIM = "client01"


def silent(_msg: str) -> None:
    pass


def config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "run.toml"
    path.write_text(tiny_config(seed=3, rounds=2, method="fedavg", n_clients=N, extra=extra))
    return path


def flower(cfg: Path, out: Path, grid: LocalGrid | None = None, *, resume: bool = False,
           lines: list[str] | None = None) -> LocalGrid:
    grid = grid or LocalGrid(build_client_app(simulation=True), partition_configs(N))
    server_main(grid, AppSettings(config=str(cfg), out=str(out), wait_nodes_s=5, resume=resume),
                log=lines.append if lines is not None else silent)
    return grid


def inprocess_without(cfg: Path, out: Path, rnd: int, cid: str) -> None:
    """The same run in process, where ``cid``'s reply of round ``rnd`` never arrives."""
    sim = build_simulator(load_config(str(cfg)), out, log=silent)
    lose_replies(sim, {(rnd, cid)})
    sim.run()


def same_globals(a: Path, b: Path) -> bool:
    ga, gb = load_checkpoint(a / "checkpoint").global_params, load_checkpoint(b / "checkpoint").global_params
    return ga.keys() == gb.keys() and all(torch.equal(ga[n], gb[n]) for n in ga)


def round_record(out: Path, rnd: int) -> dict:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in recs if r["type"] == "round" and r["round"] == rnd)


def train_messages(grid: LocalGrid, rnd: int) -> list[str]:
    return [RunRecord.from_content(m.content).cid for m in grid.delivered
            if m.metadata.message_type == MessageType.TRAIN and m.metadata.group_id == str(rnd)]


def test_dropout_on_flower_equals_in_process(tmp_path: Path) -> None:
    cfg = config(tmp_path, "dropout = 0.34\n")
    run_config(load_config(str(cfg)), tmp_path / "inproc", log=silent)
    grid = flower(cfg, tmp_path / "flower")
    assert_flower_equals_inprocess(tmp_path / "inproc", tmp_path / "flower")  # ledger == hop bytes too
    for rnd in (1, 2):
        rec = round_record(tmp_path / "flower", rnd)
        assert len(rec["dropped"]) == 1 and rec["dropped_reason"] == {rec["dropped"][0]: "dropout"}
        assert sorted(train_messages(grid, rnd)) == sorted(set(rec["clients"]) - set(rec["dropped"]))


class SilentNodeGrid(LocalGrid):
    """The node of ``VICTIM`` takes the round-2 training message and never answers it (``gone``: the SuperLink
    answers for it with ``NODE_UNAVAILABLE``, as it does for a node that stopped sending heartbeats)."""

    def __init__(self, *args, gone: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.gone = gone

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            run = RunRecord.from_content(msg.content)
            if (msg.metadata.message_type, run.round, run.cid) != (MessageType.TRAIN, 2, VICTIM):
                ids += super().push_messages([msg])
                continue
            self._counter += 1
            mid = f"local-{self._counter}"
            if self.gone:
                msg.metadata.__dict__["_message_id"] = mid
                self._pending[mid] = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="no heartbeat"),
                                             reply_to=msg)
            ids.append(mid)
        return ids


@pytest.mark.parametrize("gone", [False, True], ids=["deadline", "node-unavailable"])
def test_a_silent_or_gone_node_is_dropped_and_the_run_goes_on(tmp_path: Path, gone: bool) -> None:
    cfg = config(tmp_path, "deadline_s = 20\n")
    grid = SilentNodeGrid(build_client_app(simulation=True), partition_configs(N), gone=gone)
    lines: list[str] = []
    if not gone:  # keep the test short: the deadline is what the server waits for the silent node
        cfg.write_text(cfg.read_text().replace("deadline_s = 20", "deadline_s = 1.5"))
    flower(cfg, tmp_path / "flower", grid, lines=lines)
    rec = round_record(tmp_path / "flower", 2)
    assert rec["dropped"] == [VICTIM]
    why = rec["dropped_reason"][VICTIM]
    assert why.startswith("node unavailable: no heartbeat" if gone else "deadline: no reply within 1.5 s"), why
    assert VICTIM not in rec["client_train"]
    inprocess_without(cfg, tmp_path / "silent", 2, VICTIM)
    assert same_globals(tmp_path / "flower", tmp_path / "silent")
    flower_json = json.loads((tmp_path / "flower" / "flower.json").read_text())
    ups = [h for h in flower_json["hop"] if h["round"] == 2 and h["kind"] == "train" and h["direction"] == "up"]
    assert sorted(h["cid"] for h in ups) == ["client00", "client02"]  # no uplink from the silent node


def replaying_app() -> ClientApp:
    """The simulation ClientApp, except that ``VICTIM``'s node answers round 2 with its round-1 reply."""
    kept: dict[str, Message] = {}

    def train(msg: Message, ctx) -> Message:
        reply = handle_train(msg, ctx, simulation=True)
        run = RunRecord.from_content(msg.content)
        if run.cid != VICTIM:
            return reply
        if run.round == 1:
            kept["reply"] = reply
            return reply
        return Message(kept["reply"].content, reply_to=msg)  # the round-1 reply, word for word

    app = ClientApp()
    app.query()(partial(handle_query, simulation=True))
    app.train()(train)
    app.evaluate()(partial(handle_evaluate, simulation=True))
    return app


def test_a_replayed_round_1_reply_is_refused_as_stale(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    flower(cfg, tmp_path / "flower", LocalGrid(replaying_app(), partition_configs(N)))
    rec = round_record(tmp_path / "flower", 2)
    [rej] = rec["rejected"]
    assert (rej["client"], rej["check"], rej["round"], rej["expected"]) == (VICTIM, "stale", 1, 2)
    inprocess_without(cfg, tmp_path / "silent", 2, VICTIM)
    assert same_globals(tmp_path / "flower", tmp_path / "silent")


class DyingServerGrid(LocalGrid):
    """Stands for the ServerApp dying in round 2 after the first reply arrived: pulling the second raises."""

    def pull_messages(self, message_ids):
        replies = super().pull_messages(message_ids)
        if replies and replies[0].metadata.group_id == "2":
            self._pending.clear()
            first = replies[:1]
            self.die_next = True
            return first
        if getattr(self, "die_next", False):
            raise KeyboardInterrupt("server killed")
        return replies


def test_a_server_killed_mid_round_does_not_ask_stored_clients_again(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    run_config(load_config(str(cfg)), tmp_path / "inproc", log=silent)
    out = tmp_path / "flower"
    with pytest.raises(KeyboardInterrupt, match="server killed"):
        flower(cfg, out, DyingServerGrid(build_client_app(simulation=True), partition_configs(N)))
    assert (out / "checkpoint" / "LATEST").read_text().strip() == "round-0001"
    assert len(list((out / "journal" / "round-0002").iterdir())) == 1
    lines: list[str] = []
    grid = flower(cfg, out, resume=True, lines=lines)
    [reused] = [ln for ln in lines if "reusing the stored replies" in ln]
    first = reused.rsplit(": ", 1)[1]
    assert sorted(train_messages(grid, 2)) == sorted({"client00", "client01", "client02"} - {first})
    assert_flower_equals_inprocess(tmp_path / "inproc", out)  # hop bytes of the stored reply carried over
