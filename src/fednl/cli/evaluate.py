"""`fednl evaluate RUN_DIR`: the post-hoc evaluation protocol (:mod:`fednl.eval.protocol`)."""

from __future__ import annotations

from pathlib import Path

import typer

from fednl.cli.errors import user_errors


def evaluate(
    run_dir: Path = typer.Argument(..., help="a run directory written by `fednl run`"),
    out: Path | None = typer.Option(None, "--out", "-o", help="output JSON (default RUN_DIR/eval.json)"),
    no_aggregation: bool = typer.Option(False, "--no-aggregation-drop",
                                        help="skip the extra local round per client (aggregation drop)"),
) -> None:
    """Global / personalised / memory-off / held-out views, aggregation drop, NIAH by depth, CE by position."""
    from fednl.eval.protocol import write_eval

    with user_errors():
        path = write_eval(run_dir, out, aggregation=not no_aggregation)
        typer.echo(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
