"""Fault and attack drill: what each fault or hostile client does to a run, in process and on Flower, with and
without robust aggregation (docs/ROBUSTNESS.md).

The run: a random tiny Llama (byte tokenizer) on the embedded book cut into 7 IID clients (text, test CE), FedNL
with its rules shared, ``[screen] norm_k = 10``, full participation, seed 0. Faults:

==============  =================================================================================================
``clean``       no fault (the reference)
``dropout30``   ``engine.dropout = 0.3``: 2 of the 7 sampled clients offline every round (seeded)
``nan``         client 1 sends NaN
``shape``       client 1 sends a tensor of the wrong shape
``norm100``     client 1 sends 100 × its update
``flip2``       clients 2 and 5 send −10 × their update
``gauss2``      clients 2 and 5 send Gaussian noise with 10 × their update's norm
``node_killed`` client 3's node is gone from round 2 on: it is neither trained nor evaluated (in process: the
                executor leaves it out; on Flower: the SuperLink answers its messages with NODE_UNAVAILABLE;
                ``deploy/fault_drill.py`` kills a real SuperNode)
``server_killed``  the server process dies in round 2 after three replies were stored, and is resumed (in
                process: ``FEDNL_KILL_AT`` makes ``fednl run`` SIGKILL itself, then ``fednl run --resume``; on
                Flower: the ServerApp dies while pulling replies, then resumes)
==============  =================================================================================================

The faults are injected where a hostile node's reply enters the server (in process: the executor's replies; on
Flower: the node's ClientApp rewrites its reply, the ``LocalGrid`` runs the real ServerApp/ClientApp code with
Flower's serialisation on every hop). Per run: the rounds completed, the updates rejected (check × count) and the
clients dropped, the largest distance over the rounds between the new global parameters and the N_k-weighted mean
of the honest clients that answered (and, in brackets, that distance over the length of the honest step
‖honest mean − previous global‖), and the test CE after the last round against the fault-free run. For
``server_killed`` the distance is ‖final global − fault-free final global‖.

    .venv/bin/python scripts/hostile_drill.py --out /tmp/drill                          # both engines
    .venv/bin/python scripts/hostile_drill.py --out /tmp/drill --engines inprocess --scenarios nan,flip2
    .venv/bin/python scripts/hostile_drill.py --out /tmp/drill --deploy                 # + the loopback drills
    .venv/bin/python scripts/hostile_drill.py --out /tmp/drill-deploy --engines "" --deploy   # only those

``--deploy`` also runs ``deploy/fault_drill.py`` twice on a 3-client config (a SuperNode killed after round 1; the
ServerApp killed in round 2 and resumed; several minutes each) and adds their rows. Writes ``<out>/drill.json``
and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from fednl.config import load_config
from fednl.engine.executor import TrainReply
from fednl.engine.runstate import load_checkpoint
from fednl.engine.simulator import RoundLoop
from fednl.experiment import build_simulator, run_config
from fednl.strategies.base import Params, Payload, weighted_mean
from fednl.util.atomic import atomic_write_json
from fednl.util.faults import ENV as KILL_ENV
from tiny_stream import tiny_stream_config

REPO = Path(__file__).resolve().parents[1]
N_CLIENTS = 7
AGGREGATIONS = {
    "none": [],
    "median": ["robust.rule=median"],
    "trimmed": ["robust.rule=trimmed_mean", "robust.trim=0.3"],
    "krum": ["robust.rule=krum", "robust.num_malicious=2", "robust.select=3"],
}
Fault = Callable[[Params, Params, random.Random], Params]  # (sent, reply tensors, rng) -> what the node sends


SCREEN = "[screen]\nnorm_k = 10\n"


def _delta(scale: Callable[[torch.Tensor, random.Random], torch.Tensor]) -> Fault:
    """A fault on the update: reply = sent + scale(update)."""
    return lambda sent, got, rng: {n: sent[n] + scale(t - sent[n], rng) for n, t in got.items()}


def _gauss(d: torch.Tensor, rng: random.Random) -> torch.Tensor:
    noise = torch.randn(d.shape, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
    return noise * (10 * float(d.norm()) / max(float(noise.norm()), 1e-30))


SCENARIOS: dict[str, tuple[str, set[int], Fault | None]] = {
    # name: (description, hostile client indices, fault on the reply)
    "clean": ("no fault", set(), None),
    "dropout30": ("30 % drop-out per round (engine.dropout = 0.3, seeded)", set(), None),
    "nan": ("one client sends NaN", {1}, lambda s, g, r: {n: torch.full_like(t, math.nan) for n, t in g.items()}),
    "shape": ("one client sends a wrong shape", {1}, lambda s, g, r: {n: torch.zeros(t.numel() + 1)
                                                                     for n, t in g.items()}),
    "norm100": ("one client sends 100× its update", {1}, _delta(lambda d, r: 100 * d)),
    "flip2": ("2 of 7 send −10× their update (sign flip)", {2, 5}, _delta(lambda d, r: -10 * d)),
    "gauss2": ("2 of 7 send Gaussian noise (10× their update's norm)", {2, 5}, _delta(_gauss)),
    "node_killed": ("one client's node is gone from round 2 on", {3}, None),
    "server_killed": ("the server is killed in round 2 (3 replies stored), then resumed", set(), None),
}
SCENARIO_SETS = {"dropout30": ["engine.dropout=0.3"]}


class Probe:
    """Honest replies per round (recorded where they are made) and the distance of each round's aggregate."""

    def __init__(self, hostile: set[str]):
        self.hostile = hostile
        self.honest: dict[int, dict[str, TrainReply]] = {}
        self.dist: list[float] = []
        self.rel: list[float] = []

    def keep(self, rnd: int, reply: TrainReply) -> None:
        if reply.cid not in self.hostile:
            self.honest.setdefault(rnd, {})[reply.cid] = reply

    def measure(self, rnd: int, before: Params, new: Params, answered: set[str]) -> None:
        honest = [r for c, r in sorted(self.honest.get(rnd, {}).items()) if c in answered]
        if not honest:
            return
        want = weighted_mean([{n: r.payload.tensors[n].to(before[n].dtype) for n in before} for r in honest],
                             [r.num_examples for r in honest])
        dist = math.sqrt(sum(float(((new[n].double() - want[n].double()) ** 2).sum()) for n in before))
        step = math.sqrt(sum(float(((want[n].double() - before[n].double()) ** 2).sum()) for n in before))
        self.dist.append(dist)
        self.rel.append(dist / step if step > 0 else float("nan"))


