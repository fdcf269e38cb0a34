"""`fednl bench ...`: benchmarks that print figures (speed and memory targets are checked here, not in tests)."""

from __future__ import annotations

import typer

bench_app = typer.Typer(help="Benchmarks that print figures (JSON with --json).", no_args_is_help=True)


@bench_app.command("memory")
def bench_memory(
    json_out: bool = typer.Option(False, "--json", help="print one JSON list instead of a table"),
    repeats: int = typer.Option(3, help="timed runs per point (median reported)"),
) -> None:
    """Delta-rule op: recurrent vs chunkwise fwd+bwd at B=4, H=4, D=64, T in {256, 1024, 4096}."""
    from fednl.bench.memory import run

    run(json_out=json_out, repeats=repeats)


@bench_app.command("inference-memory")
def bench_inference_memory(
    json_out: bool = typer.Option(False, "--json", help="print one JSON list instead of a table"),
) -> None:
    """Peak RSS of streaming SmolLM2-135M (converted, windowed) vs the baseline with a full KV cache."""
    from fednl.bench.inference_memory import run

    run(json_out=json_out)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
