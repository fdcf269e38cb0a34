"""Streaming text (PG-19 style): books cut into consecutive documents of ``doc_length`` tokens.

Each book (a ``.txt`` file; by default the embedded one) is cut, sentence by sentence, into non-overlapping
documents of at most ``doc_length`` tokens of the given tokenizer (the last sentence of a document is cut at a
word boundary to fill it, and the next document goes on from the following sentence). A book is one client, or
``parts_per_book`` clients of consecutive documents. Each client's last ``test_fraction`` of documents (at
least one) is its test split, so test text never sits between training documents. The book's tail shorter
than half a document is dropped. ``kind="text"``: the metric is
next-token cross-entropy per position bin (:mod:`fednl.data.bins`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveInt, model_validator

from fednl.data.config import TaskConfigBase, apply_quickstart
from fednl.data.tasks.base import NaturalTask, register_task
from fednl.data.text import Book, TokenCounter, load_books
from fednl.data.types import ClientData, Example

@register_task
class StreamConfig(TaskConfigBase):
    """PG-19-style streaming text: books cut into documents of ``doc_length`` tokens."""

    name: Literal["stream"] = "stream"
    measures_tokens: ClassVar[bool] = True
    data_dir: Path | None = None
    """A ``.txt`` book or a folder of them. Default: the embedded book."""
    books: list[str] | None = None
    doc_length: PositiveInt = 2048
    parts_per_book: PositiveInt = 1
    test_fraction: float = Field(0.1, gt=0, lt=1)
    max_train: PositiveInt | None = None
    max_test: PositiveInt | None = None
    bin_size: PositiveInt = 1024
    quickstart: bool = False
    pooled: bool = False
    """Centralised training: all non-held-out clients merged into one client ``"pooled"`` (held-out clients must
    then be given by name)."""

    @model_validator(mode="before")
    @classmethod
    def _quickstart(cls, data: Any) -> Any:
        return apply_quickstart(
            data, {"doc_length": 256, "parts_per_book": 3, "max_train": 16, "max_test": 4, "bin_size": 64}
        )

    @model_validator(mode="after")
    def _pooled_heldout(self) -> StreamConfig:
        if self.pooled and isinstance(self.heldout, int) and self.heldout:
            raise ValueError("pooled = true needs the held-out clients by name (heldout = ['book', ...]), not a count")
        return self

    def natural(self, tokenizer: Any, seed: int) -> NaturalTask:
        return build_stream(self, tokenizer, seed)



def cut_documents(book: Book, counter: TokenCounter, doc_length: int) -> list[tuple[str, int, int]]:
    """``(text, n_tokens, first_piece)`` for consecutive documents of at most ``doc_length`` tokens.

    Pieces are added while they fit; the piece that does not fit is cut to the longest word prefix that fits,
    and the next document starts at the following piece. A last document shorter than half ``doc_length`` (the
    book's tail) is dropped.
    """
    docs: list[tuple[str, int, int]] = []
    i, n = 0, len(book.pieces)
    while i < n:
        start, parts, used = i, [], 0
        while i < n:
            text = book.pieces[i].lstrip() if not parts else book.pieces[i]
            c = counter.count(text) if not parts else counter.piece(book, i)
            if used + c > doc_length:
                break
            parts.append(text)
            used += c
            i += 1
        if i < n:
            words = (book.pieces[i].lstrip() if not parts else book.pieces[i]).split(" ")
            lo, hi = 0, len(words)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if counter.count(" ".join(words[:mid])) <= doc_length - used:
                    lo = mid
                else:
                    hi = mid - 1
            if lo:
                parts.append(" ".join(words[:lo]))
            i += 1
        doc = "".join(parts)
        n_tok = counter.count(doc)
        while n_tok > doc_length:  # BPE merges across pieces: drop words from the end
            doc = doc.rsplit(" ", 1)[0] if " " in doc else ""
            n_tok = counter.count(doc)
        if doc.strip():
            docs.append((doc, n_tok, start))
    if docs and docs[-1][1] < doc_length // 2:
        docs.pop()  # the book's tail, shorter than half a document
    return docs


def build_stream(cfg: StreamConfig, tokenizer, seed: int) -> NaturalTask:
    del seed  # documents are consecutive cuts: nothing is random
    books = load_books(cfg.data_dir, cfg.books)
    counter = TokenCounter(tokenizer)
    clients = []
    for book in books:
        docs = cut_documents(book, counter, cfg.doc_length)
        per_part = math.ceil(len(docs) / cfg.parts_per_book)
        for p in range(cfg.parts_per_book):
            chunk = docs[p * per_part : (p + 1) * per_part]
            name = book.name if cfg.parts_per_book == 1 else f"{book.name}/part{p + 1}"
            if len(chunk) < 2:
                raise ValueError(
                    f"stream: client {name!r} gets {len(chunk)} document(s) of {cfg.doc_length} tokens; it needs at "
                    "least 2 (one train, one test) — lower doc_length or parts_per_book"
                )
            n_test = max(1, round(len(chunk) * cfg.test_fraction))
            split = {"train": chunk[:-n_test], "test": chunk[-n_test:]}
            caps = {"train": cfg.max_train, "test": cfg.max_test}
            out: dict[str, list[Example]] = {}
            for s, items in split.items():
                items = items[: caps[s]] if caps[s] else items
                out[s] = [
                    Example(
                        uid=f"stream/{name}/{s}/{k:05d}", kind="text", prompt=text,
                        meta={"client": name, "book": book.name, "part": p + 1, "split": s, "n_tokens": n_tok,
                              "doc_length": cfg.doc_length, "book_piece": first, "bin_size": cfg.bin_size},
                    )
                    for k, (text, n_tok, first) in enumerate(items)
                ]
            clients.append(ClientData(name=name, train=out["train"], test=out["test"]))
    if cfg.pooled:
        clients = pool_clients(clients, keep=cfg.heldout if isinstance(cfg.heldout, list) else [])
    info = {"books": [b.name for b in books], "source": "embedded" if cfg.data_dir is None else str(cfg.data_dir),
            "doc_length": cfg.doc_length, "bin_size": cfg.bin_size, "pooled": cfg.pooled}
    return NaturalTask(kind="text", label_key="book", clients=clients, info=info)


POOLED = "pooled"


def pool_clients(clients: list[ClientData], keep: list[str]) -> list[ClientData]:
    """Centralised training: every client except those named in ``keep`` (the held-out ones) merged into one
    client ``"pooled"`` (train and test splits concatenated in client order), followed by the kept clients."""
    unknown = [k for k in keep if k not in {c.name for c in clients}]
    if unknown:
        raise ValueError(f"stream: held-out client(s) {unknown} not found; clients: {[c.name for c in clients]}")
    merged = [c for c in clients if c.name not in keep]
    if not merged:
        raise ValueError("stream: pooled = true leaves no training client (every client is held out)")
    pooled = ClientData(name=POOLED, train=[e for c in merged for e in c.train], test=[e for c in merged for e in c.test])
    return [pooled, *(c for c in clients if c.name in keep)]
