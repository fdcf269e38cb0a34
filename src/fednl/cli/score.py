"""`fednl score FILE`: CE per position bin of a text file streamed through a converted model with a rule."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fednl.cli.errors import user_errors

# The defaults of fednl.eval.score, which is not imported here: it loads torch, and `fednl --help` should not
# (tests check that the two agree).
DEFAULT_RULE, WINDOW, SINKS, BIN_SIZE, CHUNK = "default", 64, 4, 256, 256


def score(
    file: Path = typer.Argument(..., help="a UTF-8 text file"),
    rule: str = typer.Option(DEFAULT_RULE, "--rule", help="a packaged rule's name, a rule file, 'default' (the "
                             "backbone's packaged rule, default-<model>) or 'none' (an untrained memory)"),
    window: int = typer.Option(WINDOW, "--window", help="softmax window (tokens, >= 1)"),
    sinks: int = typer.Option(SINKS, "--sinks", help="sink tokens the softmax path keeps seeing"),
    memory: str = typer.Option("on", "--memory", help="on | off (off: the softmax path alone, same window + sinks)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object instead of a table"),
    model: str | None = typer.Option(None, "--model", help="backbone: smollm2 | tiny | hf:<folder> (default: the "
                                     "rule's; smollm2 with --rule none)"),
    bin_size: int = typer.Option(BIN_SIZE, "--bin-size", help="tokens per position bin"),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="score only the first N tokens"),
    chunk: int = typer.Option(CHUNK, "--chunk", help="tokens fed per step (memory use grows with it, not with "
                              "the file)"),
    threads: int | None = typer.Option(None, "--threads", help="torch intra-op threads (default: torch's)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="a progress bar on stderr"),
    cache: int = typer.Option(0, "--cache", min=0, help="a sparse cache of N evicted tokens per KV head beside the "
                              "window, chosen by the memory's surprise (memory.cache); stays on with --memory off"),
    cache_every: int = typer.Option(16, "--cache-every", min=1, help="tokens between cache updates"),
) -> None:
    """Stream FILE through the converted model (bounded memory: the memory state + sinks + window) and print the
    next-token cross-entropy (nats) per position bin and overall."""
    from fednl.eval.score import format_score, score_file
    from fednl.util.threads import torch_threads

    with user_errors():
        if threads is not None and threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        with torch_threads(threads):
            rec = score_file(file, rule=rule, model=model, window=window, sinks=sinks, memory=memory,
                             bin_size=bin_size, max_tokens=max_tokens, chunk=chunk, progress=progress, cache=cache,
                             cache_every=cache_every,
                             log=lambda msg: typer.echo(msg, err=True), free_backbone=True)
        typer.echo(json.dumps(rec) if json_out else format_score(rec, str(file)))


def register(app: typer.Typer) -> None:
    app.command("score")(score)
