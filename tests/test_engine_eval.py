"""Evaluation metrics against hand-computed values on models with known logits."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fednl.data.types import Example
from fednl.client.metrics import evaluate_examples, greedy_decode
from fednl.models.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
V = TOK.vocab_size


class FixedLogits(nn.Module):
    """Logits 0 everywhere except ``value`` on token ``tok``."""

    def __init__(self, tok: int, value: float):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.tok, self.value = tok, value

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*ids.shape, V) + self.w
        out[..., self.tok] = self.value
        return out


class Successor(nn.Module):
    """Predicts token ``id + 1`` with logit 10 (a deterministic 'copy the alphabet' model)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return 10.0 * nn.functional.one_hot((ids + 1) % V, V).float() + self.w


def test_mc_accuracy_and_answer_loglik_by_hand() -> None:
    exs = [Example(f"u{i}", "mc", f"q{i} Answer:", ("A", "B"), g) for i, g in enumerate("AABA")]
    m = evaluate_examples(FixedLogits(ord("A"), 1.0), TOK, exs, seq_len=64, batch_size=3)
    z = math.log(math.e + (V - 1))  # log-partition: one logit 1, the other V-1 logits 0
    assert m["accuracy"] == 0.75 and m["n"] == 4
    assert m["answer_loglik"] == pytest.approx((3 * (1 - z) + 1 * (0 - z)) / 4, abs=1e-5)


def test_text_ce_of_uniform_model_is_log_vocab() -> None:
    exs = [Example("t0", "text", "hello world"), Example("t1", "text", "abc")]
    m = evaluate_examples(FixedLogits(0, 0.0), TOK, exs, seq_len=64, batch_size=2)
    assert m["ce"] == pytest.approx(math.log(V), abs=1e-5)
    assert m["tokens"] == (11 - 1) + (3 - 1)


def test_qa_exact_match_by_greedy_decoding() -> None:
    # prompt ends in a space; the successor of ' ' (32) is '!' (33), then '"' (34), '#' (35)
    exs = [Example("a", "qa", "q: ", answer='!"#'), Example("b", "qa", "long prompt: ", answer="!x"),
           Example("c", "qa", "z ", answer="!")]
    m = evaluate_examples(Successor(), TOK, exs, seq_len=64, batch_size=2)
    assert m["exact_match"] == pytest.approx(2 / 3)
    lp_hit = 10 - math.log(math.e**10 + V - 1)  # log p of the predicted token
    lp_miss = -math.log(math.e**10 + V - 1)
    expected = (lp_hit + (lp_hit + lp_miss) / 2 + lp_hit) / 3
    assert m["answer_loglik"] == pytest.approx(expected, abs=1e-4)


def test_greedy_decode_rows_of_different_lengths() -> None:
    out = greedy_decode(Successor(), [[65], [70, 71, 72]], [3, 2], TOK.eos_id)
    assert out == [[66, 67, 68], [73, 74]]


def test_mixed_kinds_are_prefixed_and_empty_is_an_error() -> None:
    exs = [Example("u", "mc", "Answer:", ("A", "B"), "A"), Example("t", "text", "abc")]
    m = evaluate_examples(FixedLogits(ord("A"), 1.0), TOK, exs, seq_len=64, batch_size=2)
    assert set(m) == {"mc/accuracy", "mc/answer_loglik", "mc/n", "text/ce", "text/tokens", "text/n"}
    with pytest.raises(ValueError, match="no examples"):
        evaluate_examples(Successor(), TOK, [], seq_len=8, batch_size=1)
