"""The messages between fednl's ServerApp and ClientApp: record names and the per-message run record.

Every message is a Flower ``Message`` whose ``RecordDict`` holds fednl records only:

=========  =====================  ==========================================================================
type       direction              records
=========  =====================  ==========================================================================
query      server -> node         ``fednl.run`` (op ``hello``)
           node -> server         ``fednl.node``: partition-id, num-partitions, state-dir, pid
train      server -> node         ``fednl.tensors`` + ``fednl.meta`` (the wire-encoded payload), ``fednl.run``
           node -> server         ``fednl.tensors`` + ``fednl.meta`` (the wire-encoded reply payload),
                                  ``fednl.reply`` (num-examples + the client's training metrics)
evaluate   server -> node         ``fednl.global`` (global parameters, full precision), ``fednl.server`` +
                                  ``fednl.server-info`` (the strategy's server state), ``fednl.run``
           node -> server         ``fednl.eval`` (metrics of the client's personalised model)
=========  =====================  ==========================================================================

``fednl.run`` carries the resolved run config (JSON), its sha256, the model fingerprint, the run uid (which keys
the node's state folder), the round, the client id and the two seeds of the client round — everything a stateless
node process needs to rebuild the client exactly as the in-process simulator runs it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict

RUN = "fednl.run"
NODE = "fednl.node"
REPLY = "fednl.reply"
GLOBAL = "fednl.global"
SERVER = "fednl.server"
SERVER_INFO = "fednl.server-info"
EVAL = "fednl.eval"

OPS = ("hello", "train", "evaluate")


def config_sha(config_json: str) -> str:
    return hashlib.sha256(config_json.encode("utf-8")).hexdigest()


def config_to_json(config: dict[str, Any]) -> str:
    """Canonical JSON of a resolved run config (sorted keys): the same text gives the same sha on every node."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class RunRecord:
    """The ``fednl.run`` record of a message from the ServerApp."""

    op: str
    run_uid: str
    round: int = 0
    cid: str = ""
    config_json: str = ""
    config_sha: str = ""
    fingerprint: str = ""
    wire_dtype: str = "fp32"
    seed_gen: int = 0
    seed_torch: int = 0
    state_dir: str = ""  # the run's default node state folder (a node's own ``state-dir`` wins)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"fednl.run: unknown op {self.op!r}; expected one of {OPS}")
        if self.config_json and config_sha(self.config_json) != self.config_sha:
            raise ValueError("fednl.run: the config text does not match its sha256 (corrupted message?)")

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(asdict(self))

    @classmethod
    def from_content(cls, content: RecordDict) -> RunRecord:
        if RUN not in content:
            raise ValueError(f"message lacks the {RUN!r} record (not sent by fednl's ServerApp?); "
                             f"records: {sorted(content)}")
        rec = dict(content[RUN])
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(rec) - names)
        if unknown:
            raise ValueError(f"{RUN}: unknown field(s) {unknown}: ServerApp and ClientApp run different fednl versions?")
        return cls(**rec)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- node identity
PARTITION_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"
STATE_DIR_KEY = "state-dir"


@dataclass(frozen=True)
class NodeIdentity:
    partition_id: int
    num_partitions: int
    state_dir: str  # "" when the node config names none


def node_identity(node_config: Mapping[str, Any]) -> NodeIdentity:
    """Read ``partition-id`` / ``num-partitions`` / ``state-dir`` from a SuperNode's node config."""
    for key in (PARTITION_KEY, NUM_PARTITIONS_KEY):
        if key not in node_config:
            raise ValueError(f"this SuperNode's node config lacks {key!r}; start it with "
                             f"--node-config \"partition-id=<i> num-partitions=<n>\" (got {dict(node_config)})")
    try:
        pid, num = int(node_config[PARTITION_KEY]), int(node_config[NUM_PARTITIONS_KEY])
    except (TypeError, ValueError):
        raise ValueError(f"node config partition-id/num-partitions must be integers, got {dict(node_config)}") from None
    if not 0 <= pid < num:
        raise ValueError(f"node config partition-id={pid} is outside [0, num-partitions={num})")
    return NodeIdentity(pid, num, str(node_config.get(STATE_DIR_KEY, "")).strip())


def handle_query(msg: Message, ctx: Context) -> Message:
    """``hello``: tell the ServerApp which partition this node serves (cheap: no torch, no model)."""
    run = RunRecord.from_content(msg.content)
    if run.op != "hello":
        raise ValueError(f"query message with op {run.op!r}; expected 'hello'")
    node = node_identity(ctx.node_config)
    info = ConfigRecord({PARTITION_KEY: node.partition_id, NUM_PARTITIONS_KEY: node.num_partitions,
                         STATE_DIR_KEY: node.state_dir, "pid": os.getpid()})
    return Message(RecordDict({NODE: info}), reply_to=msg)
