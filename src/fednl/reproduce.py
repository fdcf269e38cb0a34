"""The CPU-scale reproduction of the paper's experiments as one resumable job queue (``fednl reproduce``).

A *plan* is a list of :class:`Job` s: one ``fednl run`` of a packaged preset with a method (or ablation variant)
and a seed, followed by ``fednl evaluate`` on its output. Jobs run as subprocesses, ``jobs`` at a time, each with
``engine.threads`` intra-op threads (1 thread x 2 jobs uses 2 cores better than 2 threads x 1 job on the small
shapes of the ``-cpu`` presets). A job whose ``results.json`` / ``eval.json`` already exist is skipped, so an
interrupted reproduction continues where it stopped. When every job has finished, the across-seed tables of each
experiment are written as Markdown (``tables.md``, the tables of ``docs/RESULTS.md``) and as one ``report.html``
per experiment.

Plans (``PLANS``):

* ``cpu`` — ``paper-mmlu5-cpu`` and ``paper-niah7-cpu`` for FedNL and each paper baseline, and
  ``paper-pg19-ablation-cpu`` for the four Fig. 6 variants plus FedAvg-LoRA (the streaming-trend comparison).
  Aggregation drop (Fig. 3) is measured on MMLU only, where the paper reports it.
* ``smoke`` — the same structure on the tiny random model (seconds; used by the tests).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

PAPER_BASELINES = ("fednl", "fedavg", "fedprox", "fedssi", "fedala", "ffa_lora")

# Fig. 6 variants: label -> extra --set overrides on the FedNL ablation preset.
ABLATIONS: dict[str, tuple[str, ...]] = {
    "full": (),
    "hebbian": ("memory.rule=hebbian",),
    "fixed-gate": ("memory.gate=fixed",),
    "lora-frozen": ("lora.trainable=false",),
}


# Extra tables under each experiment's main table: (kind, view, caption); absent data gives no table.
CURVES = (
    ("clients", "personalised", "Per-client personalised metric (paper Tables 1-2 layout)"),
    ("depth", "personalised", "NIAH accuracy by needle depth (Fig. 4)"),
    ("depth", "memory_off", "NIAH accuracy by needle depth, memory off"),
    ("position", "personalised", "CE by position, relative to the first bin (Fig. 5)"),
    ("position", "memory_off", "CE by position relative to the first bin, memory off"),
)


# The paper's printed numbers on its smallest backbone (Llama-3.2-1B; FedNL on Titans-Llama-3.2-1B), for the
# side-by-side tables: Table 1 average MMLU accuracy (%), Table 2 average NIAH accuracy (%), Fig. 6 PG-19 PPL.
# FedAvg-LoRA on the streaming task has no paper number (the paper's ablation is FedNL only).
PAPER: dict[str, dict[str, float]] = {
    "mmlu5": {"fednl": 42.64, "fedavg": 41.2, "fedprox": 38.2, "fedssi": 42.1, "fedala": 40.59, "ffa_lora": 40.75},
    "niah7": {"fednl": 29.7, "fedavg": 18.3, "fedprox": 20.0, "fedssi": 18.3, "fedala": 28.6, "ffa_lora": 15.2},
    "stream": {"full": 29.82, "hebbian": 1576.42, "fixed-gate": 348.97, "lora-frozen": 149.46},
}
PAPER_UNIT = {"mmlu5": "accuracy %", "niah7": "accuracy %", "stream": "perplexity"}


@dataclass(frozen=True)
class Job:
    experiment: str           # table this job belongs to (e.g. "mmlu5")
    name: str                 # run directory name inside the experiment (e.g. "fednl-s0")
    preset: str
    sets: tuple[str, ...]     # --set overrides (method, seed, threads, variant)
    aggregation_drop: bool = False
    evaluation: str = "evaluate"   # "evaluate" (the protocol, eval.json) or "memory" (memory_eval-heldout.json)

    def eval_file(self) -> str:
        return "eval.json" if self.evaluation == "evaluate" else "memory_eval-heldout.json"

    def eval_command(self, root: Path) -> list[str]:
        out = str(self.run_dir(root))
        if self.evaluation == "memory":
            return [*fednl_command(), "memory-eval", out, "--clients", "heldout", "--max-examples", "6"]
        return [*fednl_command(), "evaluate", out, *([] if self.aggregation_drop else ["--no-aggregation-drop"])]

    def run_dir(self, root: Path) -> Path:
        return root / self.experiment / self.name


@dataclass
class Plan:
    name: str
    jobs: list[Job] = field(default_factory=list)
    titles: dict[str, str] = field(default_factory=dict)   # experiment -> section title


def _jobs_for(experiment: str, preset: str, variants: dict[str, tuple[str, ...]], seeds: Sequence[int],
              threads: int, *, aggregation_drop: bool, extra: tuple[str, ...] = (),
              evaluation: str = "evaluate") -> list[Job]:
    """Seed-major order, so that a reproduction stopped early still has whole seeds for every variant."""
    return [Job(experiment, f"{label}-s{seed}", preset,
                (*extra, *sets, f"seed={seed}", f"engine.threads={threads}"), aggregation_drop, evaluation)
            for seed in seeds for label, sets in variants.items()]


def build_plan(name: str, seeds: Sequence[int], threads: int = 1) -> Plan:
    """The named plan (``cpu`` or ``smoke``) for ``seeds``; raises ``ValueError`` for an unknown name."""
    if name not in PLANS:
        raise ValueError(f"unknown plan {name!r}; known plans: {', '.join(sorted(PLANS))}")
    if not seeds:
        raise ValueError("at least one seed is needed")
    return PLANS[name](list(seeds), threads)


def _cpu_plan(seeds: list[int], threads: int) -> Plan:
    methods = {m: (f"method={m}",) for m in PAPER_BASELINES}   # fednl's default scope is "rules"
    stream = {**ABLATIONS, "fedavg": ("method=fedavg",)}
    plan = Plan("cpu")
    plan.jobs += _jobs_for("stream", "paper-pg19-ablation-cpu", stream, seeds, threads, aggregation_drop=False)
    plan.jobs += _jobs_for("niah7", "paper-niah7-cpu", methods, seeds, threads, aggregation_drop=False)
    plan.jobs += _jobs_for("mmlu5", "paper-mmlu5-cpu", methods, seeds, threads, aggregation_drop=True)
    plan.titles = {"stream": "Streaming text (paper-pg19-ablation-cpu): Fig. 6 ablation and FedNL vs FedAvg-LoRA",
                   "niah7": "NIAH-7 (paper-niah7-cpu): Table 2, Fig. 4",
                   "mmlu5": "MMLU-5 (paper-mmlu5-cpu): Table 1, Fig. 3"}
    return _seed_major(plan, seeds)


def _smoke_plan(seeds: list[int], threads: int) -> Plan:
    stream_task = ("task={name='stream', quickstart=true, max_train=2, max_test=1}", "train.seq_len=256",
                   "rounds=1")
    plan = Plan("smoke")
    plan.jobs += _jobs_for("stream", "tiny", {"full": (), "fedavg": ("method=fedavg",)}, seeds, threads,
                           aggregation_drop=False, extra=stream_task)
    plan.jobs += _jobs_for("niah7", "tiny", {"fednl": (), "fedavg": ("method=fedavg",)}, seeds, threads,
                           aggregation_drop=True, extra=("rounds=1",))
    plan.titles = {"stream": "Streaming text (tiny model)", "niah7": "NIAH (tiny model)"}
    return _seed_major(plan, seeds)


def _seed_major(plan: Plan, seeds: list[int]) -> Plan:
    """Order jobs seed by seed across experiments, so a reproduction stopped early has whole seeds everywhere."""
    plan.jobs.sort(key=lambda j: seeds.index(int(j.name.rsplit("-s", 1)[1])))   # stable: keeps plan order
    return plan


# The memory experiment (issue 12): the memory-cpu preset's variants; window + sinks alone, the zeroed twin and full
# attention are evaluation conditions of every run (`fednl memory-eval`). Centralised training pools the books into
# one client and gets the federation's total number of steps (5 training books x max_steps).
MEMORY_VARIANTS: dict[str, tuple[str, ...]] = {
    "fednl": (),
    "local": ("method=local",),
    "centralised": ("task.pooled=true", "train.max_steps=40"),
    "fedavg-window": ("method=fedavg", "lora.trainable=true", "train.objective=lm", "train.lr=3e-4"),
}


def _memory_plan(seeds: list[int], threads: int) -> Plan:
    plan = Plan("memory")
    plan.jobs += _jobs_for("memory", "memory-cpu", MEMORY_VARIANTS, seeds, threads, aggregation_drop=False,
                           evaluation="memory")
    plan.titles = {"memory": "The memory beyond the window (memory-cpu): held-out books, window 64 + 4 sinks"}
    return _seed_major(plan, seeds)


def _memory_smoke_plan(seeds: list[int], threads: int) -> Plan:
    variants = {"fednl": (), "local": ("method=local",), "centralised": ("task.pooled=true", "train.max_steps=2"),
                "fedavg-window": MEMORY_VARIANTS["fedavg-window"]}
    plan = Plan("memory-smoke")
    plan.jobs += _jobs_for("memory", "memory-tiny", variants, seeds, threads, aggregation_drop=False,
                           evaluation="memory")
    plan.titles = {"memory": "The memory beyond the window (tiny model)"}
    return _seed_major(plan, seeds)


PLANS: dict[str, Callable[[list[int], int], Plan]] = {"cpu": _cpu_plan, "smoke": _smoke_plan,
                                                      "memory": _memory_plan, "memory-smoke": _memory_smoke_plan}


def select_variants(plan: Plan, labels: Sequence[str]) -> Plan:
    """The plan restricted to jobs whose label (the run name without ``-s<seed>``) is in ``labels``; an unknown
    label is an error listing the plan's labels."""
    known = list(dict.fromkeys(j.name.rsplit("-s", 1)[0] for j in plan.jobs))
    unknown = [lab for lab in labels if lab not in known]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown} in plan {plan.name!r}; its variants: {', '.join(known)}")
    return Plan(plan.name, [j for j in plan.jobs if j.name.rsplit("-s", 1)[0] in labels], dict(plan.titles))


