"""`fednl reproduce [PLAN]`: the paper's experiments at CPU scale, resumable, then the tables (:mod:`fednl.reproduce`)."""

from __future__ import annotations

from pathlib import Path

import typer

from fednl.cli.errors import user_errors


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise typer.BadParameter(f"expected distinct comma-separated integers, got {text!r}")
    return seeds


def reproduce(
    plan: str = typer.Argument("cpu", help="'cpu' (paper-*-cpu presets, SmolLM2-135M), 'memory' (memory-cpu: the memory beyond the window), or 'smoke' / 'memory-smoke' (tiny model)"),
    out: Path = typer.Option(Path("runs/reproduce-cpu"), "--out", "-o", help="root directory of all runs"),
    seeds: str = typer.Option("0,1,2", help="comma-separated seeds"),
    jobs: int = typer.Option(2, min=1, help="runs at a time (one process each)"),
    threads: int = typer.Option(1, min=1, help="torch threads per run"),
    tables: Path | None = typer.Option(None, help="Markdown tables file (default OUT/tables.md)"),
    tables_only: bool = typer.Option(False, "--tables-only", help="only (re)write the tables from finished runs"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the commands still to run and exit"),
    variants: str | None = typer.Option(None, help="run only these variants (comma-separated job labels, e.g. "
                                                    "'fednl,local'); the tables still cover every finished run"),
) -> None:
    """Run FedNL and every paper baseline on the -cpu presets for each seed (skipping finished runs), evaluate
    each run, then write the across-seed tables (docs/RESULTS.md) and a report per experiment."""
    from fednl.reproduce import build_plan, job_commands, run_plan, select_variants, shell_line, write_tables

    with user_errors():
        p = build_plan(plan, _seeds(seeds), threads)
        if dry_run:
            for job in (p if variants is None else select_variants(p, variants.split(","))).jobs:
                for cmd in job_commands(job, out):
                    typer.echo(shell_line(cmd))
            return
        todo = p if variants is None else select_variants(p, [v.strip() for v in variants.split(",") if v.strip()])
        failures = [] if tables_only else run_plan(todo, out, jobs=jobs, log=typer.echo)
        path = write_tables(p, out, tables)
        typer.echo(f"wrote {path}")
        if failures:
            typer.echo(f"{len(failures)} job(s) failed:", err=True)
            for f in failures:
                typer.echo(f"  {f}", err=True)
            raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("reproduce")(reproduce)
