"""Robust aggregation: median, trimmed mean, (multi-)Krum and norm clipping on tiny tensors by hand, and their
composition with a strategy's mean."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from fednl.engine.robust import (
    RobustConfig,
    apply_robust,
    clip_update,
    coordinate_median,
    krum_select,
    robust_mean,
    trimmed_mean,
)
from fednl.strategies.base import ClientReply, Payload
from fednl.strategies.fedavg import FedAvg
from fednl.strategies.mtdao import MTDAO

ZERO = {"x": torch.zeros(2)}


def rep(cid: str, x: list[float], n: int = 1) -> ClientReply:
    return ClientReply(cid, Payload({"x": torch.tensor(x)}), n)


def sets(*rows: list[float]) -> list[dict[str, torch.Tensor]]:
    return [{"x": torch.tensor(r)} for r in rows]


def test_coordinate_median_by_hand() -> None:
    # column 0: 1, 2, 3, 100 -> (2 + 3) / 2 = 2.5; column 1: -1, 0, 7, -100 -> (-1 + 0) / 2 = -0.5
    out = coordinate_median(sets([1.0, -1.0], [2.0, 0.0], [3.0, 7.0], [100.0, -100.0]))
    assert torch.equal(out["x"], torch.tensor([2.5, -0.5]))
    # odd count: the middle value; the dtype is kept
    half = [{"x": torch.tensor([v], dtype=torch.float16)} for v in (5.0, -3.0, 1.0)]
    out = coordinate_median(half)
    assert out["x"].dtype == torch.float16 and float(out["x"]) == 1.0


def test_trimmed_mean_by_hand() -> None:
    rows = sets([1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0], [100.0, -1000.0])
    # trim 0.2 of 5 values: int(1.0) = 1 cut at each end -> mean(2, 3, 4) = 3; column 1: mean(10, 20, 30) = 20
    assert torch.equal(trimmed_mean(rows, 0.2)["x"], torch.tensor([3.0, 20.0]))
    # trim 0.1: int(0.5) = 0 cut -> the plain mean (1 + 2 + 3 + 4 + 100) / 5 = 22, (100 - 1000) / 5 = -180
    assert torch.equal(trimmed_mean(rows, 0.1)["x"], torch.tensor([22.0, -180.0]))


def test_krum_by_hand() -> None:
    # 1-d updates 0, 1, 2, 10, 11; n = 5, f = 1 -> each score sums the n - f - 2 = 2 smallest squared distances:
    #   0: 1 + 4 = 5;  1: 1 + 1 = 2;  2: 1 + 4 = 5;  10: 1 + 64 = 65;  11: 1 + 81 = 82
    replies = [ClientReply(c, Payload({"x": torch.tensor([v])}), 1)
               for c, v in zip("abcde", (0.0, 1.0, 2.0, 10.0, 11.0))]
    ref = {"x": torch.zeros(1)}
    assert [r.cid for r in krum_select(replies, ref, 1, 1)] == ["b"]  # Krum: the lowest score
    kept = krum_select(replies, ref, 1, 3)  # Multi-Krum: scores 2, 5, 5, input order kept, replies untouched
    assert [r.cid for r in kept] == ["a", "b", "c"] and kept[0] is replies[0]
    assert krum_select(replies[:2], ref, 1, 3) == replies[:2]  # fewer replies than select: all kept
    # Krum is on the updates: the same answer relative to any reference
    shifted = [ClientReply(r.cid, Payload({"x": r.payload.tensors["x"] + 7}), 1) for r in replies]
    assert [r.cid for r in krum_select(shifted, {"x": torch.full((1,), 7.0)}, 1, 1)] == ["b"]


def test_clip_by_hand() -> None:
    ref = {"x": torch.tensor([1.0, 1.0])}
    big = rep("c", [4.0, 5.0])  # update (3, 4), norm 5
    clipped, norm = clip_update(big, ref, 1.0)
    assert norm == 5.0
    assert torch.allclose(clipped.payload.tensors["x"], torch.tensor([1.6, 1.8]))  # 1 + (3, 4) / 5
    assert clipped.cid == "c" and clipped.num_examples == big.num_examples
    assert torch.equal(big.payload.tensors["x"], torch.tensor([4.0, 5.0]))  # the input is not modified
    same, norm = clip_update(big, ref, 10.0)
    assert same is big and norm == 5.0


def test_apply_robust_clips_then_selects() -> None:
    replies = [rep("a", [0.0, 1.0]), rep("b", [1.0, 0.0]), rep("c", [0.0, 0.5]), rep("bad", [300.0, 400.0])]
    out = apply_robust(replies, ZERO, RobustConfig(rule="krum", num_malicious=1, select=2, clip_norm=10.0))
    assert out.clipped == {"bad": 500.0}
    assert [r.cid for r in out.replies] == ["a", "c"] and out.dropped == ["b", "bad"]
    assert out.to_record() == {"clipped": {"bad": 500.0}, "krum_dropped": ["b", "bad"]}
    assert apply_robust(replies, ZERO, None).replies == replies


def test_median_replaces_the_strategy_mean_and_ignores_weights() -> None:
    s = FedAvg(groups={"frozen": set(), "lora": {"x"}})
    replies = [rep("a", [1.0, 0.0], n=1), rep("b", [2.0, 0.0], n=1), rep("evil", [1000.0, 1000.0], n=1000)]
    plain = s.aggregate_train(1, replies, ZERO)["x"]
    assert plain[0] > 900  # the weighted mean follows the attacker's inflated weight
    with s.averaging(robust_mean(RobustConfig(rule="median"))):
        assert torch.equal(s.aggregate_train(1, replies, ZERO)["x"], torch.tensor([2.0, 0.0]))
    assert torch.equal(s.aggregate_train(1, replies, ZERO)["x"], plain)  # restored after the block
    with s.averaging(robust_mean(RobustConfig(rule="trimmed_mean", trim=0.34))):  # int(1.02) = 1 cut each end
        assert torch.equal(s.aggregate_train(1, replies, ZERO)["x"], torch.tensor([2.0, 0.0]))


def test_mtdao_outer_step_runs_on_the_robust_mean() -> None:
    groups = {"frozen": set(), "lora": {"x"}}
    replies = [rep("a", [1.0, 1.0]), rep("b", [3.0, 3.0]), rep("evil", [-500.0, 9.0])]
    plain, robust = MTDAO(groups=groups), MTDAO(groups=groups)
    with robust.averaging(robust_mean(RobustConfig(rule="median"))):
        got = robust.aggregate_train(1, replies, ZERO)
    # the same outer step on a hand-made single reply equal to the median (1, 3)
    want = plain.aggregate_train(1, [rep("m", [1.0, 3.0])], ZERO)
    assert torch.equal(got["x"], want["x"])


def test_robust_config_validation() -> None:
    assert RobustConfig(rule="trimmed_mean").trim == 0.2
    k = RobustConfig(rule="krum")
    assert (k.num_malicious, k.select) == (1, 1)
    for bad in ({"rule": "mean"}, {"rule": "median", "trim": 0.1}, {"rule": "median", "select": 2},
                {"rule": "trimmed_mean", "trim": 0.5}, {"rule": "krum", "select": 0}, {"rule": "mode"},
                {"clip_norm": 0.0}, {"clip_norm": float("inf")}):
        with pytest.raises(ValidationError):
            RobustConfig.model_validate(bad)
    # the resolved form loads again (the defaults of other rules are not written)
    for cfg in (RobustConfig(rule="median"), RobustConfig(rule="krum", select=3), RobustConfig(clip_norm=2.0)):
        dumped = cfg.model_dump(exclude_none=True)
        assert RobustConfig.model_validate(dumped) == cfg
