"""Natural-text haystacks measured in tokens.

A :class:`Book` is a text cut into *pieces* (sentences, long ones cut at word boundaries), each piece carrying
its own leading separator (``" "`` inside a paragraph, ``"\\n\\n"`` at a paragraph start). Joining pieces
reproduces the normalised text, and token counts of pieces add up (almost exactly for BPE tokenizers, exactly
for bytes), so a context of a target token length can be assembled cheaply and then checked with one exact
``encode``. :func:`compose_context` builds ``haystack-with-inserts + suffix`` at a target token length.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fednl.data.io import read_text
from fednl.data.paths import EMBEDDED_BOOK

MAX_PIECE_CHARS = 300
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+")
_TITLE = re.compile(r"^\[.*\]$")


class ContextTooShort(ValueError):
    """The requested context length cannot hold the inserted text at the requested places."""


@dataclass(frozen=True)
class Book:
    """A text as a tuple of pieces; ``"".join(pieces)`` is the normalised text."""

    name: str
    pieces: tuple[str, ...]

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def _split_long(sentence: str, max_chars: int) -> list[str]:
    if len(sentence) <= max_chars:
        return [sentence]
    out: list[str] = []
    cur: list[str] = []
    size = 0
    for word in sentence.split(" "):
        if cur and size + 1 + len(word) > max_chars:
            out.append(" ".join(cur))
            cur, size = [], 0
        cur.append(word)
        size += len(word) + (1 if size else 0)
    if cur:
        out.append(" ".join(cur))
    return out


def book_from_text(name: str, text: str, max_piece_chars: int = MAX_PIECE_CHARS) -> Book:
    """Normalise ``text`` (drop a ``[Title]`` first line, collapse whitespace inside paragraphs) into pieces."""
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and _TITLE.match(lines[0].strip()):
        lines = lines[1:]
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", "\n".join(lines))]
    pieces: list[str] = []
    for para in paragraphs:
        if not para:
            continue
        sentences = [s for raw in _SENTENCE_END.split(para) for s in _split_long(raw, max_piece_chars) if s]
        for i, sentence in enumerate(sentences):
            sep = ("\n\n" if i == 0 else " ") if pieces else ""
            pieces.append(sep + sentence)
    if not pieces:
        raise ValueError(f"book {name!r} has no text")
    return Book(name=name, pieces=tuple(pieces))


def load_book(path: str | Path) -> Book:
    path = Path(path)
    return book_from_text(path.stem, read_text(path))


def load_books(source: str | Path | None, names: Sequence[str] | None = None) -> list[Book]:
    """Books from a ``.txt`` file, a folder of ``.txt`` files (name order) or, for ``None``, the embedded book.

    ``names`` selects books by file stem; an unknown name is an error listing the available ones.
    """
    if source is None:
        files = [EMBEDDED_BOOK]
    else:
        source = Path(source)
        if source.is_file():
            files = [source]
        elif source.is_dir():
            files = sorted(source.glob("*.txt"))
            if not files:
                raise FileNotFoundError(f"no .txt books in folder {source}")
        else:
            raise FileNotFoundError(f"book file or folder not found: {source}")
    if names is not None:
        by_stem = {f.stem: f for f in files}
        missing = [n for n in names if n not in by_stem]
        if missing:
            raise ValueError(f"book(s) {missing} not found; available: {sorted(by_stem)}")
        files = [by_stem[n] for n in names]
    return [load_book(f) for f in files]


class TokenCounter:
    """Token counts with the task's tokenizer, cached per (book, piece index)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._pieces: dict[tuple[str, int], int] = {}

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def piece(self, book: Book, i: int) -> int:
        key = (book.name, i)
        n = self._pieces.get(key)
        if n is None:
            n = self._pieces[key] = self.count(book.pieces[i])
        return n


