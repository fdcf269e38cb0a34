"""The messages between fednl's ServerApp and ClientApp, and what a SuperNode's node config says.

Every message is a Flower ``Message`` whose ``RecordDict`` holds fednl records only:

=========  ==============  ==================================================================================
type       direction       records
=========  ==============  ==================================================================================
query      server -> node  ``fednl.run`` (op ``hello``)
           node -> server  ``fednl.node`` (:class:`NodeInfo`): partition, the client whose data the node holds,
                           whether it is held out, the task's name and kind, its example counts
train      server -> node  ``fednl.tensors`` + ``fednl.meta`` (the wire-encoded payload), ``fednl.run``
           node -> server  ``fednl.tensors`` + ``fednl.meta`` (the wire-encoded reply payload),
                           ``fednl.reply`` (num-examples + the client's training metrics), ``fednl.answer``
                           (:class:`Answer`: the round, client and nonce of the job it answers)
evaluate   server -> node  ``fednl.global`` (global parameters, full precision), ``fednl.server`` +
                           ``fednl.server-info`` (the strategy's server state), ``fednl.run``
           node -> server  ``fednl.eval`` (metrics of the client's model)
=========  ==============  ==================================================================================

``fednl.run`` (:class:`RunRecord`) carries the resolved run config (JSON) and its sha256, the model
fingerprint, the run uid (which keys the node's state folder), the round, the client id and the two seeds of the
client round: everything a stateless node process needs to rebuild the model and train its client exactly as
the in-process simulator does. It never carries data: a node reads its client's examples from its own disk. A
``train`` message also carries the job's nonce, which the node echoes in ``fednl.answer``: the server refuses a
reply for another round (``stale``) or with another nonce (``replay``).

A SuperNode's node config (``--node-config``, or set by Flower's simulation) has the keys ``partition-id``,
``num-partitions``, ``state-dir`` (where it keeps its client's state) and ``data-dir`` (its client's data
folder, :mod:`fednl.flower.data`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from flwr.app import ConfigRecord, RecordDict

RUN = "fednl.run"
NODE = "fednl.node"
REPLY = "fednl.reply"
GLOBAL = "fednl.global"
SERVER = "fednl.server"
SERVER_INFO = "fednl.server-info"
EVAL = "fednl.eval"
ANSWER = "fednl.answer"

OPS = ("hello", "train", "evaluate")


def config_sha(config_json: str) -> str:
    return hashlib.sha256(config_json.encode("utf-8")).hexdigest()


def config_to_json(config: dict[str, Any]) -> str:
    """Canonical JSON of a resolved run config (sorted keys): the same text gives the same sha on every node."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def _config_record(fields_: Mapping[str, Any]) -> ConfigRecord:
    """A ConfigRecord of ``fields_`` without the empty strings (Flower cannot count the bytes of an empty string;
    a field left out reads back as its default, which is the empty string)."""
    return ConfigRecord({k: v for k, v in fields_.items() if v != ""})


def _from_record(cls: type, rec: Mapping[str, Any], what: str) -> Any:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(rec) - names)
    if unknown:
        raise ValueError(f"{what}: unknown field(s) {unknown}: ServerApp and ClientApp run different fednl versions?")
    return cls(**rec)


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
    nonce: str = ""  # a train job's nonce, echoed in the reply's ``fednl.answer``

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"fednl.run: unknown op {self.op!r}; expected one of {OPS}")
        if self.config_json and config_sha(self.config_json) != self.config_sha:
            raise ValueError("fednl.run: the config text does not match its sha256 (corrupted message?)")

    def to_record(self) -> ConfigRecord:
        return _config_record(asdict(self))

    @classmethod
    def from_content(cls, content: RecordDict) -> RunRecord:
        if RUN not in content:
            raise ValueError(f"message lacks the {RUN!r} record (not sent by fednl's ServerApp?); "
                             f"records: {sorted(content)}")
        return _from_record(cls, dict(content[RUN]), RUN)


@dataclass(frozen=True)
class Answer:
    """The ``fednl.answer`` record of a train reply: which job (round, client, nonce) it answers."""

    round: int
    cid: str
    nonce: str

    def to_record(self) -> ConfigRecord:
        return _config_record(asdict(self))

    @classmethod
    def from_content(cls, content: RecordDict) -> Answer:
        """The reply's answer record; a reply without one answers no job (round 0, no nonce: refused as stale)."""
        if ANSWER not in content:
            return cls(round=0, cid="", nonce="")
        rec = dict(content[ANSWER])
        try:
            return cls(round=int(rec.get("round", 0)), cid=str(rec.get("cid", "")), nonce=str(rec.get("nonce", "")))
        except (TypeError, ValueError):
            return cls(round=0, cid="", nonce="")


# ---------------------------------------------------------------------------------------------- the node
PARTITION_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"
STATE_DIR_KEY = "state-dir"
DATA_DIR_KEY = "data-dir"


@dataclass(frozen=True)
class NodeIdentity:
    """A SuperNode's node config."""

    partition_id: int
    num_partitions: int
    state_dir: str  # "" when the node config names none
    data_dir: str  # "" when the node config names none


def node_identity(node_config: Mapping[str, Any]) -> NodeIdentity:
    """Read ``partition-id`` / ``num-partitions`` / ``state-dir`` / ``data-dir`` from a SuperNode's node config."""
    for key in (PARTITION_KEY, NUM_PARTITIONS_KEY):
        if key not in node_config:
            raise ValueError(f"this SuperNode's node config lacks {key!r}; start it with --node-config "
                             f"\"partition-id=<i> num-partitions=<n> data-dir='<its data>'\" (got {dict(node_config)})")
    try:
        pid, num = int(node_config[PARTITION_KEY]), int(node_config[NUM_PARTITIONS_KEY])
    except (TypeError, ValueError):
        raise ValueError(f"node config partition-id/num-partitions must be integers, got {dict(node_config)}") from None
    if not 0 <= pid < num:
        raise ValueError(f"node config partition-id={pid} is outside [0, num-partitions={num})")
    return NodeIdentity(pid, num, str(node_config.get(STATE_DIR_KEY, "")).strip(),
                        str(node_config.get(DATA_DIR_KEY, "")).strip())


@dataclass(frozen=True)
class NodeInfo:
    """What a node tells the server in its ``hello`` reply (the ``fednl.node`` record): no example, only names
    and counts."""

    partition_id: int
    num_partitions: int
    client: str
    heldout: bool
    task: str
    kind: str
    n_train: int
    n_test: int
    pid: int  # the node process (diagnostics)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(asdict(self))

    @classmethod
    def from_content(cls, content: RecordDict) -> NodeInfo:
        if NODE not in content:
            raise ValueError(f"hello reply lacks the {NODE!r} record; records: {sorted(content)}")
        return _from_record(cls, dict(content[NODE]), NODE)
