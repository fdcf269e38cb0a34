"""ClientApp side: a SuperNode serves the one client whose data it holds (:mod:`fednl.flower.data`).

A node is stateless between messages (a deployed SuperNode even runs every message in a fresh process): it
rebuilds the model, tokenizer and strategy from the resolved config each message carries — never the task, and
never anything of another client — into a :class:`~fednl.engine.clients.ClientRuntime` (cached per process),
loads its client's state from its own disk (:class:`NodeStateStore`) and runs the client exactly as the
in-process simulator does: the server-chosen seeds, payloads through the run's wire in both directions.

Handlers: ``hello`` (which client, of which task, do you hold), ``train`` and ``evaluate``. Each first checks
that the message asks for the node's own client (:meth:`~fednl.flower.data.NodeData.serve`), before building
anything.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fednl.flower.data import NodeData, node_data
from fednl.flower.protocol import (
    ANSWER,
    EVAL,
    GLOBAL,
    NODE,
    REPLY,
    SERVER,
    SERVER_INFO,
    Answer,
    NodeIdentity,
    RunRecord,
    config_sha,
    node_identity,
)

if TYPE_CHECKING:  # torch-heavy: imported by the handlers that need them (a hello needs none)
    from fednl.client.state import ClientState
    from fednl.engine.clients import ClientRuntime


# ---------------------------------------------------------------------------------------------- client state
class NodeStateStore:
    """Client states of one partition of one run on the node's own disk — not in Flower's ``Context.state``,
    which Flower copies between the SuperNode and the ClientApp process on every message::

        <root>/<run_uid>/partition-<pid>/round-00003.safetensors
                                         round-00003.json

    A state is saved under the round that produced it, and round ``r`` starts from the newest state saved by a
    round ``< r``. The newest ``keep`` rounds are kept, so a round that is run again after a server restart
    (resume from the checkpoint of round ``r - 1`` after a crash during round ``r``) starts from exactly the state
    it started from the first time, whatever the client managed to save before the crash.
    """

    _ROUND = re.compile(r"^round-(\d{5,})\.safetensors$")
    _SAFE = re.compile(r"^[A-Za-z0-9._-]+$")

    def __init__(self, root: str | Path, run_uid: str, partition_id: int, *, keep: int = 2):
        if not self._SAFE.match(run_uid or ""):
            raise ValueError(f"run uid {run_uid!r} must be non-empty and use only letters, digits, '.', '_', '-'")
        if int(partition_id) < 0:
            raise ValueError(f"partition id must be >= 0, got {partition_id}")
        if keep < 2:
            raise ValueError(f"keep must be >= 2 (a re-run round needs its starting state), got {keep}")
        self.dir = Path(root) / run_uid / f"partition-{int(partition_id)}"
        self.keep = keep

    def _stem(self, rnd: int) -> Path:
        return self.dir / f"round-{rnd:05d}"

    def rounds(self) -> list[int]:
        """Rounds with a complete saved state (both files present), ascending."""
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.iterdir():
            m = self._ROUND.match(p.name)
            if m and p.with_suffix(".json").is_file():
                out.append(int(m.group(1)))
        return sorted(out)

    def load_before(self, rnd: int, cid: str) -> ClientState:
        """The state round ``rnd`` starts from: the newest saved by a round ``< rnd``, else a fresh one."""
        from fednl.client.state import ClientState

        earlier = [r for r in self.rounds() if r < rnd]
        if not earlier:
            return ClientState(cid=cid)
        state = ClientState.load(self._stem(earlier[-1]))
        if state.cid != cid:
            raise ValueError(f"{self.dir}: saved state belongs to client {state.cid!r}, this node now serves "
                             f"{cid!r}; the partition-id of this SuperNode changed within the run")
        return state

    def save(self, rnd: int, state: ClientState) -> Path:
        """Save the state produced by round ``rnd``; drop states older than the newest ``keep`` rounds."""
        if rnd < 1:
            raise ValueError(f"round must be >= 1, got {rnd}")
        stem = self._stem(rnd)
        state.save(stem)
        for old in self.rounds()[: -self.keep]:
            for suffix in (".json", ".safetensors"):  # json first: a half-removed state is never "complete"
                self._stem(old).with_suffix(suffix).unlink(missing_ok=True)
        return stem


def state_store(node: NodeIdentity, run: RunRecord) -> NodeStateStore:
    root = node.state_dir or run.state_dir
    if not root:
        raise ValueError("no folder for client state: set state-dir in the SuperNode's --node-config "
                         "or in the Flower run config")
    return NodeStateStore(Path(root).expanduser(), run.run_uid, node.partition_id)


# ---------------------------------------------------------------------------------------------- the runtime
@dataclass
class NodeRuntime:
    """A node's rebuilt run: the client runtime (model, tokenizer, strategy, wire) of one config."""

    runtime: ClientRuntime
    fingerprint: str
    config_sha: str
    threads: int | None = None  # the run's engine.threads: a node trains on as many as the in-process run would


_RUNTIMES: dict[str, NodeRuntime] = {}


