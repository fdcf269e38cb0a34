"""``fednl flower simulate``: the Flower app on Flower's Simulation Runtime (Ray backend), one process tree.

:func:`simulate` starts ``flwr.simulation.run_simulation`` with fednl's ServerApp (settings passed directly) and
ClientApp, one virtual SuperNode per client of the task (node config ``partition-id`` / ``num-partitions`` set
by Flower), and the per-client Ray resources of :class:`~fednl.engine.flower_settings.FlowerResources`. Flower's
runtime dependency installation and update check are switched off for the process.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from fednl.engine.atomic import atomic_write_json
from fednl.engine.flower_server import FLOWER_JSON
from fednl.engine.flower_settings import AppSettings, FlowerResources

FLOWER_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def count_clients(settings: AppSettings) -> int:
    """Number of training clients of the configured task (= SuperNodes to simulate)."""
    from fednl.config import load_config

    return _count_clients(load_config(settings.config, settings.overrides))


def _count_clients(cfg: Any) -> int:
    from fednl.data.build import build_task
    from fednl.models.loading import load_backbone

    _, tokenizer = load_backbone(cfg.model)
    return len(build_task(cfg.task, tokenizer, cfg.seed).clients)


def simulate(settings: AppSettings, overrides: dict[str, Any] | None = None, *,
             verbose: bool = False) -> dict[str, Any]:
    """Run the fednl config on Flower's Ray simulation; returns results.json's content.

    Ray resources come from the config's ``[flower]`` table (:class:`FlowerResources`), with ``overrides``
    (field -> value, e.g. from the command line) on top. ``<out>/flower.json`` gets
    ``timing.simulation_wall_s`` (Ray start + rounds + shutdown) and ``timing.backend_config`` next to what the
    ServerApp recorded.
    """
    t_prepare = time.perf_counter()
    os.environ.update(FLOWER_ENV)
    from flwr.simulation import run_simulation

    from fednl.config import load_config
    from fednl.engine.flower_app import build_server_app, clientapp

    cfg = load_config(settings.config, settings.overrides)
    resources = FlowerResources.model_validate({**cfg.flower.model_dump(), **(overrides or {})})
    n = _count_clients(cfg)
    backend = resources.backend_config()
    t0 = time.perf_counter()
    run_simulation(server_app=build_server_app(settings), client_app=clientapp, num_supernodes=n,
                   backend_config=backend, verbose_logging=verbose)
    wall = time.perf_counter() - t0
    out = Path(settings.out).expanduser().resolve()
    results_path = out / "results.json"
    if not results_path.is_file():
        raise RuntimeError(f"the Flower simulation ended without writing {results_path}; see the log above")
    record = json.loads((out / FLOWER_JSON).read_text())
    record["timing"]["prepare_s"] = round(t0 - t_prepare, 3)  # imports, config, client count (driver)
    record["timing"]["simulation_wall_s"] = round(wall, 3)  # run_simulation: Ray up, ServerApp, Ray down
    record["timing"]["ray_outside_server_s"] = round(wall - float(record["timing"].get("server_total_s", 0.0)), 3)
    record["timing"]["backend_config"] = backend
    atomic_write_json(out / FLOWER_JSON, record)
    return json.loads(results_path.read_text())
