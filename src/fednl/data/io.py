"""Small file helpers: atomic writes, text reading with an encoding fallback, located data errors."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from fednl.data.types import FederatedTask, canonical_json


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
    """Write the concatenated ``chunks`` to ``path`` atomically (temp file in the same folder, then replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
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
