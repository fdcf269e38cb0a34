"""Clients in this process: :class:`ClientRuntime` (one process's client side) and :class:`InProcessExecutor`.

One model object — the frozen backbone plus its small trainable tensors — serves every client of the process:
before a client trains (or is evaluated) only its tensors are copied in (its local parameters from its
:class:`ClientState`, the shared ones from the server's payload). Nothing is ever copied per client except those
small tensors.

:class:`ClientRuntime` is what every place that runs a client uses — the in-process executor, a Flower node
(:mod:`fednl.flower.node`) and ``fednl evaluate``'s extra local round — so a client trains the same way
everywhere: decode the downlink payload with the run's wire, :func:`~fednl.client.trainer.run_client_round` with a
torch generator (shuffling) and a forked global torch RNG seeded from the server-chosen seeds, encode the reply.
It holds no data: each call gets the client's examples.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from fednl.client.state import ClientState
from fednl.client.trainer import run_client_round
from fednl.engine.executor import ClientExecutor, Federation, TrainJob, TrainReply
from fednl.engine.wire import Wire
from fednl.client.metrics import PRIMARY_METRIC, eval_seq_len, evaluate_examples
from fednl.strategies.base import ClientReply, Params, Payload, Strategy, StrategyError

if TYPE_CHECKING:
    from fednl.data.types import ClientData, Example, FederatedTask
    from fednl.engine.runstate import RunState
    from fednl.engine.simulator import RunSpec


def primary_metric(kind: str) -> str:
    """The metric the console line and summaries report for a task kind."""
    return PRIMARY_METRIC.get(kind, "accuracy")


def federation_of(task: FederatedTask) -> Federation:
    """The :class:`Federation` of a task built in this process."""
    return Federation(task=task.name, kind=task.kind, metric=primary_metric(task.kind),
                      clients=tuple(c.name for c in task.clients),
                      tested=tuple(c.name for c in task.clients if c.test),
                      heldout=tuple(c.name for c in task.heldout))


class ClientRuntime:
    """The client side of a run in one process: the shared ``model``, the tokenizer, the strategy's client hooks,
    the training and evaluation settings of ``spec`` and the run's wire."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, strategy: Strategy, spec: RunSpec):
        self.model, self.tokenizer, self.strategy, self.spec = model, tokenizer, strategy, spec
        self.device = next(iter(model.parameters())).device
        self.wire = Wire.from_engine(spec.engine)
        live = {n: p.detach() for n, p in model.named_parameters()}
        # what a client that never trained starts its local parameters from (taken before any client trains)
        self.initial_local: Params = {n: live[n].to("cpu").clone() for n in sorted(strategy.local_names())}

    # ------------------------------------------------------------------ evaluation
    def install(self, cid: str, global_params: Params, client: ClientState, initial_local: Params) -> None:
        """Load client ``cid``'s personalised model into the shared one: its local parameters (persisted, or
        ``initial_local`` if it never trained), then ``strategy.eval_params`` (default: the global shared)."""
        live = dict(self.model.named_parameters())
        local = client.local_params()
        with torch.no_grad():
            for n in self.strategy.local_names():
                live[n].copy_(local.get(n, initial_local[n]))
            for n, t in self.strategy.eval_params(cid, global_params, client).items():
                if n not in live:
                    raise StrategyError(f"strategy {self.strategy.name!r}: eval_params names unknown parameter {n!r}")
                live[n].copy_(t)

    def evaluate(self, cid: str, examples: Sequence[Example], global_params: Params, client: ClientState,
                 initial_local: Params) -> dict[str, float]:
        """Client ``cid``'s personalised model (:meth:`install`) on ``examples``."""
        self.install(cid, global_params, client, initial_local)
        bs = int(self.spec.engine.eval_batch_size or self.spec.train.batch_size)
        return evaluate_examples(self.model, self.tokenizer, list(examples), seq_len=eval_seq_len(self.spec),
                                 batch_size=bs)

    # ------------------------------------------------------------------ one client's local round
    def train(self, rnd: int, cid: str, payload: Payload, client: ClientState, examples: Sequence[Example], *,
              initial_local: Params, seeds: tuple[int, int]) -> ClientReply:
        """Client ``cid``'s local round ``rnd`` on the decoded ``payload``: a torch generator (shuffling) and a
        forked global torch RNG seeded from ``seeds``, so the result does not depend on what ran before in the
        process. ``client`` is updated in place."""
        seed_gen, seed_torch = seeds
        gen = torch.Generator().manual_seed(int(seed_gen))
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type if devices else "cuda"):
            torch.manual_seed(int(seed_torch))
            return run_client_round(self.model, self.strategy, cid, payload, client, list(examples), self.tokenizer,
                                    self.spec.train, rnd, gen, initial_local=initial_local)

    def round(self, rnd: int, cid: str, down: Payload, client: ClientState, examples: Sequence[Example], *,
              initial_local: Params, seeds: tuple[int, int]) -> tuple[Payload, ClientReply]:
        """Client ``cid``'s whole side of round ``rnd``: decode the wire payload ``down`` (with the client's wire
        state), :meth:`train`, encode the reply. Returns ``(wire reply, reply)``."""
        received = self.wire.decode_down(down, client)
        reply = self.train(rnd, cid, received, client, examples, initial_local=initial_local, seeds=seeds)
        return self.wire.encode_up(reply.payload, received, client), reply


