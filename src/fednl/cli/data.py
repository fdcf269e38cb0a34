"""`fednl data build TASK`: build a federated task, print its clients and heterogeneity report, optionally
write every example as JSONL."""

from __future__ import annotations

import time
import tomllib
from pathlib import Path
from typing import Any

import typer

from fednl.cli.errors import user_errors

data_app = typer.Typer(help="Federated tasks: build, inspect, export.", no_args_is_help=True)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> ``(["a", "b"], value)``; the value is read as a TOML literal, else kept as a string."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set expects key=value, got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return [k.strip() for k in key.split(".")], value


def apply_overrides(base: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """Set each ``key.path=value`` of ``items`` in a copy of ``base`` (nested dicts created as needed)."""
    out: dict[str, Any] = dict(base)
    for item in items:
        path, value = parse_override(item)
        node = out
        for k in path[:-1]:
            child = node.get(k)
            node[k] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        node[path[-1]] = value
    return out


def load_tokenizer(model: str) -> Any:
    """``byte`` -> ByteTokenizer; ``smollm2`` -> SmolLM2-135M's tokenizer read from the installed GGUF."""
    if model == "byte":
        from fednl.models.tokenizer import ByteTokenizer

        return ByteTokenizer()
    if model == "smollm2":
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        from fednl.models.loading import find_smollm2_gguf
        from fednl.models.tokenizer import HFTokenizer

        gguf = find_smollm2_gguf()
        return HFTokenizer(AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
    raise ValueError(f"--model must be 'byte' or 'smollm2', got {model!r}")


@data_app.command("build")
def build(
    task: str = typer.Argument(..., help="mmlu5 | niah7 | stream | babilong | jsonl"),
    sets: list[str] = typer.Option([], "--set", help="task option key=value (TOML value), e.g. quickstart=true, "
                                                     "partition.kind=dirichlet; repeatable"),
    seed: int = typer.Option(0, "--seed", help="build seed"),
    out: Path | None = typer.Option(None, "--out", help="write every example as one JSON line to this file"),
    model: str = typer.Option("byte", "--model", help="tokenizer that measures token lengths: byte | smollm2"),
) -> None:
    """Build TASK, print per-client counts and the heterogeneity report."""
    with user_errors():
        from fednl.data import build_task, format_report, parse_task_config, task_fingerprint, write_task_jsonl

        cfg = parse_task_config(apply_overrides({"name": task}, sets))
        tokenizer = load_tokenizer(model)
        t0 = time.perf_counter()
        fed = build_task(cfg, tokenizer, seed)
        took = time.perf_counter() - t0
        typer.echo(f"task {fed.name} (kind {fed.kind}, seed {seed}, {model} tokens): built in {took:.1f} s")
        for c in [*fed.clients, *fed.heldout]:
            tag = " (heldout)" if c in fed.heldout else ""
            typer.echo(f"  {c.name}{tag}: {len(c.train)} train, {len(c.test)} test")
        typer.echo("heterogeneity (train examples, label = meta[%r]):" % fed.info["label_key"])
        typer.echo(format_report(fed.info["heterogeneity"]))
        typer.echo(f"fingerprint {task_fingerprint(fed)}")
        if out is not None:
            write_task_jsonl(fed, out)
            typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
