"""ServerApp side of the Flower adapter: :class:`FlowerExecutor`, the round loop's clients on SuperNodes.

The round loop (:class:`~fednl.engine.simulator.RoundLoop`: sampling, payloads, wire, ledger, aggregation,
checkpoints, metrics) is the in-process one; the executor turns its two calls into messages through the Flower
``Grid``:

* ``train``: one ``train`` message per job, each with its *own* payload (so per-client payloads such as
  FedTreeLoRA's cluster experts work), all sent at once with ``grid.send_and_receive``;
* ``evaluate``: one ``evaluate`` message per client (held-out clients, which have no node, are evaluated by the
  server itself).

Next to the fednl ledger (payload tensor bytes, which must equal the in-process ledger), :class:`HopLedger`
records, per message, what fednl put on the SuperLink<->SuperNode hop: payload bytes and record overhead (see
:mod:`fednl.engine.flower_codec`), for training and evaluation messages. It is written to ``<out>/flower.json``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
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
from fednl.engine.executor import ClientExecutor, Federation, TrainJob, TrainReply
from fednl.engine.runstate import RunState

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


# ---------------------------------------------------------------------------------------------- executor
class FlowerExecutor(ClientExecutor):
    """The clients of the run on Flower SuperNodes (see the module docstring): one message per job, sent with the
    Grid. ``local`` evaluates the held-out clients, which have no node."""

    def __init__(self, grid: Grid, nodes: dict[str, int], federation: Federation, *, run_uid: str, state_dir: str,
                 config: dict[str, Any], fingerprint: str, wire_dtype: str, out: Path, local: ClientExecutor,
                 round_timeout_s: float = 0.0, startup: dict[str, float] | None = None):
        missing = sorted(set(federation.clients) - set(nodes))
        if missing:
            raise FlowerRunError(f"no SuperNode for client(s) {missing}")
        self.federation, self.local = federation, local
        self.grid, self.nodes = grid, dict(nodes)
        self.cid_of_node = {node: cid for cid, node in self.nodes.items()}
        self.run_uid, self.state_dir = run_uid, state_dir
        self.round_timeout_s = float(round_timeout_s)
        self.config_json = config_to_json(config)
        self.config_sha = config_sha(self.config_json)
        self.fingerprint, self.wire_dtype, self.out = fingerprint, wire_dtype, Path(out)
        self.hops = HopLedger()
        self.timing: dict[str, Any] = {**{k: round(v, 3) for k, v in (startup or {}).items()}, "rounds": {}}

    # ------------------------------------------------------------------ messages
    def _run_record(self, op: str, rnd: int, cid: str, **seeds: int) -> ConfigRecord:
        return RunRecord(op=op, run_uid=self.run_uid, round=rnd, cid=cid, config_json=self.config_json,
                         config_sha=self.config_sha, fingerprint=self.fingerprint,
                         wire_dtype=self.wire_dtype, state_dir=self.state_dir, **seeds).to_record()

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

    # ------------------------------------------------------------------ the seam
    def start(self, state: RunState, *, resumed: bool) -> None:
        if resumed:
            record = read_flower_json(self.out)
            self.hops = HopLedger.from_json(record.get("hop", []))
            self.hops.truncate(state.round)
            rounds = {k: v for k, v in record.get("timing", {}).get("rounds", {}).items() if int(k) <= state.round}
            self.timing["rounds"] = rounds
            self.timing["resumed_after_round"] = state.round
        self._save_flower_json()

    def train(self, rnd: int, jobs: Sequence[TrainJob], state: RunState) -> list[TrainReply]:
        del state  # the nodes keep their clients' state on their own disks
        msgs = []
        for job in jobs:
            content = encode_payload(job.payload)
            content[RUN] = self._run_record("train", rnd, job.cid, seed_gen=job.seeds[0], seed_torch=job.seeds[1])
            self.hops.add(rnd, job.cid, "train", "down", message_bytes(content))
            msgs.append(Message(content, dst_node_id=self.nodes[job.cid], message_type=MessageType.TRAIN,
                                group_id=str(rnd)))
        t0 = time.perf_counter()
        cids = [job.cid for job in jobs]
        answers = self._exchange(msgs, cids, f"round {rnd} training")
        self._timing(rnd, "train_exchange_s", time.perf_counter() - t0)
        replies = []
        for cid in cids:
            content = answers[cid].content
            stats = dict(content[REPLY])
            num_examples = int(stats.pop("num-examples"))
            self.hops.add(rnd, cid, "train", "up", message_bytes(content))
            replies.append(TrainReply(cid, decode_payload(content), num_examples,
                                      {k: float(v) for k, v in stats.items()}))
        self._save_flower_json()
        return replies

    def evaluate(self, rnd: int, cids: Sequence[str], state: RunState) -> dict[str, dict[str, float]]:
        held = [c for c in cids if c in self.federation.heldout]
        cids = [c for c in cids if c not in held]
        base = {GLOBAL: tensors_to_record(state.global_params), SERVER: tensors_to_record(state.server_tensors),
                SERVER_INFO: ConfigRecord({"json": json.dumps(state.server_info, sort_keys=True)})}
        msgs = []
        for cid in cids:
            content = RecordDict({**base, RUN: self._run_record("evaluate", rnd, cid)})
            self.hops.add(rnd, cid, "evaluate", "down", message_bytes(content))
            msgs.append(Message(content, dst_node_id=self.nodes[cid], message_type=MessageType.EVALUATE,
                                group_id=f"{rnd}-eval"))
        t0 = time.perf_counter()
        answers = self._exchange(msgs, cids, f"round {rnd} evaluation") if msgs else {}
        self._timing(rnd, "eval_exchange_s", time.perf_counter() - t0)
        out: dict[str, dict[str, float]] = {}
        for cid in cids:
            content = answers[cid].content
            self.hops.add(rnd, cid, "evaluate", "up", message_bytes(content))
            out[cid] = {k: float(v) for k, v in content[EVAL].items()}
        self._save_flower_json()
        if held:
            out.update(self.local.evaluate(rnd, held, state))
        return out

    # ------------------------------------------------------------------ bookkeeping
    def flower_record(self) -> dict[str, Any]:
        return {
            "run_uid": self.run_uid,
            "nodes": {cid: self.nodes[cid] for cid in self.federation.clients},
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
