"""An in-process Flower ``Grid``: the real ServerApp/ClientApp code paths without Ray or a SuperLink.

:class:`LocalGrid` hands each message to a ``ClientApp`` in this process, one virtual SuperNode per node config,
after putting the message (and the reply) through Flower's own object serialisation (deflate every record,
inflate them back — what every hop does). A ClientApp exception becomes an error reply, as on a SuperNode. Used by
the unit tests (every strategy through the adapter in seconds) and for debugging an app without processes.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.supercore.run import Run
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import InflatableObject, get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

from fednl.engine.flower_settings import AppSettings

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
    """Virtual SuperNodes ``FIRST_NODE_ID + i`` with ``node_configs[i]``, served by ``client_app`` in-process."""

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
        self.delivered: list[Message] = []  # every instruction as the node received it (after the wire)

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


def run_local(settings: AppSettings, num_nodes: int, *, client_app: ClientApp | None = None,
              log: Callable[[str], None] | None = None) -> tuple[dict[str, Any], LocalGrid]:
    """Run fednl's ServerApp against ``num_nodes`` in-process SuperNodes (``partition-id`` 0..n-1); returns
    results.json's content and the grid (whose ``delivered`` messages can be inspected)."""
    from fednl.engine.flower_app import build_client_app, server_main

    grid = LocalGrid(client_app or build_client_app(),
                     [{"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)])
    results = server_main(grid, settings, log=log or (lambda _msg: None))
    return results, grid
