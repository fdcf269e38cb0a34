"""Starting the Flower app: its settings, the Ray simulation, and an in-process Grid for tests and debugging.

**Settings** (:class:`AppSettings`). The fednl TOML config (the same file ``fednl run`` takes) stays the single
description of the experiment. The Flower run config (``deploy/pyproject.toml`` ``[tool.flwr.app.config]``,
overridable with ``flwr run -c``) only points at it and carries overrides — these keys, all strings/bools/numbers
as Flower requires:

===================  ===================================================================================
``fednl-config``     path (on the SuperLink machine) of the fednl TOML, or a preset name
``fednl-set``        ``--set`` overrides separated by ``;`` (``"rounds=2; train.lr=1e-3"``)
``out-dir``          output folder of the ServerApp (metrics.jsonl, results.json, checkpoint/, flower.json)
``resume``           continue the run in ``out-dir`` from its last checkpoint
``state-dir``        where SuperNodes keep client state when their node config names no ``state-dir``
``wait-nodes-s``     how long the ServerApp waits for all SuperNodes to connect
``round-timeout-s``  how long the ServerApp waits for a round's replies; a node that has not answered by then is
                     dropped for that round (0 = wait for every node; ``engine.deadline_s`` takes precedence)
===================  ===================================================================================

**Simulation** (:func:`simulate`, ``fednl flower simulate``): ``flwr.simulation.run_simulation`` with fednl's
ServerApp (settings passed directly) and the simulation ClientApp, one virtual SuperNode per client of the task
(training clients, then held-out ones; Flower sets ``partition-id`` / ``num-partitions``), and the per-client Ray
resources of the config's ``[flower]`` table (:class:`~fednl.config.FlowerResources`).

**In-process Grid** (:class:`LocalGrid`, :func:`run_local`): the real ServerApp/ClientApp code paths without Ray
or a SuperLink; every message and reply goes through Flower's own object serialisation.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import InflatableObject, get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fednl.util.atomic import atomic_write_json

FLOWER_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1"}


# ---------------------------------------------------------------------------------------------- settings
RUN_CONFIG_KEYS = ("fednl-config", "fednl-set", "out-dir", "resume", "state-dir", "wait-nodes-s", "round-timeout-s")
_RUN_KEY_OF_FIELD = {"config": "fednl-config", "overrides": "fednl-set", "out": "out-dir", "resume": "resume",
                     "state_dir": "state-dir", "wait_nodes_s": "wait-nodes-s", "round_timeout_s": "round-timeout-s"}


class AppSettings(BaseModel):
    """What the ServerApp needs to start (ClientApps get everything else in the messages)."""

    model_config = ConfigDict(extra="forbid")

    config: str = Field(min_length=1)
    overrides: list[str] = Field(default_factory=list)
    out: str = Field(min_length=1)
    resume: bool = False
    state_dir: str | None = None
    wait_nodes_s: float = Field(300.0, gt=0)
    round_timeout_s: float = Field(0.0, ge=0)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> AppSettings:
        """Parse Flower's ``Context.run_config`` (keys :data:`RUN_CONFIG_KEYS`)."""
        unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"Flower run config has unknown key(s) {unknown}; fednl reads {list(RUN_CONFIG_KEYS)}")
        config = str(run_config.get("fednl-config", "")).strip()
        out = str(run_config.get("out-dir", "")).strip()
        if not config:
            raise ValueError("Flower run config: 'fednl-config' is empty; pass -c \"fednl-config='path/to/run.toml'\"")
        if not out:
            raise ValueError("Flower run config: 'out-dir' is empty; pass -c \"out-dir='/path/to/out'\"")
        state_dir = str(run_config.get("state-dir", "")).strip() or None
        try:
            return cls(
                config=config,
                overrides=split_overrides(str(run_config.get("fednl-set", ""))),
                out=out,
                resume=bool(run_config.get("resume", False)),
                state_dir=state_dir,
                wait_nodes_s=float(run_config.get("wait-nodes-s", 300.0)),
                round_timeout_s=float(run_config.get("round-timeout-s", 0.0)),
            )
        except ValidationError as exc:
            err = exc.errors()[0]
            key = _RUN_KEY_OF_FIELD.get(str(err["loc"][0]), str(err["loc"][0]))
            raise ValueError(f"Flower run config: {key}: {err['msg']}") from None

    def to_run_config(self) -> dict[str, Any]:
        """The inverse of :meth:`from_run_config` (what ``flwr run -c`` gets)."""
        return {
            "fednl-config": self.config,
            "fednl-set": join_overrides(self.overrides),
            "out-dir": self.out,
            "resume": self.resume,
            "state-dir": self.state_dir or "",
            "wait-nodes-s": self.wait_nodes_s,
            "round-timeout-s": self.round_timeout_s,
        }


