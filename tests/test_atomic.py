"""The one atomic-write core (``fednl.util.atomic.atomic_open``) behind both public writers."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from fednl.data.io import atomic_write_lines
from fednl.util.atomic import atomic_open, atomic_write_bytes, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_engine_writer_returns_sha256_and_keeps_mkstemp_permissions(tmp_path) -> None:
    path = tmp_path / "sub" / "a.bin"
    assert atomic_write_bytes(path, b"\x00\x01") == hashlib.sha256(b"\x00\x01").hexdigest()
    assert path.read_bytes() == b"\x00\x01" and _mode(path) == 0o600
    assert atomic_write_text(path, "é\n") == hashlib.sha256("é\n".encode()).hexdigest()
    assert path.read_bytes() == "é\n".encode()


def test_data_writer_streams_utf8_with_umask_permissions(tmp_path) -> None:
    umask = os.umask(0o022)
    try:
        path = atomic_write_lines(tmp_path / "d" / "x.jsonl", iter(["a\r\n", "é", "\n"]))
    finally:
        os.umask(umask)
    assert path.read_bytes() == "a\r\né\n".encode() and _mode(path) == 0o644


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path) -> None:
    path = tmp_path / "f.txt"
    path.write_text("old")

    def chunks():
        yield "new"
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write_lines(path, chunks())
    with pytest.raises(UnicodeEncodeError):
        atomic_write_lines(path, ["\ud800"])
    with pytest.raises(KeyError), atomic_open(path) as fh:
        fh.write(b"partial")
        raise KeyError("x")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
