"""Small file helpers: atomic writes, text reading with an encoding fallback, located data errors."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from fednl.data.types import FederatedTask, canonical_json
from fednl.util.atomic import atomic_open


class DataFileError(ValueError):
    """A malformed data file; the message starts with ``path:line:``."""

    def __init__(self, path: str | Path, line: int | None, message: str):
        self.path = str(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    return atomic_write_lines(path, [text])


def atomic_write_lines(path: str | Path, chunks: Iterable[str]) -> Path:
    """Write the concatenated ``chunks`` to ``path`` as UTF-8, streamed and atomically
    (:func:`fednl.util.atomic.atomic_open`: temp file in the same folder, fsync, then replace)."""
    path = Path(path)
    umask = os.umask(0)
    os.umask(umask)
    with atomic_open(path, mode=0o666 & ~umask) as f:  # mkstemp creates 0600; give the file the usual permissions
        for chunk in chunks:
            f.write(chunk.encode("utf-8"))  # newlines written as they are, like text mode with newline="\n"
    return path


def write_task_jsonl(task: FederatedTask, path: str | Path) -> Path:
    """Write every example of ``task`` as one canonical-JSON line (see :meth:`FederatedTask.iter_records`)."""
    return atomic_write_lines(path, (canonical_json(rec) + "\n" for rec in task.iter_records()))


def read_text(path: str | Path) -> str:
    """Read a text file as UTF-8, falling back to Latin-1 (some Gutenberg files); newlines normalised to ``\\n``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")
