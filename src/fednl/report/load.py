"""Read a run directory for the report: results.json, metrics.jsonl, and eval.json when present, each through its
typed record (:mod:`fednl.records`).

Every problem is a ``ValueError`` / ``FileNotFoundError`` naming the file (and the line for metrics.jsonl).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fednl.records import (
    EVAL_NAME,
    METRICS_NAME,
    RESULTS_NAME,
    EvalRecord,
    EvalReport,
    Results,
    RoundRecord,
    StopRecord,
    read_metrics,
)

__all__ = ["RunRecord", "load_run_dir", "read_metrics"]


@dataclass
class RunRecord:
    path: Path
    results: Results
    rounds: list[RoundRecord] = field(default_factory=list)   # "round" records of metrics.jsonl
    evals: list[EvalRecord] = field(default_factory=list)     # "eval" records of metrics.jsonl
    stops: list[StopRecord] = field(default_factory=list)     # a "stop" record when the run ended on its budget
    evaluation: EvalReport | None = None                      # eval.json, if `fednl evaluate` ran

    @property
    def label(self) -> str:
        seed = "?" if self.results.seed is None else self.results.seed
        return f"{self.results.method} ({self.path.name}, seed {seed})"

    def view_mean(self, view: str) -> float | None:
        """The mean of an eval.json view (``None`` without eval.json or that view)."""
        return None if self.evaluation is None else self.evaluation.view_mean(view)


def load_run_dir(run_dir: str | Path) -> RunRecord:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    res_path = run_dir / RESULTS_NAME
    if not res_path.is_file():
        raise FileNotFoundError(f"{res_path} does not exist (unfinished run, or a suite root: pass its member "
                                "directories)")
    rec = RunRecord(run_dir, Results.load(res_path))
    mpath = run_dir / METRICS_NAME
    if mpath.is_file():
        rec.rounds, rec.evals, rec.stops = read_metrics(mpath)
    epath = run_dir / EVAL_NAME
    if epath.is_file():
        rec.evaluation = EvalReport.load(epath)
    return rec
