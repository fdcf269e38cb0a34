#!/usr/bin/env python3
"""One config through the three engines — in-process simulator, Flower simulation (Ray), loopback TLS deployment —
and their results side by side: per-client metrics, ledger bytes, hop bytes and wall time (startup vs rounds).

    python deploy/compare_engines.py [CONFIG] --out DIR [--skip-deploy]

CONFIG defaults to deploy/smoke.toml (tiny model, 3 clients, 2 rounds, seed 0). Each engine runs as its own
command (`fednl run`, `fednl flower simulate`, `deploy/loopback_smoke.sh`) so wall times include process start;
the figures are printed as a table and written to DIR/comparison.json. Exit status 1 when a metric differs by
more than 1e-5 or a ledger differs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TOL = 1e-5


def timed(cmd: list[str], env: dict[str, str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd[:3])} ... failed (rc={proc.returncode}); see {log}")
    return wall


def round_times(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["round"]: r["s_round"] for r in rows if r.get("type") == "round"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default=str(HERE / "smoke.toml"))
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--skip-deploy", action="store_true", help="only in-process vs Flower simulation")
    args = ap.parse_args()
    out: Path = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        sys.exit(f"error: {out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_HOME": str(out / "flwr-home")}
    fednl = str(bindir / "fednl")

    engines: dict[str, dict[str, Any]] = {}
    wall = timed([fednl, "run", args.config, "--out", str(out / "inprocess")], env, out / "inprocess.log")
    engines["in-process"] = {"dir": out / "inprocess", "process_wall_s": wall}
    wall = timed([fednl, "flower", "simulate", args.config, "--out", str(out / "simulation")], env,
                 out / "simulation.log")
    engines["flower-simulation"] = {"dir": out / "simulation", "process_wall_s": wall}
    if not args.skip_deploy:
        wall = timed(["bash", str(HERE / "loopback_smoke.sh"), args.config, str(out / "deployment")], env,
                     out / "deployment.log")
        engines["loopback-deployment"] = {"dir": out / "deployment", "process_wall_s": wall}

    for e in engines.values():
        e["results"] = json.loads((e["dir"] / "results.json").read_text())
        e["rounds_s"] = round_times(e["dir"])
        fj = e["dir"] / "flower.json"
        e["flower"] = json.loads(fj.read_text()) if fj.is_file() else None

    ref = engines["in-process"]["results"]
    names = list(engines)
    metric_rows = []
    worst = 0.0
    for cid in sorted(ref["clients"]):
        for k in sorted(ref["clients"][cid]):
            vals = [engines[n]["results"]["clients"][cid][k] for n in names]
            worst = max(worst, max(abs(v - vals[0]) for v in vals))
            metric_rows.append((f"{cid} {k}", vals))
    for k in sorted(ref["mean"]):
        metric_rows.append((f"mean {k}", [engines[n]["results"]["mean"][k] for n in names]))
    ledgers_equal = all(engines[n]["results"]["comm"] == ref["comm"] for n in names)

    w = max(24, *(len(n) + 2 for n in names))
    print(f"{'':<28}" + "".join(f"{n:>{w}}" for n in names))
    for label, vals in metric_rows:
        print(f"{label:<28}" + "".join(f"{v:>{w}.9f}" for v in vals))
    for key in ("bytes_up", "bytes_down"):
        print(f"{'ledger ' + key:<28}" + "".join(f"{engines[n]['results']['comm'][key]:>{w}}" for n in names))
    for kind in ("train_down", "train_up", "evaluate_down", "evaluate_up"):
        cells = []
        for n in names:
            f = engines[n]["flower"]
            cells.append("-" if f is None else f"{f['hop_bytes'][kind]['payload']}+{f['hop_bytes'][kind]['overhead']}")
        print(f"{'hop ' + kind + ' (pay+ovh)':<28}" + "".join(f"{c:>{w}}" for c in cells))
    print(f"{'process wall s':<28}" + "".join(f"{engines[n]['process_wall_s']:>{w}.1f}" for n in names))
    print(f"{'run wall_s (results.json)':<28}" + "".join(f"{engines[n]['results']['wall_s']:>{w}.2f}" for n in names))
    for r in sorted(engines["in-process"]["rounds_s"]):
        print(f"{f's_round {r}':<28}" + "".join(f"{engines[n]['rounds_s'].get(r, float('nan')):>{w}.2f}" for n in names))
    for key in ("prepare_s", "build_s", "handshake_s", "server_total_s", "simulation_wall_s",
                "ray_outside_server_s"):
        cells = []
        for n in names:
            f = engines[n]["flower"]
            v = None if f is None else f["timing"].get(key)
            cells.append("-" if v is None else f"{v:.2f}")
        print(f"{key:<28}" + "".join(f"{c:>{w}}" for c in cells))
    print(f"max |metric difference| vs in-process: {worst:.3e} (tolerance {TOL}); ledgers equal: {ledgers_equal}")

    record = {
        "config": str(args.config), "tolerance": TOL, "max_abs_metric_diff": worst, "ledgers_equal": ledgers_equal,
        "engines": {n: {"dir": str(e["dir"]), "process_wall_s": e["process_wall_s"], "results": e["results"], "rounds_s": e["rounds_s"],
                        "flower_timing": None if e["flower"] is None else e["flower"]["timing"],
                        "hop_bytes": None if e["flower"] is None else e["flower"]["hop_bytes"]}
                    for n, e in engines.items()},
    }
    from fednl.util.atomic import atomic_write_json

    atomic_write_json(out / "comparison.json", record)
    if worst > TOL or not ledgers_equal:
        sys.exit(1)


if __name__ == "__main__":
    main()
