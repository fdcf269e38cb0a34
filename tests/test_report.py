"""`fednl report`: every panel for real tiny runs, explicit notes for missing data, self-containment, the
results table's numbers, and clear errors for bad inputs."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fednl.cli import app
from fednl.config import load_config
from fednl.experiment import run_config
from fednl.eval.protocol import write_eval
from fednl.report import build_report, load_run_dir, read_bench, read_metrics, results_rows, write_report

TINY = ["rounds=1", "task.templates=['passkey', 'uuid']", "task.train_lengths=[768]", "task.test_lengths=[768]",
        "train.seq_len=768"]
BENCH = [{"model": "converted", "tokens": n, "peak_rss_mb": 1169.0 + n / 1e4, "stream_peak_rss_mb": 1169.0}
         for n in (1024, 4096)] + [{"model": "baseline", "tokens": n, "peak_rss_mb": 1100.0 + n / 10,
                                    "stream_peak_rss_mb": None} for n in (1024, 4096)]
IMG = re.compile(r"<img alt='[^']*' src='data:image/png;base64,[A-Za-z0-9+/=]+'>")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("report")
    out = {}
    for method in ("fednl", "fedavg"):
        cfg = load_config("tiny", [*TINY, f"method={method}"])
        run_config(cfg, tmp / method, log=lambda s: None)
        out[method] = tmp / method
    write_eval(out["fednl"], aggregation=False)
    bench = tmp / "bench.json"
    bench.write_text(json.dumps(BENCH))
    out["bench"] = bench
    return out


def _panel(page: str, key: str) -> str:
    start = page.index(f"id='panel-{key}'")
    end = page.find("<div class='panel'", start)
    return page[start:end if end > 0 else len(page)]


def test_every_panel_with_full_data(runs, tmp_path) -> None:
    path = write_report([runs["fednl"], runs["fedavg"]], tmp_path / "report.html", memory_bench=runs["bench"])
    page = path.read_text()
    for key in ("per-client", "depth", "position", "memory", "bytes"):  # NIAH: CE over the prompt stream
        assert IMG.search(_panel(page, key)), key
        assert "Not available" not in _panel(page, key), key
    assert "fednl (fednl" in page and "fedavg (fedavg" in page
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # atomic write


def test_missing_data_is_said_not_plotted(runs) -> None:
    page = build_report([runs["fedavg"]])  # no eval.json, no bench
    assert len(IMG.findall(page)) == 2  # per-client bars and cumulative bytes
    for key in ("depth", "position", "memory"):
        assert "Not available" in _panel(page, key) and "<img" not in _panel(page, key)


def test_self_contained(runs) -> None:
    page = build_report([runs["fednl"], runs["fedavg"]], memory_bench=runs["bench"])
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:|//)", page)
    assert "<script" not in page and "<link" not in page and "http://" not in page and "https://" not in page


def test_results_table_numbers(runs) -> None:
    rows = results_rows([load_run_dir(runs["fednl"]), load_run_dir(runs["fedavg"])])
    for row, method in zip(rows, ("fednl", "fedavg")):
        res = json.loads((runs[method] / "results.json").read_text())
        accs = [m["accuracy"] for m in res["clients"].values()]
        mean = sum(accs) / len(accs)
        assert row["mean"] == pytest.approx(mean) and row["worst"] == min(accs)
        assert row["std"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs)))
        per = res["comm"]["per_round"]
        assert row["bytes_per_round"] == sum(p["bytes_up"] + p["bytes_down"] for p in per) / len(per)
    assert rows[0]["memory_off"] is not None and rows[1]["memory_off"] is None  # eval.json only for fednl
    assert rows[0]["bytes_per_round"] < rows[1]["bytes_per_round"]  # FedNL sends only the memory rules


def test_missing_results_json(runs, tmp_path) -> None:
    d = tmp_path / "run"
    shutil.copytree(runs["fedavg"], d)
    (d / "results.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(d / "results.json"))):
        build_report([d])


def test_corrupted_metrics_line_names_file_and_line(runs, tmp_path) -> None:
    d = tmp_path / "run"
    shutil.copytree(runs["fedavg"], d)
    lines = (d / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:25]  # truncated JSON on line 2
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{d / 'metrics.jsonl'}:2: corrupted metrics line")):
        build_report([d])
    (d / "metrics.jsonl").write_text('{"type": "round", "round": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: round record lacks \[.*'bytes_up', 'bytes_down'"):
        read_metrics(d / "metrics.jsonl")
    (d / "metrics.jsonl").write_text('{"type": "eval", "round": "one", "client": "a"}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: round: Input should be a valid integer"):
        read_metrics(d / "metrics.jsonl")
    (d / "metrics.jsonl").write_text('{"type": "nope"}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: expected an object with type 'round', 'eval' or 'stop'"):
        read_metrics(d / "metrics.jsonl")


def test_bad_results_and_bench(runs, tmp_path) -> None:
    d = tmp_path / "run"
    shutil.copytree(runs["fedavg"], d)
    (d / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="results.json: not valid JSON"):
        build_report([d])
    (d / "results.json").write_text('{"method": "fedavg", "task": "niah7"}')
    with pytest.raises(ValueError, match=r"results.json: results lacks \['clients', 'mean', 'comm', 'wall_s'\]"):
        build_report([d])
    bad = tmp_path / "bench.json"
    bad.write_text('{"model": "converted"}')
    with pytest.raises(ValueError, match="expected a JSON list of objects"):
        read_bench(bad)
    with pytest.raises(FileNotFoundError, match="memory bench file"):
        read_bench(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="no run directories"):
        build_report([])


def test_cli(runs, tmp_path) -> None:
    out = tmp_path / "r.html"
    res = CliRunner().invoke(app, ["report", str(runs["fedavg"]), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.is_file() and "wrote" in res.output
    res = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_seed_groups_and_markdown(runs, tmp_path) -> None:
    from fednl.report.seeds import markdown_table, mean_std, seed_groups

    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0) and mean_std([5.0]) == (5.0, 0.0)
    dirs = []
    for name, seed, edit in (("a", 0, None), ("b", 1, None), ("c", 0, ("r = 4", "r = 8"))):
        d = tmp_path / name
        shutil.copytree(runs["fedavg"], d)
        cfg = re.sub(r"(?m)^seed = 0$", f"seed = {seed}", (d / "config.resolved.toml").read_text())
        if edit:
            assert edit[0] in cfg
            cfg = cfg.replace(*edit)
        (d / "config.resolved.toml").write_text(cfg)
        res = json.loads((d / "results.json").read_text())
        res["seed"] = seed
        (d / "results.json").write_text(json.dumps(res))
        dirs.append(d)
    groups = seed_groups([load_run_dir(d) for d in dirs])
    assert [g["seeds"] for g in groups] == [[0, 1], [0]]
    assert groups[0]["variant"] == "lora.r=4" and groups[1]["variant"] == "lora.r=8"
    assert groups[0]["mean"][1] == 0.0  # identical copies: zero spread
    md = markdown_table(groups)
    assert md.count("\n") == 4 and "| fedavg | niah7 | lora.r=4 | 0,1 | accuracy |" in md
    page = build_report(dirs)
    assert "Across seeds" in page
