"""fednl on Flower: the ``ServerApp`` and ``ClientApp`` (Message API) that wrap fednl's own engine.

One adapter, no second implementation of any algorithm: the ServerApp runs the in-process simulator's round
loop (:class:`~fednl.engine.flower_server.FlowerEngine`) with every registered strategy's ``configure_train`` /
``aggregate_train`` / server state, and the ClientApp runs the simulator's per-client step
(:mod:`fednl.engine.flower_runtime`) around :func:`fednl.client.run_client_round`.

Entry points:

* ``flwr run``: ``deploy/pyproject.toml`` names ``fednl.engine.flower_app:serverapp`` and ``:clientapp``; the
  ServerApp reads its :class:`~fednl.engine.flower_settings.AppSettings` from the Flower run config.
* ``fednl flower simulate``: :func:`build_server_app` with settings given directly (``run_simulation`` has no run
  config), see :mod:`fednl.engine.flower_sim`.

A SuperNode runs every message in a fresh ``flwr-clientapp`` process, so this module imports only Flower and the
light protocol module; torch, the model and the trainer are imported by the handlers that need them (the
``hello`` query needs none of them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fednl.engine.flower_protocol import handle_query
from fednl.engine.flower_settings import AppSettings


def server_main(grid: Grid, settings: AppSettings, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the run from the fednl config, wait for one SuperNode per client, run all rounds; returns
    results.json's content (``<out>/flower.json`` gets the Flower-side record)."""
    from fednl.config import load_config, save_resolved
    from fednl.engine.experiment import build_simulator, holds_run
    from fednl.engine.flower_server import (
        FLOWER_JSON,
        NODE_STATE_DIR,
        FlowerExecutor,
        discover_nodes,
        new_run_uid,
        read_flower_json,
    )
    from fednl.engine.simulator import RoundLoop

    t0 = time.perf_counter()
    out = Path(settings.out).expanduser().resolve()
    cfg = load_config(settings.config, settings.overrides)
    sim = build_simulator(cfg, out, log=log)
    if settings.resume:
        run_uid = str(read_flower_json(out)["run_uid"])
    else:
        if holds_run(out) or (out / FLOWER_JSON).exists():
            raise ValueError(f"{out} already holds a run: resume it, or pick another output folder")
        out.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, out)
        run_uid = new_run_uid()
    state_dir = settings.state_dir or str(out / NODE_STATE_DIR)
    log(f"== flower | {cfg.method.name} | {len(sim.client_names)} clients | {cfg.rounds} rounds | "
        f"wire {cfg.engine.wire_dtype} | run {run_uid} | out {out}")
    t1 = time.perf_counter()
    nodes = discover_nodes(grid, sim.client_names, run_uid, timeout_s=settings.wait_nodes_s, log=log)
    t2 = time.perf_counter()
    startup = {"build_s": t1 - t0, "handshake_s": t2 - t1, "startup_s": t2 - t0}
    executor = FlowerExecutor(grid, nodes, sim.federation, run_uid=run_uid, state_dir=state_dir,
                              config=sim.spec.config, fingerprint=sim.fingerprint,
                              wire_dtype=cfg.engine.wire_dtype, out=out, local=sim.executor,
                              round_timeout_s=settings.round_timeout_s, startup=startup)
    results = RoundLoop(sim.model, sim.strategy, sim.spec, executor, log=log).run(resume=settings.resume)
    assert results is not None
    executor.finish(time.perf_counter() - t0)
    return results


def build_server_app(settings: AppSettings | None = None) -> ServerApp:
    """A ServerApp running :func:`server_main`; without ``settings`` they come from the Flower run config."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        server_main(grid, settings if settings is not None else AppSettings.from_run_config(context.run_config))

    return app


def _train(msg: Message, ctx: Context) -> Message:
    from fednl.engine.flower_client import handle_train

    return handle_train(msg, ctx)


def _evaluate(msg: Message, ctx: Context) -> Message:
    from fednl.engine.flower_client import handle_evaluate

    return handle_evaluate(msg, ctx)


def build_client_app() -> ClientApp:
    """A ClientApp answering fednl's ``query`` (hello), ``train`` and ``evaluate`` messages."""
    app = ClientApp()
    app.query()(handle_query)
    app.train()(_train)
    app.evaluate()(_evaluate)
    return app


serverapp = build_server_app()
clientapp = build_client_app()
