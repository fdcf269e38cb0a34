"""Hostile updates on the Flower path: a node whose train reply carries NaN (or a wrong shape) is screened by the
same round loop as in process. The Flower run (real ServerApp / ClientApp code, Flower's serialisation on both
hops, ``LocalGrid``) ends bit-identical to the in-process run in which that client sent nothing."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from fednl.config import load_config  # noqa: E402
from fednl.engine.runstate import load_checkpoint  # noqa: E402
from fednl.experiment import build_simulator  # noqa: E402
from fednl.flower.codec import decode_payload, encode_payload  # noqa: E402
from fednl.flower.launch import AppSettings, run_local  # noqa: E402
from fednl.flower.node import handle_evaluate, handle_query, handle_train  # noqa: E402
from fednl.flower.protocol import ANSWER, REPLY, RunRecord  # noqa: E402
from fednl.strategies.base import Payload  # noqa: E402
from flower_tiny import tiny_config  # noqa: E402
from lost_replies import lose_replies  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

N = 3
VICTIM = "client01"


def hostile_client_app(corrupt: Callable[[Payload], Payload]) -> ClientApp:
    """The simulation ClientApp, except that client ``VICTIM``'s round-1 reply is rewritten on its node."""
    def train(msg: Message, ctx) -> Message:
        reply = handle_train(msg, ctx, simulation=True)
        run = RunRecord.from_content(msg.content)
        if (run.round, run.cid) != (1, VICTIM) or reply.has_error():
            return reply
        content = encode_payload(corrupt(decode_payload(reply.content)))
        content[REPLY] = reply.content[REPLY]
        content[ANSWER] = reply.content[ANSWER]  # it answers its job, with a poisoned payload
        return Message(content, reply_to=msg)

    app = ClientApp()
    app.query()(partial(handle_query, simulation=True))
    app.train()(train)
    app.evaluate()(partial(handle_evaluate, simulation=True))
    return app


def nan_payload(p: Payload) -> Payload:
    return Payload({n: torch.full_like(t, float("nan")) for n, t in p.tensors.items()}, dict(p.meta))


def shape_payload(p: Payload) -> Payload:
    return Payload({n: torch.zeros(t.numel() + 1, dtype=t.dtype) for n, t in p.tensors.items()}, dict(p.meta))


@pytest.mark.parametrize(("corrupt", "check"), [(nan_payload, "nonfinite"), (shape_payload, "shape")])
def test_a_hostile_node_is_screened_on_flower(tmp_path: Path, corrupt, check: str) -> None:
    config = tmp_path / "run.toml"
    config.write_text(tiny_config(seed=3, rounds=2, method="fedavg", n_clients=N))
    run_local(AppSettings(config=str(config), out=str(tmp_path / "flower"), wait_nodes_s=5), N,
              client_app=hostile_client_app(corrupt))
    # the same run in process, where the victim's round-1 reply never arrives
    sim = build_simulator(load_config(str(config)), tmp_path / "silent", log=lambda s: None)
    lose_replies(sim, {(1, VICTIM)})
    sim.run()
    ga = load_checkpoint(tmp_path / "flower" / "checkpoint").global_params
    gb = load_checkpoint(tmp_path / "silent" / "checkpoint").global_params
    assert ga.keys() == gb.keys() and all(torch.equal(ga[n], gb[n]) for n in ga)
    rounds = [json.loads(x) for x in (tmp_path / "flower" / "metrics.jsonl").read_text().splitlines()]
    first = [r for r in rounds if r["type"] == "round" and r["round"] == 1][0]
    assert [(r["client"], r["check"]) for r in first["rejected"]] == [(VICTIM, check)]
