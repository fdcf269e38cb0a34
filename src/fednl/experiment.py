"""From a :class:`~fednl.config.RunConfig` to a finished run: build model, task and strategy, simulate, report.

Each config section builds its component: ``cfg.method.model_spec()`` names the model (kind + parameters) that
:func:`fednl.models.build_model` builds, ``cfg.method.build(groups=...)`` the strategy, ``cfg.task.build(...)``
the federated task. ``run_suite`` runs one or several methods on identical settings (the ``quickstart`` preset
runs FedNL and FedAvg-LoRA) and prints the comparison table: per-client metric, mean, bytes per round and the
traffic ratio, read from each run's typed :class:`~fednl.records.Results`.
"""

from __future__ import annotations

import gc
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fednl.config import RESOLVED_NAME, RunConfig, save_resolved
from fednl.engine.simulator import RunSpec, Simulator, human_bytes
from fednl.records import HIGHER_IS_BETTER, RESULTS_NAME, Results
from fednl.util.atomic import atomic_write_json
from fednl.util.threads import torch_threads

Log = Callable[[str], None]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda[:N]"`` must be available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"engine.device: {name!r} requested but CUDA is not available (use 'cpu' or 'auto')")
    return dev


@dataclass
class RunParts:
    """A run without its clients: the model the strategy asks for (one instance), its tokenizer, the strategy
    and the run spec. The in-process simulator adds the task; a Flower ServerApp or SuperNode needs no task."""

    model: torch.nn.Module
    tokenizer: Any
    strategy: Any
    spec: RunSpec


def build_parts(cfg: RunConfig, out: str | Path) -> RunParts:
    """Build the model, tokenizer, strategy and run spec of ``cfg`` (no data)."""
    from fednl.models.build import build_model
    from fednl.models.groups import param_groups
    from fednl.models.loading import load_backbone

    model_spec = cfg.method.model_spec()
    model = build_model(model_spec, cfg.model, cfg.memory, cfg.lora, seed=cfg.seed)
    _, tokenizer = load_backbone(cfg.model)
    hf_config = getattr(model, "config", None)
    if getattr(hf_config, "use_cache", False):
        hf_config.use_cache = False  # training/eval never reuse a KV cache
    model.to(resolve_device(cfg.engine.device))
    strategy = cfg.method.build(groups=param_groups(model))
    spec = RunSpec.from_config(cfg, out, model_name=f"{cfg.model.source}/{model_spec.label}")
    return RunParts(model, tokenizer, strategy, spec)


def build_simulator(cfg: RunConfig, out: str | Path, *, log: Log = print) -> Simulator:
    """Build the model the strategy asks for (one instance, shared by every client), the task and the strategy."""
    parts = build_parts(cfg, out)
    task = cfg.task.build(parts.tokenizer, cfg.seed)
    return Simulator(parts.model, parts.tokenizer, task, parts.strategy, parts.spec, log=log)


def run_config(cfg: RunConfig, out: str | Path, *, resume: bool = False, log: Log = print) -> dict[str, Any]:
    """Run (or resume) one method; writes config.resolved.toml, metrics.jsonl, results.json and checkpoints."""
    out = Path(out)
    try:
        with torch_threads(cfg.engine.threads):
            results = _run(cfg, out, resume=resume, log=log)
    finally:
        gc.collect()
    return results


def _run(cfg: RunConfig, out: Path, *, resume: bool, log: Log) -> dict[str, Any]:
    if not resume:  # first: from here on the folder can be resumed, whenever the process dies
        out.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, out)
    sim = build_simulator(cfg, out, log=log)
    log(f"== {cfg.method.name} | model {sim.spec.model_name} | task {sim.task.name} | "
        f"{len(sim.client_names)} clients | {cfg.rounds} rounds | wire {wire_label(sim)} | "
        f"{torch.get_num_threads()} threads | out {out}")
    results = sim.run(resume=resume)
    assert results is not None
    return results


def wire_label(sim: Simulator) -> str:
    """``"fp32"`` when both directions use one codec, else ``"↑int8 ↓fp16"``; plus the server optimiser."""
    up, down = sim.wire.label("up"), sim.wire.label("down")
    text = up if up == down else f"↑{up} ↓{down}"
    return text + (f" | server_opt {sim.spec.server_opt.name}" if sim.spec.server_opt is not None else "")


def run_dirs(cfgs: Sequence[RunConfig], out: Path) -> list[Path]:
    """One run: ``out`` itself. Several: ``out/<method>`` (``-2``, ``-3`` ... for repeated names)."""
    if len(cfgs) == 1:
        return [out]
    seen: dict[str, int] = {}
    dirs = []
    for c in cfgs:
        seen[c.method.name] = seen.get(c.method.name, 0) + 1
        k = seen[c.method.name]
        dirs.append(out / (c.method.name if k == 1 else f"{c.method.name}-{k}"))
    return dirs


def run_suite(cfgs: Sequence[RunConfig], out: str | Path, *, resume: bool = False, log: Log = print) -> list[dict[str, Any]]:
    """Run every config (one per method); several runs get a comparison table (printed and comparison.json)."""
    out = Path(out)
    if not cfgs:
        raise ValueError("no runs to execute")
    dirs = run_dirs(cfgs, out)
    if len(cfgs) > 1 and not resume:
        out.mkdir(parents=True, exist_ok=True)
        save_resolved(cfgs, out)
    results = []
    for cfg, d in zip(cfgs, dirs):
        # inside a suite, a member that never reached its first checkpoint simply starts
        member_resume = resume and (len(cfgs) == 1 or (d / "checkpoint").exists())
        results.append(run_config(cfg, d, resume=member_resume, log=log))
    table = format_comparison(results) if len(results) > 1 else format_results(results[0])
    log(table)
    if len(results) > 1:
        atomic_write_json(out / "comparison.json", comparison_record(results))
    return results


