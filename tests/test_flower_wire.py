"""Compressed wire, server optimiser and byte budget on the Flower path: the same run as in-process, message for
message (the codec's extra tensors cross Flower's records bit-exactly and the hop bytes equal the ledger)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("flwr")

from test_flower_strategies import check_parity, config_path  # noqa: E402,F401  (the module's fixture)


def test_topk_up_int8_down_and_fedadam_on_flower_equal_inprocess(config_path, tmp_path):  # noqa: F811
    overrides = ["method=fednl", "rounds=2", "engine.wire_up=topk-0.25", "engine.wire_down=int8-row",
                 "server_opt.name=fedadam"]
    expected, trains = check_parity(config_path, tmp_path, overrides)
    by_group = expected["comm"]["by_group"]
    assert {e["dtype"] for e in json.loads((tmp_path / "inproc" / "checkpoint" / "round-0002" / "run.json")
                                           .read_text())["ledger"]} == {"topk-0.25", "int8-row"}
    assert by_group and len(trains) == 4


def test_budget_stop_on_flower_equals_inprocess(config_path, tmp_path):  # noqa: F811
    probe, _ = check_parity(config_path, tmp_path / "probe", ["method=fednl"])
    one_round = probe["comm"]["bytes_up"] + probe["comm"]["bytes_down"]
    expected, _ = check_parity(config_path, tmp_path, ["method=fednl", "rounds=3",
                                                       f"engine.max_bytes={one_round + 1}"])
    assert expected["stopped"]["rounds_completed"] == 1 and expected["stopped"]["round"] == 2
    flower = json.loads((tmp_path / "flower" / "results.json").read_text())
    assert flower["stopped"] == expected["stopped"]
