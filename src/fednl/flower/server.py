"""ServerApp side: the one round loop with its clients on SuperNodes (:class:`FlowerExecutor`).

:func:`server_main` builds the run's model, strategy and spec from the fednl config — no task, no client data —,
asks every connected SuperNode which client it holds (:func:`discover_nodes`, which gives the
:class:`~fednl.engine.executor.Federation`), and runs :class:`~fednl.engine.simulator.RoundLoop` (sampling,
payloads, wire, ledger, aggregation, checkpoints, metrics: the in-process loop) with a :class:`FlowerExecutor`,
which turns the loop's two calls into messages through the Flower ``Grid``:

* ``train``: one ``train`` message per job, each with its *own* payload (so per-client payloads such as
  FedTreeLoRA's cluster experts work), all pushed at once, then the replies pulled as they come in: each is handed
  to the round loop on arrival (which stores it, so a killed server does not ask that node again), until every
  node answered or the round's deadline passed;
* ``evaluate``: one ``evaluate`` message per client, training or held-out, to the node that holds its data.

Faults: the deadline is ``engine.deadline_s``, else the run config's ``round-timeout-s`` (0: wait for every
node). A node that has not answered by then, or for which the SuperLink reports that the node or its message is
gone (a killed SuperNode: ``NODE_UNAVAILABLE`` and the like), counts as dropped for that round (training) or is
left out of that round's evaluation; the run goes on. An error a ClientApp *raised* still fails the run: it is a
bug or a refusal, not a drop-out.

Next to the fednl ledger (payload tensor bytes, which must equal the in-process ledger), :class:`HopLedger`
records, per message, what fednl put on the SuperLink<->SuperNode hop: payload bytes and record overhead (see
:mod:`fednl.flower.codec`), for training and evaluation messages. It is written to ``<out>/flower.json``.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fednl.engine.executor import ClientExecutor, Federation, TrainJob, TrainReply
from fednl.engine.runstate import RunState
from fednl.flower.codec import MessageBytes, decode_payload, encode_payload, message_bytes, tensors_to_record
from fednl.flower.protocol import (
    EVAL,
    GLOBAL,
    REPLY,
    RUN,
    SERVER,
    SERVER_INFO,
    Answer,
    NodeInfo,
    RunRecord,
    config_sha,
    config_to_json,
)
from fednl.records import PRIMARY_METRIC
from fednl.util.atomic import atomic_write_json

if TYPE_CHECKING:
    from fednl.flower.launch import AppSettings

FLOWER_JSON = "flower.json"
NODE_STATE_DIR = "node-state"
POLL_S = 0.5  # how often the ServerApp pulls replies while a round is open (Flower's own loop: 3 s)
# errors the SuperLink reports for a node or message that is gone: the client dropped out, the run goes on
GONE = {ErrorCode.NODE_UNAVAILABLE: "node unavailable", ErrorCode.MESSAGE_UNAVAILABLE: "message unavailable",
        ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "reply unavailable", ErrorCode.CLIENT_APP_CRASHED: "ClientApp crashed"}


class FlowerRunError(RuntimeError):
    """A SuperNode failed, did not answer in time, or the federation is inconsistent."""


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
    """Bytes of every fednl message on the SuperLink<->SuperNode hop (see :mod:`fednl.flower.codec`)."""

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


def federation_of(infos: Sequence[NodeInfo], task: str) -> Federation:
    """The federation the nodes describe (``infos`` one per partition, in partition order): the training clients
    in partition order, then the held-out ones; every node must hold a client of ``task``, all of one kind."""
    kinds = {i.kind for i in infos}
    wrong = [f"partition {i.partition_id}: {i.task!r}" for i in infos if i.task != task]
    if wrong:
        raise FlowerRunError(f"the run's task is {task!r}, but SuperNodes hold data of another task: {wrong}")
    if len(kinds) != 1:
        raise FlowerRunError(f"SuperNodes hold examples of different kinds {sorted(kinds)}")
    kind = kinds.pop()
    training = [i for i in infos if not i.heldout]
    try:
        return Federation(task=task, kind=kind, metric=PRIMARY_METRIC.get(kind, "accuracy"),
                          clients=tuple(i.client for i in training),
                          tested=tuple(i.client for i in training if i.n_test),
                          heldout=tuple(i.client for i in infos if i.heldout))
    except ValueError as exc:
        raise FlowerRunError(f"the SuperNodes' clients do not make a federation: {exc}") from None


def discover_nodes(grid: Grid, hello: RunRecord, task: str, *, timeout_s: float,
                   log: Callable[[str], None] = print) -> tuple[Federation, dict[str, int]]:
    """Ask every connected SuperNode which partition and client it serves; wait until every partition has one.

    Returns the federation and ``{cid: node_id}``. Raises :class:`FlowerRunError` when two nodes claim one
    partition, nodes disagree on ``num-partitions``, a client is served twice, or ``timeout_s`` passes.
    """
    deadline = time.monotonic() + timeout_s
    asked: set[int] = set()
    found: dict[int, tuple[int, NodeInfo]] = {}  # partition id -> (node id, what it said)
    total: int | None = None
    while True:
        new = sorted(set(grid.get_node_ids()) - asked)
        if new:
            msgs = [Message(RecordDict({RUN: hello.to_record()}), dst_node_id=node, message_type=MessageType.QUERY,
                            group_id="hello") for node in new]
            replies = list(grid.send_and_receive(msgs, timeout=max(1.0, deadline - time.monotonic())))
            _raise_errors(replies, "hello")
            for r in replies:
                info, node = NodeInfo.from_content(r.content), r.metadata.src_node_id
                if total is not None and info.num_partitions != total:
                    raise FlowerRunError(f"SuperNode {node} has num-partitions={info.num_partitions}, others "
                                         f"have {total}")
                total = info.num_partitions
                pid = info.partition_id
                if pid in found and found[pid][0] != node:
                    raise FlowerRunError(f"SuperNodes {found[pid][0]} and {node} both serve partition-id={pid}")
                found[pid] = (node, info)
            asked.update(r.metadata.src_node_id for r in replies)
        if total is not None and len(found) == total:
            break
        if time.monotonic() > deadline:
            missing = sorted(set(range(total or 0)) - set(found)) if total else "all"
            raise FlowerRunError(f"only {len(found)} of {total if total else '?'} partitions connected within "
                                 f"{timeout_s:.0f} s; missing partition-id(s) {missing}")
        time.sleep(0.5)
    infos = [found[p][1] for p in range(total)]
    federation = federation_of(infos, task)
    nodes = {found[p][1].client: found[p][0] for p in range(total)}
    log(f"flower: {total} SuperNodes connected: " + ", ".join(
        f"{i.client}{' (held out)' if i.heldout else ''}=node {nodes[i.client]}" for i in infos))
    return federation, nodes


# ---------------------------------------------------------------------------------------------- executor
class FlowerExecutor(ClientExecutor):
    """The clients of the run on Flower SuperNodes (see the module docstring); ``nodes``: client -> node id."""

    def __init__(self, grid: Grid, nodes: dict[str, int], federation: Federation, *, run_uid: str, state_dir: str,
                 config: dict[str, Any], fingerprint: str, wire_dtype: str, out: str | Path,
                 round_timeout_s: float = 0.0, startup: dict[str, float] | None = None):
        missing = sorted((set(federation.clients) | set(federation.heldout)) - set(nodes))
        if missing:
            raise FlowerRunError(f"no SuperNode for client(s) {missing}")
        self.federation, self.grid, self.nodes = federation, grid, dict(nodes)
        self.cid_of_node = {node: cid for cid, node in self.nodes.items()}
        self.run_uid, self.state_dir = run_uid, state_dir
        self.round_timeout_s = float(round_timeout_s)
        self.config_json = config_to_json(config)
        self.config_sha = config_sha(self.config_json)
        self.fingerprint, self.wire_dtype, self.out = fingerprint, wire_dtype, Path(out)
        self.hops = HopLedger()
        self._carried: list[HopRow] = []  # hop rows of the round a killed session left unfinished
        self.timing: dict[str, Any] = {**{k: round(v, 3) for k, v in (startup or {}).items()}, "rounds": {}}
        self.log: Callable[[str], None] = print

    def _run_record(self, op: str, rnd: int, cid: str, **job: Any) -> ConfigRecord:
        return RunRecord(op=op, run_uid=self.run_uid, round=rnd, cid=cid, config_json=self.config_json,
                         config_sha=self.config_sha, fingerprint=self.fingerprint,
                         wire_dtype=self.wire_dtype, state_dir=self.state_dir, **job).to_record()

    def _exchange(self, msgs: list[Message], cids: list[str], what: str,
                  on_reply: Callable[[str, Message], None] | None = None) -> dict[str, Message]:
        """Push ``msgs`` (one per client of ``cids``), then pull replies until each client answered or the
        deadline passed; ``on_reply(cid, reply)`` runs as each one arrives. A client without a reply is
        :meth:`missed` (no reply in time, or the SuperLink says its node or message is gone); an error its
        ClientApp raised fails the exchange."""
        ids = list(self.grid.push_messages(msgs))
        cid_of_message = dict(zip(ids, cids))
        deadline = time.monotonic() + self.round_timeout_s if self.round_timeout_s else None
        out: dict[str, Message] = {}
        waiting = set(cids)
        errors: list[Message] = []
        while waiting and ids:
            for r in self.grid.pull_messages(ids):
                ids = [i for i in ids if i != r.metadata.reply_to_message_id]
                cid = self.cid_of_node.get(r.metadata.src_node_id)
                if r.has_error() and r.error.code in GONE:  # from the SuperLink: the node or message is gone
                    gone = cid_of_message.get(r.metadata.reply_to_message_id, cid)
                    if gone in waiting:
                        waiting.discard(gone)
                        self.missed(gone, f"{GONE[r.error.code]}: {r.error.reason}")
                    continue
                if cid is None or cid not in cids:
                    raise FlowerRunError(f"{what}: unexpected reply from node {r.metadata.src_node_id}")
                if r.has_error():
                    errors.append(r)
                    waiting.discard(cid)
                    continue
                if cid not in waiting:
                    continue  # a second reply to one message: Flower delivers one, nothing to take
                waiting.discard(cid)
                out[cid] = r
                if on_reply is not None:
                    on_reply(cid, r)
            if not waiting:
                break
            if deadline is not None and time.monotonic() > deadline:
                for cid in sorted(waiting):
                    self.missed(cid, f"deadline: no reply within {self.round_timeout_s:g} s")
                self.log(f"{what}: no reply from {sorted(waiting)} within {self.round_timeout_s:g} s; going on "
                         "without them")
                break
            time.sleep(POLL_S)
        _raise_errors(errors, what)
        return out

    def _timing(self, rnd: int, key: str, seconds: float) -> None:
        self.timing["rounds"].setdefault(str(rnd), {})[key] = round(seconds, 4)

    # ------------------------------------------------------------------ the seam
    def start(self, state: RunState, *, resumed: bool) -> None:
        if resumed and (state.round > 0 or (self.out / FLOWER_JSON).is_file()):
            record = read_flower_json(self.out)
            self.hops = HopLedger.from_json(record.get("hop", []))
            nxt = state.round + 1  # the unfinished round's train rows: replies the journal may hand back
            self._carried = [r for r in self.hops.rows if r.round == nxt and r.kind == "train"]
            self.hops.truncate(state.round)
            rounds = {k: v for k, v in record.get("timing", {}).get("rounds", {}).items() if int(k) <= state.round}
            self.timing["rounds"] = rounds
            self.timing["resumed_after_round"] = state.round
        self._save_flower_json()

    def reused(self, rnd: int, cids: Sequence[str]) -> None:
        """The journal hands back the replies of ``cids``: restore their hop rows of the killed session."""
        self.hops.rows += [r for r in self._carried if r.round == rnd and r.cid in set(cids)]
        self._carried = []

    def train(self, rnd: int, jobs: Sequence[TrainJob], state: RunState) -> list[TrainReply]:
        del state  # the nodes keep their clients' state on their own disks
        msgs = []
        for job in jobs:
            content = encode_payload(job.payload)
            content[RUN] = self._run_record("train", rnd, job.cid, seed_gen=job.seeds[0], seed_torch=job.seeds[1],
                                            nonce=job.nonce)
            self.hops.add(rnd, job.cid, "train", "down", message_bytes(content))
            msgs.append(Message(content, dst_node_id=self.nodes[job.cid], message_type=MessageType.TRAIN,
                                group_id=str(rnd)))
        replies: list[TrainReply] = []

        def arrived(cid: str, msg: Message) -> None:
            content = msg.content
            stats = dict(content[REPLY])
            num_examples = int(stats.pop("num-examples"))
            answer = Answer.from_content(content)
            self.hops.add(rnd, cid, "train", "up", message_bytes(content))
            reply = TrainReply(cid, decode_payload(content), num_examples, {k: float(v) for k, v in stats.items()},
                               round=answer.round, nonce=answer.nonce)
            replies.append(reply)
            self._save_flower_json()  # its hop rows first: a resume that reuses the reply finds them
            self.arrived(reply)

        self._save_flower_json()
        t0 = time.perf_counter()
        self._exchange(msgs, [job.cid for job in jobs], f"round {rnd} training", on_reply=arrived)
        self._timing(rnd, "train_exchange_s", time.perf_counter() - t0)
        self._save_flower_json()
        return replies

    def evaluate(self, rnd: int, cids: Sequence[str], state: RunState) -> dict[str, dict[str, float]]:
        base = {GLOBAL: tensors_to_record(state.global_params), SERVER: tensors_to_record(state.server_tensors),
                SERVER_INFO: ConfigRecord({"json": json.dumps(state.server_info, sort_keys=True)})}
        msgs = []
        for cid in cids:
            content = RecordDict({**base, RUN: self._run_record("evaluate", rnd, cid)})
            self.hops.add(rnd, cid, "evaluate", "down", message_bytes(content))
            msgs.append(Message(content, dst_node_id=self.nodes[cid], message_type=MessageType.EVALUATE,
                                group_id=f"{rnd}-eval"))
        t0 = time.perf_counter()
        answers = self._exchange(msgs, list(cids), f"round {rnd} evaluation")
        self._timing(rnd, "eval_exchange_s", time.perf_counter() - t0)
        out: dict[str, dict[str, float]] = {}
        for cid in cids:
            if cid not in answers:  # its node is gone or too slow: this round's evaluation goes on without it
                continue
            content = answers[cid].content
            self.hops.add(rnd, cid, "evaluate", "up", message_bytes(content))
            out[cid] = {k: float(v) for k, v in content[EVAL].items()}
        self._save_flower_json()
        return out

    # ------------------------------------------------------------------ flower.json
    def flower_record(self) -> dict[str, Any]:
        return {
            "run_uid": self.run_uid,
            "nodes": {cid: self.nodes[cid] for cid in [*self.federation.clients, *self.federation.heldout]},
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


# ---------------------------------------------------------------------------------------------- the ServerApp
def server_main(grid: Grid, settings: AppSettings, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the run (no data), wait for one SuperNode per partition, run all rounds; returns results.json's
    content (``<out>/flower.json`` gets the Flower-side record)."""
    from fednl.config import load_config, save_resolved
    from fednl.engine.simulator import RoundLoop, model_fingerprint
    from fednl.experiment import build_parts, holds_run

    t0 = time.perf_counter()
    out = Path(settings.out).expanduser().resolve()
    cfg = load_config(settings.config, settings.overrides, local_paths=False)  # the server reads no data
    parts = build_parts(cfg, out)
    if settings.resume and (out / FLOWER_JSON).is_file():
        run_uid = str(read_flower_json(out)["run_uid"])
    elif settings.resume:  # killed before its first round: nothing reached a node, start afresh
        run_uid = new_run_uid()
    else:
        if holds_run(out) or (out / FLOWER_JSON).exists():
            raise ValueError(f"{out} already holds a run: resume it, or pick another output folder")
        out.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, out)
        run_uid = new_run_uid()
    state_dir = settings.state_dir or str(out / NODE_STATE_DIR)
    config_json = config_to_json(parts.spec.config)
    fingerprint = model_fingerprint(parts.model)
    t1 = time.perf_counter()
    hello = RunRecord(op="hello", run_uid=run_uid, config_json=config_json, config_sha=config_sha(config_json),
                      fingerprint=fingerprint)
    federation, nodes = discover_nodes(grid, hello, cfg.task.name, timeout_s=settings.wait_nodes_s, log=log)
    t2 = time.perf_counter()
    log(f"== flower | {cfg.method.name} | {len(federation.clients)} clients"
        f"{f' + {len(federation.heldout)} held out' if federation.heldout else ''} | {cfg.rounds} rounds | "
        f"wire {cfg.engine.wire_dtype} | run {run_uid} | out {out}")
    executor = FlowerExecutor(grid, nodes, federation, run_uid=run_uid, state_dir=state_dir, config=parts.spec.config,
                              fingerprint=fingerprint, wire_dtype=cfg.engine.wire_dtype, out=out,
                              round_timeout_s=cfg.engine.deadline_s or settings.round_timeout_s,
                              startup={"build_s": t1 - t0, "handshake_s": t2 - t1, "startup_s": t2 - t0})
    executor.log = log
    results = RoundLoop(parts.model, parts.strategy, parts.spec, executor, log=log).run(resume=settings.resume)
    assert results is not None
    executor.finish(time.perf_counter() - t0)
    return results


