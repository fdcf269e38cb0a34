"""Fault and attack drill on the tiny preset, in process: what each hostile client does to a run, with and without
robust aggregation (docs/ROBUSTNESS.md).

The run is the ``tiny`` preset (random tiny Llama, FedNL with rules shared) on all 7 NIAH templates (7 clients),
``[screen] norm_k = 10``. The faults are injected where a hostile node's reply enters the server: the executor's replies, after the wire
(the uplink is fp32, so a reply's tensors are the values the client sends). Per run it reports the rounds
completed, the rejected updates and why, the distance of each round's new global parameters from the mean the
honest clients alone would give (N_k-weighted, over the honest clients that answered), and the task metric after
the last round.

    .venv/bin/python scripts/hostile_drill.py --out /tmp/drill                       # every scenario
    .venv/bin/python scripts/hostile_drill.py --out /tmp/drill --scenarios nan,flip2 --aggregations none,median

Writes ``<out>/drill.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fednl.config import load_config
from fednl.engine.executor import TrainJob, TrainReply
from fednl.experiment import build_simulator
from fednl.strategies.base import Payload, weighted_mean
from fednl.util.atomic import atomic_write_json

TEMPLATES = '["passkey","uuid","name_date","phrase","counter","mk_niah","mv_niah"]'  # 7 clients
AGGREGATIONS = {
    "none": [],
    "median": ["robust.rule=median"],
    "trimmed": ["robust.rule=trimmed_mean", "robust.trim=0.3"],
    "krum": ["robust.rule=krum", "robust.num_malicious=2", "robust.select=3"],
}
Fault = Callable[[int, TrainJob, TrainReply, random.Random], TrainReply | None]


def _rewrite(reply: TrainReply, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> TrainReply:
    return replace(reply, payload=Payload({n: fn(n, t) for n, t in reply.payload.tensors.items()},
                                          dict(reply.payload.meta)))


def _delta_fault(scale: Callable[[torch.Tensor, torch.Tensor, random.Random], torch.Tensor]) -> Fault:
    """A fault on the update: reply = sent + scale(update, sent, rng)."""
    def fault(rnd: int, job: TrainJob, reply: TrainReply, rng: random.Random) -> TrainReply:
        del rnd
        return _rewrite(reply, lambda n, t: job.payload.tensors[n] + scale(t - job.payload.tensors[n],
                                                                           job.payload.tensors[n], rng))
    return fault


def _gauss(d: torch.Tensor, sent: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Gaussian noise with 10x the norm of the client's own update."""
    del sent
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    noise = torch.randn(d.shape, generator=g)
    return noise * (10 * float(d.norm()) / max(float(noise.norm()), 1e-30))


SCENARIOS: dict[str, tuple[str, set[int], Fault | None]] = {
    # name: (description, hostile client indices, fault)
    "clean": ("no fault", set(), None),
    "dropout30": ("30 % of the sampled clients never answer (seeded, every round)", set(), None),
    "nan": ("one client sends NaN", {1}, lambda r, j, x, g: _rewrite(x, lambda n, t: torch.full_like(t, math.nan))),
    "shape": ("one client sends a wrong shape", {1},
              lambda r, j, x, g: _rewrite(x, lambda n, t: torch.zeros(t.numel() + 1))),
    "norm100": ("one client sends 100x its update", {1}, _delta_fault(lambda d, s, g: 100 * d)),
    "flip2": ("2 of 7 send -10x their update", {2, 5}, _delta_fault(lambda d, s, g: -10 * d)),
    "gauss2": ("2 of 7 send Gaussian noise (10x their update's norm)", {2, 5}, _delta_fault(_gauss)),
}