def measured_aggregate(probe: Probe, inner: Callable[..., Any]) -> Callable[..., Any]:
    """``RoundLoop._aggregate`` that also measures the new global parameters against the honest mean."""
    def aggregate(self: Any, rnd: int, replies: Any, state: Any, **kw: Any) -> Any:
        before = {n: t.clone() for n, t in state.global_params.items()}
        new, step = inner(self, rnd, replies, state, **kw)
        answered = {r.cid for r in replies} | {r.cid for r in kw.get("refused") or []}
        probe.measure(rnd, before, new, answered)
        return new, step
    return aggregate


def faulty(fault: Fault | None, hostile: set[str], rng: random.Random, rnd: int, sent: Params,
           reply: TrainReply) -> TrainReply:
    if fault is None or reply.cid not in hostile:
        return reply
    return replace(reply, payload=Payload(fault(sent, reply.payload.tensors, rng), dict(reply.payload.meta)))


# ---------------------------------------------------------------------------------------------- in process
def run_inprocess(out: Path, config: Path, scenario: str, overrides: list[str], seed: int) -> Probe:
    _, hostile_idx, fault = SCENARIOS[scenario]
    cfg = load_config(str(config), overrides)
    if scenario == "server_killed":
        return kill_and_resume(out, config, overrides)
    sim = build_simulator(cfg, out, log=lambda s: None)
    hostile = {sim.client_names[i] for i in hostile_idx}
    probe, rng = Probe(set() if scenario == "node_killed" else hostile), random.Random(seed)
    inner_train = sim.executor.train

    def train(rnd: int, jobs: Any, state: Any) -> list[TrainReply]:
        if scenario == "node_killed" and rnd >= 2:  # its node is gone: it gets nothing, trains nothing, answers not
            jobs = [j for j in jobs if j.cid not in hostile]
        sent = {j.cid: j.payload.tensors for j in jobs}
        out_ = []
        for r in inner_train(rnd, jobs, state):
            probe.keep(rnd, r)
            out_.append(faulty(fault, hostile, rng, rnd, sent[r.cid], r))
        return out_

    sim.executor.train = train  # type: ignore[method-assign]
    if scenario == "node_killed":  # nor is it evaluated (on Flower its evaluate message gets NODE_UNAVAILABLE)
        inner_eval = sim.executor.evaluate
        sim.executor.evaluate = lambda rnd, cids, state: inner_eval(  # type: ignore[method-assign]
            rnd, [c for c in cids if not (rnd >= 2 and c in hostile)], state)
    sim._aggregate = partial(measured_aggregate(probe, RoundLoop._aggregate), sim)  # type: ignore[method-assign]
    sim.run()
    return probe