def fednl_command() -> list[str]:
    """The ``fednl`` console entry point of this interpreter (works without the script on PATH)."""
    return [sys.executable, "-c", "from fednl.cli import main; main()"]


def job_commands(job: Job, root: Path) -> list[list[str]]:
    """The commands a job still needs (none when both results.json and eval.json exist). A run stopped after a
    checkpoint continues from it (``--resume``); one with no checkpoint starts over."""
    out = job.run_dir(root)
    cmds = []
    if not (out / "results.json").is_file():
        if (out / "checkpoint").is_dir() and any((out / "checkpoint").iterdir()) and \
                (out / "config.resolved.toml").is_file():
            cmds.append([*fednl_command(), "run", "--resume", str(out)])
        else:
            run = [*fednl_command(), "run", job.preset, "--out", str(out), "--overwrite"]
            for s in job.sets:
                run += ["--set", s]
            cmds.append(run)
    if not (out / job.eval_file()).is_file():
        cmds.append(job.eval_command(root))
    return cmds


def shell_line(cmd: Sequence[str]) -> str:
    """A command as the user would type it (``fednl ...``), quoted for a POSIX shell."""
    import shlex

    args = list(cmd[len(fednl_command()):]) if list(cmd[:3]) == fednl_command() else list(cmd)
    return "fednl " + " ".join(shlex.quote(a) for a in args)


