"""The end-to-end example (examples/end_to_end.py) runs on the tiny model, and its spelled-out pipeline is exactly
what `fednl run` does with the same config."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fednl.config import load_config
from fednl.experiment import run_config

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "end_to_end.py"
pytestmark = pytest.mark.usefixtures("one_thread")


def _script():
    spec = importlib.util.spec_from_file_location("end_to_end", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_end_to_end_script_runs_and_equals_fednl_run(tmp_path, capsys) -> None:
    e2e = _script()
    results, report = e2e.main(tmp_path / "script")
    out = capsys.readouterr().out
    for step in ("1. config", "2. task", "3. model", "4. rounds", "5. evaluate"):
        assert step in out, step
    assert results.rounds == 2 and set(results.clients) == {"passkey", "uuid"} and results.comm.total > 0
    assert set(report.views) >= {"personalised", "global", "memory_off", "heldout"} and report.aggregation_drop.clients
    assert report.views["personalised"].summary.mean == results.mean["accuracy"]
    # the same config through `fednl run`'s code path: the same results, bit for bit (but the wall time)
    run_config(load_config("tiny", e2e.OVERRIDES), tmp_path / "cli", log=lambda s: None)
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("script", "cli"))
    a.pop("wall_s"), b.pop("wall_s")
    assert a == b
