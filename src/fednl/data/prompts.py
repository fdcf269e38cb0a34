"""Prompt formats shared by the tasks.

Multiple choice (MMLU-5, NIAH-7, JSONL ``mc``)::

    Question: <question>
    A. <option 0>
    B. <option 1>
    ...
    Answer:

With ``separator="space"`` the same parts are joined by single spaces (the paper's one-line rendering). The
training target is ``" " + letter``; the model is scored on the letter tokens at the last prompt position.
Exact-match QA (BABILong, JSONL ``qa``) ends in ``"Question: <question>\\nAnswer:"`` and the target is
``" " + answer``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SEPARATORS = {"newline": "\n", "space": " "}


def letters(n: int) -> tuple[str, ...]:
    """The first ``n`` option letters."""
    if not 2 <= n <= len(LETTERS):
        raise ValueError(f"a multiple-choice question needs 2..{len(LETTERS)} options, got {n}")
    return tuple(LETTERS[:n])


def format_mc(question: str, options: Sequence[str], separator: str = "newline") -> str:
    """``Question: q<sep>A. o0<sep>B. o1 ...<sep>Answer:``."""
    sep = SEPARATORS[separator]
    lines = [f"Question: {question.strip()}"]
    lines += [f"{letter}. {str(opt).strip()}" for letter, opt in zip(letters(len(options)), options)]
    lines.append("Answer:")
    return sep.join(lines)


def format_qa(question: str, context: str | None = None) -> str:
    """``<context>\\n\\nQuestion: q\\nAnswer:`` (no context part when ``context`` is empty)."""
    body = f"Question: {question.strip()}\nAnswer:"
    return f"{context.rstrip()}\n\n{body}" if context and context.strip() else body


def balanced_positions(n: int, n_options: int, rng: random.Random) -> list[int]:
    """``n`` gold positions in ``0..n_options-1``, each used ``n // n_options`` or one more time, in seeded
    random order (gold letters uniformly placed)."""
    out = [i % n_options for i in range(n)]
    rng.shuffle(out)
    return out


def place_gold(gold: str, distractors: Sequence[str], position: int, rng: random.Random) -> list[str]:
    """Options with ``gold`` at ``position`` and the distractors in seeded random order around it."""
    rest = list(distractors)
    rng.shuffle(rest)
    rest.insert(position, gold)
    return rest
