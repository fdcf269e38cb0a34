"""`fednl run`, `fednl presets` and `fednl comm`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fednl.cli.errors import user_errors


def run(
    config: str | None = typer.Argument(None, help="a config TOML file or a preset name (see `fednl presets`)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="output directory"),
    set_: list[str] = typer.Option([], "--set", help="override, key.sub=value (TOML literal); repeatable"),
    resume: Path | None = typer.Option(None, "--resume", help="continue the run in DIR from its last checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="delete a previous run's outputs in --out first"),
) -> None:
    """Run federated training; writes config.resolved.toml, metrics.jsonl, results.json and checkpoints."""
    from fednl.config import load_runs
    from fednl.experiment import clear_run_dir, holds_run, load_resolved, run_dirs, run_suite

    with user_errors():
        if resume is not None:
            if out is not None and out.resolve() != resume.resolve():
                raise ValueError(f"--out {out} and --resume {resume} name different directories")
            cfgs = load_runs(config or load_resolved(resume), set_)
            run_suite(cfgs, resume, resume=True)
            return
        if config is None:
            raise ValueError("missing CONFIG: give a config TOML file or a preset name (see `fednl presets`)")
        cfgs = load_runs(config, set_)
        target = out if out is not None else (Path(cfgs[0].out) if cfgs[0].out else None)
        if target is None:
            raise ValueError("missing --out DIR (or `out = \"DIR\"` in the config)")
        dirs = run_dirs(cfgs, target)
        if holds_run(target) or any(holds_run(d) for d in dirs):
            if not overwrite:
                raise ValueError(f"{target} already holds a run: continue it with --resume {target}, start over "
                                 "with --overwrite, or pick another --out")
            for d in {target, *dirs}:
                clear_run_dir(d)
        run_suite(cfgs, target)


def presets() -> None:
    """List the packaged presets with their one-line descriptions."""
    from fednl.config import list_presets

    items = list_presets()
    width = max(len(n) for n, _ in items)
    for name, desc in items:
        typer.echo(f"{name:<{width}}  {desc}")


def comm(
    model: str = typer.Option("smollm2", help="model source: smollm2, tiny or hf:<folder>"),
    r: int = typer.Option(16, help="LoRA rank"),
    alpha: float = typer.Option(32.0, help="LoRA alpha"),
    wire: str = typer.Option("fp32", help="FedNL's wire codec: fp32, fp16, bf16, int8, int8-row, topk-<fraction>"),
    fedavg_wire: str | None = typer.Option(None, "--fedavg-wire", help="FedAvg-LoRA's wire codec (default: --wire)"),
    scope: str = typer.Option("rules", help="FedNL sharing scope: rules or rules+lora"),
    fedavg_targets: str = typer.Option("all", help="FedAvg-LoRA targets: all, or comma-separated module names"),
    memory_preset: str | None = typer.Option(None, "--memory-preset", help="take FedNL's memory design from this "
                                             "preset or config file (e.g. memory-cpu); default: the paper's design"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Per-round FedNL vs FedAvg-LoRA traffic for one backbone, counted by building and encoding both payloads."""
    from fednl.engine.codecs import as_spec
    from fednl.engine.comm import format_comparison, traffic_comparison
    from fednl.models.config import ModelConfig

    with user_errors():
        targets: list[str] | str = "all" if fedavg_targets == "all" else [t.strip() for t in fedavg_targets.split(",")]
        for flag, value in (("--wire", wire), ("--fedavg-wire", fedavg_wire)):
            if value is not None:
                try:
                    as_spec(value)
                except ValueError as exc:
                    raise ValueError(f"{flag}: {exc}") from None
        memory_cfg = None
        if memory_preset is not None:
            from fednl.config import load_config

            memory_cfg = load_config(memory_preset).memory
        rec = traffic_comparison(ModelConfig(source=model), r=r, alpha=alpha, wire_dtype=wire, scope=scope,
                                 fedavg_targets=targets, fedavg_wire=fedavg_wire, memory_cfg=memory_cfg)
        if memory_preset is not None:
            rec["memory_preset"] = memory_preset
        typer.echo(json.dumps(rec, indent=2) if json_out else format_comparison(rec))


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("presets")(presets)
    app.command("comm")(comm)