def kill_and_resume(out: Path, config: Path, overrides: list[str]) -> Probe:
    """``fednl run`` SIGKILLs itself after the third stored reply of round 2; ``fednl run --resume`` ends it."""
    env = {**os.environ, KILL_ENV: "reply_stored:2:3", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    sets = [a for o in overrides for a in ("--set", o)]
    p = subprocess.run([str(Path(sys.executable).parent / "fednl"), "run", str(config), "--out", str(out), *sets],
                       env=env, capture_output=True, text=True)
    if p.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the run was not killed (rc {p.returncode}):\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    run_config(load_config(str(out / "config.resolved.toml")), out, resume=True, log=lambda s: None)
    return Probe(set())


# ---------------------------------------------------------------------------------------------- Flower
def run_flower(out: Path, config: Path, scenario: str, overrides: list[str], seed: int) -> Probe:
    from flwr.app import Error, Message
    from flwr.clientapp import ClientApp
    from flwr.common.constant import ErrorCode

    from fednl.flower.codec import decode_payload, encode_payload
    from fednl.flower.launch import AppSettings, LocalGrid, partition_configs
    from fednl.flower.node import handle_evaluate, handle_query, handle_train
    from fednl.flower.protocol import ANSWER, REPLY, RunRecord
    from fednl.flower.server import server_main

    _, hostile_idx, fault = SCENARIOS[scenario]
    names = list(build_names(config, overrides))
    hostile = {names[i] for i in hostile_idx}
    probe, rng = Probe(set() if scenario == "node_killed" else hostile), random.Random(seed)

    def train(msg: Message, ctx: Any) -> Message:
        reply = handle_train(msg, ctx, simulation=True)
        if reply.has_error():
            return reply
        run = RunRecord.from_content(msg.content)
        got = decode_payload(reply.content)
        stats = dict(reply.content[REPLY])
        probe.keep(run.round, TrainReply(run.cid, got, int(stats["num-examples"]), round=run.round))
        if fault is None or run.cid not in hostile:
            return reply
        content = encode_payload(Payload(fault(decode_payload(msg.content).tensors, got.tensors, rng),
                                         dict(got.meta)))
        content[REPLY], content[ANSWER] = reply.content[REPLY], reply.content[ANSWER]
        return Message(content, reply_to=msg)

    app = ClientApp()
    app.query()(partial(handle_query, simulation=True))
    app.train()(train)
    app.evaluate()(partial(handle_evaluate, simulation=True))

    class Grid(LocalGrid):
        """``node_killed``: the SuperLink answers for the victim's node with NODE_UNAVAILABLE from round 2 on.
        ``server_killed``: the ServerApp dies while pulling round 2's replies, after three arrived."""

        dying: bool | str = scenario == "server_killed"

        def push_messages(self, messages: Any) -> list[str]:
            ids = []
            for msg in messages:
                run = RunRecord.from_content(msg.content)
                if scenario == "node_killed" and run.cid in hostile and run.round >= 2:
                    self._counter += 1
                    mid = f"local-{self._counter}"
                    msg.metadata.__dict__["_message_id"] = mid
                    self._pending[mid] = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node killed"),
                                                 reply_to=msg)
                    ids.append(mid)
                else:
                    ids += super().push_messages([msg])
            return ids

        def pull_messages(self, message_ids: Any) -> list[Message]:
            if self.dying == "now":
                raise KeyboardInterrupt("server killed")  # after the first three replies were stored
            replies = super().pull_messages(message_ids)
            if self.dying is True and replies and replies[0].metadata.group_id == "2":
                self.dying = "now"
                self._pending.clear()
                return replies[:3]
            return replies

    inner = RoundLoop._aggregate
    RoundLoop._aggregate = measured_aggregate(probe, inner)  # type: ignore[method-assign]
    try:
        settings = AppSettings(config=str(config), overrides=overrides, out=str(out), wait_nodes_s=5)
        grid = Grid(app, partition_configs(N_CLIENTS))
        if scenario == "server_killed":
            try:
                server_main(grid, settings, log=lambda s: None)
            except KeyboardInterrupt:
                pass
            settings = settings.model_copy(update={"resume": True})
            grid = Grid(app, partition_configs(N_CLIENTS))
            grid.dying = False  # the restarted ServerApp
        server_main(grid, settings, log=lambda s: None)
    finally:
        RoundLoop._aggregate = inner  # type: ignore[method-assign]
    return probe