ISOLATION_JSON = "isolation.json"


def check_isolation(grid: Grid, settings: AppSettings, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Ask every SuperNode to train a client whose data another node holds: each must refuse.

    The requests are well-formed ``train`` messages (the run config, a real client id) without a payload: a node
    that does not check the client first fails on the missing payload instead, with another error, and counts as
    not refusing. Writes ``<out>/isolation.json`` and raises :class:`FlowerRunError` unless every node refused."""
    from fednl.config import load_config

    cfg = load_config(settings.config, settings.overrides, local_paths=False)  # the server reads no data
    config_json = config_to_json(cfg.to_dict())
    run_uid = f"isolation-{new_run_uid()}"
    hello = RunRecord(op="hello", run_uid=run_uid, config_json=config_json, config_sha=config_sha(config_json))
    federation, nodes = discover_nodes(grid, hello, cfg.task.name, timeout_s=settings.wait_nodes_s, log=log)
    names = [*federation.clients, *federation.heldout]
    if len(names) < 2:
        raise FlowerRunError("the isolation check needs at least two SuperNodes")
    asked = {holder: names[(i + 1) % len(names)] for i, holder in enumerate(names)}
    msgs = [Message(RecordDict({RUN: RunRecord(op="train", run_uid=run_uid, round=1, cid=asked[holder],
                                               config_json=config_json, config_sha=config_sha(config_json),
                                               state_dir=settings.state_dir or "").to_record()}),
                    dst_node_id=nodes[holder], message_type=MessageType.TRAIN, group_id="isolation")
            for holder in names]
    holder_of = {node: cid for cid, node in nodes.items()}
    checks: dict[str, Any] = {}
    for r in grid.send_and_receive(msgs, timeout=settings.round_timeout_s or None):
        holder = holder_of[r.metadata.src_node_id]
        reason = r.error.reason if r.has_error() else "answered with a reply"
        checks[holder] = {"node": r.metadata.src_node_id, "asked_for": asked[holder],
                          "refused": r.has_error() and "refuses to train client" in reason, "reason": reason}
    record = {"nodes": len(names), "refused": sum(c["refused"] for c in checks.values()),
              "clients": dict(sorted(checks.items()))}
    out = Path(settings.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / ISOLATION_JSON, record)
    served = sorted(set(names) - {c for c, v in checks.items() if v["refused"]})
    if served:
        raise FlowerRunError(f"isolation check: SuperNode(s) of {served} did not refuse another client's data; see "
                             f"{out / ISOLATION_JSON}")
    log(f"isolation: every one of the {len(names)} SuperNodes refused to train another client's data")
    return record


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
    from fednl.experiment import clear_run_dir

    clear_run_dir(out)
    (Path(out) / FLOWER_JSON).unlink(missing_ok=True)
    if (Path(out) / NODE_STATE_DIR).is_dir():
        shutil.rmtree(Path(out) / NODE_STATE_DIR)


def new_run_uid() -> str:
    return uuid.uuid4().hex[:16]