class JobFailed(RuntimeError):
    pass


def _run_job(job: Job, root: Path) -> float:
    out = job.run_dir(root)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{job.name}.log"
    t0 = time.perf_counter()
    for cmd in job_commands(job, root):
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"$ {shell_line(cmd)}\n")
            fh.flush()
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
        if rc != 0:
            raise JobFailed(f"{job.experiment}/{job.name}: `{shell_line(cmd)}` exited with {rc}; see {log}")
    return time.perf_counter() - t0


def run_plan(plan: Plan, root: str | Path, *, jobs: int = 2, log: Callable[[str], None] = print) -> list[str]:
    """Run every unfinished job of ``plan`` under ``root``; returns the failures (one line each)."""
    root = Path(root)
    todo = [j for j in plan.jobs if job_commands(j, root)]
    log(f"== reproduce {plan.name}: {len(plan.jobs)} jobs, {len(plan.jobs) - len(todo)} already done, "
        f"{jobs} at a time | out {root}")
    failures: list[str] = []
    done = 0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(_run_job, j, root): j for j in todo}
        for fut in as_completed(futures):
            job = futures[fut]
            done += 1
            try:
                secs = fut.result()
                log(f"[{done:3d}/{len(todo)}] {job.experiment}/{job.name} done in {secs:.0f} s "
                    f"(elapsed {time.perf_counter() - t0:.0f} s)")
            except JobFailed as exc:
                failures.append(str(exc))
                log(f"[{done:3d}/{len(todo)}] FAILED {exc}")
    return failures


def write_tables(plan: Plan, root: str | Path, out: str | Path | None = None) -> Path:
    """Across-seed Markdown tables of every experiment with finished runs (``root/tables.md`` by default), and a
    ``report.html`` per experiment. Experiments without finished runs are listed as not run."""
    from fednl.util.atomic import atomic_write_text
    from fednl.report import load_run_dir, write_report
    from fednl.report.seeds import curve_table, markdown_table, seed_groups

    root = Path(root)
    out = Path(out) if out is not None else root / "tables.md"
    parts = [f"<!-- written by `fednl reproduce {plan.name}`; do not edit by hand -->\n"]
    for experiment, title in plan.titles.items():
        jobs = [j for j in plan.jobs if j.experiment == experiment]
        finished = [j.run_dir(root) for j in jobs if (j.run_dir(root) / "results.json").is_file()]
        parts.append(f"### {title}\n")
        if not finished:
            parts.append("Not run.\n")
            continue
        runs = [load_run_dir(d) for d in finished]
        groups = seed_groups(runs)
        for g in groups:  # the job's label ("hebbian", "lora-frozen") names the variant better than config keys
            label = g["runs"][0].path.name.rsplit("-s", 1)[0]
            g["variant"] = "" if label == g["method"] else label
        parts.append(markdown_table(groups))
        if experiment in PAPER:
            parts.append("\n" + paper_table(experiment, groups))
        for kind, view, what in CURVES:
            table = curve_table(groups, kind, view)
            if table:
                parts.append(f"\n{what}:\n\n{table}")
        memory_jobs = [j for j in jobs if j.evaluation == "memory"]
        if memory_jobs:
            parts.append("\n" + memory_table(memory_jobs, root))
        missing = len(jobs) - len(finished)
        if missing:
            parts.append(f"\n{missing} of {len(jobs)} runs of this experiment have not finished.\n")
        report = write_report(finished, root / experiment / "report.html", title=title)
        parts.append(f"\nReport: `{report}`. Commands (one per run, then `fednl evaluate`):\n")
        parts.append("\n```\n" + "\n".join(shell_line(c) for c in _all_commands(jobs, root)) + "\n```\n")
    atomic_write_text(out, "\n".join(parts))
    return out


