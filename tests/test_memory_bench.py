"""`fednl bench memory` machinery at tiny shapes (the real figures come from running the benchmark)."""

from __future__ import annotations

import json

import pytest
import torch

from fednl.bench import memory as bench


def test_run_prints_one_json_record_per_length(capsys) -> None:
    threads = torch.get_num_threads()
    records = bench.run(json_out=True, repeats=1, lengths=(8, 20), batch=1, heads=1, dim=4, threads=1)
    printed = json.loads(capsys.readouterr().out)
    assert printed == records
    assert [r["T"] for r in printed] == [8, 20]
    for r in printed:
        assert set(r) == {"T", "recurrent_s", "chunk_s", "speedup", "max_abs_err"}
        assert r["recurrent_s"] > 0 and r["chunk_s"] > 0
        assert r["speedup"] == pytest.approx(r["recurrent_s"] / r["chunk_s"], rel=0.05, abs=0.01)
        assert 0 <= r["max_abs_err"] < 1e-4  # both modes compute the same outputs
    assert torch.get_num_threads() == threads  # restored


def test_run_prints_a_table_without_json(capsys) -> None:
    bench.run(json_out=False, repeats=1, lengths=(6,), batch=1, heads=1, dim=4, threads=1)
    out = capsys.readouterr().out
    assert "recurrent s" in out and "speedup" in out


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="repeats must be >= 1; got 0"):
        bench.measure(repeats=0)
    with pytest.raises(ValueError, match="lengths must be a non-empty list"):
        bench.measure(lengths=())