def build_names(config: Path, overrides: list[str]) -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return build_simulator(load_config(str(config), overrides), tmp, log=lambda s: None).client_names


# ---------------------------------------------------------------------------------------------- one row
def summarise(out: Path, engine: str, scenario: str, aggregation: str, probe: Probe,
              clean: Path | None) -> dict[str, Any]:
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rounds = [r for r in records if r["type"] == "round"]
    rejected: dict[str, int] = {}
    dropped: dict[str, int] = {}
    for r in rounds:
        for rej in r.get("rejected", []):
            rejected[rej["check"]] = rejected.get(rej["check"], 0) + 1
        for why in (r.get("dropped_reason") or {}).values():
            key = why.split(":")[0]
            dropped[key] = dropped.get(key, 0) + 1
    results = json.loads((out / "results.json").read_text())
    final = load_checkpoint(out / "checkpoint").global_params
    dist, rel = (max(probe.dist), max(probe.rel)) if probe.dist else (None, None)
    if scenario == "server_killed" and clean is not None:
        ref = load_checkpoint(clean / "checkpoint").global_params
        dist = math.sqrt(sum(float(((final[n].double() - ref[n].double()) ** 2).sum()) for n in final))
        rel = None
    return {"engine": engine, "scenario": scenario, "fault": SCENARIOS[scenario][0], "aggregation": aggregation,
            "rounds_completed": len(rounds), "rejected": rejected, "dropped": dropped,
            "krum_dropped": sum(len(r.get("krum_dropped", [])) for r in rounds), "dist_max": dist,
            "rel_dist_max": rel, "ce": results["mean"].get("ce"),
            "final_global_finite": all(bool(torch.isfinite(t).all()) for t in final.values())}