def memory_table(jobs: Sequence[Job], root: Path) -> str:
    """Markdown: per variant (the job label), mean ± sample std over seeds of the held-out CE beyond position 256 under
    the four conditions of :mod:`fednl.eval.memory`, the memory's gains and the bytes per round."""
    import json

    from fednl.records import Results
    from fednl.report.seeds import mean_std

    rows: dict[str, list[dict]] = {}
    start = "?"
    for j in jobs:
        path = j.run_dir(root) / j.eval_file()
        res = j.run_dir(root) / "results.json"
        if not (path.is_file() and res.is_file()):
            continue
        ev, rs = json.loads(path.read_text()), Results.load(res)
        rounds = max(1, rs.rounds)
        p = ev["pooled"]
        start = p["ranges"][-1][0]
        rows.setdefault(j.name.rsplit("-s", 1)[0], []).append({
            **{c: p[c]["ranges"][-1]["ce"] for c in ("memory", "zeroed", "window", "full")},
            "inside": p["memory"]["ranges"][0]["ce"] - p["window"]["ranges"][0]["ce"],
            "gain": p["gain_beyond"], "carried": p["carried"], "closed": 100.0 * p["gap_closed"],
            "bytes": rs.comm.total / rounds, "wall": rs.wall_s})
    if not rows:
        return "No memory evaluation has finished.\n"
    cols = [("memory", "memory", 4), ("zeroed", "zeroed twin", 4), ("window", "window + sinks", 4),
            ("full", "full attention", 4), ("gain", "gain beyond", 4), ("inside", "in-window cost", 4),
            ("carried", "carried", 4), ("closed", "gap closed %", 1), ("bytes", "bytes / round", 0),
            ("wall", "wall s", 0)]
    lines = [f"Held-out books, CE (nats) at positions >= {start}; mean ± sample std over seeds.\n",
             "| variant | " + " | ".join(c[1] for c in cols) + " | seeds |",
             "|---|" + "---|" * (len(cols) + 1)]
    for label, recs in rows.items():
        cells = []
        for key, _, nd in cols:
            m, sd = mean_std([r[key] for r in recs])
            cells.append(f"{m:.{nd}f} ± {sd:.{nd}f}")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(recs)} |")
    return "\n".join(lines) + "\n"


def paper_table(experiment: str, groups: list[dict]) -> str:
    """Markdown: the paper's number next to ours (mean ± sample std over seeds) in the paper's unit — accuracy
    in % of the client-mean accuracy, or perplexity ``exp(client-mean CE)`` per run."""
    import math

    from fednl.report.rows import results_rows
    from fednl.report.seeds import mean_std

    unit = PAPER_UNIT[experiment]
    lines = [f"| method / variant | paper ({unit}, Llama-3.2-1B) | ours ({unit}, SmolLM2-135M) | seeds |",
             "|---|---|---|---|"]
    for g in groups:
        key = g["variant"] or g["method"]
        vals = []
        for row in results_rows(g["runs"]):
            vals.append(math.exp(row["mean"]) if unit == "perplexity" else 100.0 * row["mean"])
        m, sd = mean_std(vals)
        paper = PAPER[experiment].get(key)
        lines.append(f"| {key} | {'–' if paper is None else f'{paper:g}'} | {m:.2f} ± {sd:.2f} | {len(vals)} |")
    return "\n".join(lines) + "\n"


def _all_commands(jobs: Sequence[Job], root: Path) -> list[list[str]]:
    """Every job's full command list as if nothing had run yet (for the documentation)."""
    lines = []
    for j in jobs:
        run = [*fednl_command(), "run", j.preset, "--out", str(j.run_dir(root))]
        for s in j.sets:
            run += ["--set", s]
        lines.append(run)
        lines.append(j.eval_command(root))
    return lines
