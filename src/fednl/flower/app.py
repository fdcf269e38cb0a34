"""The Flower entry points: fednl's ``ServerApp`` and ``ClientApp`` objects (Message API).

* ``flwr run``: ``deploy/pyproject.toml`` names ``fednl.flower.app:serverapp`` and ``:clientapp``; the ServerApp
  reads its :class:`~fednl.flower.launch.AppSettings` from the Flower run config, and every SuperNode serves the
  client folder its node config names (``data-dir``).
* ``flwr run deploy/isolation``: :data:`isolationapp` asks every SuperNode for another client's data (each must
  refuse) and runs no round.
* ``fednl flower simulate``: :func:`build_server_app` with settings given directly (``run_simulation`` has no run
  config) and :data:`simulation_clientapp`, whose virtual nodes may build their partition of the task from the
  run config instead (:mod:`fednl.flower.launch`).

A deployed SuperNode runs every message in a fresh ``flwr-clientapp`` process, so this module imports only Flower
and the light node module; the ServerApp code and torch are imported where they are needed.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fednl.flower.launch import AppSettings
from fednl.flower.node import build_client_app


def build_server_app(settings: AppSettings | None = None) -> ServerApp:
    """A ServerApp running :func:`~fednl.flower.server.server_main`; without ``settings`` they come from the
    Flower run config."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        from fednl.flower.server import server_main

        server_main(grid, settings if settings is not None else AppSettings.from_run_config(context.run_config))

    return app


def build_isolation_app(settings: AppSettings | None = None) -> ServerApp:
    """A ServerApp that only checks that every SuperNode refuses another client's data
    (:func:`~fednl.flower.server.check_isolation`; ``deploy/isolation``)."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        from fednl.flower.server import check_isolation

        check_isolation(grid, settings if settings is not None else AppSettings.from_run_config(context.run_config))

    return app


serverapp = build_server_app()
isolationapp = build_isolation_app()
clientapp = build_client_app()  # deployment: each node serves its own data-dir only
simulation_clientapp = build_client_app(simulation=True)  # Ray simulation: a node may build its partition