def deploy_rows(out: Path) -> list[dict[str, Any]]:
    """The two loopback drills of deploy/fault_drill.py on a 3-client FedAvg config."""
    cfg = out / "deploy.toml"
    cfg.write_text(tiny_stream_config(seed=5, rounds=2, clients=3, method="fedavg", extra=SCREEN))
    rows = []
    clean = out / "deploy-clean"
    run_config(load_config(str(cfg)), clean, log=lambda s: None)
    # a deadline far above an honest round: the killed node is dropped when the SuperLink stops receiving its
    # heartbeats (NODE_UNAVAILABLE), and a loaded machine does not turn honest nodes into stragglers
    for name, args in (("node_killed", ["--kill-node", "1", "--after-round", "1", "--deadline", "300"]),
                       ("server_killed", ["--kill-server-in-round", "2", "--deadline", "300"])):
        d = out / f"deploy-{name}"
        p = subprocess.run([sys.executable, str(REPO / "deploy" / "fault_drill.py"), str(cfg), str(d), *args],
                           capture_output=True, text=True)
        drill = json.loads((d / "drill.json").read_text())
        res = json.loads((d / "run" / "results.json").read_text()) if (d / "run" / "results.json").is_file() else {}
        final = load_checkpoint(d / "run" / "checkpoint").global_params
        dropped: dict[str, int] = {}
        for per in drill.get("dropped", {}).values():
            for why in per.values():
                dropped[why.split(":")[0]] = dropped.get(why.split(":")[0], 0) + 1
        clean_res = json.loads((clean / "results.json").read_text())
        same = [c for c in res.get("clients", {}) if c in clean_res["clients"]]  # a dead node is not evaluated
        ce_clean = sum(clean_res["clients"][c]["ce"] for c in same) / len(same) if same else None
        row = {"engine": "flower-deployment", "scenario": name, "aggregation": "none", "rc": p.returncode,
               "fault": ("a SuperNode killed (SIGKILL) after round 1" if name == "node_killed" else
                         "the ServerApp killed (SIGKILL) in round 2 after a reply was stored, resumed"),
               "rounds_completed": drill.get("rounds_completed"), "rejected": {}, "dropped": dropped,
               "krum_dropped": 0, "ce": res.get("mean", {}).get("ce"), "ce_clean": ce_clean, "wall_s": drill["wall_s"]}
        if name == "server_killed":
            ref = load_checkpoint(clean / "checkpoint").global_params
            row["dist_max"] = math.sqrt(sum(float(((final[n].double() - ref[n].double()) ** 2).sum()) for n in final))
        else:  # the aggregate is the mean of the clients that answered: the honest mean
            row["dist_max"] = 0.0 if drill.get("finished") else None
        row["rel_dist_max"] = None
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--aggregations", default="none,median,krum")
    ap.add_argument("--engines", default="inprocess,flower")
    ap.add_argument("--robust-for", default="flip2,gauss2",
                    help="scenarios run with every aggregation; the others run with 'none' only")
    ap.add_argument("--deploy", action="store_true", help="also run the two loopback deployment drills (slow)")
    args = ap.parse_args()
    scenarios = [s for s in args.scenarios.split(",") if s]
    aggs = [a for a in args.aggregations.split(",") if a]
    engines = [e for e in args.engines.split(",") if e]
    bad = ([s for s in scenarios if s not in SCENARIOS] + [a for a in aggs if a not in AGGREGATIONS]
           + [e for e in engines if e not in ("inprocess", "flower")])
    if bad:
        raise SystemExit(f"unknown scenario, aggregation or engine {bad}; scenarios {list(SCENARIOS)}, "
                         f"aggregations {list(AGGREGATIONS)}, engines ['inprocess', 'flower']")
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} is not empty")
    args.out.mkdir(parents=True)
    config = args.out / "drill.toml"
    config.write_text(tiny_stream_config(seed=args.seed, rounds=args.rounds, clients=N_CLIENTS, extra=SCREEN))
    torch.set_num_threads(1)
    rows = []
    robust_for = set(args.robust_for.split(","))
    for engine in engines:
        runner = run_inprocess if engine == "inprocess" else run_flower
        clean = None
        for s in (["clean"] if "clean" not in scenarios else []) + scenarios:
            for a in (aggs if s in robust_for else aggs[:1]):
                out = args.out / engine / f"{s}-{a}"
                probe = runner(out, config, s, [*SCENARIO_SETS.get(s, []), *AGGREGATIONS[a]], args.seed)
                row = summarise(out, engine, s, a, probe, clean)
                if s == "clean" and a == aggs[0]:
                    clean = out
                row["ce_clean"] = json.loads((clean / "results.json").read_text())["mean"]["ce"] if clean else None
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.deploy:
        rows += deploy_rows(args.out)
    atomic_write_json(args.out / "drill.json", rows)
    print_table(rows)


def print_table(rows: list[dict[str, Any]]) -> None:
    def fmt(x: float | None, digits: int = 3) -> str:
        return "—" if x is None else f"{x:.{digits}g}"

    print("\n| engine | fault | aggregation | rounds | rejected | dropped | Krum left out | max ‖agg − honest mean‖ "
          "(÷ honest step) | test CE (fault-free) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rej = ", ".join(f"{k} ×{v}" for k, v in sorted(r["rejected"].items())) or "—"
        drop = ", ".join(f"{k} ×{v}" for k, v in sorted(r["dropped"].items())) or "—"
        dist = fmt(r["dist_max"]) + ("" if r.get("rel_dist_max") is None else f" ({fmt(r['rel_dist_max'])})")
        ce = "—" if r["ce"] is None else f"{r['ce']:.4f}" + ("" if r.get("ce_clean") is None else
                                                            f" ({r['ce_clean']:.4f})")
        print(f"| {r['engine']} | {r['fault']} | {r['aggregation']} | {r['rounds_completed']} | {rej} | {drop} | "
              f"{r['krum_dropped'] or '—'} | {dist} | {ce} |")


if __name__ == "__main__":
    main()
