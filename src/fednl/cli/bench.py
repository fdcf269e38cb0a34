"""`fednl bench ...`: benchmarks that print figures (speed and memory targets are checked here, not in tests)."""

from __future__ import annotations

from pathlib import Path

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
    lengths: str = typer.Option("1024,4096,16384,65536", help="comma-separated context lengths (tokens)"),
    baseline_max: int = typer.Option(16384, min=2, help="longest length run for the full-KV-cache baseline"),
    window: int = typer.Option(512, min=1, help="softmax window of the converted model (tokens)"),
    sinks: int | None = typer.Option(None, help="sink tokens beside the window (default 4)"),
    threads: int = typer.Option(1, min=1, help="torch threads per measurement"),
    out: Path | None = typer.Option(None, "--out", "-o", help="also write the JSON list to this file (for "
                                    "`fednl report --memory-bench`)"),
) -> None:
    """Peak RSS of streaming SmolLM2-135M (converted, windowed + sinks) vs the baseline with a full KV cache."""
    from fednl.bench.inference_memory import run
    from fednl.cli.errors import user_errors

    with user_errors():
        try:
            parsed = [int(x) for x in lengths.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--lengths: expected comma-separated integers, got {lengths!r}") from None
        records = run(json_out=json_out, lengths=parsed, baseline_max=baseline_max, window=window,
                      threads=threads, sinks=sinks)
        if out is not None:
            from fednl.util.atomic import atomic_write_json

            atomic_write_json(out, records)
            typer.echo(f"wrote {out}", err=True)


@bench_app.command("train-step")
def bench_train_step(
    preset: str = typer.Option("memory-cpu", help="the preset whose model and memory design are timed"),
    sets: list[str] = typer.Option([], "--set", help="config override key=value (repeatable)"),
    batch: int = typer.Option(1, min=1, help="sequences per step"),
    tokens: int = typer.Option(512, min=2, help="tokens per sequence"),
    repeats: int = typer.Option(3, min=1, help="timed steps per objective (after one warm-up step)"),
    threads: int = typer.Option(2, min=1, help="torch threads"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON list instead of a table"),
) -> None:
    """Seconds and tokens/s of one training step of the memory (attention transfer and LM loss)."""
    from fednl.bench.train_step import run
    from fednl.cli.errors import user_errors

    with user_errors():
        run(preset=preset, sets=sets, batch=batch, tokens=tokens, repeats=repeats, threads=threads,
            json_out=json_out)


@bench_app.command("passkey")
def bench_passkey(
    rule: str = typer.Option("default", help="a packaged rule name, a rule file, 'default' or 'none'"),
    model: str | None = typer.Option(None, help="backbone source (default: the rule's own)"),
    window: int = typer.Option(64, min=1, help="softmax window (tokens)"),
    sinks: int = typer.Option(4, min=0, help="sink tokens beside the window"),
    n: int = typer.Option(20, min=1, help="prompts"),
    filler: int = typer.Option(560, min=0, help="book tokens between the key and the question"),
    seed: int = typer.Option(0, help="seed of the keys and the filler offsets"),
    threads: int = typer.Option(2, min=1, help="torch threads"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object instead of a table"),
    cache: int = typer.Option(0, min=0, help="sparse cache of N evicted tokens per KV head (memory.cache)"),
    cache_every: int = typer.Option(16, min=1, help="tokens between cache updates"),
    depth: float = typer.Option(0.0, min=0.0, max=0.99, help="fraction of the filler placed before the key"),
    conditions: str | None = typer.Option(None, help="comma-separated subset of memory,cache,random_cache,wider,"
                                                     "more_sinks,zeroed,window,full (default: all that apply)"),
) -> None:
    """Passkey digit accuracy with the key beyond the window: memory vs window + sinks vs full attention (and,
    with --cache, window + sinks + the sparse cache without the memory)."""
    from fednl.bench.passkey import run
    from fednl.cli.errors import user_errors

    with user_errors():
        run(rule=rule, model=model, window=window, sinks=sinks, n=n, filler=filler, seed=seed, threads=threads,
            json_out=json_out, cache=cache, cache_every=cache_every, depth=depth,
            conditions=tuple(c.strip() for c in conditions.split(",") if c.strip()) if conditions else None)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
