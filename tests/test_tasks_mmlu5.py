"""MMLU-5: the paper's counts from the shared data, both CSV layouts + a HF datasets copy, malformed files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fednl.data import DataFileError, Mmlu5Config, build_task, task_fingerprint
from fednl.data.paths import SHARED_ENV
from fednl.data.tasks.mmlu5 import DOMAINS, UNASSIGNED, split_pool
from fednl.data.tasks.mmlu_io import read_cais_csv, read_hendrycks_csv

SHARED_MMLU = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mmlu"
needs_shared = pytest.mark.skipif(not (SHARED_MMLU / "cais_hf_csv").is_dir(), reason="shared MMLU data absent")
ALL_SUBJECTS = [s for subs in DOMAINS.values() for s in subs] + list(UNASSIGNED)


def _rows(subject: str, split: str, n: int) -> list[tuple[str, list[str], int]]:
    return [(f"{subject} {split} q{i}, with a comma", [f"c{j} of {i}" for j in range(4)], (i * 7 + len(subject)) % 4)
            for i in range(n)]


def write_cais(root: Path, n: int = 3, splits=("test", "dev")) -> Path:
    for split in splits:
        (root / split).mkdir(parents=True, exist_ok=True)
        for s in ALL_SUBJECTS:
            with open(root / split / f"{s}_{split}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
                for q, ch, a in _rows(s, split, n):
                    w.writerow([q, *ch, a])
    return root


def write_hendrycks(root: Path, n: int = 3, splits=("test", "dev")) -> Path:
    for split in splits:
        (root / split).mkdir(parents=True, exist_ok=True)
        for s in ALL_SUBJECTS:
            with open(root / split / f"{s}_{split}.csv", "w", newline="") as f:
                w = csv.writer(f)
                for q, ch, a in _rows(s, split, n):
                    w.writerow([q, *ch, "ABCD"[a]])
    return root


@needs_shared
def test_paper_counts_from_cais_hf_csv():
    task = build_task({"name": "mmlu5", "data_dir": str(SHARED_MMLU)}, None, seed=0)
    counts = {c.name: (len(c.train), len(c.test)) for c in task.clients}
    assert counts == {"law_ethics": (2000, 200), "humanities": (2000, 200), "stem": (1855, 200),
                      "math_cs": (915, 183), "medical_psychology": (2000, 200)}
    assert task.info["layout"] == "cais_hf_csv"
    assert task.info["pool_sizes"] == {"law_ethics": 3393, "humanities": 4421, "stem": 2055, "math_cs": 1098,
                                       "medical_psychology": 2793}
    prop = build_task({"name": "mmlu5", "data_dir": str(SHARED_MMLU), "split_rule": "proportional"}, None, seed=0)
    assert {c.name: (len(c.train), len(c.test)) for c in prop.clients}["stem"] == (1713, 200)
    assert {c.name: (len(c.train), len(c.test)) for c in prop.clients}["math_cs"] == (915, 183)
    # train and test never share a question row
    for c in task.clients:
        assert not {e.meta["source"] for e in c.train} & {e.meta["source"] for e in c.test}


@needs_shared
def test_subject_mapping_covers_mmlu():
    cats = json.loads((SHARED_MMLU / "subject_categories.json").read_text())
    mapped = [s for subs in DOMAINS.values() for s in subs]
    assert len(mapped) == len(set(mapped)) == 56
    assert set(mapped) | set(UNASSIGNED) == set(cats)
    assert len(DOMAINS["math_cs"]) == 8 and len(DOMAINS["medical_psychology"]) == 10


def test_split_rules_by_hand():
    cfg = Mmlu5Config()
    assert split_pool(1098, cfg) == (183, 183, 915)
    assert split_pool(2055, cfg) == (200, 200, 1855)
    assert split_pool(2055, Mmlu5Config(split_rule="proportional")) == (200, 342, 1713)
    assert split_pool(1098, Mmlu5Config(split_rule="proportional")) == (183, 183, 915)
    assert split_pool(12, Mmlu5Config(max_train=5, max_test=1)) == (1, 1, 5)


def test_prompt_format_and_answer(tmp_path):
    root = write_cais(tmp_path / "cais_hf_csv")
    task = build_task({"name": "mmlu5", "data_dir": str(tmp_path), "max_train": 100}, None, 0)
    everything = [e for c in task.clients for e in c.train + c.test]
    ex = next(e for e in everything if e.meta["source"].endswith("abstract_algebra_test.csv:2"))
    q, ch, a = _rows("abstract_algebra", "test", 3)[0]
    assert ex.prompt == f"Question: {q}\nA. {ch[0]}\nB. {ch[1]}\nC. {ch[2]}\nD. {ch[3]}\nAnswer:"
    assert ex.choices == ("A", "B", "C", "D") and ex.answer == "ABCD"[a] and ex.kind == "mc"
    assert ex.meta["subject"] == "abstract_algebra" and ex.meta["client"] == "math_cs"
    spaced = build_task({"name": "mmlu5", "data_dir": str(root), "separator": "space"}, None, 0)
    assert all("\n" not in e.prompt for c in spaced.clients for e in c.train)
    # 3 rows x 8 subjects = 24 rows for Math/CS: 4 test (round(24/6)), 20 train; the unassigned subject is unused
    math_cs = task.client("math_cs")
    assert (len(math_cs.train), len(math_cs.test)) == (20, 4)
    assert not any(e.meta["subject"] == "professional_accounting" for c in task.clients for e in c.train + c.test)


def test_layouts_and_hf_copy_give_the_same_examples(tmp_path):
    cais = build_task({"name": "mmlu5", "data_dir": str(write_cais(tmp_path / "c")), "pool": ["test", "dev"]}, None, 5)
    orig = build_task({"name": "mmlu5", "data_dir": str(write_hendrycks(tmp_path / "h")), "pool": ["test", "dev"]},
                      None, 5)
    assert orig.info["layout"] == "hendrycks_original" and cais.info["layout"] == "cais_hf_csv"
    strip = lambda t: [(r["client"], r["split"], r["prompt"], r["answer"]) for r in t.iter_records()]  # noqa: E731
    assert strip(cais) == strip(orig)

    datasets = pytest.importorskip("datasets")
    cols: dict[str, dict[str, list]] = {}
    for split, hf_name in (("test", "test"), ("dev", "dev")):
        rows = [(s, *r) for s in sorted(ALL_SUBJECTS) for r in _rows(s, split, 3)]
        cols[hf_name] = {"question": [r[1] for r in rows], "subject": [r[0] for r in rows],
                         "choices": [r[2] for r in rows], "answer": [r[3] for r in rows]}
    dd = datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in cols.items()})
    dd.save_to_disk(str(tmp_path / "hf"))
    hf = build_task({"name": "mmlu5", "data_dir": str(tmp_path / "hf"), "pool": ["test", "dev"]}, None, 5)
    assert hf.info["layout"] == "hf"
    assert strip(hf) == strip(cais)
    with pytest.raises(ValueError, match="no split 'validation'"):
        build_task({"name": "mmlu5", "data_dir": str(tmp_path / "hf"), "pool": ["val"]}, None, 5)


def test_same_seed_same_bytes(tmp_path):
    root = str(write_cais(tmp_path))
    a = build_task({"name": "mmlu5", "data_dir": root}, None, 1)
    b = build_task({"name": "mmlu5", "data_dir": root}, None, 1)
    assert task_fingerprint(a) == task_fingerprint(b)
    assert task_fingerprint(build_task({"name": "mmlu5", "data_dir": root}, None, 2)) != task_fingerprint(a)


def test_bad_csv_rows_name_file_and_line(tmp_path):
    f = tmp_path / "x_test.csv"
    f.write_text('question,choice0,choice1,choice2,choice3,answer\n"multi\nline q",a,b,c,d,1\nq2,a,b,c,2\n')
    with pytest.raises(DataFileError, match=r"x_test\.csv:4: expected 6 columns .* got 5"):
        read_cais_csv(f, "x")
    f.write_text("question,choice0,choice1,choice2,choice3,answer\nq,a,b,c,d,B\n")
    with pytest.raises(DataFileError, match=r"x_test\.csv:2: answer must be an integer 0-3, got 'B'"):
        read_cais_csv(f, "x")
    f.write_text("q,a,b,c,d,1\n")
    with pytest.raises(DataFileError, match=r"x_test\.csv:1: expected the header"):
        read_cais_csv(f, "x")
    f.write_text("q,a,b,c,d,A\nq2,a,b,c,d,E\n")
    with pytest.raises(DataFileError, match=r"x_test\.csv:2: answer must be a letter A-D, got 'E'"):
        read_hendrycks_csv(f, "x")
    f.write_text("q,a,b,c,d,A\nq2,a,b,c,d,A,extra\n")
    with pytest.raises(DataFileError, match=r"x_test\.csv:2: expected 6 columns"):
        read_hendrycks_csv(f, "x")
    # through build_task: the error names the subject file inside the data folder
    root = write_cais(tmp_path / "data")
    (root / "test" / "virology_test.csv").write_text("question,choice0,choice1,choice2,choice3,answer\nq,a,b,c,d,9\n")
    with pytest.raises(DataFileError, match=r"virology_test\.csv:2: answer must be an integer"):
        build_task({"name": "mmlu5", "data_dir": str(root)}, None, 0)


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(SHARED_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="MMLU data not found"):
        build_task({"name": "mmlu5"}, None, 0)
    with pytest.raises(ValueError, match="task.data_dir: .*path does not exist"):
        build_task({"name": "mmlu5", "data_dir": str(tmp_path / "missing")}, None, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no MMLU data"):
        build_task({"name": "mmlu5", "data_dir": str(tmp_path / "empty")}, None, 0)
    write_cais(tmp_path / "c", splits=("test",))
    with pytest.raises(FileNotFoundError, match="split folder not found.*val"):
        build_task({"name": "mmlu5", "data_dir": str(tmp_path / "c"), "pool": ["val"]}, None, 0)
