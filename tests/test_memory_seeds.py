"""scripts/memory_seeds.py pools memory-eval results over seeds: hand-computed means, stds and gap shares."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def result(path: Path, **ce: float) -> Path:
    pooled = {c: {"ranges": [{"start": 1, "ce": 9.0}, {"start": 256, "end": None, "ce": v}]} for c, v in ce.items()}
    path.write_text(json.dumps({"pooled": {**pooled, "gain_beyond": 0.1}}))
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "memory_seeds.py"), *args], capture_output=True,
                          text=True)


def test_pooled_rows_by_hand(tmp_path: Path) -> None:
    a = result(tmp_path / "a.json", window=4.0, full=3.0, memory=3.5, cache=3.25)
    b = result(tmp_path / "b.json", window=4.0, full=3.0, memory=3.7, cache=3.25)
    proc = run(str(a), str(b), "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["rows"]
    assert set(rows) == {"window", "full", "memory", "cache"}  # "gain_beyond" is not a condition
    m, sd = rows["memory"]["ce"]
    assert abs(m - 3.6) < 1e-12 and abs(sd - 0.1414213562) < 1e-9  # sample std of 3.5, 3.7
    assert abs(rows["memory"]["closed"][0] - 40.0) < 1e-9  # (50 % + 30 %) / 2
    assert rows["cache"]["closed"] == [75.0, 0.0] and rows["full"]["closed"][0] == 100.0
    table = run(str(a), str(b)).stdout
    assert "| cache | 3.2500 ± 0.0000 | +0.7500 ± 0.0000 | 75.0 ± 0.0 |" in table


def test_a_file_without_the_gap_is_refused(tmp_path: Path) -> None:
    a = result(tmp_path / "a.json", window=4.0, memory=3.5)
    proc = run(str(a))
    assert proc.returncode != 0 and "lacks the condition(s) ['full']" in proc.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    proc = run(str(bad))
    assert proc.returncode != 0 and "not a memory-eval result" in proc.stderr