@dataclass
class Composed:
    """A context with inserts, followed by ``suffix``.

    ``insert_token_starts[j]`` is the number of tokens of the text before insert ``j`` (without the space that
    separates it, so insert ``j`` begins in that token, or in the next one when the space is a token of its
    own); ``context_tokens`` the tokens of the context alone (everything before ``suffix``), so
    ``insert_token_starts[j] / context_tokens`` is the realised depth of insert ``j``.
    """

    prompt: str
    n_tokens: int
    context_tokens: int
    insert_char_starts: list[int]
    insert_token_starts: list[int]
    book: str
    start_piece: int


Placer = Callable[[list[int], list[int], random.Random], list[int]]
"""Given the filler pieces' token counts and the inserts' token counts, return one boundary per insert
(non-decreasing, in 0..len(counts)); insert j goes right before filler piece ``boundaries[j]``. Raise
:class:`ContextTooShort` if impossible."""


def depth_placer(depths: Sequence[float]) -> Placer:
    """Boundaries that put insert j nearest to depth ``depths[j]`` of the whole context (filler + inserts):
    filler offset ``depth * (filler + inserts) - tokens of the inserts before j``; strictly increasing, with
    filler before the first and after the last insert."""

    def place(counts: list[int], insert_counts: list[int], rng: random.Random) -> list[int]:
        del rng
        cum = [0]
        for c in counts:
            cum.append(cum[-1] + c)
        total = cum[-1] + sum(insert_counts)
        targets = [d * total - sum(insert_counts[:j]) for j, d in enumerate(depths)]
        bounds = [min(range(len(cum)), key=lambda b, t=t: (abs(cum[b] - t), b)) for t in targets]
        ok = bounds[0] >= 1 and bounds[-1] <= len(counts) - 1 and all(b < a for b, a in zip(bounds, bounds[1:]))
        if not ok:
            raise ContextTooShort(
                f"{len(counts)} haystack pieces ({cum[-1]} tokens) cannot separate {len(depths)} inserts at depths "
                f"{list(depths)}"
            )
        return bounds

    return place


def ordered_random_placer(n_inserts: int) -> Placer:
    """Uniformly random boundaries (seeded), sorted, so inserts keep their order (BABILong-style)."""

    def place(counts: list[int], insert_counts: list[int], rng: random.Random) -> list[int]:
        del insert_counts
        return sorted(rng.randint(0, len(counts)) for _ in range(n_inserts))

    return place


def _fill(book: Book, counter: TokenCounter, start: int, budget: int) -> tuple[list[str], list[int]]:
    """Consecutive pieces from ``start`` (wrapping around the book once at most) totalling <= ``budget`` tokens,
    completed by a word-truncated piece that uses the remaining budget."""
    pieces: list[str] = []
    counts: list[int] = []
    used = 0
    n = len(book.pieces)
    for step in range(n):
        i = (start + step) % n
        text = book.pieces[i]
        if not pieces:
            text = " " + text.lstrip()  # the first filler piece starts a sentence mid-text
        elif i == 0:
            text = "\n\n" + text  # wrapped around to the book's first piece, which has no separator
        c = counter.piece(book, i) if text is book.pieces[i] else counter.count(text)
        if used + c <= budget:
            pieces.append(text)
            counts.append(c)
            used += c
            continue
        words = text.split(" ")
        lo, hi = 0, len(words)
        while lo < hi:  # largest prefix of words that fits
            mid = (lo + hi + 1) // 2
            if counter.count(" ".join(words[:mid])) <= budget - used:
                lo = mid
            else:
                hi = mid - 1
        prefix = " ".join(words[:lo])
        if prefix.strip():
            pieces.append(prefix)
            counts.append(counter.count(prefix))
        return pieces, counts
    raise ContextTooShort(f"book {book.name!r} is shorter than the requested {budget} haystack tokens")


