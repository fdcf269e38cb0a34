"""`fednl flower ...`: run a fednl config on Flower (Ray simulation) and helpers for `flwr run` deployments."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fednl.cli.errors import user_errors

flower_app = typer.Typer(help="Run fednl on Flower: Ray simulation, and helpers for SuperLink/SuperNode deployments.",
                         no_args_is_help=True)


@flower_app.command("simulate")
def simulate_cmd(
    config: str | None = typer.Argument(None, help="fednl TOML config or preset name (the same as `fednl run`)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="output folder (results.json, flower.json, ...)"),
    set_: list[str] = typer.Option([], "--set", help="override key=value (repeatable), as in `fednl run`"),
    resume: Path | None = typer.Option(None, "--resume", help="continue the run in DIR from its last checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="delete a previous run's outputs in --out first"),
    num_cpus: float | None = typer.Option(None, help="Ray CPUs per ClientApp (default: flower.num_cpus)"),
    num_gpus: float | None = typer.Option(None, help="Ray GPUs per ClientApp, e.g. 0.25 (default: flower.num_gpus)"),
    ray_num_cpus: int | None = typer.Option(None, help="CPUs of the Ray instance (default: flower.ray_num_cpus)"),
    ray_num_gpus: int | None = typer.Option(None, help="GPUs of the Ray instance (default: flower.ray_num_gpus)"),
    verbose: bool = typer.Option(False, help="Flower's verbose logging"),
) -> None:
    """Run CONFIG on Flower's Simulation Runtime (Ray): one virtual SuperNode per client (held-out ones too).

    Ray resources per ClientApp come from the config's [flower] table (num_cpus, num_gpus, ray_num_cpus,
    ray_num_gpus); the options below override it.
    """
    with user_errors():
        from fednl.experiment import format_results, holds_run, load_resolved
        from fednl.flower.launch import AppSettings, simulate
        from fednl.flower.server import FLOWER_JSON, clear_flower_outputs

        if resume is not None:
            if out is not None and out.resolve() != resume.resolve():
                raise ValueError(f"--out {out} and --resume {resume} name different directories")
            config, out = config or load_resolved(resume), resume
        elif config is None:
            raise ValueError("missing CONFIG: give a config TOML file or a preset name (see `fednl presets`)")
        if out is None:
            raise ValueError("missing --out DIR")
        if resume is None and (holds_run(out) or (out / FLOWER_JSON).exists()):
            if not overwrite:
                raise ValueError(f"{out} already holds a run: continue it with --resume {out}, start over with "
                                 "--overwrite, or pick another --out")
            clear_flower_outputs(out)
        settings = AppSettings(config=config, overrides=list(set_), out=str(out), resume=resume is not None)
        given = {"num_cpus": num_cpus, "num_gpus": num_gpus, "ray_num_cpus": ray_num_cpus, "ray_num_gpus": ray_num_gpus}
        results = simulate(settings, {k: v for k, v in given.items() if v is not None}, verbose=verbose)
        typer.echo(format_results(results))


@flower_app.command("clients")
def clients_cmd(
    config: str = typer.Argument(..., help="fednl TOML config or preset name"),
    set_: list[str] = typer.Option([], "--set", help="override key=value (repeatable)"),
) -> None:
    """Print the number of SuperNodes CONFIG needs (partition-id 0..N-1): its training clients, then its held-out
    clients."""
    with user_errors():
        from fednl.flower.launch import AppSettings, count_nodes

        typer.echo(count_nodes(AppSettings(config=config, overrides=list(set_), out=".")))


@flower_app.command("split-data")
def split_data_cmd(
    config: str = typer.Argument(..., help="fednl TOML config or preset name"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for one client folder per SuperNode"),
    set_: list[str] = typer.Option([], "--set", help="override key=value (repeatable)"),
) -> None:
    """Build CONFIG's task here and write each client's examples to OUT/partition-<i> (client.json, train.jsonl,
    test.jsonl): the data-dir of SuperNode i. Prints one line per partition: id, client, folder."""
    with user_errors():
        from fednl.flower.data import split_task
        from fednl.flower.launch import AppSettings, build_task

        if out.exists() and any(out.iterdir()):
            raise ValueError(f"{out} is not empty; pick a new folder")
        task = build_task(AppSettings(config=config, overrides=list(set_), out="."))
        for pid, client, folder in split_task(task, out):
            typer.echo(f"{pid}\t{client}\t{folder}")


@flower_app.command("run-config")
def run_config_cmd(
    config: str = typer.Argument(..., help="fednl TOML config or preset name, as the SuperLink machine sees it"),
    out: str = typer.Option(..., "--out", help="output folder on the SuperLink machine"),
    set_: list[str] = typer.Option([], "--set", help="override key=value (repeatable)"),
    resume: bool = typer.Option(False, "--resume"),
    state_dir: str = typer.Option("", help="client-state folder for nodes whose node config names none"),
) -> None:
    """Print the TOML override file for `flwr run deploy <connection> --run-config FILE`."""
    with user_errors():
        from fednl.flower.launch import AppSettings

        settings = AppSettings(config=config, overrides=list(set_), out=out, resume=resume,
                               state_dir=state_dir or None)
        for key, value in settings.to_run_config().items():
            typer.echo(f"{key} = {json.dumps(value)}")


def register(app: typer.Typer) -> None:
    app.add_typer(flower_app, name="flower")
