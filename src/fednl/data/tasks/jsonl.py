"""User data in JSONL: multiple-choice or exact-match QA records, one JSON object per line.

Multiple choice::

    {"question": "...", "choices": ["...", "...", ...], "answer": "B" or 1, "client": "...", "split": "train"}

Exact-match QA::

    {"context": "...", "question": "...", "answer": "...", "client": "...", "split": "test"}

``client``, ``split`` (``"train"``/``"test"``) and ``context`` are optional; ``answer`` of a multiple-choice
record is a letter or a 0-based index into ``choices`` (2 to 26 options). Every other field is kept in
``meta["fields"]``; ``label_field`` names the one used as the partition label. Records without ``client`` are
dealt to clients by the configured partition; records without ``split`` are split with ``test_fraction`` per
client (seeded). Blank lines are skipped; a bad line raises an error naming the file and the line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PositiveInt

from fednl.data.config import TaskConfigBase
from fednl.data.io import DataFileError, read_text
from fednl.data.prompts import LETTERS, format_mc, format_qa, letters
from fednl.data.tasks.base import NaturalTask, register_task, rng_for
from fednl.data.types import ClientData, Example

@register_task
class JsonlConfig(TaskConfigBase):
    """Your own data: JSONL multiple-choice or exact-match QA records (format in docs/DATA.md)."""

    name: Literal["jsonl"] = "jsonl"
    path: Path
    """A ``.jsonl`` file or a folder whose ``*.jsonl`` files are read in name order."""
    format: Literal["auto", "mc", "qa"] = "auto"
    test_fraction: float = Field(0.2, gt=0, lt=1)
    label_field: str | None = None
    """Record field used as the label by dirichlet/pathological partitioning and the heterogeneity report
    (default: the ``client`` field)."""
    max_train: PositiveInt | None = None
    max_test: PositiveInt | None = None
    separator: Literal["newline", "space"] = "newline"

    def natural(self, tokenizer: Any, seed: int) -> NaturalTask:
        return build_jsonl(self, tokenizer, seed)


RESERVED = {"question", "choices", "answer", "client", "split", "context"}
POOL_CLIENT = "all"


@dataclass
class Record:
    kind: str
    question: str
    answer: str  # mc: gold letter
    choices: tuple[str, ...]
    context: str | None
    client: str | None
    split: str | None
    fields: dict
    source: str


def _str_field(rec: dict, key: str, path: Path, line: int, required: bool) -> str | None:
    if key not in rec:
        if required:
            raise DataFileError(path, line, f"missing field {key!r}")
        return None
    value = rec[key]
    if not isinstance(value, str) or not value.strip():
        raise DataFileError(path, line, f"field {key!r} must be a non-empty string, got {value!r}")
    return value


def parse_record(rec: object, path: Path, line: int, fmt: str) -> Record:
    """Validate one decoded JSON line into a :class:`Record` (``fmt``: ``auto``, ``mc`` or ``qa``)."""
    if not isinstance(rec, dict):
        raise DataFileError(path, line, f"expected a JSON object, got {type(rec).__name__}")
    kind = ("mc" if "choices" in rec else "qa") if fmt == "auto" else fmt
    question = _str_field(rec, "question", path, line, True)
    context = _str_field(rec, "context", path, line, False)
    client = _str_field(rec, "client", path, line, False)
    split = _str_field(rec, "split", path, line, False)
    if split is not None and split not in ("train", "test"):
        raise DataFileError(path, line, f"field 'split' must be 'train' or 'test', got {split!r}")
    if "answer" not in rec:
        raise DataFileError(path, line, "missing field 'answer'")
    answer = rec["answer"]
    choices: tuple[str, ...] = ()
    if kind == "mc":
        if "choices" not in rec:
            raise DataFileError(path, line, "missing field 'choices' (format is 'mc')")
        raw = rec["choices"]
        if not isinstance(raw, list) or not 2 <= len(raw) <= len(LETTERS) or not all(isinstance(c, str) for c in raw):
            raise DataFileError(path, line, f"'choices' must be a list of 2-{len(LETTERS)} strings, got {raw!r}")
        choices = tuple(raw)
        opts = letters(len(choices))
        if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
            answer = opts[answer]
        elif not (isinstance(answer, str) and answer.strip() in opts):
            raise DataFileError(
                path, line,
                f"'answer' must be a letter {opts[0]}-{opts[-1]} or an index 0-{len(choices) - 1}, got {answer!r}",
            )
        answer = answer.strip()
    else:
        if "choices" in rec:
            raise DataFileError(path, line, "a 'choices' field in a qa record (format is 'qa')")
        if not isinstance(answer, str) or not answer.strip():
            raise DataFileError(path, line, f"'answer' must be a non-empty string, got {answer!r}")
        answer = answer.strip()
    fields = {k: v for k, v in rec.items() if k not in RESERVED}
    return Record(kind, question, answer, choices, context, client, split, fields, f"{path.name}:{line}")


def read_jsonl(path: Path, fmt: str) -> list[Record]:
    out = []
    for line, raw in enumerate(read_text(path).split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataFileError(path, line, f"invalid JSON ({err.msg} at column {err.colno})") from None
        out.append(parse_record(rec, path, line, fmt))
    return out


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no .jsonl files in folder {path}")
    return files


def _check_consistency(records: list[Record]) -> None:
    first = records[0]
    for r in records:
        if r.kind != first.kind:
            raise ValueError(
                f"{r.source}: a {r.kind} record, but {first.source} is {first.kind}; one task has one kind"
            )
        if (r.client is None) != (first.client is None):
            lacking = r if r.client is None else first
            raise ValueError(f"{lacking.source}: no 'client' field, but other records have one (all or none)")


def build_jsonl(cfg: JsonlConfig, tokenizer, seed: int) -> NaturalTask:
    del tokenizer
    files = _files(Path(cfg.path))
    records = [r for f in files for r in read_jsonl(f, cfg.format)]
    if not records:
        raise ValueError(f"no records in {cfg.path}")
    _check_consistency(records)
    if records[0].client is None and cfg.partition.kind == "natural":
        raise ValueError(
            f"{records[0].source}: records have no 'client' field; set task.partition.kind to iid, dirichlet, "
            "pathological or long_tail (with n_clients) so the partitioner deals them to clients"
        )
    if cfg.label_field is not None:
        for r in records:
            if cfg.label_field not in r.fields:
                raise ValueError(f"{r.source}: missing the label field {cfg.label_field!r}")
    elif records[0].client is None and cfg.partition.kind in ("dirichlet", "pathological"):
        raise ValueError(f"partition kind {cfg.partition.kind!r} needs task.label_field (records have no 'client')")
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(r.client or POOL_CLIENT, []).append(r)
    clients = []
    for name, recs in groups.items():
        unsplit = [i for i, r in enumerate(recs) if r.split is None]
        rng_for("jsonl", seed, name).shuffle(unsplit)
        n_test = math.floor(len(unsplit) * cfg.test_fraction + 0.5)
        test_idx = set(unsplit[:n_test])
        split_of = [r.split or ("test" if i in test_idx else "train") for i, r in enumerate(recs)]
        out: dict[str, list[Example]] = {"train": [], "test": []}
        caps = {"train": cfg.max_train, "test": cfg.max_test}
        for r, s in zip(recs, split_of):
            if caps[s] is not None and len(out[s]) >= caps[s]:
                continue
            label = r.fields[cfg.label_field] if cfg.label_field else (r.client or POOL_CLIENT)
            if r.kind == "mc":
                prompt = format_mc(r.question, r.choices, cfg.separator)
                prompt = f"{r.context.rstrip()}\n\n{prompt}" if r.context else prompt
            else:
                prompt = format_qa(r.question, r.context)
            meta = {"client": name, "split": s, "source": r.source, "label": str(label), "fields": r.fields}
            out[s].append(
                Example(uid=f"jsonl/{name}/{s}/{len(out[s]):05d}", kind=r.kind, prompt=prompt,
                        choices=letters(len(r.choices)) if r.kind == "mc" else (), answer=r.answer, meta=meta)
            )
        clients.append(ClientData(name=name, train=out["train"], test=out["test"]))
    info = {"files": [f.name for f in files], "n_records": len(records)}
    return NaturalTask(kind=records[0].kind, label_key="label", clients=clients, info=info)
