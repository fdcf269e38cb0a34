"""ServerApp side of the Flower adapter: the simulator's round loop with clients on SuperNodes.

:class:`FlowerEngine` *is* the in-process :class:`~fednl.engine.simulator.Simulator` — sampling, per-client
``configure_train``, wire casts, the byte ledger, ``aggregate_train``, server state, evaluation schedule,
metrics.jsonl, checkpoint/resume and results.json are inherited unchanged — except that the two places where
clients run are replaced by messages through the Flower ``Grid``:

* ``_round``: one ``train`` message per sampled client, each with its *own* payload (so per-client payloads
  such as FedTreeLoRA's cluster experts work), all sent at once with ``grid.send_and_receive``;
* ``evaluate``: one ``evaluate`` message per client with a test split (held-out clients, which have no node,
  are still evaluated by the server itself).

Next to the fednl ledger (payload tensor bytes, which must equal the in-process ledger), :class:`HopLedger`
records, per message, what fednl put on the SuperLink<->SuperNode hop: payload bytes and record overhead (see
:mod:`fednl.engine.flower_codec`), for training and evaluation messages. It is written to ``<out>/flower.json``.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fednl.engine.atomic import atomic_write_json
from fednl.engine.flower_codec import MessageBytes, decode_payload, encode_payload, message_bytes, tensors_to_record
from fednl.engine.flower_protocol import (
    EVAL,
    GLOBAL,
    NODE,
    REPLY,
    RUN,
    SERVER,
    SERVER_INFO,
    RunRecord,
    config_sha,
    config_to_json,
)
from fednl.engine.runstate import RunState
from fednl.engine.simulator import Simulator
from fednl.strategies.base import ClientReply, Payload

FLOWER_JSON = "flower.json"
NODE_STATE_DIR = "node-state"


class FlowerRunError(RuntimeError):
    """A SuperNode failed, did not answer in time, or the federation does not match the task."""


# ---------------------------------------------------------------------------------------------- hop bytes
@dataclass(frozen=True)
class HopRow:
    round: int
    cid: str
    kind: str  # "train" | "evaluate"
    direction: str  # "down" (server -> node) | "up"
    payload: int
    overhead: int


class HopLedger:
    """Bytes of every fednl message on the SuperLink<->SuperNode hop (see :mod:`fednl.engine.flower_codec`)."""

    def __init__(self, rows: Iterable[HopRow] = ()):
        self.rows: list[HopRow] = list(rows)

    def add(self, rnd: int, cid: str, kind: str, direction: str, mb: MessageBytes) -> None:
        self.rows.append(HopRow(rnd, cid, kind, direction, mb.payload, mb.overhead))

    def truncate(self, last_round: int) -> None:
        self.rows = [r for r in self.rows if r.round <= last_round]

    def total(self, field: str, *, kind: str | None = None, direction: str | None = None,
              rnd: int | None = None) -> int:
        return sum(getattr(r, field) for r in self.rows
                   if (kind is None or r.kind == kind) and (direction is None or r.direction == direction)
                   and (rnd is None or r.round == rnd))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kind in ("train", "evaluate"):
            for d in ("down", "up"):
                out[f"{kind}_{d}"] = {"payload": self.total("payload", kind=kind, direction=d),
                                      "overhead": self.total("overhead", kind=kind, direction=d),
                                      "messages": sum(1 for r in self.rows if r.kind == kind and r.direction == d)}
        return out

    def to_json(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.rows]

    @classmethod
    def from_json(cls, rows: list[dict[str, Any]]) -> HopLedger:
        try:
            return cls(HopRow(**r) for r in rows)
        except TypeError as exc:
            raise ValueError(f"malformed hop record in {FLOWER_JSON}: {exc}") from None


# ---------------------------------------------------------------------------------------------- nodes
def _raise_errors(replies: list[Message], what: str) -> None:
    errors = [f"node {r.metadata.src_node_id}: [code {r.error.code}] {r.error.reason}" for r in replies if r.has_error()]
    if errors:
        raise FlowerRunError(f"{what} failed on {len(errors)} SuperNode(s):\n" + "\n".join(errors))


def discover_nodes(grid: Grid, client_names: list[str], run_uid: str, *, timeout_s: float,
                   log: Callable[[str], None] = print) -> dict[str, int]:
    """Ask every connected SuperNode for its ``partition-id``; wait until each of the task's clients has one.

    Returns ``{cid: node_id}`` with ``cid = client_names[partition_id]``. Raises :class:`FlowerRunError` when two
    nodes claim one partition, a node's ``num-partitions`` disagrees with the task, or ``timeout_s`` passes.
    """
    n = len(client_names)
    deadline = time.monotonic() + timeout_s
    asked: set[int] = set()
    found: dict[int, int] = {}
    hello = RunRecord(op="hello", run_uid=run_uid).to_record()
    while True:
        new = sorted(set(grid.get_node_ids()) - asked)
        if new:
            msgs = [Message(RecordDict({RUN: ConfigRecord(dict(hello))}), dst_node_id=node,
                            message_type=MessageType.QUERY, group_id="hello") for node in new]
            replies = list(grid.send_and_receive(msgs, timeout=max(1.0, deadline - time.monotonic())))
            _raise_errors(replies, "hello")
            for r in replies:
                info = r.content[NODE]
                pid, num = int(info["partition-id"]), int(info["num-partitions"])
                node = r.metadata.src_node_id
                if num != n:
                    raise FlowerRunError(f"SuperNode {node} has num-partitions={num}, the task has {n} clients")
                if pid in found and found[pid] != node:
                    raise FlowerRunError(f"SuperNodes {found[pid]} and {node} both serve partition-id={pid}")
                found[pid] = node
            asked.update(r.metadata.src_node_id for r in replies)
        if len(found) == n:
            break
        if time.monotonic() > deadline:
            missing = sorted(set(range(n)) - set(found))
            raise FlowerRunError(f"only {len(found)} of {n} partitions connected within {timeout_s:.0f} s; "
                                 f"missing partition-id(s) {missing}")
        time.sleep(0.5)
    log(f"flower: {n} SuperNodes connected: " + ", ".join(f"{client_names[p]}=node {found[p]}" for p in range(n)))
    return {client_names[p]: found[p] for p in range(n)}


# ---------------------------------------------------------------------------------------------- engine
class FlowerEngine(Simulator):
    """The simulator whose clients run on Flower SuperNodes (see the module docstring).

    Every node validates the resolved config (``spec.config``) it receives and builds its run from it; its model
    fingerprint must equal this engine's.
    """

    def __init__(self, sim: Simulator, grid: Grid, nodes: dict[str, int], *, run_uid: str, state_dir: str,
                 round_timeout_s: float = 0.0, startup: dict[str, float] | None = None):
        super().__init__(sim.model, sim.tokenizer, sim.task, sim.strategy, sim.spec, log=sim.log)
        missing = sorted(set(self.client_names) - set(nodes))
        if missing:
            raise FlowerRunError(f"no SuperNode for client(s) {missing}")
        self.grid, self.nodes = grid, dict(nodes)
        self.cid_of_node = {node: cid for cid, node in self.nodes.items()}
        self.run_uid, self.state_dir = run_uid, state_dir
        self.round_timeout_s = float(round_timeout_s)
        self.config_json = config_to_json(self.spec.config)
        self.config_sha = config_sha(self.config_json)
        self.hops = HopLedger()
        self.timing: dict[str, Any] = {**{k: round(v, 3) for k, v in (startup or {}).items()}, "rounds": {}}
        self._rnd = 0

    # ------------------------------------------------------------------ messages
    def _run_record(self, op: str, rnd: int, cid: str, **seeds: int) -> ConfigRecord:
        return RunRecord(op=op, run_uid=self.run_uid, round=rnd, cid=cid, config_json=self.config_json,
                         config_sha=self.config_sha, fingerprint=self.fingerprint,
                         wire_dtype=self.spec.engine.wire_dtype, state_dir=self.state_dir, **seeds).to_record()

    def _exchange(self, msgs: list[Message], cids: list[str], what: str) -> dict[str, Message]:
        timeout = self.round_timeout_s or None
        replies = list(self.grid.send_and_receive(msgs, timeout=timeout))
        _raise_errors(replies, what)
        out: dict[str, Message] = {}
        for r in replies:
            cid = self.cid_of_node.get(r.metadata.src_node_id)
            if cid is None or cid not in cids:
                raise FlowerRunError(f"{what}: unexpected reply from node {r.metadata.src_node_id}")
            out[cid] = r
        missing = [c for c in cids if c not in out]
        if missing:
            raise FlowerRunError(f"{what}: no reply from client(s) {missing} within {self.round_timeout_s:.0f} s")
        return out

    def _timing(self, rnd: int, key: str, seconds: float) -> None:
        self.timing["rounds"].setdefault(str(rnd), {})[key] = round(seconds, 4)

    # ------------------------------------------------------------------ the two overridden steps
    def _round(self, rnd: int, state: RunState, rng: random.Random) -> tuple[list[ClientReply], list[str]]:
        self._rnd = rnd
        chosen, seeds = self._sample_round(rnd, state, rng)
        msgs = []
        received: dict[str, Payload | None] = {}
        for cid in chosen:
            payload = self.strategy.configure_train(rnd, cid, state.global_params)
            down, received[cid] = self.wire.encode_down(cid, payload, state.engine_tensors)
            self._send(state, rnd, cid, "down", down)
            content = encode_payload(down)
            content[RUN] = self._run_record("train", rnd, cid, seed_gen=seeds[cid][0], seed_torch=seeds[cid][1])
            self.hops.add(rnd, cid, "train", "down", message_bytes(content))
            msgs.append(Message(content, dst_node_id=self.nodes[cid], message_type=MessageType.TRAIN,
                                group_id=str(rnd)))
        t0 = time.perf_counter()
        answers = self._exchange(msgs, chosen, f"round {rnd} training")
        self._timing(rnd, "train_exchange_s", time.perf_counter() - t0)
        replies: list[ClientReply] = []
        for cid in chosen:  # the sampling order, as in-process: aggregation sums in the same order
            content = answers[cid].content
            up = decode_payload(content)
            try:
                self.wire.check(up, "up")
            except ValueError as exc:
                raise FlowerRunError(f"client {cid}: {exc}") from None
            stats = dict(content[REPLY])
            num_examples = int(stats.pop("num-examples"))
            self.hops.add(rnd, cid, "train", "up", message_bytes(content))
            self._send(state, rnd, cid, "up", up)
            replies.append(ClientReply(cid, self.wire.decode_up(up, received[cid], like=state.global_params),
                                       num_examples, {k: float(v) for k, v in stats.items()}))
        self._save_flower_json()
        return replies, chosen

    def evaluate(self, state: RunState) -> dict[str, dict[str, float]]:
        rnd = self._rnd
        cids = [c for c in self.client_names if self.data[c].test]
        base = {GLOBAL: tensors_to_record(state.global_params), SERVER: tensors_to_record(state.server_tensors),
                SERVER_INFO: ConfigRecord({"json": json.dumps(state.server_info, sort_keys=True)})}
        msgs = []
        for cid in cids:
            content = RecordDict({**base, RUN: self._run_record("evaluate", rnd, cid)})
            self.hops.add(rnd, cid, "evaluate", "down", message_bytes(content))
            msgs.append(Message(content, dst_node_id=self.nodes[cid], message_type=MessageType.EVALUATE,
                                group_id=f"{rnd}-eval"))
        t0 = time.perf_counter()
        answers = self._exchange(msgs, cids, f"round {rnd} evaluation")
        self._timing(rnd, "eval_exchange_s", time.perf_counter() - t0)
        out: dict[str, dict[str, float]] = {}
        for cid in cids:
            content = answers[cid].content
            self.hops.add(rnd, cid, "evaluate", "up", message_bytes(content))
            out[cid] = {k: float(v) for k, v in content[EVAL].items()}
        self._save_flower_json()
        return out

    # ------------------------------------------------------------------ bookkeeping
    def _rolled_back(self, state: RunState) -> None:
        super()._rolled_back(state)
        self._rnd = state.round  # nodes then evaluate the client state they saved after that round

    def _start(self, resume: bool) -> tuple[RunState, random.Random]:
        state, rng = super()._start(resume)
        if resume:
            record = read_flower_json(self.out)
            self.hops = HopLedger.from_json(record.get("hop", []))
            self.hops.truncate(state.round)
            rounds = {k: v for k, v in record.get("timing", {}).get("rounds", {}).items() if int(k) <= state.round}
            self.timing["rounds"] = rounds
            self.timing["resumed_after_round"] = state.round
        self._rnd = state.round
        self._save_flower_json()
        return state, rng

    def flower_record(self) -> dict[str, Any]:
        return {
            "run_uid": self.run_uid,
            "nodes": {cid: self.nodes[cid] for cid in self.client_names},
            "state_dir": self.state_dir,
            "config_sha256": self.config_sha,
            "hop_bytes": self.hops.summary(),
            "timing": self.timing,
            "hop": self.hops.to_json(),
        }

    def finish(self, server_total_s: float) -> None:
        """Record the ServerApp's whole duration (build + nodes + rounds) in flower.json."""
        self.timing["server_total_s"] = round(server_total_s, 3)
        self._save_flower_json()

    def _save_flower_json(self) -> None:
        atomic_write_json(self.out / FLOWER_JSON, self.flower_record())


def read_flower_json(out: str | Path) -> dict[str, Any]:
    path = Path(out) / FLOWER_JSON
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume the Flower run in {out}: {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: malformed JSON ({exc})") from None


def clear_flower_outputs(out: str | Path) -> None:
    """Delete what a Flower run writes into ``out`` (the run outputs, flower.json, node-state/), nothing else."""
    import shutil

    from fednl.engine.experiment import clear_run_dir

    clear_run_dir(out)
    (Path(out) / FLOWER_JSON).unlink(missing_ok=True)
    if (Path(out) / NODE_STATE_DIR).is_dir():
        shutil.rmtree(Path(out) / NODE_STATE_DIR)


def new_run_uid() -> str:
    return uuid.uuid4().hex[:16]
