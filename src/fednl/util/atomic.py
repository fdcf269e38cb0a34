"""Atomic file writes: write to a temporary file in the same directory, fsync, then ``os.replace``.

A reader never sees a half-written file: either the old content or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


@contextmanager
def atomic_open(path: str | os.PathLike[str], *, mode: int | None = None) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new content into: a temporary file in the same directory (created by
    ``mkstemp``, so 0600 unless ``mode`` sets its permission bits). When the block ends normally the file is
    flushed, fsynced and moved onto ``path`` with ``os.replace``; when it raises, the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> str:
    """Write ``data`` to ``path`` atomically and return its sha256 hex digest."""
    with atomic_open(path) as fh:
        fh.write(data)
    return hashlib.sha256(data).hexdigest()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> str:
    """Write UTF-8 ``text`` atomically; returns the sha256 of the bytes written."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> str:
    """Write ``obj`` as indented JSON atomically; returns the sha256 of the bytes written."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
