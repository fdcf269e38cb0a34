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
    markdown: Path | None = typer.Option(None, "--markdown",
                                         help="also write the across-seed table (Markdown) to this file"),
) -> None:
    """Per-client bars, accuracy vs depth, CE vs position, memory vs length, cumulative bytes, results table."""
    from fednl.report import write_report

    with user_errors():
        path = write_report(run_dirs, out, memory_bench=memory_bench, title=title)
        typer.echo(f"wrote {path}")
        if markdown is not None:
            from fednl.util.atomic import atomic_write_text
            from fednl.report import load_run_dir
            from fednl.report.seeds import markdown_table, seed_groups

            atomic_write_text(markdown, markdown_table(seed_groups([load_run_dir(d) for d in run_dirs])))
            typer.echo(f"wrote {markdown}")


def register(app: typer.Typer) -> None:
    app.command("report")(report)