def run_one(out: Path, scenario: str, aggregation: str, rounds: int, seed: int) -> dict[str, Any]:
    desc, hostile_idx, fault = SCENARIOS[scenario]
    overrides = [f"rounds={rounds}", f"seed={seed}", f"task.templates={TEMPLATES}", "engine.eval_every=0",
                 "screen.norm_k=10", *AGGREGATIONS[aggregation]]
    cfg = load_config("tiny", overrides)
    sim = build_simulator(cfg, out, log=lambda s: None)
    names = sim.client_names
    hostile = {names[i] for i in hostile_idx}
    rng = random.Random(seed)
    honest_replies: dict[int, list[TrainReply]] = {}
    inner_train = sim.executor.train

    def train(rnd: int, jobs: Any, state: Any) -> list[TrainReply]:
        replies = inner_train(rnd, jobs, state)
        by_cid = {j.cid: j for j in jobs}
        if scenario == "dropout30":
            k = round(0.3 * len(replies))
            gone = set(rng.sample(sorted(r.cid for r in replies), k))
            replies = [r for r in replies if r.cid not in gone]
        honest_replies[rnd] = [r for r in replies if r.cid not in hostile]
        out_ = []
        for r in replies:
            new = fault(rnd, by_cid[r.cid], r, rng) if (fault is not None and r.cid in hostile) else r
            if new is not None:
                out_.append(new)
        return out_

    sim.executor.train = train  # type: ignore[method-assign]
    distances: list[float] = []
    rel: list[float] = []
    inner_aggregate = sim._aggregate

    def aggregate(rnd: int, replies: Any, state: Any, **kw: Any) -> Any:
        before = {n: t.clone() for n, t in state.global_params.items()}
        new, step = inner_aggregate(rnd, replies, state, **kw)
        honest = honest_replies[rnd]
        want = weighted_mean([{n: r.payload.tensors[n].to(before[n].dtype) for n in before} for r in honest],
                             [r.num_examples for r in honest])
        dist = math.sqrt(sum(float(((new[n].double() - want[n].double()) ** 2).sum()) for n in before))
        step_norm = math.sqrt(sum(float(((want[n].double() - before[n].double()) ** 2).sum()) for n in before))
        distances.append(dist)
        rel.append(dist / step_norm if step_norm > 0 else float("nan"))
        return new, step

    sim._aggregate = aggregate  # type: ignore[method-assign]
    results = sim.run()
    assert results is not None
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rounds_done = [r for r in records if r["type"] == "round"]
    rejected: dict[str, int] = {}
    for r in rounds_done:
        for rej in r.get("rejected", []):
            rejected[rej["check"]] = rejected.get(rej["check"], 0) + 1
    krum_out = sum(len(r.get("krum_dropped", [])) for r in rounds_done)
    metric = sim.federation.metric
    return {"scenario": scenario, "fault": desc, "aggregation": aggregation, "rounds_completed": len(rounds_done),
            "rejected": rejected, "krum_dropped": krum_out, "dist_max": max(distances), "rel_dist_max": max(rel),
            "metric": metric, "final": results["mean"].get(metric), "final_loglik": results["mean"].get("answer_loglik"),
            "final_global_finite": all(bool(torch.isfinite(t).all()) for t in sim.state.global_params.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--aggregations", default="none,median,krum")
    ap.add_argument("--robust-only-for", default="flip2,gauss2",
                    help="scenarios run with every aggregation; the others (one faulty client, caught by screening) "
                         "run with 'none' only")
    args = ap.parse_args()
    scenarios = [s for s in args.scenarios.split(",") if s]
    aggs = [a for a in args.aggregations.split(",") if a]
    bad = [s for s in scenarios if s not in SCENARIOS] + [a for a in aggs if a not in AGGREGATIONS]
    if bad:
        raise SystemExit(f"unknown scenario or aggregation {bad}; scenarios {list(SCENARIOS)}, "
                         f"aggregations {list(AGGREGATIONS)}")
    rows = []
    robust_for = set(args.robust_only_for.split(","))
    for s in scenarios:
        for a in (aggs if s in robust_for else aggs[:1]):
            row = run_one(args.out / f"{s}-{a}", s, a, args.rounds, args.seed)
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "drill.json", rows)
    print("\n| fault | aggregation | rounds | rejected | Krum left out | max ‖agg − honest mean‖ (relative to the "
          "honest step) | accuracy | answer log-lik |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        rej = ", ".join(f"{k} ×{v}" for k, v in sorted(r["rejected"].items())) or "—"
        fin = "—" if r["final"] is None else f"{r['final']:.4f}"
        ll = "—" if r["final_loglik"] is None else f"{r['final_loglik']:.4f}"
        print(f"| {r['fault']} | {r['aggregation']} | {r['rounds_completed']} | {rej} | {r['krum_dropped'] or '—'} | "
              f"{r['dist_max']:.3g} ({r['rel_dist_max']:.3g}) | {fin} | {ll} |")


if __name__ == "__main__":
    main()
