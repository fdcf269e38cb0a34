"""Update screening: every check on tiny replies, with the numbers it reports computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from fednl.engine.screening import ScreenConfig, TensorSpec, screen_replies, spec_of, structural_check, update_norm
from fednl.strategies.base import ClientReply, Payload
from fednl.strategies.scaffold import DC_UP, Scaffold

GLOBAL = {"a": torch.zeros(2), "b": torch.zeros(1, 2)}
EXPECTED = spec_of(GLOBAL)


def rep(cid: str, a: list[float], b: list[list[float]] | None = None, n: int = 1, **extra: torch.Tensor) -> ClientReply:
    tensors = {"a": torch.tensor(a), "b": torch.tensor(b if b is not None else [[0.0, 0.0]]), **extra}
    return ClientReply(cid, Payload(tensors), n)


def only(result, cid):
    [r] = [r for r in result.rejected if r.cid == cid]
    return r


def test_well_formed_replies_pass_in_order() -> None:
    replies = [rep("c1", [1.0, 0.0]), rep("c2", [0.0, 1.0]), rep("c3", [1.0, 1.0])]
    res = screen_replies(replies, EXPECTED, GLOBAL, ScreenConfig(norm_k=3))
    assert res.accepted == replies and res.rejected == []
    assert res.norms == {"c1": 1.0, "c2": 1.0, "c3": math.sqrt(2)}
    assert res.median_norm == 1.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_is_rejected_with_the_count(bad: float) -> None:
    replies = [rep("ok", [1.0, 2.0]), rep("bad", [bad, 2.0], [[bad, bad]])]
    res = screen_replies(replies, EXPECTED, GLOBAL)
    assert [r.cid for r in res.accepted] == ["ok"]
    r = only(res, "bad")
    assert r.check == "nonfinite" and r.numbers == {"tensor": "a", "nonfinite": 1, "numel": 2}
    rec = r.to_record()
    assert rec["client"] == "bad" and rec["check"] == "nonfinite" and "NaN/Inf" in rec["message"]


def test_wrong_names_missing_and_unexpected() -> None:
    missing = ClientReply("m", Payload({"a": torch.zeros(2)}), 1)
    extra = rep("x", [0.0, 0.0], z=torch.zeros(1))
    res = screen_replies([missing, extra, rep("ok", [0.0, 1.0])], EXPECTED, GLOBAL)
    assert [r.cid for r in res.accepted] == ["ok"]
    assert only(res, "m").check == "names" and only(res, "m").numbers["missing"] == ["b"]
    assert only(res, "x").check == "names" and only(res, "x").numbers["unexpected"] == ["z"]


def test_wrong_shape_and_dtype() -> None:
    shape = ClientReply("s", Payload({"a": torch.zeros(3), "b": torch.zeros(1, 2)}), 1)
    dtype = ClientReply("d", Payload({"a": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(1, 2)}), 1)
    ints = ClientReply("i", Payload({"a": torch.zeros(2, dtype=torch.int64), "b": torch.zeros(1, 2)}), 1)
    res = screen_replies([shape, dtype, ints], EXPECTED, GLOBAL)
    assert res.accepted == []
    assert only(res, "s").check == "shape" and only(res, "s").numbers == {"tensor": "a", "shape": [3], "expected": [2]}
    assert only(res, "d").check == "dtype" and only(res, "d").numbers["dtype"] == "float64"
    assert only(res, "i").check == "dtype" and only(res, "i").numbers["expected"] == "float32"


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_non_positive_or_non_integer_example_count(n) -> None:
    r = structural_check(rep("c", [0.0, 0.0], n=n), EXPECTED)
    assert r is not None and r.check == "num_examples"


def test_norm_check_by_hand() -> None:
    # update norms 1, 2, 3, 100 (reference 0): median (2 + 3) / 2 = 2.5; k = 10 -> limit 25: only the 100 goes
    replies = [rep("n1", [1.0, 0.0]), rep("n2", [0.0, 2.0]), rep("n3", [0.0, 0.0], [[3.0, 0.0]]),
               rep("big", [60.0, 80.0])]
    res = screen_replies(replies, EXPECTED, GLOBAL, ScreenConfig(norm_k=10))
    assert [r.cid for r in res.accepted] == ["n1", "n2", "n3"]
    r = only(res, "big")
    assert r.check == "norm"
    assert r.numbers == {"norm": 100.0, "median": 2.5, "k": 10.0, "ratio": 40.0}
    # k = 50: 100 <= 125 passes; without [screen] there is no norm check at all
    assert len(screen_replies(replies, EXPECTED, GLOBAL, ScreenConfig(norm_k=50)).accepted) == 4
    assert len(screen_replies(replies, EXPECTED, GLOBAL, None).accepted) == 4


def test_norm_is_of_the_update_against_the_reference() -> None:
    ref = {"a": torch.tensor([10.0, 10.0]), "b": torch.tensor([[0.0, 0.0]])}
    assert update_norm({"a": torch.tensor([13.0, 14.0]), "b": torch.zeros(1, 2)}, ref) == 5.0
    # a client that was sent other values (a personalising strategy) is measured against what it received
    replies = [rep("p", [13.0, 14.0]), rep("q", [10.0, 10.0], [[1.0, 0.0]])]
    res = screen_replies(replies, EXPECTED, ref, received={"q": {"b": torch.tensor([[1.0, 0.0]])}})
    assert res.norms == {"p": 5.0, "q": 0.0}


def test_zero_median_rejects_nothing_and_structural_rejects_do_not_count_for_the_median() -> None:
    replies = [rep("z1", [0.0, 0.0]), rep("z2", [0.0, 0.0]), rep("mv", [3.0, 4.0])]
    assert len(screen_replies(replies, EXPECTED, GLOBAL, ScreenConfig(norm_k=2)).accepted) == 3
    # the NaN reply is rejected first; the median is over the two valid ones: (1 + 5) / 2 = 3
    replies = [rep("nan", [float("nan"), 0.0]), rep("one", [1.0, 0.0]), rep("five", [3.0, 4.0])]
    res = screen_replies(replies, EXPECTED, GLOBAL, ScreenConfig(norm_k=1.5))
    assert res.median_norm == 3.0 and [r.cid for r in res.accepted] == ["one"]
    assert {r.cid: r.check for r in res.rejected} == {"nan": "nonfinite", "five": "norm"}


def test_scaffold_reply_with_its_control_deltas_passes() -> None:
    s = Scaffold(groups={"frozen": set(), "lora": {"a", "b"}})
    like = s.reply_like(GLOBAL)
    assert set(like) == {"a", "b", DC_UP + "a", DC_UP + "b"}
    ok = rep("c", [1.0, 0.0], **{DC_UP + "a": torch.zeros(2), DC_UP + "b": torch.zeros(1, 2)})
    res = screen_replies([ok, rep("plain", [1.0, 0.0])], spec_of(like), GLOBAL)
    assert [r.cid for r in res.accepted] == ["c"] and only(res, "plain").check == "names"
    assert res.norms == {"c": 1.0}  # control deltas are not part of the update norm


def test_screen_config_validation() -> None:
    with pytest.raises(ValidationError):
        ScreenConfig(norm_k=1.0)
    with pytest.raises(ValidationError):
        ScreenConfig(norm_k=float("inf"))
    with pytest.raises(ValidationError):
        ScreenConfig.model_validate({"norm": 3})
    assert TensorSpec((2,), torch.float32) == EXPECTED["a"]
