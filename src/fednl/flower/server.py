"""ServerApp side: the one round loop with its clients on SuperNodes (:class:`FlowerExecutor`).

:func:`server_main` builds the run's model, strategy and spec from the fednl config — no task, no client data —,
asks every connected SuperNode which client it holds (:func:`discover_nodes`, which gives the
:class:`~fednl.engine.executor.Federation`), and runs :class:`~fednl.engine.simulator.RoundLoop` (sampling,
payloads, wire, ledger, aggregation, checkpoints, metrics: the in-process loop) with a :class:`FlowerExecutor`,
which turns the loop's two calls into messages through the Flower ``Grid``:

* ``train``: one ``train`` message per job, each with its *own* payload (so per-client payloads such as
  FedTreeLoRA's cluster experts work), all sent at once with ``grid.send_and_receive``;
* ``evaluate``: one ``evaluate`` message per client, training or held-out, to the node that holds its data.

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
        self.timing: dict[str, Any] = {**{k: round(v, 3) for k, v in (startup or {}).items()}, "rounds": {}}

    def _run_record(self, op: str, rnd: int, cid: str, **seeds: int) -> ConfigRecord:
        return RunRecord(op=op, run_uid=self.run_uid, round=rnd, cid=cid, config_json=self.config_json,
                         config_sha=self.config_sha, fingerprint=self.fingerprint,
                         wire_dtype=self.wire_dtype, state_dir=self.state_dir, **seeds).to_record()

    def _exchange(self, msgs: list[Message], cids: list[str], what: str) -> dict[str, Message]:
        replies = list(self.grid.send_and_receive(msgs, timeout=self.round_timeout_s or None))
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
        cids = [job.cid for job in jobs]
        t0 = time.perf_counter()
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
    if settings.resume:
        run_uid = str(read_flower_json(out)["run_uid"])
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
                              round_timeout_s=settings.round_timeout_s,
                              startup={"build_s": t1 - t0, "handshake_s": t2 - t1, "startup_s": t2 - t0})
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
