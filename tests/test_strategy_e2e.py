"""Every comparator end to end through the run pipeline (`fednl run`'s config loading + simulator) on NIAH-7 and
MMLU-5 at a tiny scale: results.json written, traffic as the method defines it, nothing non-finite."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fednl.config import load_config
from fednl.experiment import run_config
from test_strategy_harness import build_for  # noqa: F401  (sets one intra-op thread for tiny shapes)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
LIGHT = {  # keep the extra local passes of FedALA / FedSSI small
    "fedala": ["method.max_init_epochs=2", "method.num_pre_loss=2"],
    "fedssi": ["method.psm_steps=1"],
    "floral": ["method.n_adaptors=2"],
}
METHODS = ["fedprox", "ffa_lora", "fedala", "fedssi", "floral", "fedtreelora"]


def check(results: dict, method: str, n_clients: int) -> None:
    assert results["method"] == method and results["rounds"] == 2
    assert len(results["clients"]) == n_clients
    assert all(math.isfinite(v) for m in results["clients"].values() for v in m.values())
    comm = results["comm"]
    assert comm["bytes_up"] > 0 and comm["bytes_down"] > 0


@pytest.mark.parametrize("method", METHODS)
def test_niah7_tiny(method: str, tmp_path) -> None:
    cfg = load_config("tiny", [f"method={method}", *LIGHT.get(method, []), "engine.progress=false"])
    res = run_config(cfg, tmp_path, log=lambda s: None)
    check(res, method, 3)
    assert json.loads((tmp_path / "results.json").read_text())["method"] == method


@pytest.mark.skipif(not (SHARED / "data" / "mmlu").is_dir(), reason="shared MMLU data not present")
def test_mmlu5_tiny_all_methods(tmp_path) -> None:
    task = f'task={{name = "mmlu5", data_dir = "{SHARED / "data" / "mmlu"}", max_train = 2, max_test = 2}}'
    base = [task, "train.seq_len=128", "engine.progress=false"]
    bytes_up = {}
    for method in ["fedavg", *METHODS]:
        over = [f"method={method}", *LIGHT.get(method, []), *base]
        cfg = load_config("tiny", over)
        res = run_config(cfg, tmp_path / method, log=lambda s: None)
        check(res, method, 5)
        bytes_up[method] = res["comm"]["bytes_up"]
    assert bytes_up["fedprox"] == bytes_up["fedala"] == bytes_up["fedssi"] == bytes_up["fedavg"]
    assert bytes_up["ffa_lora"] < bytes_up["fedavg"] < bytes_up["floral"]