def split_overrides(text: str) -> list[str]:
    """``"a=1; b.c=x"`` -> ``["a=1", "b.c=x"]`` (empty items dropped)."""
    return [part.strip() for part in text.split(";") if part.strip()]


def join_overrides(overrides: Sequence[str]) -> str:
    for o in overrides:
        if ";" in o:
            raise ValueError(f"override {o!r} contains ';', which separates overrides in the Flower run config")
    return "; ".join(overrides)


# ---------------------------------------------------------------------------------------------- the task's nodes
def build_task(settings: AppSettings) -> Any:
    """The configured task, built here (the operator's machine: to count or split it, never in the ServerApp)."""
    from fednl.config import load_config
    from fednl.models.loading import load_backbone

    cfg = load_config(settings.config, settings.overrides)
    _, tokenizer = load_backbone(cfg.model)
    return cfg.task.build(tokenizer, cfg.seed)


def count_nodes(settings: AppSettings) -> int:
    """SuperNodes a run of the config needs: one per training client and one per held-out client."""
    task = build_task(settings)
    return len(task.clients) + len(task.heldout)


# ---------------------------------------------------------------------------------------------- simulation
def simulate(settings: AppSettings, overrides: dict[str, Any] | None = None, *,
             verbose: bool = False) -> dict[str, Any]:
    """Run the fednl config on Flower's Ray simulation; returns results.json's content.

    Ray resources come from the config's ``[flower]`` table, with ``overrides`` (field -> value, e.g. from the
    command line) on top. ``<out>/flower.json`` gets ``timing.simulation_wall_s`` (Ray start + rounds + shutdown)
    and ``timing.backend_config`` next to what the ServerApp recorded.
    """
    t_prepare = time.perf_counter()
    os.environ.update(FLOWER_ENV)
    from flwr.simulation import run_simulation

    from fednl.config import FlowerResources, load_config
    from fednl.flower.app import build_server_app, simulation_clientapp
    from fednl.flower.server import FLOWER_JSON

    cfg = load_config(settings.config, settings.overrides)
    resources = FlowerResources.model_validate({**cfg.flower.model_dump(), **(overrides or {})})
    n = count_nodes(settings)
    backend = resources.backend_config()
    t0 = time.perf_counter()
    run_simulation(server_app=build_server_app(settings), client_app=simulation_clientapp, num_supernodes=n,
                   backend_config=backend, verbose_logging=verbose)
    wall = time.perf_counter() - t0
    out = Path(settings.out).expanduser().resolve()
    results_path = out / "results.json"
    if not results_path.is_file():
        raise RuntimeError(f"the Flower simulation ended without writing {results_path}; see the log above")
    record = json.loads((out / FLOWER_JSON).read_text())
    record["timing"]["prepare_s"] = round(t0 - t_prepare, 3)  # imports, config, node count (driver)
    record["timing"]["simulation_wall_s"] = round(wall, 3)  # run_simulation: Ray up, ServerApp, Ray down
    record["timing"]["ray_outside_server_s"] = round(wall - float(record["timing"].get("server_total_s", 0.0)), 3)
    record["timing"]["backend_config"] = backend
    atomic_write_json(out / FLOWER_JSON, record)
    return json.loads(results_path.read_text())


# ---------------------------------------------------------------------------------------------- in-process Grid
T = TypeVar("T", bound=InflatableObject)
SERVER_NODE_ID = 1
FIRST_NODE_ID = 1001