RUN_OUTPUTS = ("checkpoint", "journal", "metrics.jsonl", RESULTS_NAME, RESOLVED_NAME, "comparison.json")


def holds_run(out: str | Path) -> bool:
    """True when ``out`` contains outputs of a previous run."""
    return any((Path(out) / name).exists() for name in RUN_OUTPUTS)


def clear_run_dir(out: str | Path) -> None:
    """Delete the files a run writes (and nothing else) from ``out``."""
    for name in RUN_OUTPUTS:
        path = Path(out) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def load_resolved(out: str | Path) -> str:
    """Path of the resolved config of a run directory (for ``--resume``)."""
    path = Path(out) / RESOLVED_NAME
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume {out}: {path} does not exist (not a run directory, or its run was "
                                "killed before it started: run it again with `fednl run CONFIG --out DIR`)")
    return str(path)


def finished_run(run_dir: str | Path, *, verb: str) -> tuple[RunConfig, Path]:
    """The one run config of ``run_dir`` and its checkpoint folder, for commands that read a finished run
    (``verb``: what the command does to a run, for the message about suites). Clear errors for a folder that is
    not a run directory, a suite of several runs, or a run without a checkpoint."""
    from fednl.config import load_runs

    run_dir = Path(run_dir)
    cfg_path = run_dir / RESOLVED_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} does not exist ({run_dir} is not a run directory)")
    cfgs = load_runs(str(cfg_path))
    if len(cfgs) != 1:
        raise ValueError(f"{cfg_path} describes {len(cfgs)} runs (a suite): {verb} each member directory "
                         f"({', '.join(c.method.name for c in cfgs)}) instead")
    ckpt = run_dir / "checkpoint"
    if not ckpt.is_dir():
        raise FileNotFoundError(f"{ckpt} does not exist (the run never finished a round)")
    return cfgs[0], ckpt


# ---------------------------------------------------------------------------------------------- reporting
Result = Results | dict[str, Any]  # a run's results: typed, or results.json's JSON form as Simulator.run returns it


def as_results(result: Result) -> Results:
    return result if isinstance(result, Results) else Results.parse(result, source="results")


def bytes_per_round(result: Result) -> float:
    return as_results(result).comm.bytes_per_round() or 0.0


def traffic_ratio(results: Sequence[Result], method: str = "fednl", reference: str = "fedavg") -> float | None:
    """reference bytes / method bytes (e.g. FedAvg-LoRA / FedNL), from the runs' counted ledgers."""
    by = {r.method: r for r in map(as_results, results)}
    if method not in by or reference not in by:
        return None
    a, b = by[method].comm.total, by[reference].comm.total
    return b / a if a else None


def comparison_record(results: Sequence[Result]) -> dict[str, Any]:
    runs = [as_results(r) for r in results]
    metric = runs[0].primary_metric()
    return {
        "metric": metric,
        "methods": [r.method for r in runs],
        "clients": {r.method: {c: m.get(metric) for c, m in r.clients.items()} for r in runs},
        "mean": {r.method: r.mean.get(metric) for r in runs},
        "bytes_per_round": {r.method: bytes_per_round(r) for r in runs},
        "wall_s": {r.method: r.wall_s for r in runs},
        "traffic_ratio_fedavg_over_fednl": traffic_ratio(runs),
    }


def format_comparison(results: Sequence[Result]) -> str:
    """Plain-text table: rows = clients + mean + bytes/round + wall time, one column per method."""
    runs = [as_results(r) for r in results]
    metric = runs[0].primary_metric()
    names = [r.method for r in runs]
    clients = sorted({c for r in runs for c in r.clients})
    w0 = max(12, *(len(c) for c in clients), len("bytes / round"))
    ws = [max(12, len(n)) for n in names]
    arrow = "higher is better" if HIGHER_IS_BETTER.get(metric, True) else "lower is better"

    def row(label: str, cells: list[str]) -> str:
        return f"{label:<{w0}} | " + " | ".join(f"{c:>{w}}" for c, w in zip(cells, ws))

    lines = [f"{metric} per client ({arrow}), task {runs[0].task}, {runs[0].rounds} rounds, seed {runs[0].seed}",
             row("client", names), "-" * (w0 + 3 + sum(w + 3 for w in ws))]
    for c in clients:
        lines.append(row(c, [_fmt(r.clients.get(c, {}).get(metric)) for r in runs]))
    lines.append(row("mean", [_fmt(r.mean.get(metric)) for r in runs]))
    lines.append(row("bytes / round", [human_bytes(bytes_per_round(r)) for r in runs]))
    lines.append(row("total bytes", [human_bytes(r.comm.total) for r in runs]))
    lines.append(row("wall s", [f"{r.wall_s:.1f}" for r in runs]))
    ratio = traffic_ratio(runs)
    if ratio is not None:
        lines.append(f"traffic ratio FedAvg-LoRA / FedNL = {ratio:,.1f}x (counted bytes, both directions)")
    return "\n".join(lines)


def format_results(result: Result) -> str:
    r = as_results(result)
    metric = r.primary_metric()
    lines = [f"{r.method} on {r.task}: {metric} per client"]
    for c, m in sorted(r.clients.items()):
        lines.append(f"  {c:<16} {_fmt(m.get(metric))}")
    lines.append(f"  {'mean':<16} {_fmt(r.mean.get(metric))}")
    lines.append(f"  bytes / round {human_bytes(bytes_per_round(r))} | wall {r.wall_s:.1f} s")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{float(v):.4f}"
