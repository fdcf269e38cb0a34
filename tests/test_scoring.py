"""The one scoring function for multiple choice and for text CE: the fast paths against their readable references
(values), hand-computed cases, and the metrics that call them."""

from __future__ import annotations

import math

import pytest
import torch

from fednl.client.batching import IGNORE, encode_cached
from fednl.data.types import Example
from fednl.client.metrics import eval_mc, evaluate_examples
from fednl.client.scoring import McScore, mc_metrics, score_mc, score_mc_reference, token_ce, token_ce_reference
from fednl.models import ByteTokenizer, LoraConfig, MemoryConfig, ModelConfig, build_model


def test_score_mc_matches_the_reference() -> None:
    g = torch.Generator().manual_seed(0)
    last = torch.randn(6, 50, generator=g) * 4
    choice_ids = [[3, 7, 11, 19], [5, 6], [40, 41, 42], [0, 49, 25, 26], [10, 20, 30, 40], [1, 2, 3, 4]]
    gold = [0, 1, 2, 3, 1, 2]
    last[4, 20] = last[4].max() + 1  # a sure answer
    fast, ref = score_mc(last, choice_ids, gold), score_mc_reference(last, choice_ids, gold)
    assert [s.correct for s in fast] == [s.correct for s in ref] and fast[4].correct
    for a, b in zip(fast, ref):
        assert a.answer_loglik == pytest.approx(b.answer_loglik, abs=1e-5)
    assert mc_metrics(fast)["accuracy"] == mc_metrics(ref)["accuracy"]


def test_score_mc_hand_values_ties_and_bad_input() -> None:
    last = torch.zeros(1, 4)  # uniform: log p = log(1/4); a tie goes to the first choice
    (first,) = score_mc(last, [[2, 1]], [0])
    assert first.correct and first.answer_loglik == pytest.approx(math.log(0.25))
    (second,) = score_mc(last, [[2, 1]], [1])
    assert not second.correct
    assert score_mc_reference(last, [[2, 1]], [0])[0].correct
    with pytest.raises(ValueError, match="gold index 2 is not one of 2 choices"):
        score_mc(last, [[2, 1]], [2])
    with pytest.raises(ValueError, match=r"expected last-position logits \[B, V\]"):
        score_mc(torch.zeros(4), [[1]], [0])


def test_mc_metrics() -> None:
    m = mc_metrics([McScore(True, -1.0), McScore(False, -3.0), McScore(True, -2.0)])
    assert m == {"accuracy": 2 / 3, "answer_loglik": -2.0, "n": 3.0}
    with pytest.raises(ValueError, match="no scored example"):
        mc_metrics([])


def test_token_ce_matches_the_reference_per_position_and_summed() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=g)
    targets = torch.randint(0, 11, (3, 5), generator=g)
    targets[0, 0] = targets[2, 4] = IGNORE
    per = token_ce(logits, targets)
    torch.testing.assert_close(per, token_ce_reference(logits, targets))
    assert per[0, 0] == 0 and per[2, 4] == 0
    total = token_ce(logits, targets, reduction="sum")
    assert float(total) == pytest.approx(float(token_ce_reference(logits, targets).double().sum()), rel=1e-6)
    flat = token_ce(logits.reshape(15, 11), targets.reshape(15))  # any leading shape
    torch.testing.assert_close(flat, per.reshape(15))


def test_metrics_score_through_the_one_function() -> None:
    # eval_mc on a real tiny model equals the reference scores of the same logits
    tok = ByteTokenizer()
    model = build_model("titans", ModelConfig(source="tiny"), MemoryConfig(chunk_size=8), LoraConfig(r=2), seed=1)
    model.eval()
    exs = [Example(uid=f"q{i}", kind="mc", prompt=f"Question {i}: pick one.\nA. x\nB. y\nC. z\nAnswer:",
                   choices=("A", "B", "C"), answer="ABC"[i % 3]) for i in range(5)]
    enc = [encode_cached(ex, tok, 64) for ex in exs]
    with torch.no_grad():
        last = torch.stack([model(torch.tensor([e.ids[: e.n_prompt]])).logits[0, -1] for e in enc])
    ref = mc_metrics(score_mc_reference(last, [e.choice_ids for e in enc], [e.gold for e in enc]))
    got = eval_mc(model, enc, tok.eos_id, batch_size=2)
    assert got["accuracy"] == ref["accuracy"] and got["n"] == 5.0
    assert got["answer_loglik"] == pytest.approx(ref["answer_loglik"], abs=1e-5)
    assert evaluate_examples(model, tok, exs, seq_len=64, batch_size=2) == got
