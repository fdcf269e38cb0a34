"""Suite helpers: run directories, the comparison table and its numbers, device resolution, run-dir hygiene."""

from __future__ import annotations

import pytest
import torch

from fednl.config import load_runs
from fednl.experiment import (
    bytes_per_round, clear_run_dir, comparison_record, format_comparison, format_results, holds_run, resolve_device,
    run_dirs, traffic_ratio,
)


def result(method: str, accs: dict[str, float], up: int, down: int, rounds: int = 2) -> dict:
    per = [{"round": r + 1, "bytes_up": up // rounds, "bytes_down": down // rounds} for r in range(rounds)]
    return {"method": method, "model": "m", "task": "niah7", "rounds": rounds, "seed": 0, "wall_s": 12.5,
            "clients": {c: {"accuracy": a, "answer_loglik": -1.0, "n": 4.0} for c, a in accs.items()},
            "mean": {"accuracy": sum(accs.values()) / len(accs), "answer_loglik": -1.0},
            "comm": {"bytes_up": up, "bytes_down": down, "per_round": per, "by_group": {}}}


def test_run_dirs(tmp_path) -> None:
    runs = load_runs("quickstart-niah")
    assert run_dirs(runs[:1], tmp_path) == [tmp_path]
    assert run_dirs(runs, tmp_path) == [tmp_path / "fednl", tmp_path / "fedavg"]
    assert run_dirs([runs[0], runs[0]], tmp_path) == [tmp_path / "fednl", tmp_path / "fednl-2"]


def test_comparison_table_and_ratio() -> None:
    nl = result("fednl", {"passkey": 0.5, "uuid": 0.25}, up=2000, down=2000)
    avg = result("fedavg", {"passkey": 0.25, "uuid": 0.75}, up=600_000, down=600_000)
    assert bytes_per_round(nl) == 2000.0 and traffic_ratio([nl, avg]) == 300.0
    assert traffic_ratio([nl]) is None
    text = format_comparison([nl, avg])
    lines = text.splitlines()
    assert lines[0].startswith("accuracy per client (higher is better), task niah7, 2 rounds")
    assert [c.strip() for c in lines[1].split("|")] == ["client", "fednl", "fedavg"]
    row = {ln.split("|")[0].strip(): [c.strip() for c in ln.split("|")[1:]] for ln in lines[3:] if "|" in ln}
    assert row["passkey"] == ["0.5000", "0.2500"] and row["uuid"] == ["0.2500", "0.7500"]
    assert row["mean"] == ["0.3750", "0.5000"]
    assert row["bytes / round"] == ["1.95 KB", "585.94 KB"]
    assert lines[-1] == "traffic ratio FedAvg-LoRA / FedNL = 300.0x (counted bytes, both directions)"
    rec = comparison_record([nl, avg])
    assert rec["traffic_ratio_fedavg_over_fednl"] == 300.0 and rec["mean"] == {"fednl": 0.375, "fedavg": 0.5}
    assert "passkey" in format_results(nl)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_clear_run_dir_keeps_foreign_files(tmp_path) -> None:
    (tmp_path / "checkpoint" / "round-0001").mkdir(parents=True)
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "mine.txt").write_text("keep")
    assert holds_run(tmp_path)
    clear_run_dir(tmp_path)
    assert not holds_run(tmp_path) and (tmp_path / "mine.txt").read_text() == "keep"