def runtime_for(run: RunRecord) -> NodeRuntime:
    """The runtime of the message's config, built once per process (only the newest config is kept); its model
    fingerprint must equal the ServerApp's."""
    if config_sha(run.config_json) != run.config_sha:
        raise ValueError("config text does not match its sha256")
    rt = _RUNTIMES.get(run.config_sha)
    if rt is None:
        from fednl.config import validate_config
        from fednl.engine.clients import ClientRuntime
        from fednl.engine.simulator import model_fingerprint
        from fednl.experiment import build_parts

        # the task's data paths are the operator's: this node reads its own data-dir, never the run's task
        cfg = validate_config(json.loads(run.config_json), source="the config sent by the ServerApp", local_paths=False)
        parts = build_parts(cfg, Path("."))  # a node writes nothing under the run's output folder
        fingerprint = model_fingerprint(parts.model)  # before any client trains the shared model
        _RUNTIMES.clear()
        rt = _RUNTIMES[run.config_sha] = NodeRuntime(ClientRuntime(parts.model, parts.tokenizer, parts.strategy,
                                                                   parts.spec), fingerprint, run.config_sha,
                                                     cfg.engine.threads)
    if rt.fingerprint != run.fingerprint:
        raise ValueError("the model built on this SuperNode differs from the ServerApp's (fingerprint mismatch): "
                         "different backbone weights or fednl version?")
    return rt


# ---------------------------------------------------------------------------------------------- handlers
def _request(msg: Message, ctx: Context, op: str, simulation: bool) -> tuple[RunRecord, NodeIdentity, NodeData]:
    run = RunRecord.from_content(msg.content)
    if run.op != op:
        raise ValueError(f"{op} message with op {run.op!r}")
    node = node_identity(ctx.node_config)
    return run, node, node_data(node, run, simulation=simulation)


def handle_query(msg: Message, ctx: Context, *, simulation: bool = False) -> Message:
    """``hello``: which partition, and which client of which task, this node serves (names and counts only)."""
    _, node, data = _request(msg, ctx, "hello", simulation)
    return Message(RecordDict({NODE: data.info(node, os.getpid()).to_record()}), reply_to=msg)


def handle_train(msg: Message, ctx: Context, *, simulation: bool = False) -> Message:
    """One local round: refuse another client's data, decode, load state from disk, train, save state, reply."""
    from fednl.flower.codec import decode_payload, encode_payload
    from fednl.util.threads import torch_threads

    run, node, data = _request(msg, ctx, "train", simulation)
    client = data.serve(run.cid, "train")
    rt = runtime_for(run)
    store = state_store(node, run)
    state = store.load_before(run.round, run.cid)
    down = decode_payload(msg.content)
    rt.runtime.wire.check(down, "down")
    with torch_threads(rt.threads):
        up, reply = rt.runtime.round(run.round, run.cid, down, state, client.train, initial_local=rt.runtime.initial_local,
                                     seeds=(int(run.seed_gen), int(run.seed_torch)))
    store.save(run.round, state)
    content = encode_payload(up)
    content[REPLY] = MetricRecord({"num-examples": int(reply.num_examples),
                                   **{k: float(v) for k, v in reply.metrics.items()}})
    content[ANSWER] = Answer(round=run.round, cid=run.cid, nonce=run.nonce).to_record()
    return Message(content, reply_to=msg)


def handle_evaluate(msg: Message, ctx: Context, *, simulation: bool = False) -> Message:
    """The client's model after round ``run.round`` — a training client's personalised model (its state + the
    strategy's ``eval_params``) on its test split, a held-out client's global model on all its examples."""
    from fednl.client.state import ClientState
    from fednl.flower.codec import record_to_tensors
    from fednl.util.threads import torch_threads

    run, node, data = _request(msg, ctx, "evaluate", simulation)
    data.serve(run.cid, "evaluate")
    for key, kind in ((GLOBAL, ArrayRecord), (SERVER, ArrayRecord), (SERVER_INFO, ConfigRecord)):
        if not isinstance(msg.content.get(key), kind):
            raise ValueError(f"evaluate message lacks the {kind.__name__} {key!r}")
    rt = runtime_for(run)
    state = ClientState(run.cid) if data.heldout else state_store(node, run).load_before(run.round + 1, run.cid)
    rt.runtime.strategy.load_server_state(record_to_tensors(msg.content[SERVER]),
                                          json.loads(str(msg.content[SERVER_INFO]["json"])))
    with torch_threads(rt.threads):
        metrics = rt.runtime.evaluate(run.cid, data.eval_examples(), record_to_tensors(msg.content[GLOBAL]), state,
                                      rt.runtime.initial_local)
    return Message(RecordDict({EVAL: MetricRecord({k: float(v) for k, v in metrics.items()})}), reply_to=msg)


def build_client_app(*, simulation: bool = False) -> ClientApp:
    """A ClientApp answering ``query`` (hello), ``train`` and ``evaluate``. ``simulation``: a node without
    ``data-dir`` serves its partition of the task built from the run config (Flower simulation, one process for
    many virtual nodes); otherwise it serves only its ``data-dir``."""
    app = ClientApp()
    app.query()(partial(handle_query, simulation=simulation))
    app.train()(partial(handle_train, simulation=simulation))
    app.evaluate()(partial(handle_evaluate, simulation=simulation))
    return app
