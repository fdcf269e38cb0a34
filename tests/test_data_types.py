"""Data records, serialisation, fingerprints, prompt helpers and task-config parsing."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from fednl.data import (
    ClientData,
    Example,
    FederatedTask,
    Niah7Config,
    build_task,
    parse_task_config,
    task_fingerprint,
    write_task_jsonl,
)
from fednl.data.prompts import balanced_positions, format_mc, format_qa, letters, place_gold
from fednl.data.text import book_from_text
from fednl.models.tokenizer import ByteTokenizer


def _task(prompt: str = "Question: q\nA. x\nB. y\nAnswer:") -> FederatedTask:
    ex = Example(uid="t/a/train/0", kind="mc", prompt=prompt, choices=("A", "B"), answer="B", meta={"depth": 0.1})
    return FederatedTask(name="t", kind="mc", clients=[ClientData("a", [ex], [])],
                         heldout=[ClientData("h", [], [Example(uid="t/h/test/0", kind="qa", prompt="p", answer="x")])],
                         info={})


def test_example_validation_and_roundtrip():
    ex = _task().clients[0].train[0]
    assert Example.from_dict(json.loads(json.dumps(ex.to_dict()))) == ex
    with pytest.raises(ValueError, match="kind must be one of"):
        Example(uid="u", kind="cloze", prompt="p")
    with pytest.raises(ValueError, match="answer 'C' is not one of choices"):
        Example(uid="u", kind="mc", prompt="p", choices=("A", "B"), answer="C")
    with pytest.raises(ValueError, match="choices must be a tuple of str"):
        Example(uid="u", kind="mc", prompt="p", choices="AB", answer="A")


def test_fingerprint_and_jsonl_export(tmp_path):
    a, b = _task(), _task()
    assert task_fingerprint(a) == task_fingerprint(b)
    assert task_fingerprint(_task("Question: q\nA. x\nB. z\nAnswer:")) != task_fingerprint(a)
    out = write_task_jsonl(a, tmp_path / "sub" / "task.jsonl")
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["client"], r["split"], r["heldout"], r["uid"]) for r in recs] == [
        ("a", "train", False, "t/a/train/0"), ("h", "test", True, "t/h/test/0")]
    assert recs[0]["meta"] == {"depth": 0.1} and recs[0]["choices"] == ["A", "B"]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["task.jsonl"]  # no temp file left behind
    assert a.client("h").name == "h"
    with pytest.raises(KeyError, match="no client 'z'"):
        a.client("z")


def test_prompt_helpers():
    assert format_mc("q?", ["x", "y", "z"]) == "Question: q?\nA. x\nB. y\nC. z\nAnswer:"
    assert format_mc("q?", ["x", "y"], "space") == "Question: q? A. x B. y Answer:"
    assert format_qa("q?") == "Question: q?\nAnswer:"
    assert format_qa("q?", "ctx ") == "ctx\n\nQuestion: q?\nAnswer:"
    assert letters(4) == ("A", "B", "C", "D")
    with pytest.raises(ValueError, match="2..26 options"):
        letters(1)
    pos = balanced_positions(10, 4, random.Random(0))
    assert sorted(Counter(pos).values()) == [2, 2, 3, 3]
    opts = place_gold("g", ["d1", "d2", "d3"], 2, random.Random(0))
    assert opts[2] == "g" and sorted(opts) == ["d1", "d2", "d3", "g"]


def test_book_pieces_rebuild_the_normalised_text():
    book = book_from_text("b", "[Title line]\n\nFirst  para one. Two!\nstill two?\n\n\nSecond para.\n")
    assert book.pieces == ("First para one.", " Two!", " still two?", "\n\nSecond para.")
    long = book_from_text("l", " ".join(["word"] * 200), max_piece_chars=50)
    assert all(len(p.strip()) <= 50 for p in long.pieces)
    assert " ".join(p.strip() for p in long.pieces) == " ".join(["word"] * 200)


def test_parse_task_config_errors_name_the_field():
    assert isinstance(parse_task_config({"name": "niah7"}), Niah7Config)
    with pytest.raises(ValueError, match="unknown task name 'mmlu'"):
        parse_task_config({"name": "mmlu"})
    with pytest.raises(ValueError, match="needs a 'name'"):
        parse_task_config({"quickstart": True})
    with pytest.raises(ValueError, match=r"task\.n_train: Input should be greater than or equal to 0"):
        parse_task_config({"name": "niah7", "n_train": -1})
    with pytest.raises(ValueError, match=r"task\.partition\.kind: Input should be"):
        parse_task_config({"name": "niah7", "partition": {"kind": "random"}})
    with pytest.raises(ValueError, match=r"task\.heldout"):
        parse_task_config({"name": "niah7", "heldout": -1})
    with pytest.raises(ValueError, match="seed must be an int"):
        build_task({"name": "niah7", "quickstart": True}, object(), seed="0")


def test_config_dump_roundtrips():
    cfg = parse_task_config({"name": "niah7", "quickstart": True, "partition": {"kind": "iid", "n_clients": 3}})
    again = parse_task_config(cfg.model_dump(mode="json"))
    assert again == cfg


def test_duplicates_and_missing_tokenizer_are_errors():
    with pytest.raises(ValueError, match=r"templates lists \['uuid'\] more than once"):
        parse_task_config({"name": "niah7", "templates": ["uuid", "passkey", "uuid"]})
    with pytest.raises(ValueError, match=r"tasks lists \['1'\] more than once"):
        parse_task_config({"name": "babilong", "tasks": [1, 1]})
    with pytest.raises(ValueError, match=r"pool lists \['test'\] more than once"):
        parse_task_config({"name": "mmlu5", "pool": ["test", "test"]})
    with pytest.raises(ValueError, match="measures lengths in tokens"):
        build_task({"name": "niah7", "quickstart": True}, None, 0)


def test_each_task_registers_in_its_own_file_and_builds_itself():
    from fednl.data.build import TASK_NAMES
    from fednl.data.tasks.base import TASKS

    assert set(TASK_NAMES) == {"mmlu5", "niah7", "stream", "babilong", "jsonl"}
    for name in TASK_NAMES:
        cls = TASKS.get(name)
        assert cls.__module__ == f"fednl.data.tasks.{name}" and cls.model_fields["name"].default == name
    cfg = parse_task_config({"name": "niah7", "quickstart": True, "templates": ["passkey"], "n_train": 2, "n_test": 1,
                             "train_lengths": [768], "test_lengths": [768]})
    built = cfg.build(ByteTokenizer(), 0)
    assert task_fingerprint(built) == task_fingerprint(build_task(cfg.model_dump(mode="json"), ByteTokenizer(), 0))
    assert [c.name for c in built.clients] == ["passkey"] and len(built.clients[0].train) == 2
