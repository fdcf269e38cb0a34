"""`fednl report DIR [DIR ...]`: a self-contained report.html comparing runs (:mod:`fednl.report`)."""

from __future__ import annotations

from pathlib import Path

import typer

from fednl.cli.errors import user_errors


def report(
    run_dirs: list[Path] = typer.Argument(..., help="run directories written by `fednl run`"),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="output HTML file"),
    memory_bench: Path | None = typer.Option(None, "--memory-bench",
                                             help="JSON from `fednl bench inference-memory --json`"),
    title: str = typer.Option("fednl report", help="page title"),
) -> None:
    """Per-client bars, accuracy vs depth, CE vs position, memory vs length, cumulative bytes, results table."""
    from fednl.report import write_report

    with user_errors():
        path = write_report(run_dirs, out, memory_bench=memory_bench, title=title)
        typer.echo(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.command("report")(report)
