"""A node's data: its one client's examples, read from its own disk — never sent by the server.

**Deployment.** The node config's ``data-dir`` names a *client folder*, written by ``fednl flower split-data
CONFIG --out DIR`` (one folder per partition) or by the data's owner in the same format::

    <data-dir>/client.json   {"format": 1, "client": "client00", "heldout": false, "task": "stream",
                              "kind": "text", "partition-id": 0, "num-partitions": 3,
                              "train": 4, "test": 2, "sha256": "<of train.jsonl + test.jsonl>"}
    <data-dir>/train.jsonl   one example per line (:meth:`fednl.data.types.Example.to_dict`)
    <data-dir>/test.jsonl

``client.json`` is the node's task spec: which client it is, of which task, and (optionally) which partition; the
node checks it against its node config and the examples against the sha256 before serving anything.

**Simulation** (``fednl flower simulate``, :class:`~fednl.flower.launch.LocalGrid`): one process may serve many
virtual nodes. A node of the *simulation* ClientApp without ``data-dir`` builds the task from the run config
(once per process) and serves partition ``partition-id`` of it: the training clients in the task's order, then
the held-out clients. The deployment ClientApp never does this: without ``data-dir`` it refuses to start work.

Either way a node serves exactly one client: asked to train or evaluate any other client, it refuses
(:class:`ForeignClientError`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fednl.data.types import ClientData, Example, FederatedTask, canonical_json
from fednl.flower.protocol import NodeIdentity, NodeInfo, RunRecord
from fednl.util.atomic import atomic_write_json, atomic_write_text

FORMAT = 1
CLIENT_JSON = "client.json"
SPLITS = ("train", "test")


class ForeignClientError(ValueError):
    """The server asked a node for a client whose data the node does not hold."""


@dataclass(frozen=True)
class NodeData:
    """The one client a node serves."""

    client: ClientData
    heldout: bool  # never trains; evaluated on all its examples
    task: str
    kind: str
    source: str  # where the examples came from (error messages)

    def serve(self, cid: str, op: str) -> ClientData:
        """The client's data for ``op`` (``train`` / ``evaluate``) on client ``cid``; refuses any other client."""
        if cid != self.client.name:
            raise ForeignClientError(f"this SuperNode holds the data of client {self.client.name!r} only "
                                     f"({self.source}); it refuses to {op} client {cid!r}")
        if op == "train" and self.heldout:
            raise ValueError(f"client {cid!r} is held out ({self.source}): it is evaluated, never trained")
        return self.client

    def eval_examples(self) -> list[Example]:
        """Its test split, or all its examples for a held-out client."""
        c = self.client
        return [*c.train, *c.test] if self.heldout else list(c.test)

    def info(self, node: NodeIdentity, pid: int) -> NodeInfo:
        return NodeInfo(partition_id=node.partition_id, num_partitions=node.num_partitions, client=self.client.name,
                        heldout=self.heldout, task=self.task, kind=self.kind, n_train=len(self.client.train),
                        n_test=len(self.client.test), pid=pid)


# ---------------------------------------------------------------------------------------------- client folders
def partitions(task: FederatedTask) -> list[tuple[ClientData, bool]]:
    """``(client, held out?)`` per partition id: the training clients in the task's order, then the held-out ones."""
    return [(c, False) for c in task.clients] + [(c, True) for c in task.heldout]


def _lines(examples: list[Example]) -> str:
    return "".join(canonical_json(ex.to_dict()) + "\n" for ex in examples)


def _sha(texts: dict[str, str]) -> str:
    h = hashlib.sha256()
    for split in SPLITS:
        h.update(texts[split].encode("utf-8"))
    return h.hexdigest()


