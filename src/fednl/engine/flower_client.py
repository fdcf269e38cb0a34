"""ClientApp side of the Flower adapter: a SuperNode serves the fednl client of its ``partition-id``.

A node is stateless between messages (with ``--isolation subprocess`` every message even runs in a fresh
process): it rebuilds model, tokenizer, task and strategy from the resolved config carried by each message
(cached per process), loads its client state from its own disk (:mod:`fednl.engine.flower_store`), and runs the
client exactly as the in-process simulator does — :func:`fednl.client.run_client_round` with the server-chosen
seeds, payloads through :mod:`fednl.engine.wire` in both directions.
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fednl.client.state import ClientState
from fednl.engine.flower_codec import decode_payload, encode_payload, record_to_tensors
from fednl.engine.flower_protocol import (
    EVAL,
    GLOBAL,
    REPLY,
    SERVER,
    SERVER_INFO,
    NodeIdentity,
    RunRecord,
    node_identity,
)
from fednl.engine.flower_runtime import Runtime, evaluate_client, runtime_for, train_client
from fednl.engine.flower_store import NodeStateStore


def _state_store(node: NodeIdentity, run: RunRecord) -> NodeStateStore:
    root = node.state_dir or run.state_dir
    if not root:
        raise ValueError("no folder for client state: set state-dir in the SuperNode's --node-config "
                         "or in the Flower run config")
    return NodeStateStore(Path(root).expanduser(), run.run_uid, node.partition_id)


def _client_of(rt: Runtime, node: NodeIdentity, run: RunRecord) -> str:
    names = rt.client_names
    if node.num_partitions != len(names):
        raise ValueError(f"SuperNode has num-partitions={node.num_partitions} but the task has {len(names)} clients")
    cid = names[node.partition_id]
    if cid != run.cid:
        raise ValueError(f"message for client {run.cid!r} reached the SuperNode of partition {node.partition_id} "
                         f"({cid!r})")
    return cid


def _checked_runtime(run: RunRecord) -> Runtime:
    rt = runtime_for(run.config_json, run.config_sha)
    if rt.fingerprint != run.fingerprint:
        raise ValueError("the model built on this SuperNode differs from the ServerApp's (fingerprint mismatch): "
                         "different backbone weights or fednl version?")
    return rt


# ---------------------------------------------------------------------------------------------- handlers
def handle_train(msg: Message, ctx: Context) -> Message:
    """One local round: decode, load state from disk, :func:`train_client`, save state, reply."""
    run = RunRecord.from_content(msg.content)
    if run.op != "train":
        raise ValueError(f"train message with op {run.op!r}")
    node = node_identity(ctx.node_config)
    rt = _checked_runtime(run)
    cid = _client_of(rt, node, run)
    store = _state_store(node, run)
    state = store.load_before(run.round, cid)
    down = decode_payload(msg.content)
    up, num_examples, metrics = train_client(rt, cid, down, state, run.round, run.seed_gen, run.seed_torch)
    store.save(run.round, state)
    content = encode_payload(up)
    content[REPLY] = MetricRecord({"num-examples": int(num_examples), **{k: float(v) for k, v in metrics.items()}})
    return Message(content, reply_to=msg)


def handle_evaluate(msg: Message, ctx: Context) -> Message:
    """Evaluate this client's personalised model (global + its local state) on its test split."""
    run = RunRecord.from_content(msg.content)
    if run.op != "evaluate":
        raise ValueError(f"evaluate message with op {run.op!r}")
    for key, kind in ((GLOBAL, ArrayRecord), (SERVER, ArrayRecord), (SERVER_INFO, ConfigRecord)):
        if not isinstance(msg.content.get(key), kind):
            raise ValueError(f"evaluate message lacks the {kind.__name__} {key!r}")
    node = node_identity(ctx.node_config)
    rt = _checked_runtime(run)
    cid = _client_of(rt, node, run)
    state: ClientState = _state_store(node, run).load_before(run.round + 1, cid)
    global_params = record_to_tensors(msg.content[GLOBAL])
    server_tensors = record_to_tensors(msg.content[SERVER])
    server_info = json.loads(str(msg.content[SERVER_INFO]["json"]))
    metrics = evaluate_client(rt, cid, global_params, state, server_tensors, server_info, run.round)
    return Message(RecordDict({EVAL: MetricRecord({k: float(v) for k, v in metrics.items()})}), reply_to=msg)

