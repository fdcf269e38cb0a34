"""The data records every task produces (the contract in ``docs/ARCHITECTURE.md``).

An :class:`Example` is one prompt with its target, a :class:`ClientData` one client's train/test lists and a
:class:`FederatedTask` the whole federation. Helpers here serialise examples to JSON and fingerprint a task, so
"same seed -> byte-identical examples" can be checked by comparing one hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

KINDS = ("mc", "qa", "text")


@dataclass(frozen=True)
class Example:
    """One example.

    ``kind`` is ``"mc"`` (multiple choice: ``prompt`` ends in ``"Answer:"``, ``choices`` are the option letters,
    ``answer`` the gold letter), ``"qa"`` (exact match: ``answer`` is the gold string) or ``"text"`` (``prompt``
    is a document for next-token cross-entropy, ``answer`` is empty). ``meta`` is JSON-able.
    """

    uid: str
    kind: str
    prompt: str
    choices: tuple[str, ...] = ()
    answer: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.choices, tuple) or not all(isinstance(c, str) for c in self.choices):
            raise ValueError(f"Example {self.uid!r}: choices must be a tuple of str, got {self.choices!r}")
        if self.kind not in KINDS:
            raise ValueError(f"Example {self.uid!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "mc" and self.answer not in self.choices:
            raise ValueError(f"Example {self.uid!r}: answer {self.answer!r} is not one of choices {self.choices}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict with the fields in declaration order."""
        return {
            "uid": self.uid,
            "kind": self.kind,
            "prompt": self.prompt,
            "choices": list(self.choices),
            "answer": self.answer,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Example:
        return cls(
            uid=d["uid"],
            kind=d["kind"],
            prompt=d["prompt"],
            choices=tuple(d.get("choices", ())),
            answer=d.get("answer", ""),
            meta=dict(d.get("meta", {})),
        )


@dataclass
class ClientData:
    """One client's examples."""

    name: str
    train: list[Example]
    test: list[Example]


@dataclass
class FederatedTask:
    """A federation: training clients, held-out clients (never trained; evaluated zero-shot) and a JSON-able
    ``info`` record (config, counts, heterogeneity report, data sources)."""

    name: str
    kind: str
    clients: list[ClientData]
    heldout: list[ClientData]
    info: dict

    def client(self, name: str) -> ClientData:
        """The client (training or held-out) called ``name``."""
        for c in [*self.clients, *self.heldout]:
            if c.name == name:
                return c
        names = [c.name for c in [*self.clients, *self.heldout]]
        raise KeyError(f"task {self.name!r} has no client {name!r}; clients: {names}")

    def iter_records(self) -> Iterator[dict[str, Any]]:
        """Every example as a flat JSON-able record with ``client``, ``split`` and ``heldout`` added."""
        for heldout, group in ((False, self.clients), (True, self.heldout)):
            for c in group:
                for split, examples in (("train", c.train), ("test", c.test)):
                    for ex in examples:
                        yield {"client": c.name, "split": split, "heldout": heldout, **ex.to_dict()}


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces, UTF-8 kept) used for hashing and JSONL output."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def task_fingerprint(task: FederatedTask) -> str:
    """sha256 over the canonical JSON of every example record (clients, splits and order included)."""
    h = hashlib.sha256()
    for rec in task.iter_records():
        h.update(canonical_json(rec).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()
