"""What a SuperNode runs for one message: the in-process simulator's per-client steps, on a node-local client.

The node builds the very same :class:`~fednl.engine.simulator.Simulator` that ``fednl run`` builds
(:func:`fednl.engine.experiment.build_simulator`, from the resolved config the message carries; cached per
process) and runs one client through it:

* :func:`train_client` — :meth:`Simulator.client_round <fednl.engine.simulator.Simulator.client_round>` (the
  body of the simulator's per-client loop: decode with the run's wire, train, encode the reply) with the
  server-chosen seeds (a torch generator for shuffling, and a forked, seeded global torch RNG);
* :func:`evaluate_client` — :meth:`Simulator.evaluate_client <fednl.engine.simulator.Simulator.evaluate_client>`
  with the strategy's server state installed first, so personalising strategies (``eval_params``) see what the
  server knows.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fednl.client.state import ClientState
from fednl.engine.flower_protocol import config_sha
from fednl.engine.runstate import RunState
from fednl.engine.simulator import Simulator
from fednl.strategies.base import Params, Payload


@dataclass
class Runtime:
    """A node's rebuilt run: the simulator object (model, tokenizer, task, strategy) for one config."""

    sim: Simulator
    config_sha: str

    @property
    def client_names(self) -> list[str]:
        return self.sim.client_names

    @property
    def fingerprint(self) -> str:
        return self.sim.fingerprint


_CACHE: dict[str, Runtime] = {}


def build_runtime(config_json: str) -> Runtime:
    """Validate a resolved config (JSON text) and build its simulator. Its ``out`` is a scratch path: a node
    writes nothing there (the node's client state goes to its state folder)."""
    from fednl.config import validate_config
    from fednl.engine.experiment import build_simulator

    cfg = validate_config(json.loads(config_json), source="the config sent by the ServerApp")
    scratch = Path(tempfile.gettempdir()) / "fednl-flower-node"
    sim = build_simulator(cfg, scratch, log=lambda _msg: None)
    return Runtime(sim=sim, config_sha=config_sha(config_json))


def runtime_for(config_json: str, sha: str) -> Runtime:
    """The runtime of a config, built once per process (only the newest config is kept in memory)."""
    if config_sha(config_json) != sha:
        raise ValueError("config text does not match its sha256")
    rt = _CACHE.get(sha)
    if rt is None:
        _CACHE.clear()
        rt = _CACHE[sha] = build_runtime(config_json)
    return rt


def train_client(rt: Runtime, cid: str, down: Payload, state: ClientState, rnd: int, seed_gen: int,
                 seed_torch: int) -> tuple[Payload, int, dict[str, float]]:
    """One local round of client ``cid`` on the wire payload ``down``; returns the wire-encoded reply payload,
    N_k and the training metrics. ``state`` (with the client's wire state) is updated in place (the caller
    persists it)."""
    sim = rt.sim
    sim.wire.check(down, "down")
    up, reply = sim.client_round(rnd, cid, down, state, initial_local=sim.initial_local,
                                 seeds=(int(seed_gen), int(seed_torch)))
    return up, reply.num_examples, dict(reply.metrics)


def evaluate_client(rt: Runtime, cid: str, global_params: Params, state: ClientState, server_tensors: Params,
                    server_info: dict[str, Any], rnd: int) -> dict[str, float]:
    """Client ``cid``'s personalised model (its local state + ``eval_params``) on its test split."""
    sim = rt.sim
    sim.strategy.load_server_state(server_tensors, server_info)
    run_state = RunState(rnd, global_params, sim.initial_local, {cid: state})
    return sim.evaluate_client(cid, sim.data[cid].test, run_state)
