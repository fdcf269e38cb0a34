"""Streaming task: documents of a token length cut from books; position-bin helpers."""

from __future__ import annotations

import numpy as np
import pytest

from fednl.data import bin_edges, bin_index, bin_means, build_task, relative_to_first, task_fingerprint
from fednl.data.bins import bin_means_reference
from fednl.data.paths import SHARED_ENV
from fednl.data.tasks.stream import cut_documents
from fednl.data.text import TokenCounter, book_from_text
from fednl.models.tokenizer import ByteTokenizer


class WordTok(ByteTokenizer):
    """One token per whitespace-separated word (a tokenizer whose counts are not bytes)."""

    def encode(self, text):
        return list(range(len(text.split())))


def test_documents_fill_the_length_and_follow_the_book():
    text = "\n\n".join(" ".join(f"Sentence {p}.{i} has a few words." for i in range(12)) for p in range(30))
    book = book_from_text("b", text)
    docs = cut_documents(book, TokenCounter(ByteTokenizer()), 200)
    assert len(docs) > 10
    for doc, n, _ in docs:
        assert n == len(doc.encode()) and 200 - 40 <= n <= 200
        assert not doc.startswith((" ", "\n"))
    # consecutive: each document starts where the book text continues after the previous one
    flat = book.text
    positions = [flat.index(doc[:60]) for doc, _, _ in docs]
    assert positions == sorted(positions)
    words = cut_documents(book, TokenCounter(WordTok()), 50)
    assert all(45 <= n <= 50 and n == len(d.split()) for d, n, _ in words[:-1])


def test_stream_task_quickstart_is_embedded_and_deterministic(monkeypatch, tmp_path):
    monkeypatch.setenv(SHARED_ENV, str(tmp_path / "nowhere"))
    task = build_task({"name": "stream", "quickstart": True}, ByteTokenizer(), 0)
    assert task.kind == "text" and [c.name for c in task.clients] == [f"chesterton-thursday/part{i}" for i in (1, 2, 3)]
    for c in task.clients:
        assert (len(c.train), len(c.test)) == (16, 4)
        for ex in c.train + c.test:
            assert ex.kind == "text" and ex.answer == "" and ex.choices == ()
            assert ex.meta["n_tokens"] == len(ex.prompt.encode()) <= 256
        # test documents come after every training document of the client (the tail of its part)
        assert max(e.meta["book_piece"] for e in c.train) < min(e.meta["book_piece"] for e in c.test)
    assert task_fingerprint(task) == task_fingerprint(build_task({"name": "stream", "quickstart": True}, ByteTokenizer(), 1))


def test_books_by_name_and_errors(tmp_path):
    (tmp_path / "one.txt").write_text("Short text. " * 400)
    (tmp_path / "two.txt").write_text("Other words here. " * 400)
    task = build_task({"name": "stream", "data_dir": str(tmp_path), "books": ["two"], "doc_length": 512}, ByteTokenizer(), 0)
    assert [c.name for c in task.clients] == ["two"] and task.info["books"] == ["two"]
    with pytest.raises(ValueError, match=r"book\(s\) \['three'\] not found; available: \['one', 'two'\]"):
        build_task({"name": "stream", "data_dir": str(tmp_path), "books": ["three"]}, ByteTokenizer(), 0)
    with pytest.raises(ValueError, match="needs at least 2"):
        build_task({"name": "stream", "data_dir": str(tmp_path / "one.txt"), "doc_length": 4096}, ByteTokenizer(), 0)


def test_bins_by_hand():
    assert [bin_index(t, 4) for t in (0, 3, 4, 9)] == [0, 0, 1, 2]
    assert bin_edges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    values = [1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 10.0, 5.0, 7.0]
    assert bin_means_reference(values, 4) == [2.5, 10.0, 6.0]
    np.testing.assert_allclose(bin_means(values, 4), [2.5, 10.0, 6.0])
    assert relative_to_first([2.0, 1.0, 3.0]) == [0.0, -0.5, 0.5]
    with pytest.raises(ValueError, match="bin_size"):
        bin_edges(10, 0)


def test_bin_means_matches_the_reference_and_masks():
    rng = np.random.default_rng(0)
    v = rng.random((3, 37))
    for size in (1, 5, 16, 37, 64):
        np.testing.assert_allclose(bin_means(v[0], size), bin_means_reference(list(v[0]), size), rtol=1e-12)
        # 2-D: token-weighted mean over documents == reference on the concatenated per-bin values
        expected = [np.mean(v[:, s:e]) for s, e in bin_edges(37, size)]
        np.testing.assert_allclose(bin_means(v, size), expected, rtol=1e-12)
    mask = np.ones_like(v, dtype=bool)
    mask[1, 20:] = False  # a shorter document (padding)
    expected = [np.mean(v[:, s:e][mask[:, s:e]]) for s, e in bin_edges(37, 8)]
    np.testing.assert_allclose(bin_means(v, 8, mask), expected, rtol=1e-12)
    empty = bin_means(v[:1, :4], 2, np.array([[True, True, False, False]]))
    assert empty[0] == pytest.approx(v[0, :2].mean()) and np.isnan(empty[1])
