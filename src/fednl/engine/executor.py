"""The seam between the round loop and where clients run: :class:`ClientExecutor`.

The round loop (:class:`fednl.engine.simulator.RoundLoop`) does everything a server does — sampling, the
strategy's payloads, the wire codecs, the byte ledger and budget, aggregation, checkpoints, metrics — and hands
the clients' work to an executor through two calls:

* ``train(rnd, jobs, state) -> replies``: one :class:`TrainJob` per sampled client, carrying the wire-encoded
  downlink payload and the client's two seeds; each :class:`TrainReply` carries the wire-encoded uplink payload.
  An executor may answer only a subset of the jobs (a client dropped out, missed a deadline); the loop then
  aggregates over the clients that answered and counts no uplink bytes for the others. An executor says why a job
  got no reply with :meth:`ClientExecutor.missed` (recorded in the round's ``dropped_reason``), and hands every
  reply to :meth:`ClientExecutor.arrived` the moment it comes in: the loop stores it on disk there, so a run
  killed in the middle of a round does not train that client again when it resumes.
* Every job carries the round and a nonce; a reply must carry both back (``TrainReply.round`` / ``nonce``). The
  loop refuses a reply for another round (check ``stale``), one whose nonce is not its job's, a second reply for
  one job, and a reply nobody asked for (check ``replay``).
* ``evaluate(rnd, cids, state) -> metrics``: the metrics of each client's model after round ``rnd`` — a training
  client's personalised model on its test split, a held-out client's global model on all its examples.

Implementations: :class:`fednl.engine.clients.InProcessExecutor` (every client in this process, one shared model)
and :class:`fednl.flower.server.FlowerExecutor` (every client on its own Flower SuperNode).

:class:`Federation` is what the server knows about the clients without holding their data: their names (in the
order sampling sees them), which have a test split, the held-out ones, and the task's name and kind.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fednl.strategies.base import Payload

if TYPE_CHECKING:
    from fednl.engine.runstate import RunState


@dataclass(frozen=True)
class TrainJob:
    """One client's local round: the wire-encoded downlink payload, its ``(shuffling, torch)`` seeds and the
    job's nonce (the reply must echo it)."""

    cid: str
    payload: Payload
    seeds: tuple[int, int]
    nonce: str = ""


@dataclass(frozen=True)
class TrainReply:
    """A client's answer as it crossed the wire: the wire-encoded uplink payload, N_k, training metrics, and the
    round and nonce of the job it answers (a reply that does not state them is refused as stale)."""

    cid: str
    payload: Payload
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    round: int = 0
    nonce: str = ""


@dataclass(frozen=True)
class Federation:
    """The clients of a run as the server sees them (names and counts, never data)."""

    task: str  # task name, e.g. "stream"
    kind: str  # "mc" | "qa" | "text"
    metric: str  # the task kind's primary metric (the console line)
    clients: tuple[str, ...]  # training clients, in the order the strategy samples from
    tested: tuple[str, ...] = ()  # training clients with a test split: evaluated after evaluation rounds
    heldout: tuple[str, ...] = ()  # never trained; evaluated with the global model on all their examples

    def __post_init__(self) -> None:
        names = [*self.clients, *self.heldout]
        if not self.clients:
            raise ValueError(f"task {self.task!r} has no clients")
        if len(set(names)) != len(names):
            raise ValueError(f"task {self.task!r}: client names are not unique: {names}")
        stray = sorted(set(self.tested) - set(self.clients))
        if stray:
            raise ValueError(f"task {self.task!r}: tested clients {stray} are not training clients")


class ClientExecutor(ABC):
    """Where the clients of a run train and are evaluated (see the module docstring).

    ``state`` is the run state the round loop continues from. An executor whose clients live in this process
    keeps their :class:`~fednl.client.state.ClientState` in ``state.clients`` (so a checkpoint holds them); one
    whose clients run elsewhere reads only what the server may send from it (global parameters, the strategy's
    server state).
    """

    federation: Federation
    on_reply: Callable[[TrainReply], None] | None = None  # set by the round loop around each ``train`` call
    missing: dict[str, str]  # client -> why it gave no reply in the last ``train`` call (reset by the loop)

    def arrived(self, reply: TrainReply) -> None:
        """Hand ``reply`` to the round loop as soon as it came in (before the other jobs are done)."""
        if self.on_reply is not None:
            self.on_reply(reply)

    def missed(self, cid: str, reason: str) -> None:
        """Record why client ``cid`` gave no reply in this ``train`` call (a deadline, a node gone)."""
        self.__dict__.setdefault("missing", {})[cid] = reason

    def start(self, state: RunState, *, resumed: bool) -> None:
        """Called once before the first round of a session (``resumed``: ``state`` came from a checkpoint)."""
        del state, resumed

    def reused(self, rnd: int, cids: Sequence[str]) -> None:
        """The replies of ``cids`` in round ``rnd`` were taken from the journal of a killed session (they crossed
        then): an executor that keeps its own records of the traffic can restore theirs."""
        del rnd, cids

    @abstractmethod
    def train(self, rnd: int, jobs: Sequence[TrainJob], state: RunState) -> list[TrainReply]:
        """Run the jobs of round ``rnd``; replies for any subset of the jobs, at most one per job."""

    @abstractmethod
    def evaluate(self, rnd: int, cids: Sequence[str], state: RunState) -> dict[str, dict[str, float]]:
        """Metrics of the clients ``cids`` (training or held-out) after round ``rnd``."""