def compose_context(
    books: Sequence[Book],
    counter: TokenCounter,
    rng: random.Random,
    *,
    total_tokens: int,
    inserts: Sequence[str],
    suffix: str,
    placer: Placer,
    attempts: int = 16,
    refits: int = 8,
) -> Composed:
    """Build ``context + suffix`` of at most ``total_tokens`` tokens (as close below as word granularity allows),
    where the context is book text (a random window of a random book) with each insert placed as its own
    sentence at the boundary chosen by ``placer``.

    The filler is sized from per-piece token counts and then measured exactly; when a tokenizer merges or
    splits across pieces so that the prompt comes out too long, the haystack budget shrinks by the excess and
    the window is refilled (at most ``refits`` times). Tries ``attempts`` windows before giving up.
    """
    insert_texts = [" " + s.strip() for s in inserts]
    insert_counts = [counter.count(s) for s in insert_texts]
    fixed = counter.count(suffix) + sum(insert_counts)
    budget = total_tokens - fixed
    if budget <= 0:
        raise ContextTooShort(
            f"context length {total_tokens} is too short: the inserts and question alone take {fixed} tokens"
        )
    last_err: ContextTooShort | None = None
    for _ in range(attempts):
        book = books[rng.randrange(len(books))]
        start = rng.randrange(len(book.pieces))
        shrink = 0
        for _ in range(refits):
            if budget - shrink <= 0:
                break
            try:  # a book shorter than the budget, or no room between the inserts: try another window
                filler, counts = _fill(book, counter, start, budget - shrink)
                bounds = placer(counts, insert_counts, rng)
            except ContextTooShort as err:
                last_err = err
                break
            composed = _assemble(filler, insert_texts, bounds, suffix, counter, book.name, start)
            if composed.n_tokens <= total_tokens:
                return composed
            shrink += composed.n_tokens - total_tokens
    detail = f", and {last_err}" if last_err else " (the tokenizer's counts of the parts do not add up)"
    raise ContextTooShort(
        f"context length {total_tokens} is too short: after the inserts and question ({fixed} tokens) only "
        f"{budget} haystack tokens remain{detail}"
    )


def _assemble(
    filler: list[str],
    insert_texts: list[str],
    bounds: list[int],
    suffix: str,
    counter: TokenCounter,
    book: str,
    start: int,
) -> Composed:
    parts: list[str] = []
    marks: list[int] = []  # index in parts of each insert
    j = 0
    for b in range(len(filler) + 1):
        while j < len(insert_texts) and bounds[j] == b:
            marks.append(len(parts))
            parts.append(insert_texts[j])
            j += 1
        if b < len(filler):
            parts.append(filler[b])
    parts[0] = parts[0].lstrip()
    context = "".join(parts)
    prompt = context + suffix
    n_tokens = counter.count(prompt)
    char_starts = []
    pos = 0
    for k, p in enumerate(parts):
        if k in marks:
            char_starts.append(pos + (len(p) - len(p.lstrip())))
        pos += len(p)
    token_starts, context_tokens = _token_offsets(prompt, n_tokens, [c - 1 for c in char_starts], len(context), counter)
    return Composed(
        prompt=prompt,
        n_tokens=n_tokens,
        context_tokens=context_tokens,
        insert_char_starts=char_starts,
        insert_token_starts=token_starts,
        book=book,
        start_piece=start,
    )


def _token_offsets(
    prompt: str, n_tokens: int, cuts: list[int], context_end: int, counter: TokenCounter
) -> tuple[list[int], int]:
    """Token counts of ``prompt[:cut]`` for each cut and of ``prompt[:context_end]``.

    Counted segment by segment (each character once); the sum is checked against the exact ``n_tokens`` of
    the whole prompt, and if a tokenizer merges across a cut the prefixes are encoded whole instead.
    """
    bounds = [*cuts, context_end]
    segments = [prompt[a:b] for a, b in zip([0, *bounds], [*bounds, len(prompt)])]
    counts = [counter.count(seg) for seg in segments]
    if sum(counts) == n_tokens:
        cum = [sum(counts[: k + 1]) for k in range(len(bounds))]
        return cum[:-1], cum[-1]
    return [counter.count(prompt[:c]) for c in cuts], counter.count(prompt[:context_end])