class InProcessExecutor(ClientExecutor):
    """Every client of ``task`` in this process, one after the other, on the runtime's one model. Their
    :class:`ClientState` lives in the run state (``state.clients``), so the server's checkpoint holds it.

    ``engine.deadline_s``: the clients of a round stand for clients training side by side, so each one's own
    training time is compared with the deadline; a client that took longer trained (its state moved on, as a
    real straggler's would) but its reply is discarded and it counts as dropped (``deadline: ...``)."""

    def __init__(self, runtime: ClientRuntime, task: FederatedTask):
        self.runtime, self.task = runtime, task
        self.federation = federation_of(task)
        self.data: dict[str, ClientData] = {c.name: c for c in [*task.clients, *task.heldout]}

    def examples(self, cid: str) -> list[Example]:
        """What client ``cid`` is evaluated on: its test split, or all its examples for a held-out client."""
        c = self.data[cid]
        return [*c.train, *c.test] if cid in self.federation.heldout else list(c.test)

    def train(self, rnd: int, jobs: Sequence[TrainJob], state: RunState) -> list[TrainReply]:
        show = bool(self.runtime.spec.engine.progress) and sys.stderr.isatty()
        deadline = self.runtime.spec.engine.deadline_s
        replies = []
        for job in tqdm(jobs, desc=f"round {rnd}", unit="client", leave=False, disable=not show):
            t0 = time.perf_counter()
            up, reply = self.runtime.round(rnd, job.cid, job.payload, state.clients[job.cid],
                                           self.data[job.cid].train, initial_local=state.initial_local,
                                           seeds=job.seeds)
            took = time.perf_counter() - t0
            if deadline is not None and took > deadline:
                self.missed(job.cid, f"deadline: answered after {took:.2f} s > engine.deadline_s {deadline:g} s")
                continue
            answer = TrainReply(job.cid, up, reply.num_examples, dict(reply.metrics), round=rnd, nonce=job.nonce)
            self.arrived(answer)
            replies.append(answer)
        return replies

    def evaluate(self, rnd: int, cids: Sequence[str], state: RunState) -> dict[str, dict[str, float]]:
        del rnd
        out = {}
        for cid in cids:
            client = ClientState(cid) if cid in self.federation.heldout else state.clients[cid]
            out[cid] = self.runtime.evaluate(cid, self.examples(cid), state.global_params, client,
                                             state.initial_local)
        return out
