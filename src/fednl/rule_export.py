"""``fednl rule export RUN_DIR``: the global rule of a finished run as a rule file (:mod:`fednl.models.rules`).

The run's model is rebuilt from ``config.resolved.toml`` (the same kind, config and seed as the run, checked
against the checkpoint's model fingerprint), the newest checkpoint's *global* parameters of groups ``rule`` and
``gate`` are copied into it, and :func:`fednl.models.rules.save_rule` writes them with the run's memory design
and backbone. Provenance: the run directory's name, method and options, rounds, seed, task, the run's mean
metrics (``results.json``) and, when ``fednl evaluate`` has run, each view's mean (``eval.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fednl.records import EVAL_NAME, RESULTS_NAME, EvalReport, Results


def run_provenance(run_dir: Path, cfg: Any, rounds: int) -> dict[str, Any]:
    """What a rule exported from ``run_dir`` records about where it comes from."""
    prov: dict[str, Any] = {"run": run_dir.resolve().name, "method": cfg.method.name,
                            "options": cfg.method.options.model_dump(mode="json"), "rounds": int(rounds),
                            "seed": int(cfg.seed), "task": cfg.task.name}
    if (run_dir / RESULTS_NAME).is_file():
        prov["results"] = Results.load(run_dir / RESULTS_NAME).mean
    if (run_dir / EVAL_NAME).is_file():
        ev = EvalReport.load(run_dir / EVAL_NAME)
        prov["eval"] = {"metric": ev.metric, **{v: ev.view_mean(v) for v in ev.views}}
    return prov


def export_rule(run_dir: str | Path, out: str | Path, *, notes: dict[str, Any] | None = None,
                log: Any = None) -> Path:
    """Write the global rule of ``run_dir``'s newest checkpoint to ``out``; ``notes`` are merged into the
    provenance. ``ValueError`` for a run without a memory rule, or whose rule is not global."""
    from fednl.experiment import finished_run
    from fednl.engine.runstate import load_checkpoint
    from fednl.engine.simulator import model_fingerprint
    from fednl.models.build import build_model
    from fednl.models.rules import RULE_GROUPS, rule_names, save_rule
    run_dir = Path(run_dir)
    cfg, ckpt = finished_run(run_dir, verb="export the rule of")
    spec = cfg.method.model_spec()
    if spec.kind != "titans":
        raise ValueError(f"{run_dir}: method {cfg.method.name!r} trains a {spec.kind!r} model, which has no memory "
                         "rule")
    state = load_checkpoint(ckpt)
    model = build_model(spec, cfg.model, cfg.memory, cfg.lora, seed=cfg.seed)
    if state.info.get("fingerprint") not in (None, model_fingerprint(model)):
        raise ValueError(f"{run_dir}: the rebuilt model differs from the checkpointed run's model")
    names = [n for g in RULE_GROUPS for n in rule_names(model)[g]]
    missing = [n for n in names if n not in state.global_params]
    if missing:
        raise ValueError(f"{run_dir}: the checkpoint's global parameters lack {len(missing)} rule/gate tensors "
                         f"(first: {missing[0]}); method {cfg.method.name!r} does not share the rule")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].copy_(state.global_params[n].to(dtype=params[n].dtype))
    others = sorted(set(state.global_params) - set(names))
    if others and log is not None:
        log(f"note: the run also shares {len(others)} other tensors (e.g. {others[0]}); a rule file "
            "carries only the rule and gate groups")
    provenance = {**run_provenance(run_dir, cfg, state.round), **(notes or {})}
    return save_rule(model, out, model_source=cfg.model.source, provenance=provenance)


__all__ = ["export_rule", "run_provenance"]
