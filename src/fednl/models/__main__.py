"""``python -m fednl.models groups``: print the parameter-group counts of a model kind.

Example: ``python -m fednl.models groups --source smollm2 --kind titans --targets all --r 16``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fednl.models", description="model utilities")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("groups", help="print parameter-group counts")
    g.add_argument("--source", default="tiny", help="'smollm2', 'tiny' or 'hf:<folder>'")
    g.add_argument("--kind", default="titans", help="model kind (titans, lora, ...)")
    g.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj"], help="LoRA targets or 'all'")
    g.add_argument("--r", type=int, default=16)
    g.add_argument("--alpha", type=float, default=32.0)
    g.add_argument("--gate-granularity", choices=("head", "channel"), default="head")
    g.add_argument("--decay", action="store_true")
    g.add_argument("--beta-source", choices=("key", "input"), default="key")
    a = p.parse_args(argv)

    from fednl.models import LoraConfig, MemoryConfig, ModelConfig, build_model, print_group_counts

    targets = "all" if a.targets == ["all"] else list(a.targets)
    lora = LoraConfig(targets=targets, r=a.r, alpha=a.alpha)
    mem = MemoryConfig(gate_granularity=a.gate_granularity, decay=a.decay, beta_source=a.beta_source)
    model = build_model(a.kind, ModelConfig(source=a.source), mem, lora, seed=0)
    title = (f"{a.source} kind={a.kind} LoRA r={a.r} on {'all seven linears' if targets == 'all' else targets}"
             + (f", gate per {a.gate_granularity}, beta from {a.beta_source}, decay={a.decay}"
                if a.kind == "titans" else ""))
    print_group_counts(model, title)


if __name__ == "__main__":
    main()
