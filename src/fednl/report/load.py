"""Read a run directory for the report: results.json, metrics.jsonl, and eval.json when present.

Every problem is a ``ValueError`` / ``FileNotFoundError`` naming the file (and the line for metrics.jsonl).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULT_KEYS = ("method", "task", "clients", "mean", "comm", "wall_s")


@dataclass
class RunRecord:
    path: Path
    results: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)   # "round" records of metrics.jsonl
    evals: list[dict[str, Any]] = field(default_factory=list)    # "eval" records of metrics.jsonl
    evaluation: dict[str, Any] | None = None                     # eval.json, if `fednl evaluate` ran

    @property
    def label(self) -> str:
        return f"{self.results['method']} ({self.path.name}, seed {self.results.get('seed', '?')})"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(round records, eval records) of a metrics.jsonl; a bad line raises naming ``path:line``."""
    rounds, evals = [], []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i}: corrupted metrics line ({exc.msg})") from None
        if not isinstance(rec, dict) or rec.get("type") not in ("round", "eval"):
            raise ValueError(f"{path}:{i}: expected an object with type 'round' or 'eval'")
        if rec["type"] == "round":
            missing = [k for k in ("round", "bytes_up", "bytes_down") if k not in rec]
            if missing:
                raise ValueError(f"{path}:{i}: round record lacks {missing}")
            rounds.append(rec)
        else:
            evals.append(rec)
    return rounds, evals


def load_run_dir(run_dir: str | Path) -> RunRecord:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    res_path = run_dir / "results.json"
    if not res_path.is_file():
        raise FileNotFoundError(f"{res_path} does not exist (unfinished run, or a suite root: pass its member "
                                "directories)")
    results = _read_json(res_path)
    missing = [k for k in RESULT_KEYS if k not in results]
    if missing:
        raise ValueError(f"{res_path}: missing keys {missing}")
    rec = RunRecord(run_dir, results)
    mpath = run_dir / "metrics.jsonl"
    if mpath.is_file():
        rec.rounds, rec.evals = read_metrics(mpath)
    epath = run_dir / "eval.json"
    if epath.is_file():
        rec.evaluation = _read_json(epath)
    return rec
