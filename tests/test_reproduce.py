"""`fednl reproduce`: the plan's shape, every job's config validates, and the smoke plan end to end (tiny model)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fednl.cli import app
from fednl.config import load_config
from fednl.records import (
    AggregationDrop,
    Comm,
    DepthCell,
    DepthView,
    EvalReport,
    PooledCurve,
    PositionCurve,
    PositionView,
    Results,
)
from fednl.reproduce import ABLATIONS, PAPER_BASELINES, build_plan, job_commands, shell_line, write_tables


def test_cpu_plan_covers_every_method_and_seed() -> None:
    plan = build_plan("cpu", [0, 1, 2])
    names = {(j.experiment, j.name) for j in plan.jobs}
    assert len(names) == len(plan.jobs) == 3 * (2 * len(PAPER_BASELINES) + len(ABLATIONS) + 1)
    for seed in (0, 1, 2):
        for exp in ("mmlu5", "niah7"):
            assert {(exp, f"{m}-s{seed}") for m in PAPER_BASELINES} <= names
        assert {("stream", f"{v}-s{seed}") for v in [*ABLATIONS, "fedavg"]} <= names
    # seed-major: all of seed 0 before any of seed 1
    seeds = [int(j.name.rsplit("-s", 1)[1]) for j in plan.jobs]
    assert seeds == sorted(seeds)
    # the aggregation drop (Fig. 3) is measured where the paper reports it
    assert {j.experiment for j in plan.jobs if j.aggregation_drop} == {"mmlu5"}


def test_every_cpu_job_config_validates() -> None:
    """Each job's preset + overrides loads as exactly one run with the intended method, seed and variant."""
    for job in build_plan("cpu", [7]).jobs:
        cfg = load_config(job.preset, list(job.sets))
        assert cfg.seed == 7 and cfg.engine.threads == 1
        label = job.name.rsplit("-s", 1)[0]
        if job.experiment == "stream":
            assert cfg.method.name == ("fedavg" if label == "fedavg" else "fednl")
            if label == "hebbian":
                assert cfg.memory.rule == "hebbian"
            if label == "fixed-gate":
                assert cfg.memory.gate == "fixed"
            if label == "lora-frozen":
                assert cfg.lora.trainable is False
        else:
            assert cfg.method.name == label
            if label == "fednl":
                assert cfg.method.options.scope == "rules"


def test_bad_plan_and_seeds() -> None:
    with pytest.raises(ValueError, match="unknown plan 'nope'; known plans: cpu, memory, memory-smoke, smoke"):
        build_plan("nope", [0])
    with pytest.raises(ValueError, match="at least one seed"):
        build_plan("cpu", [])
    res = CliRunner().invoke(app, ["reproduce", "cpu", "--seeds", "0,x", "--dry-run"])
    assert res.exit_code == 2 and "comma-separated integers" in res.output


