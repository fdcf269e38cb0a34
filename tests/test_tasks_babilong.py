"""BABILong-style task: bAbI parsing, facts kept in order inside the haystack, malformed files."""

from __future__ import annotations

from pathlib import Path

import pytest

from fednl.data import DataFileError, build_task, task_fingerprint
from fednl.data.tasks.babilong import parse_babi
from fednl.models.tokenizer import ByteTokenizer

SHARED_BABI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "babi-en"

STORY = (
    "1 Mary moved to the bathroom.\n"
    "2 John went to the hallway.\n"
    "3 Where is Mary? \tbathroom\t1\n"
    "4 Daniel went back to the hallway.\n"
    "5 Sandra moved to the garden.\n"
    "6 Where is Daniel? \thallway\t4\n"
    "1 Sandra travelled to the office.\n"
    "2 Sandra went to the bathroom.\n"
    "3 Where is Sandra? \tbathroom\t2\n"
)


def write_babi(folder: Path, tasks=(1, 2), copies: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for t in tasks:
        for split in ("train", "test"):
            (folder / f"qa{t}_task-{t}_{split}.txt").write_text(STORY * copies)
    return folder


def test_parse_babi_stories_and_supports(tmp_path):
    f = write_babi(tmp_path, tasks=(1,), copies=1) / "qa1_task-1_train.txt"
    samples = parse_babi(f)
    assert [(s.question, s.answer) for s in samples] == [
        ("Where is Mary?", "bathroom"), ("Where is Daniel?", "hallway"), ("Where is Sandra?", "bathroom")]
    assert samples[0].facts == ("Mary moved to the bathroom.", "John went to the hallway.")
    assert samples[1].facts[-1] == "Sandra moved to the garden." and len(samples[1].facts) == 4
    assert samples[1].supports == (2,)  # line 4 is the third statement (question lines are not facts)
    assert samples[2].facts == ("Sandra travelled to the office.", "Sandra went to the bathroom.")
    assert samples[2].source == "qa1_task-1_train.txt:9"


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("1 A fact.\nx Where?\tb\t1\n", 2, "expected '<number> <text>'"),
        ("1 A fact.\n3 Another.\n", 2, "does not follow 1"),
        ("1 A fact.\n2 Where is it?\tkitchen\n", 2, "question<TAB>answer<TAB>supporting ids"),
        ("1 A fact.\n2 Where is it?\tkitchen\t7\n", 2, r"supporting line\(s\) \[7\]"),
        ("1 A fact.\n2 Where is it?\tkitchen\tone\n", 2, "supporting ids must be line numbers"),
    ],
)
def test_malformed_babi_names_file_and_line(tmp_path, text, line, message):
    f = tmp_path / "qa1_bad_train.txt"
    f.write_text(text)
    with pytest.raises(DataFileError, match=rf"qa1_bad_train\.txt:{line}: .*{message}"):
        parse_babi(f)


def test_facts_scattered_in_order_and_exact_answer(tmp_path):
    folder = write_babi(tmp_path / "babi")
    cfg = {"name": "babilong", "data_dir": str(folder), "tasks": [1, 2], "n_train": 6, "n_test": 3,
           "train_lengths": [1024], "test_lengths": [2048]}
    task = build_task(cfg, ByteTokenizer(), seed=0)
    assert task.kind == "qa" and [c.name for c in task.clients] == ["qa1", "qa2"]
    for c in task.clients:
        for ex in c.train + c.test:
            context, _, tail = ex.prompt.rpartition("\n\nQuestion: ")
            assert tail == f"{ex.meta['question']}\nAnswer:"
            pos = [context.index(f) for f in ex.meta["facts"]]  # every fact, in story order
            assert pos == sorted(pos)
            assert ex.answer in ("bathroom", "hallway") and ex.choices == ()
            length = ex.meta["context_length"]
            assert length - 32 <= ex.meta["n_tokens"] == len(ex.prompt.encode()) <= length
            assert len(context) > 700  # the facts sit inside book text
    assert task_fingerprint(task) == task_fingerprint(build_task(cfg, ByteTokenizer(), seed=0))
    assert task_fingerprint(task) != task_fingerprint(build_task(cfg, ByteTokenizer(), seed=1))


def test_samples_longer_than_the_context_are_passed_over(tmp_path):
    folder = write_babi(tmp_path / "babi", tasks=(1,))
    # Questions 1 and 3 of the story need ~75 bytes with their facts, question 2 ~135: at 120 tokens only
    # the short ones fit, so every drawn sample is a short one and the long ones are counted as skipped.
    task = build_task({"name": "babilong", "data_dir": str(folder), "tasks": [1], "n_train": 6, "n_test": 0,
                       "train_lengths": [120]}, ByteTokenizer(), 0)
    assert {len(e.meta["facts"]) for e in task.clients[0].train} == {2}
    assert task.info["skipped_too_long"]["qa1/train"] >= 1
    with pytest.raises(ValueError, match=r"qa1_task-1_train\.txt: only 0 of the 8 requested samples .* fit"):
        build_task({"name": "babilong", "data_dir": str(folder), "tasks": [1], "n_train": 8, "n_test": 0,
                    "train_lengths": [60]}, ByteTokenizer(), 0)
    # Just enough room for the facts and question: a context with (almost) no haystack, like BABILong's "0k".
    tight = build_task({"name": "babilong", "data_dir": str(folder), "tasks": [1], "n_train": 2, "n_test": 0,
                        "train_lengths": [100]}, ByteTokenizer(), 0)
    assert all(e.meta["n_tokens"] <= 100 for e in tight.clients[0].train)
    with pytest.raises(ValueError, match="asked for 50 train samples"):
        build_task({"name": "babilong", "data_dir": str(folder), "tasks": [1], "n_train": 50}, ByteTokenizer(), 0)
    with pytest.raises(FileNotFoundError, match=r"qa3_\*_train\.txt"):
        build_task({"name": "babilong", "data_dir": str(folder), "tasks": [3]}, ByteTokenizer(), 0)


@pytest.mark.skipif(not SHARED_BABI.is_dir(), reason="shared bAbI data absent")
def test_shared_babi_answers_match_the_source_lines():
    task = build_task({"name": "babilong", "data_dir": str(SHARED_BABI), "tasks": [1, 2], "n_train": 5, "n_test": 2,
                       "train_lengths": [2048], "test_lengths": [2048]}, ByteTokenizer(), 0)
    for c in task.clients:
        for ex in c.train + c.test:
            fname, line = ex.meta["source"].rsplit(":", 1)
            raw = (SHARED_BABI / fname).read_text().split("\n")[int(line) - 1]
            assert raw.split("\t")[1] == ex.answer
            assert ex.meta["task_name"] in ("single-supporting-fact", "two-supporting-facts")
