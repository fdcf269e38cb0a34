"""The quality cost of client-level DP at the same ε: FedNL (rules shared) vs FedAvg-LoRA (docs/ROBUSTNESS.md).

Both methods run the same small CPU config — a random tiny Llama with the byte tokenizer, the embedded book cut
into ``--clients`` IID clients, ``--rounds`` rounds of full participation — once without DP and once per noise
multiplier ``z`` of ``--noise``, for every seed. ε depends only on ``z`` and the number of rounds (the accountant
composes full-participation Gaussian releases, no amplification by sampling), so at one ``z`` both methods spend
exactly the same ε; the difference is what the noise does to each: ``N(0, (zC/m)²)`` on every shared coordinate
of the mean, and FedNL shares a few hundred coordinates where FedAvg-LoRA shares every LoRA matrix.

The clip norm ``C`` is set per method to the median L2 norm of the clients' round-1 updates in the no-DP run of
the first seed (so about half of the updates are clipped; the same rule for both methods). Reported per method:
the test CE (nats per byte, mean over the clients) after the last round, mean ± std over seeds; the cost of DP,
the paired per-seed difference CE(DP) − CE(no DP), mean ± std; the shared coordinates and ε.

    .venv/bin/python scripts/dp_cost.py --out /tmp/dp-cost                 # 2 methods x 3 seeds x (1 + 2) runs
    .venv/bin/python scripts/dp_cost.py --out /tmp/dp-cost --seeds 0 --noise 1.0

Writes ``<out>/dp_cost.json`` and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fednl.config import load_config
from fednl.engine.dp import ClientDP, DPConfig
from fednl.engine.screening import update_norm
from fednl.experiment import build_simulator, run_config
from fednl.util.atomic import atomic_write_json
from tiny_stream import tiny_stream_config

METHODS = {"fednl": ["method.scope=rules"], "fedavg": []}
LABEL = {"fednl": "FedNL (rules)", "fedavg": "FedAvg-LoRA"}


def overrides(method: str, seed: int, dp: tuple[float, float] | None) -> list[str]:
    out = [f"method.name={method}", *METHODS[method], f"seed={seed}"]
    if dp is not None:
        out += [f"dp.clip_norm={dp[0]!r}", f"dp.noise_multiplier={dp[1]!r}", "dp.delta=1e-5"]
    return out


def round1_median_norm(config: Path, method: str, seed: int, out: Path) -> float:
    """The median ||reply − sent|| of the round-1 updates (a 1-round run without DP)."""
    cfg = load_config(str(config), [*overrides(method, seed, None), "rounds=1"])
    sim = build_simulator(cfg, out, log=lambda _m: None)
    norms: list[float] = []
    inner = sim._aggregate

    def aggregate(rnd: int, replies: Any, state: Any, **kw: Any) -> Any:
        norms.extend(update_norm(r.payload.tensors, kw["sent"][r.cid]) for r in replies)
        return inner(rnd, replies, state, **kw)

    sim._aggregate = aggregate  # type: ignore[method-assign]
    sim.run()
    return statistics.median(norms)


def shared_numel(config: Path, method: str) -> int:
    cfg = load_config(str(config), overrides(method, 0, None))
    with tempfile.TemporaryDirectory() as tmp:
        sim = build_simulator(cfg, tmp, log=lambda _m: None)
        return sum(t.numel() for t in sim._fresh.global_params.values())


def mean_std(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--noise", default="0.5,1.0", help="noise multipliers z")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    noise = [float(z) for z in args.noise.split(",") if z]
    args.out.mkdir(parents=True, exist_ok=True)
    config = args.out / "dp-cost.toml"
    config.write_text(tiny_stream_config(seed=0, rounds=args.rounds, clients=args.clients))
    rows: list[dict[str, Any]] = []
    clip: dict[str, float] = {}
    numel: dict[str, int] = {}
    for method in METHODS:
        numel[method] = shared_numel(config, method)
        clip[method] = round1_median_norm(config, method, seeds[0], args.out / f"{method}-norms")
        print(f"{method}: {numel[method]} shared coordinates, C = median round-1 update norm = {clip[method]:.4g}",
              flush=True)
        for seed in seeds:
            for z in [None, *noise]:
                dp = None if z is None else (clip[method], z)
                out = args.out / f"{method}-s{seed}-{'nodp' if z is None else f'z{z:g}'}"
                t0 = time.perf_counter()
                res = run_config(load_config(str(config), overrides(method, seed, dp)), out, log=lambda _m: None)
                lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
                last = [r for r in lines if r["type"] == "round"][-1]
                row = {"method": method, "seed": seed, "z": z, "clip_norm": None if dp is None else dp[0],
                       "ce": res["mean"]["ce"], "epsilon": (last.get("dp") or {}).get("epsilon"),
                       "wall_s": round(time.perf_counter() - t0, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    eps = {z: ClientDP(DPConfig(clip_norm=1.0, noise_multiplier=z), n_clients=args.clients) for z in noise}
    for acc in eps.values():
        for _ in range(args.rounds):
            acc.record(args.clients)
    record = {"config": config.read_text(), "seeds": seeds, "noise": noise, "rounds": args.rounds,
              "clients": args.clients, "clip_norm": clip, "shared_numel": numel, "rows": rows,
              "epsilon": {str(z): acc.spent()["epsilon"] for z, acc in eps.items()}}
    atomic_write_json(args.out / "dp_cost.json", record)

    def ce(method: str, z: float | None) -> list[float]:
        return [r["ce"] for r in sorted(rows, key=lambda r: r["seed"]) if r["method"] == method and r["z"] == z]

    print(f"\nε after {args.rounds} rounds at δ = 1e-5: " + ", ".join(
        f"z = {z:g}: {record['epsilon'][str(z)]:.2f}" for z in noise))
    print("\n| method | shared coordinates | C | CE, no DP | " + " | ".join(
        f"CE, z = {z:g} (ε = {record['epsilon'][str(z)]:.1f}) | cost at z = {z:g}" for z in noise) + " |")
    print("|---|---|---|---|" + "---|---|" * len(noise))
    for method in METHODS:
        base = ce(method, None)
        cells = [LABEL[method], str(numel[method]), f"{clip[method]:.3g}", mean_std(base)]
        for z in noise:
            with_dp = ce(method, z)
            cells += [mean_std(with_dp), mean_std([a - b for a, b in zip(with_dp, base)])]
        print("| " + " | ".join(cells) + " |")
    if any(math.isnan(r["ce"]) for r in rows):
        print("warning: a run ended with CE = nan")


if __name__ == "__main__":
    main()