def wire_copy(obj: T) -> T:
    """``obj`` after Flower's serialisation: every nested object deflated to bytes and inflated back."""
    contents = {oid: o.deflate() for oid, o in get_all_nested_objects(obj).items()}
    return inflate_object_from_contents(obj.object_id, contents)  # type: ignore[return-value]


def _ensure_task_identity(run_id: int) -> None:
    for attr, value in (("run_id", run_id), ("task_id", 1), ("node_id", SERVER_NODE_ID)):
        try:
            getattr(TaskIdentity, attr)
        except RuntimeError:
            setattr(TaskIdentity, attr, value)


class LocalGrid(Grid):
    """Virtual SuperNodes ``FIRST_NODE_ID + i`` with ``node_configs[i]``, served by ``client_app`` in-process.

    Each message (and reply) is put through Flower's object serialisation (what every hop does); a ClientApp
    exception becomes an error reply, as on a SuperNode. ``delivered`` keeps every instruction as a node received
    it."""

    def __init__(self, client_app: ClientApp, node_configs: Iterable[Mapping[str, Any]], *, run_id: int = 7):
        _ensure_task_identity(run_id)
        self.client_app = client_app
        self.contexts = {
            FIRST_NODE_ID + i: Context(run_id=run_id, node_id=FIRST_NODE_ID + i, node_config=dict(cfg),
                                       state=RecordDict(), run_config={})
            for i, cfg in enumerate(node_configs)
        }
        self._run = Run.create_empty(run_id=run_id)
        self._pending: dict[str, Message] = {}
        self._counter = 0
        self.delivered: list[Message] = []

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def _deliver(self, msg: Message) -> Message:
        dst = msg.metadata.dst_node_id
        if dst not in self.contexts:
            raise ValueError(f"LocalGrid: no node {dst}; nodes are {self.get_node_ids()}")
        received = Message(wire_copy(msg.content), dst_node_id=dst, message_type=msg.metadata.message_type,
                           group_id=msg.metadata.group_id)
        self.delivered.append(received)
        try:
            reply = self.client_app(received, self.contexts[dst])
        except Exception as exc:  # noqa: BLE001 - reported to the server as an error reply, like a SuperNode
            reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=received)
        if reply.has_error():
            return reply
        return Message(wire_copy(reply.content), reply_to=received)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            self._counter += 1
            mid = f"local-{self._counter}"
            self._pending[mid] = self._deliver(msg)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._pending.pop(mid) for mid in list(message_ids) if mid in self._pending]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        del timeout  # delivery is synchronous
        return self.pull_messages(self.push_messages(messages))


def partition_configs(n: int, data_dirs: Sequence[str | Path] | None = None) -> list[dict[str, Any]]:
    """Node configs ``partition-id`` 0..n-1 (with ``data-dir`` each, when ``data_dirs`` are given)."""
    configs: list[dict[str, Any]] = [{"partition-id": i, "num-partitions": n} for i in range(n)]
    for cfg, folder in zip(configs, data_dirs or []):
        cfg["data-dir"] = str(folder)
    return configs


def run_local(settings: AppSettings, num_nodes: int, *, data_dirs: Sequence[str | Path] | None = None,
              client_app: ClientApp | None = None,
              log: Callable[[str], None] | None = None) -> tuple[dict[str, Any], LocalGrid]:
    """Run fednl's ServerApp against ``num_nodes`` in-process SuperNodes (``partition-id`` 0..n-1); returns
    results.json's content and the grid (whose ``delivered`` messages can be inspected). With ``data_dirs`` node
    ``i`` reads ``data_dirs[i]`` with the deployment ClientApp; without, the nodes are simulation nodes."""
    from fednl.flower.node import build_client_app
    from fednl.flower.server import server_main

    app = client_app or build_client_app(simulation=data_dirs is None)
    grid = LocalGrid(app, partition_configs(num_nodes, data_dirs))
    results = server_main(grid, settings, log=log or (lambda _msg: None))
    return results, grid
