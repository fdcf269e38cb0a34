"""fednl end to end in one file: config -> task -> model -> federated rounds -> evaluation.

    python examples/end_to_end.py              # about 15 s of CPU time
    python examples/end_to_end.py --out DIR    # keep the run directory (default: a temporary one)

It runs on the tiny random Llama with the byte tokenizer and the NIAH haystack book that ships inside the package,
so it reads nothing outside the repository and downloads nothing. Each step is the public API that `fednl run`
and `fednl evaluate` are made of; read it top to bottom.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from fednl.config import load_config, save_resolved
from fednl.engine.simulator import RunSpec, Simulator
from fednl.eval.protocol import evaluate_run
from fednl.models import build_model, group_counts, load_backbone, param_groups
from fednl.records import EvalReport, Results

# The `tiny` preset (FedNL, scope "rules", on NIAH-7) made smaller: two needle templates = two clients.
OVERRIDES = ["rounds=2", "task.templates=['passkey', 'uuid']", "task.train_lengths=[768]", "task.test_lengths=[768]",
             "train.seq_len=768", "memory.chunk_size=32", "engine.progress=false"]


def main(out: Path, overrides: list[str] = OVERRIDES) -> tuple[Results, EvalReport]:
    # 1. Config: one typed RunConfig (method, model, memory, LoRA, task, training, engine), validated at load.
    cfg = load_config("tiny", overrides)
    print(f"1. config   method {cfg.method.name} {cfg.method.options.model_dump()}, {cfg.rounds} rounds, seed {cfg.seed}")

    # 2. Task: the task config builds the federated task: each client's train / test examples.
    _, tokenizer = load_backbone(cfg.model)
    task = cfg.task.build(tokenizer, cfg.seed)
    for c in task.clients:
        print(f"2. task     client {c.name:<8} {len(c.train)} train / {len(c.test)} test {task.kind} examples")

    # 3. Model: the method names the model it trains (a kind + parameters); the strategy gets its parameter groups.
    model_spec = cfg.method.model_spec()
    model = build_model(model_spec, cfg.model, cfg.memory, cfg.lora, seed=cfg.seed)
    strategy = cfg.method.build(groups=param_groups(model))
    counts = group_counts(model)
    shared = sum(counts[g] for g in strategy.shared_groups())
    print(f"3. model    {model_spec.label}: parameters per group {counts}; {shared:,} cross the wire")

    # 4. Rounds: the in-process simulator runs the rounds (sample, send, train locally, aggregate, checkpoint).
    save_resolved(cfg, out)  # config.resolved.toml: what `fednl evaluate` rebuilds the run from
    spec = RunSpec.from_config(cfg, out, model_name=f"{cfg.model.source}/{model_spec.label}")
    sim = Simulator(model, tokenizer, task, strategy, spec, log=lambda line: print("4. rounds  ", line))
    results = Results.parse(sim.run(), source="the run")
    metric = results.primary_metric()
    print(f"   results  mean {metric} {results.mean[metric]:.4f}, {results.comm.total:,} bytes in "
          f"{results.rounds} rounds")

    # 5. Evaluate: the post-hoc protocol on the finished run directory (views, aggregation drop, by depth).
    report = evaluate_run(out, log=lambda line: None)
    for view, v in report.views.items():
        mean = "-" if v.summary.mean is None else f"{v.summary.mean:.4f}"
        print(f"5. evaluate {view:<12} mean {report.metric} {mean} over {v.summary.n_clients} clients")
    drop = report.aggregation_drop.summary
    if drop is not None:
        print(f"   aggregation drop (local fine-tuning minus aggregated, round {report.aggregation_drop.round}): "
              f"{drop.mean:+.4f}")
    if "personalised" in report.depth:
        pooled = report.depth["personalised"].pooled
        print("   accuracy by needle depth: " + ", ".join(f"{d} {c.accuracy:.2f}" for d, c in pooled.items()))
    return results, report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="run directory to keep (default: a temporary one)")
    args = parser.parse_args()
    if args.out is not None:
        main(args.out)
    else:
        with tempfile.TemporaryDirectory(prefix="fednl-e2e-") as tmp:
            main(Path(tmp))