def write_client_folder(folder: str | Path, client: ClientData, *, task: str, kind: str, heldout: bool,
                        partition_id: int | None = None, num_partitions: int | None = None) -> Path:
    """Write one client's examples and its ``client.json`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    texts = {"train": _lines(client.train), "test": _lines(client.test)}
    for split in SPLITS:
        atomic_write_text(folder / f"{split}.jsonl", texts[split])
    spec: dict[str, Any] = {"format": FORMAT, "client": client.name, "heldout": heldout, "task": task, "kind": kind,
                            "train": len(client.train), "test": len(client.test), "sha256": _sha(texts)}
    if partition_id is not None:
        spec["partition-id"], spec["num-partitions"] = int(partition_id), int(num_partitions or 0)
    atomic_write_json(folder / CLIENT_JSON, spec)
    return folder


def split_task(task: FederatedTask, out: str | Path) -> list[tuple[int, str, Path]]:
    """One client folder per partition, ``out/partition-<i>``; returns ``(partition id, client, folder)``."""
    parts = partitions(task)
    out = Path(out)
    written = []
    for pid, (client, heldout) in enumerate(parts):
        folder = write_client_folder(out / f"partition-{pid}", client, task=task.name, kind=task.kind,
                                     heldout=heldout, partition_id=pid, num_partitions=len(parts))
        written.append((pid, client.name, folder))
    return written


def read_client_folder(folder: str | Path) -> tuple[NodeData, dict[str, Any]]:
    """A client folder's data and its ``client.json``; clear errors for a missing, foreign or altered folder."""
    folder = Path(folder).expanduser()
    spec_path = folder / CLIENT_JSON
    if not spec_path.is_file():
        raise FileNotFoundError(f"data-dir {folder}: {CLIENT_JSON} does not exist (write client folders with "
                                "`fednl flower split-data CONFIG --out DIR`)")
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        if spec.get("format") != FORMAT:
            raise ValueError(f"format {spec.get('format')!r}, this version reads format {FORMAT}")
        name, task, kind, heldout = str(spec["client"]), str(spec["task"]), str(spec["kind"]), bool(spec["heldout"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{spec_path}: not a fednl client spec ({exc})") from None
    texts = {}
    for split in SPLITS:
        path = folder / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"data-dir {folder}: {path.name} does not exist")
        texts[split] = path.read_text(encoding="utf-8")
    if _sha(texts) != spec.get("sha256"):
        raise ValueError(f"data-dir {folder}: the examples do not match the sha256 in {CLIENT_JSON} (changed or "
                         "truncated?)")
    examples = {}
    for split in SPLITS:
        try:
            examples[split] = [Example.from_dict(json.loads(line)) for line in texts[split].splitlines() if line]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"data-dir {folder}: bad example in {split}.jsonl ({exc})") from None
        if len(examples[split]) != int(spec.get(split, -1)):
            raise ValueError(f"data-dir {folder}: {split}.jsonl has {len(examples[split])} examples, "
                             f"{CLIENT_JSON} says {spec.get(split)}")
    data = NodeData(ClientData(name, examples["train"], examples["test"]), heldout, task, kind,
                    source=f"data-dir {folder}")
    return data, spec


# ---------------------------------------------------------------------------------------------- a node's data
_FOLDERS: dict[str, tuple[NodeData, dict[str, Any]]] = {}
_TASKS: dict[str, FederatedTask] = {}


def _folder_data(node: NodeIdentity) -> NodeData:
    key = str(Path(node.data_dir).expanduser().resolve())
    if key not in _FOLDERS:
        _FOLDERS.clear()
        _FOLDERS[key] = read_client_folder(key)
    data, spec = _FOLDERS[key]
    if "partition-id" in spec and (int(spec["partition-id"]), int(spec["num-partitions"])) != (
            node.partition_id, node.num_partitions):
        raise ValueError(f"data-dir {node.data_dir} holds partition {spec['partition-id']} of "
                         f"{spec['num-partitions']}, but this SuperNode's node config says partition-id="
                         f"{node.partition_id} num-partitions={node.num_partitions}")
    return data


def _task_of(run: RunRecord) -> FederatedTask:
    """The task of the run config in ``run`` (simulation only), built once per process."""
    if not run.config_json:
        raise ValueError("a simulation node without data-dir needs the run config in the message to build its "
                         "partition of the task")
    if run.config_sha not in _TASKS:
        from fednl.config import validate_config
        from fednl.models.loading import load_backbone

        cfg = validate_config(json.loads(run.config_json), source="the config sent by the ServerApp")
        _, tokenizer = load_backbone(cfg.model)
        _TASKS.clear()
        _TASKS[run.config_sha] = cfg.task.build(tokenizer, cfg.seed)
    return _TASKS[run.config_sha]


def node_data(node: NodeIdentity, run: RunRecord, *, simulation: bool) -> NodeData:
    """The client this node serves: its ``data-dir`` folder, or (``simulation`` only) its partition of the task."""
    if node.data_dir:
        return _folder_data(node)
    if not simulation:
        raise ValueError("this SuperNode's node config names no data-dir: a deployed node reads its client's data "
                         "from its own folder (--node-config \"... data-dir='<folder>'\", written by `fednl flower "
                         "split-data`); it never builds the task from the server's config")
    task = _task_of(run)
    parts = partitions(task)
    if node.num_partitions != len(parts):
        raise ValueError(f"SuperNode has num-partitions={node.num_partitions} but the task has {len(task.clients)} "
                         f"training + {len(task.heldout)} held-out clients")
    client, heldout = parts[node.partition_id]
    return NodeData(client, heldout, task.name, task.kind,
                    source=f"simulation: partition {node.partition_id} of the task built from the run config")
