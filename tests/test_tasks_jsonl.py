"""User JSONL data: multiple-choice and exact-match formats, clients/splits, and located errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fednl.data import DataFileError, build_task, task_fingerprint


def write(path: Path, records: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def mc(i: int, client: str | None = "alice", **extra) -> dict:
    rec = {"question": f"What is {i} + 1?", "choices": [str(i + 1), str(i), str(i + 2)], "answer": "A", **extra}
    if client is not None:
        rec["client"] = client
    return rec


def test_multiple_choice_with_clients_and_splits(tmp_path):
    recs = [mc(i, "alice" if i % 3 else "bob", subject="math") for i in range(30)]
    recs[0] = {**recs[0], "answer": 2, "split": "test"}  # index answer -> letter C
    recs[1] = {**recs[1], "split": "train", "context": "Some background."}
    f = write(tmp_path / "data.jsonl", recs)
    task = build_task({"name": "jsonl", "path": str(f), "test_fraction": 0.25}, None, 0)
    assert task.kind == "mc" and [c.name for c in task.clients] == ["bob", "alice"]
    bob, alice = task.client("bob"), task.client("alice")
    first = next(e for e in bob.test if e.meta["source"] == "data.jsonl:1")
    assert first.answer == "C" and first.choices == ("A", "B", "C")
    assert first.prompt == "Question: What is 0 + 1?\nA. 1\nB. 0\nC. 2\nAnswer:"
    second = next(e for e in alice.train if e.meta["source"] == "data.jsonl:2")
    assert second.prompt.startswith("Some background.\n\nQuestion: What is 1 + 1?")
    assert second.meta["fields"] == {"subject": "math"} and second.meta["label"] == "alice"
    # bob: 10 records, 1 forced to test, 9 unsplit -> round(9 * .25) = 2 more test; alice: 20 -> 1 forced train
    assert (len(bob.train), len(bob.test)) == (7, 3)
    assert (len(alice.train), len(alice.test)) == (15, 5)
    again = build_task({"name": "jsonl", "path": str(f), "test_fraction": 0.25}, None, 0)
    assert task_fingerprint(task) == task_fingerprint(again)


def test_qa_without_client_is_dealt_by_the_partitioner(tmp_path):
    recs = [{"question": f"Capital of country {i}?", "answer": f"City{i}", "topic": "geo" if i < 20 else "hist"}
            for i in range(40)]
    f = write(tmp_path / "qa.jsonl", recs)
    with pytest.raises(ValueError, match="no 'client' field; set task.partition.kind"):
        build_task({"name": "jsonl", "path": str(f)}, None, 0)
    with pytest.raises(ValueError, match="needs task.label_field"):
        build_task({"name": "jsonl", "path": str(f), "partition": {"kind": "dirichlet", "n_clients": 2}}, None, 0)
    task = build_task({"name": "jsonl", "path": str(f), "label_field": "topic",
                       "partition": {"kind": "pathological", "n_clients": 2, "k": 1}}, None, 0)
    assert task.kind == "qa" and len(task.clients) == 2
    for c in task.clients:
        assert len({e.meta["label"] for e in c.train + c.test}) == 1  # one topic per client
        for e in c.train + c.test:
            assert e.prompt == f"Question: Capital of country {e.answer[4:]}?\nAnswer:"
    assert Counter(r["split"] for r in task.iter_records()) == {"train": 32, "test": 8}


def test_folder_of_files(tmp_path):
    write(tmp_path / "a.jsonl", [mc(i, "x") for i in range(5)])
    write(tmp_path / "b.jsonl", [mc(i, "y") for i in range(5)])
    (tmp_path / "notes.txt").write_text("ignored")
    task = build_task({"name": "jsonl", "path": str(tmp_path)}, None, 0)
    assert task.info["files"] == ["a.jsonl", "b.jsonl"] and [c.name for c in task.clients] == ["x", "y"]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"question": "q", "choices": ["a", "b"], "answer": "A"', r"invalid JSON"),
        ('["not", "an", "object"]', r"expected a JSON object, got list"),
        ('{"choices": ["a", "b"], "answer": "A"}', r"missing field 'question'"),
        ('{"question": "q", "choices": ["a", "b"]}', r"missing field 'answer'"),
        ('{"question": "q", "choices": ["a", "b"], "answer": "C"}',
         r"'answer' must be a letter A-B or an index 0-1, got 'C'"),
        ('{"question": "q", "choices": ["a", "b"], "answer": 5}', r"or an index 0-1, got 5"),
        ('{"question": "q", "choices": ["a"], "answer": "A"}', r"'choices' must be a list of 2-26 strings"),
        ('{"question": "q", "choices": ["a", "b"], "answer": "A", "split": "dev"}',
         r"'split' must be 'train' or 'test'"),
        ('{"question": "", "answer": "x"}', r"field 'question' must be a non-empty string"),
        ('{"question": "q", "answer": 3}', r"'answer' must be a non-empty string, got 3"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    f = tmp_path / "user.jsonl"
    f.write_text(json.dumps(mc(0)) + "\n\n" + line + "\n")  # the blank line 2 is skipped; the bad line is 3
    with pytest.raises(DataFileError, match=rf"user\.jsonl:3: .*{message}"):
        build_task({"name": "jsonl", "path": str(f)}, None, 0)


def test_inconsistent_records_are_errors(tmp_path):
    f = write(tmp_path / "mixed.jsonl", [mc(0), {"question": "q", "answer": "x", "client": "alice"}])
    with pytest.raises(ValueError, match=r"mixed\.jsonl:2: a qa record, but mixed\.jsonl:1 is mc"):
        build_task({"name": "jsonl", "path": str(f)}, None, 0)
    f = write(tmp_path / "clients.jsonl", [mc(0), mc(1, client=None)])
    with pytest.raises(ValueError, match=r"clients\.jsonl:2: no 'client' field, but other records have one"):
        build_task({"name": "jsonl", "path": str(f)}, None, 0)
    f = write(tmp_path / "label.jsonl", [mc(0, topic="a"), mc(1)])
    with pytest.raises(ValueError, match=r"label\.jsonl:2: missing the label field 'topic'"):
        build_task({"name": "jsonl", "path": str(f), "label_field": "topic"}, None, 0)
    f = write(tmp_path / "forced.jsonl", [mc(0)])
    with pytest.raises(DataFileError, match=r"forced\.jsonl:1: a 'choices' field in a qa record"):
        build_task({"name": "jsonl", "path": str(f), "format": "qa"}, None, 0)
    with pytest.raises(ValueError, match="task.path: .*path does not exist"):
        build_task({"name": "jsonl", "path": str(tmp_path / "missing.jsonl")}, None, 0)
