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




def memory_eval(
    run_dir: Path = typer.Argument(..., help="a run directory written by `fednl run` (windowed memory model)"),
    clients: str = typer.Option("heldout", help="'heldout' (global rule, books never trained on) or 'train' "
                                                "(each client's personalised model on its test split)"),
    max_examples: int | None = typer.Option(None, help="at most this many documents per client"),
    out: Path | None = typer.Option(None, "--out", "-o", help="output JSON (default RUN_DIR/memory_eval-CLIENTS.json, "
                                                             "-CLIENTS-cacheN.json with --cache)"),
    cache: int = typer.Option(0, "--cache", min=0, help="add a sparse cache of N evicted tokens per KV head "
                                                       "(memory.cache; inference only) and its 'cache' condition"),
    cache_every: int = typer.Option(16, "--cache-every", min=1, help="tokens between cache updates"),
    conditions: str | None = typer.Option(None, "--conditions", help="comma-separated subset of memory,zeroed,window,"
                                          "full (and with --cache: cache,random_cache,wider,more_sinks); default: all"),
) -> None:
    """CE inside vs beyond the window for the memory, its zeroed twin, window + sinks alone and full attention."""
    import json

    from fednl.eval.memory import CACHE_CONDITIONS, CONDITIONS, run_memory_views
    from fednl.records import RESULTS_NAME, Results
    from fednl.util.atomic import atomic_write_text

    with user_errors():
        chosen = tuple(c.strip() for c in conditions.split(",") if c.strip()) if conditions else None
        res = run_memory_views(run_dir, clients=clients, max_examples=max_examples, cache=cache,
                               cache_every=cache_every, **({"conditions": chosen} if chosen else {}))
        path = out or Path(run_dir) / (f"memory_eval-{clients}" + (f"-cache{cache}" if cache else "") + ".json")
        atomic_write_text(path, json.dumps(res, indent=1))
        p = res["pooled"]
        typer.echo(f"beyond position {p['ranges'][-1][0]}: " + "  ".join(
            f"{c} {p[c]['ranges'][-1]['ce']:.4f}" for c in (*CONDITIONS, *CACHE_CONDITIONS) if c in p))
        if "gain_inside" in p:
            typer.echo(f"gain inside {p['gain_inside']:+.4f}  beyond {p['gain_beyond']:+.4f}  carried "
                       f"{p['carried']:+.4f}" + (f"  gap closed {100 * p['gap_closed']:.1f} %" if "gap_closed" in p
                                                  else ""))
        results = Path(run_dir) / RESULTS_NAME
        if results.is_file():
            rs = Results.load(results)
            rounds, total = max(1, rs.rounds), rs.comm.total
            typer.echo(f"traffic: {total:,} bytes in {rounds} rounds ({total // rounds:,} per round, both directions)")
        typer.echo(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
    app.command("memory-eval")(memory_eval)
