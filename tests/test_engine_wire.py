"""Compressed wire through the simulator (exact ledger bytes, error-feedback state, resume) and the byte budget."""

from __future__ import annotations

import json

import pytest
import torch

from fednl.engine.wire import CLIENT_DOWN, CLIENT_RESIDUAL
from test_resume import assert_same_run
from toy_sim import final, toy_sim

pytestmark = pytest.mark.usefixtures("one_thread")

# the toy FedNL model sends rule_k [16, 16], rule_beta [1] and gate [1]: 258 values in 3 tensors
FP32_MSG = 258 * 4


@pytest.mark.parametrize("codec,per_msg", [
    ("int8", 258 + 3 * 4),            # codes + one float32 scale per tensor
    ("int8-row", 258 + (16 + 1 + 1) * 4),  # rule_k has 16 rows
    ("fp16", 258 * 2),
])
def test_ledger_counts_the_encoded_bytes(tmp_path, codec, per_msg) -> None:
    res = toy_sim(tmp_path, "fednl", engine={"wire_up": codec, "wire_down": codec}).run()
    assert res["comm"]["per_round"] == [{"round": r, "bytes_up": 3 * per_msg, "bytes_down": 3 * per_msg}
                                        for r in (1, 2)]
    st = final(tmp_path)
    assert {e.dtype for e in st.ledger.entries} == {codec}
    assert sum(e.numel for e in st.ledger.entries if e.direction == "up" and e.round == 1) == 3 * 258


def test_topk_both_ways_counts_sparse_bytes_keeps_state_and_resumes(tmp_path) -> None:
    engine = {"wire_up": "topk-0.25", "wire_down": "topk-0.25-bf16"}
    res = toy_sim(tmp_path / "straight", "fednl", engine=engine, rounds=3).run()
    # k: rule_k 64 of 256, rule_beta 1, gate 1. Up: 66 float32 values + 66 int16 indices + shapes (2 + 1 + 1 dims)
    up = 66 * 4 + 66 * 2 + 4 * 4
    dense_down = 258 * 2  # a client's first downlink: every tensor, bf16
    down = 66 * 2 + 66 * 2 + 4 * 4
    assert [r["bytes_up"] for r in res["comm"]["per_round"]] == [3 * up] * 3
    assert [r["bytes_down"] for r in res["comm"]["per_round"]] == [3 * dense_down, 3 * down, 3 * down]
    st = final(tmp_path / "straight")
    for cid, client in st.clients.items():  # each side holds the same copy of what the client received
        for n in ("rule_k", "rule_beta", "gate"):
            assert torch.equal(client.tensors[CLIENT_DOWN + n], st.engine_tensors[f"wire|down|{cid}|{n}"])
        assert client.tensors[CLIENT_RESIDUAL + "rule_k"].abs().sum() > 0  # what top-k left out, owed
    toy_sim(tmp_path / "broken", "fednl", engine=engine, rounds=3).run(stop_after=2)
    toy_sim(tmp_path / "broken", "fednl", engine=engine, rounds=3).run(resume=True)
    assert_same_run(tmp_path / "straight", tmp_path / "broken")


def test_budget_stops_cleanly_after_the_last_round_that_fits(tmp_path) -> None:
    lines: list[str] = []
    # a fp32 round of 3 clients is 6 * 1032 = 6192 B; round 2 would reach 9288 B at its third message, the third
    # client's downlink (a round sends every sampled client its payload before any reply comes back)
    res = toy_sim(tmp_path, "fednl", rounds=3, engine={"max_bytes": 9000}, log=lines.append).run()
    assert res["stopped"] == {"reason": "max_bytes", "max_bytes": 9000, "bytes": 6192, "rounds_completed": 1,
                              "round": 2, "bytes_needed": 3 * FP32_MSG + 6192, "message": "down client2"}
    assert res["comm"]["bytes_up"] + res["comm"]["bytes_down"] == 6192 and len(res["comm"]["per_round"]) == 1
    assert set(res["clients"]) == {"client0", "client1", "client2"}  # round 1's model was evaluated
    assert json.loads((tmp_path / "results.json").read_text())["stopped"]["rounds_completed"] == 1
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in recs if r["round"] == 1][0] == "round"
    assert recs[-1]["type"] == "stop" and {r["round"] for r in recs if r["type"] == "eval"} == {1}
    assert lines[-1].startswith("stopped: the downlink payload of client2 in round 2 would bring the traffic to "
                                "9,288 B, past engine.max_bytes = 9,000 B; results cover rounds 1-1 (6,192 B)")
    st = final(tmp_path)
    assert st.round == 1 and st.info["stopped"]["round"] == 2
    assert all(c.info.get("rounds_trained") == 1 for c in st.clients.values())  # round 2's training discarded
    # a larger budget on resume continues to the end, exactly like a run that never stopped
    toy_sim(tmp_path / "straight", "fednl", rounds=3).run()
    again = toy_sim(tmp_path, "fednl", rounds=3, engine={"max_bytes": 10**6}).run(resume=True)
    assert "stopped" not in again and again["comm"] == json.loads((tmp_path / "straight" / "results.json")
                                                                  .read_text())["comm"]
    assert torch.equal(final(tmp_path).global_params["rule_k"], final(tmp_path / "straight").global_params["rule_k"])


def test_budget_below_one_message_evaluates_the_initial_model(tmp_path) -> None:
    lines: list[str] = []
    res = toy_sim(tmp_path, "fednl", engine={"max_bytes": 100}, log=lines.append).run()
    assert res["stopped"]["rounds_completed"] == 0 and res["comm"]["bytes_up"] == 0 and res["clients"]
    assert "results cover the initial model (no round fits)" in lines[-1]
