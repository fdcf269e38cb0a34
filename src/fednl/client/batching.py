"""Token sequences and loss masks for the three example kinds, and right-padded batches.

* ``mc``   — ``prompt`` + separator + the gold answer letter; the loss is on the letter token only, and scoring
  is the argmax over the choice-letter tokens at the last prompt position (the position that predicts it).
  The letter is ``" " + letter`` when that is one token (SmolLM2); otherwise (byte tokenizer) the space is
  part of the prompt and the letter byte is the target.
* ``qa``   — ``prompt`` + answer (a space is inserted unless the prompt ends in whitespace); loss on the answer
  tokens.
* ``text`` — the document; full next-token loss.

Truncation keeps what the loss needs: for ``mc``/``qa`` the prompt is *left*-truncated (the question and the
answer survive, the oldest context is dropped); ``text`` is *right*-truncated (the first tokens are kept).
Every sequence holds at most ``seq_len + 1`` tokens, so the model sees at most ``seq_len`` inputs. Batches are
right-padded with ``eos_id`` and padded targets are ``-100`` (ignored); a causal model's outputs at real
positions do not depend on right padding, and the memory state starts at zero for every sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

IGNORE = -100
KINDS = ("mc", "qa", "text")


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class Encoded:
    """One example as tokens. ``ids[:n_prompt]`` is the (possibly truncated) prompt incl. any separator;
    the loss covers ``ids[loss_from:]``. ``choice_ids`` are the candidate tokens for ``mc`` scoring and
    ``gold`` the index of the gold one (``-1`` otherwise)."""

    ids: tuple[int, ...]
    n_prompt: int
    loss_from: int
    choice_ids: tuple[int, ...] = ()
    gold: int = -1
    truncated: bool = False


@dataclass
class Batch:
    """Right-padded model inputs. ``targets[b, t]`` is the token position ``t`` must predict (or -100);
    ``last_prompt[b]`` is the input position whose output predicts the first answer token."""

    input_ids: torch.Tensor  # [B, T] long
    targets: torch.Tensor  # [B, T] long
    last_prompt: torch.Tensor  # [B] long
    encoded: list[Encoded]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.targets.to(device), self.last_prompt.to(device), self.encoded)

    @property
    def num_target_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())


def choice_tokens(tokenizer: Tokenizer, choices: Sequence[str]) -> tuple[list[int], list[int]]:
    """``(separator_ids, letter_ids)`` so that ``prompt + separator`` is followed by one letter token.

    Prefers ``" " + letter`` as a single token (no separator); falls back to a separate space token followed by
    the bare letter. Raises ``ValueError`` if the letters cannot be told apart by a single token.
    """
    if not choices:
        raise ValueError("multiple-choice example has no choices")
    spaced = [tokenizer.encode(" " + c) for c in choices]
    if all(len(s) == 1 for s in spaced) and len({s[0] for s in spaced}) == len(choices):
        return [], [s[0] for s in spaced]
    sep = tokenizer.encode(" ")
    bare = [tokenizer.encode(c) for c in choices]
    if all(len(b) == 1 for b in bare) and len({b[0] for b in bare}) == len(choices):
        return sep, [b[0] for b in bare]
    raise ValueError(f"choices {list(choices)} do not map to distinct single tokens with this tokenizer")


def encode_example(example: Any, tokenizer: Tokenizer, seq_len: int) -> Encoded:
    """Tokenise one :class:`fednl.data.Example` for training and evaluation (see module docstring)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    budget = seq_len + 1
    kind = example.kind
    if kind == "text":
        ids = tokenizer.encode(example.prompt)
        if len(ids) < 2:
            raise ValueError(f"text example {example.uid!r} has fewer than 2 tokens")
        truncated = len(ids) > budget
        ids = ids[:budget]
        return Encoded(tuple(ids), n_prompt=1, loss_from=1, truncated=truncated)
    prompt = tokenizer.encode(example.prompt)
    if kind == "mc":
        sep, letters = choice_tokens(tokenizer, example.choices)
        if example.answer not in example.choices:
            raise ValueError(f"mc example {example.uid!r}: answer {example.answer!r} not in {example.choices}")
        gold = list(example.choices).index(example.answer)
        target = [letters[gold]]
        prompt = prompt + sep
        choice_ids, gold_idx = tuple(letters), gold
    elif kind == "qa":
        if not example.answer:
            raise ValueError(f"qa example {example.uid!r} has an empty answer")
        text = example.answer if example.prompt[-1:].isspace() else " " + example.answer
        target = tokenizer.encode(text)
        choice_ids, gold_idx = (), -1
    else:
        raise ValueError(f"example {example.uid!r}: unknown kind {kind!r}; expected one of {KINDS}")
    keep = budget - len(target)
    if keep < 1:
        raise ValueError(
            f"example {example.uid!r}: answer needs {len(target)} tokens, seq_len={seq_len} leaves no room for a prompt"
        )
    truncated = len(prompt) > keep
    if truncated:
        prompt = prompt[len(prompt) - keep :]
    if not prompt:
        raise ValueError(f"example {example.uid!r} has an empty prompt")
    ids = prompt + target
    return Encoded(tuple(ids), len(prompt), len(prompt), choice_ids, gold_idx, truncated)


def collate(items: Sequence[Encoded], eos_id: int) -> Batch:
    """Right-pad with ``eos_id``; inputs are ``ids[:-1]``, targets ``ids[1:]`` masked before ``loss_from``."""
    if not items:
        raise ValueError("cannot build a batch from zero examples")
    width = max(len(e.ids) for e in items) - 1
    inputs = torch.full((len(items), width), eos_id, dtype=torch.long)
    targets = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for b, e in enumerate(items):
        ids = torch.tensor(e.ids, dtype=torch.long)
        n = len(e.ids) - 1
        inputs[b, :n] = ids[:-1]
        start = e.loss_from - 1  # input position predicting ids[loss_from]
        targets[b, start:n] = ids[e.loss_from :]
    last_prompt = torch.tensor([e.n_prompt - 1 for e in items], dtype=torch.long)
    return Batch(inputs, targets, last_prompt, list(items))


_CACHE: dict[tuple[Any, ...], tuple[Any, Encoded]] = {}
_CACHE_MAX = 200_000


def encode_cached(example: Any, tokenizer: Tokenizer, seq_len: int) -> Encoded:
    """:func:`encode_example` memoised per (tokenizer object, example content, seq_len)."""
    key = (id(tokenizer), seq_len, example.kind, example.prompt, example.answer, tuple(example.choices))
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    enc = encode_example(example, tokenizer, seq_len)
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.clear()
    _CACHE[key] = (tokenizer, enc)
    return enc
