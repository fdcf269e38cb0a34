"""MMLU readers: the two CSV layouts and a Hugging Face ``datasets`` copy saved on disk.

* ``cais_hf_csv``: ``<split>/<subject>_<split>.csv`` with header ``question,choice0,choice1,choice2,choice3,answer``
  and an integer answer 0-3 (the content of HF ``cais/mmlu``).
* ``hendrycks_original``: the same file names, no header, ``question,A,B,C,D,answer_letter``.
* ``hf``: a folder written by ``DatasetDict.save_to_disk`` (e.g. ``cais/mmlu`` config ``all``) with columns
  ``question``, ``subject``, ``choices`` (4 strings) and ``answer`` (0-3); splits ``test``, ``validation``,
  ``dev``. Read with ``datasets.load_from_disk``; nothing is downloaded.

Every malformed row raises :class:`~fednl.data.io.DataFileError` naming the file and line.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from fednl.data.io import DataFileError

CAIS_HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
HF_SPLITS = {"test": "test", "dev": "dev", "val": "validation"}
LAYOUTS = ("cais_hf_csv", "hendrycks_original", "hf")


@dataclass(frozen=True)
class MmluRow:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # 0..3
    source: str  # "file:line" or "hf:<split>:<row>"


def _records(path: Path):
    """Yield ``(first_line_number, fields)`` for each CSV record (quoted fields may span lines)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        start = 1
        for fields in reader:
            yield start, fields
            start = reader.line_num + 1


def read_cais_csv(path: str | Path, subject: str, label: str | None = None) -> list[MmluRow]:
    """Rows of one ``cais_hf_csv`` file (header, integer answer)."""
    path = Path(path)
    rows: list[MmluRow] = []
    for line, fields in _records(path):
        if line == 1:
            if fields != CAIS_HEADER:
                raise DataFileError(path, 1, f"expected the header {','.join(CAIS_HEADER)}, got {fields[:6]}")
            continue
        if len(fields) != 6:
            raise DataFileError(path, line, f"expected 6 columns (question, 4 choices, answer), got {len(fields)}")
        ans = fields[5].strip()
        if ans not in ("0", "1", "2", "3"):
            raise DataFileError(path, line, f"answer must be an integer 0-3, got {fields[5]!r}")
        rows.append(MmluRow(subject, fields[0], tuple(fields[1:5]), int(ans), f"{label or path.name}:{line}"))
    return rows


def read_hendrycks_csv(path: str | Path, subject: str, label: str | None = None) -> list[MmluRow]:
    """Rows of one ``hendrycks_original`` file (no header, answer letter A-D)."""
    path = Path(path)
    rows: list[MmluRow] = []
    for line, fields in _records(path):
        if len(fields) != 6:
            raise DataFileError(path, line, f"expected 6 columns (question, A, B, C, D, answer), got {len(fields)}")
        ans = fields[5].strip()
        if ans not in ("A", "B", "C", "D"):
            raise DataFileError(path, line, f"answer must be a letter A-D, got {fields[5]!r}")
        rows.append(MmluRow(subject, fields[0], tuple(fields[1:5]), "ABCD".index(ans), f"{label or path.name}:{line}"))
    return rows


def detect_layout(data_dir: Path, layout: str = "auto") -> tuple[str, Path]:
    """``(layout, root)`` where ``root`` holds ``<split>/`` folders (CSV) or the saved dataset (hf)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"MMLU data folder not found: {data_dir}")
    if layout in ("cais_hf_csv", "hendrycks_original"):
        root = data_dir / layout if (data_dir / layout).is_dir() else data_dir
        return layout, root
    if layout == "hf" or (data_dir / "dataset_dict.json").is_file() or (data_dir / "dataset_info.json").is_file():
        return "hf", data_dir
    for name in ("cais_hf_csv", "hendrycks_original"):
        if (data_dir / name).is_dir():
            return name, data_dir / name
    csvs = sorted(data_dir.glob("*/*.csv"))
    if csvs:
        with open(csvs[0], newline="", encoding="utf-8") as f:
            first = next(csv.reader(f), [])
        return ("cais_hf_csv" if first == CAIS_HEADER else "hendrycks_original"), data_dir
    raise FileNotFoundError(
        f"no MMLU data in {data_dir}: expected cais_hf_csv/ or hendrycks_original/ (or <split>/<subject>_<split>.csv"
        " files), or a HF datasets folder saved with save_to_disk"
    )


def read_csv_split(layout: str, root: Path, split: str, subjects: list[str]) -> list[MmluRow]:
    """Rows of ``subjects`` (in that order) from ``root/<split>/<subject>_<split>.csv``."""
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(f"MMLU split folder not found: {folder} (the {layout} layout has no {split!r} split?)")
    reader = read_cais_csv if layout == "cais_hf_csv" else read_hendrycks_csv
    rows: list[MmluRow] = []
    for subject in subjects:
        path = folder / f"{subject}_{split}.csv"
        if not path.is_file():
            raise FileNotFoundError(f"MMLU file not found: {path}")
        rows += reader(path, subject, label=f"{layout}/{split}/{path.name}")
    return rows


def read_hf_split(root: Path, split: str, subjects: list[str]) -> list[MmluRow]:
    """Rows of ``subjects`` from a saved HF dataset (``datasets`` is imported lazily)."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets ships with the flower extra
        raise ImportError(
            "reading a HF datasets copy of MMLU needs the 'datasets' package (pip install datasets)"
        ) from err
    ds = datasets.load_from_disk(str(root))
    name = HF_SPLITS[split]
    if isinstance(ds, datasets.DatasetDict):
        if name not in ds:
            raise ValueError(f"HF dataset {root} has no split {name!r}; splits: {sorted(ds)}")
        ds = ds[name]
    missing = {"question", "subject", "choices", "answer"} - set(ds.column_names)
    if missing:
        raise ValueError(f"HF dataset {root} split {name!r} lacks column(s) {sorted(missing)}")
    wanted = set(subjects)
    by_subject: dict[str, list[MmluRow]] = {s: [] for s in subjects}
    for i, rec in enumerate(ds):
        if rec["subject"] not in wanted:
            continue
        where = f"hf:{name}:{i}"
        choices = list(rec["choices"])
        if len(choices) != 4:
            raise DataFileError(root, None, f"{where}: expected 4 choices, got {len(choices)}")
        if rec["answer"] not in (0, 1, 2, 3):
            raise DataFileError(root, None, f"{where}: answer must be an integer 0-3, got {rec['answer']!r}")
        row = MmluRow(rec["subject"], rec["question"], tuple(choices), int(rec["answer"]), where)
        by_subject[rec["subject"]].append(row)
    return [row for s in subjects for row in by_subject[s]]