def test_dry_run_prints_user_commands(tmp_path) -> None:
    res = CliRunner().invoke(app, ["reproduce", "cpu", "--seeds", "0", "--out", str(tmp_path), "--dry-run"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 2 * len(build_plan("cpu", [0]).jobs)  # run + evaluate per job
    assert lines[0].startswith("fednl run paper-pg19-ablation-cpu --out ") and "--set seed=0" in lines[0]
    assert any("--set method=ffa_lora" in x for x in lines)
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_smoke_plan_end_to_end_and_resume(tmp_path) -> None:
    out = tmp_path / "repro"
    res = CliRunner().invoke(app, ["reproduce", "smoke", "--seeds", "0", "--out", str(out), "--jobs", "2"])
    assert res.exit_code == 0, res.output
    assert "4 jobs, 0 already done" in res.output
    plan = build_plan("smoke", [0])
    for job in plan.jobs:
        run = job.run_dir(out)
        assert (run / "results.json").is_file() and (run / "eval.json").is_file()
        assert job_commands(job, out) == []
        assert json.loads((run / "eval.json").read_text())["seed"] == 0
    drop = json.loads((out / "niah7" / "fednl-s0" / "eval.json").read_text())["aggregation_drop"]
    assert drop["clients"]  # the smoke plan's NIAH jobs measure it
    tables = (out / "tables.md").read_text()
    assert "### Streaming text (tiny model)" in tables and "### NIAH (tiny model)" in tables
    main_rows = [x for x in tables.splitlines() if x.startswith("| fednl | ") and "| 0 |" in x]
    assert len(main_rows) == 2  # one across-seed row per experiment (seeds column "0")
    for caption in ("Per-client personalised metric", "NIAH accuracy by needle depth (Fig. 4)",
                    "CE by position, relative to the first bin (Fig. 5)"):
        assert caption in tables, caption
    assert (out / "stream" / "report.html").is_file() and (out / "niah7" / "report.html").is_file()
    # a second call finds everything done and only rewrites the tables
    res = CliRunner().invoke(app, ["reproduce", "smoke", "--seeds", "0", "--out", str(out)])
    assert res.exit_code == 0 and "4 already done" in res.output


def test_failed_job_is_reported_and_exit_is_nonzero(tmp_path, monkeypatch) -> None:
    import fednl.reproduce as rep

    plan = build_plan("smoke", [0])
    broken = [rep.Job(j.experiment, j.name, "no-such-preset", j.sets) for j in plan.jobs[:1]]
    monkeypatch.setitem(rep.PLANS, "smoke", lambda seeds, threads: rep.Plan("smoke", broken, plan.titles))
    res = CliRunner().invoke(app, ["reproduce", "smoke", "--seeds", "0", "--out", str(tmp_path)])
    assert res.exit_code == 1
    assert "1 job(s) failed" in res.output and "exited with 2" in res.output
    log = (tmp_path / broken[0].experiment / f"{broken[0].name}.log").read_text()
    assert "no-such-preset" in log
    assert "Not run." in (tmp_path / "tables.md").read_text()


def test_tables_list_unfinished_experiments(tmp_path) -> None:
    path = write_tables(build_plan("smoke", [0]), tmp_path)
    assert path.read_text().count("Not run.") == 2


def test_shell_line_quotes() -> None:
    from fednl.reproduce import fednl_command

    assert shell_line([*fednl_command(), "run", "x", "--set", "task={name='stream'}"]) == \
        "fednl run x --set 'task={name='\"'\"'stream'\"'\"'}'"


def results(seed: int, clients: dict[str, dict[str, float]], metric: str) -> Results:
    """A hand-made results record (no traffic)."""
    return Results(method="fednl", task="niah7", seed=seed, clients=clients,
                   mean={metric: sum(m[metric] for m in clients.values()) / len(clients)},
                   comm=Comm(bytes_up=0, bytes_down=0, per_round=[], by_group={}), wall_s=1.0)


def test_curve_table_hand_computed(tmp_path) -> None:
    from fednl.report.load import RunRecord
    from fednl.report.seeds import curve_table

    def run(seed: int, acc: dict[str, float], rel: list[float]) -> RunRecord:
        res = results(seed, {c: {"accuracy": a, "n": 4.0} for c, a in acc.items()}, "accuracy")
        curve = PositionCurve(bin_size=64, bin_start=[0, 64], ce=[1.0, 1.0 + rel[1]], relative=rel, tokens=128, n=1,
                              ce_mean=1.0)
        cell = DepthCell(accuracy=acc["a"], n=4.0)
        ev = EvalReport(run_dir="r", method="fednl", model="tiny/titans", task="niah7", task_kind="mc", rounds=1,
                        seed=seed, metric="accuracy", higher_is_better=True, titans=True, views={},
                        aggregation_drop=AggregationDrop(round=2, clients={}, summary=None),
                        depth={"personalised": DepthView(clients={"a": {"0.10": cell}}, pooled={"0.10": cell})},
                        position={"personalised": PositionView(clients={"a": curve}, pooled=PooledCurve(
                            bin_start=[0, 64], ce=[1.0, 1.0 + rel[1]], relative=rel))}, wall_s=0.0)
        return RunRecord(tmp_path / f"s{seed}", res, evaluation=ev)

    runs = [run(0, {"a": 0.25, "b": 0.5}, [0.0, -0.1]), run(1, {"a": 0.75, "b": 0.5}, [0.0, 0.1])]
    group = [{"method": "fednl", "variant": "", "runs": runs}]
    clients = curve_table(group, "clients")
    # a: mean 0.5, sample std sqrt(((0.25-0.5)^2 + (0.75-0.5)^2) / 1) = 0.354; b: 0.5 ± 0
    assert "| fednl | 0.500 ± 0.354 | 0.500 ± 0.000 |" in clients and "| method | a | b |" in clients
    pos = curve_table(group, "position")
    assert "| fednl | 0.000 ± 0.000 | 0.000 ± 0.141 |" in pos  # -0.1 and 0.1: std sqrt(0.02) = 0.141
    assert "| fednl | 0.500 ± 0.354 |" in curve_table(group, "depth")
    assert curve_table(group, "depth", "memory_off") == ""  # no data: no table
    with pytest.raises(ValueError, match="kind must be"):
        curve_table(group, "bytes")


def test_paper_table_units(tmp_path) -> None:
    import math

    from fednl.report.load import RunRecord
    from fednl.reproduce import paper_table

    def run(seed: int, metric: str, vals: list[float]) -> RunRecord:
        clients = {f"c{i}": {metric: v, "n": 1.0} for i, v in enumerate(vals)}
        return RunRecord(tmp_path / f"s{seed}", results(seed, clients, metric))

    # perplexity = exp(client-mean CE) per run: exp(1) and exp(2) -> mean 5.0537, sample std 3.3028
    g = [{"method": "fednl", "variant": "hebbian", "runs": [run(0, "ce", [0.5, 1.5]), run(1, "ce", [2.0, 2.0])]}]
    e1, e2 = math.exp(1.0), math.exp(2.0)
    assert f"| hebbian | 1576.42 | {(e1 + e2) / 2:.2f} ± {abs(e2 - e1) / math.sqrt(2):.2f} | 2 |" in paper_table("stream", g)
    g = [{"method": "fedavg", "variant": "", "runs": [run(0, "accuracy", [0.25, 0.5])]}]
    assert "| fedavg | 18.3 | 37.50 ± 0.00 | 1 |" in paper_table("niah7", g)


def test_memory_plan_jobs_validate_and_use_the_memory_evaluation() -> None:
    from fednl.reproduce import MEMORY_VARIANTS

    plan = build_plan("memory", [0, 1, 2])
    assert len(plan.jobs) == 3 * len(MEMORY_VARIANTS)
    for job in plan.jobs:
        assert job.evaluation == "memory" and job.eval_file() == "memory_eval-heldout.json"
        cfg = load_config(job.preset, list(job.sets))
        label = job.name.rsplit("-s", 1)[0]
        assert cfg.memory.attn_window == 64 and cfg.memory.sinks == 4
        assert cfg.task.heldout == ["austen-persuasion", "chesterton-brown"]
        assert cfg.method.name == {"fednl": "fednl", "local": "local", "centralised": "fednl",
                                   "fedavg-window": "fedavg"}[label]
        if label == "centralised":  # the pooled books get the federation's total number of steps
            assert cfg.task.pooled and cfg.train.max_steps == 5 * load_config("memory-cpu").train.max_steps
    for job in build_plan("memory-smoke", [0]).jobs:
        assert load_config(job.preset, list(job.sets)).model.source == "tiny"


def test_memory_table_from_evaluations(tmp_path) -> None:
    from fednl.reproduce import memory_table

    plan = build_plan("memory", [0, 1])
    jobs = [j for j in plan.jobs if j.name.startswith("fednl-")]

    def ranges(ce_in, ce_out):
        return {"ranges": [{"start": 1, "end": 64, "tokens": 10, "ce": ce_in},
                           {"start": 256, "end": None, "tokens": 10, "ce": ce_out}]}

    for k, j in enumerate(jobs):
        d = j.run_dir(tmp_path)
        d.mkdir(parents=True)
        pooled = {"ranges": [[1, 64], [256, None]], "memory": ranges(4.0, 3.5 - 0.1 * k), "zeroed": ranges(4.0, 3.7),
                  "window": ranges(4.0, 3.7), "full": ranges(4.0, 3.3)}
        pooled.update(gain_inside=0.0, gain_beyond=0.2 + 0.1 * k, carried=0.2 + 0.1 * k,
                      gap_closed=(0.2 + 0.1 * k) / 0.4)
        (d / j.eval_file()).write_text(json.dumps({"pooled": pooled}))
        comm = Comm(bytes_up=100, bytes_down=300, per_round=[], by_group={})
        Results(method="fednl", task="stream", rounds=2, clients={}, mean={}, comm=comm, wall_s=10.0 + k).write(
            d / "results.json")
    table = memory_table(jobs, tmp_path)
    row = next(line for line in table.splitlines() if line.startswith("| fednl |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "3.4500 ± 0.0707"  # memory: 3.5 and 3.4
    assert cells[5] == "0.2500 ± 0.0707"  # gain beyond: 0.2 and 0.3
    assert cells[8] == "62.5 ± 17.7"     # gap closed: 50 % and 75 %
    assert cells[9] == "200 ± 0" and cells[-1] == "2"  # (100 + 300) / 2 rounds


def test_select_variants() -> None:
    from fednl.reproduce import select_variants

    plan = build_plan("memory", [0, 1])
    sub = select_variants(plan, ["fednl", "local"])
    assert [j.name for j in sub.jobs] == ["fednl-s0", "local-s0", "fednl-s1", "local-s1"]
    assert sub.titles == plan.titles
    with pytest.raises(ValueError, match="unknown variant"):
        select_variants(plan, ["nope"])


def test_a_job_stopped_after_a_checkpoint_resumes_instead_of_starting_over(tmp_path) -> None:
    job = build_plan("smoke", [0]).jobs[0]
    run = job.run_dir(tmp_path)
    first = job_commands(job, tmp_path)[0]
    assert "--overwrite" in first and "--resume" not in first  # nothing there yet: start
    (run / "checkpoint").mkdir(parents=True)
    (run / "config.resolved.toml").write_text("seed = 0\n")
    assert "--overwrite" in job_commands(job, tmp_path)[0]  # an empty checkpoint folder holds nothing to resume
    (run / "checkpoint" / "round-0001").mkdir()
    assert shell_line(job_commands(job, tmp_path)[0]) == f"fednl run --resume {run}"
