"""`fednl rule ...`: rule files (the shared memory parameters of a converted model, :mod:`fednl.models.rules`)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fednl.cli.errors import user_errors

rule_app = typer.Typer(help="Rule files: a converted model's shared memory parameters + the design that built them.",
                       no_args_is_help=True)


@rule_app.command("list")
def list_cmd() -> None:
    """List the packaged rules (usable as `fednl score FILE --rule NAME`)."""
    from fednl.models.rules import describe_rule, list_rules, load_rule, rules_dir

    with user_errors():
        names = list_rules()
        if not names:
            typer.echo(f"no packaged rules (a rule named NAME is the file {rules_dir().name}/NAME.safetensors "
                       "of the fednl package)")
            return
        width = max(len(n) for n in names)
        for name in names:
            typer.echo(f"{name:<{width}}  {describe_rule(load_rule(name))}")


@rule_app.command("show")
def show_cmd(rule: str = typer.Argument(..., help="a packaged rule's name or a rule file")) -> None:
    """Print a rule's backbone, memory design, tensors and provenance as JSON."""
    from fednl.models.rules import load_rule

    with user_errors():
        r = load_rule(rule)
        typer.echo(json.dumps({"rule": r.origin, "model_source": r.model_source, "parameters": r.n_params,
                               "tensors": {n: list(t.shape) for n, t in sorted(r.tensors.items())},
                               "memory": r.memory_config.model_dump(mode="json"), "provenance": r.provenance},
                              indent=2))


@rule_app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., help="a finished run directory of a titans method (e.g. fednl)"),
    out: Path = typer.Option(..., "--out", "-o", help="the rule file to write (.safetensors)"),
    notes: list[str] = typer.Option([], "--note", help="extra provenance key=value (TOML value); repeatable"),
) -> None:
    """Extract the global rule (groups `rule` and `gate`) of RUN_DIR's newest checkpoint into a rule file."""
    from fednl.cli.data import apply_overrides
    from fednl.rule_export import export_rule
    from fednl.models.rules import describe_rule, load_rule

    with user_errors():
        path = export_rule(run_dir, out, notes=apply_overrides({}, notes),
                           log=lambda msg: typer.echo(msg, err=True))
        typer.echo(f"wrote {path}: {describe_rule(load_rule(path))}")


def register(app: typer.Typer) -> None:
    app.add_typer(rule_app, name="rule")
