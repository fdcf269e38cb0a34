"""Per-round traffic of FedNL vs FedAvg-LoRA for one backbone, counted by building both payloads.

Neither number comes from a formula: each model is built (``titans`` for FedNL, ``lora`` for FedAvg-LoRA),
the strategy constructs its real down/up payloads, they are encoded by the wire codec (a cast, int8 codes and
scales, or top-k values and indices) and their bytes are summed (:func:`fednl.engine.ledger.strategy_round_bytes`).
Each method has its own codec, so FedNL at int8 can be compared with FedAvg-LoRA at fp32.
"""

from __future__ import annotations

import gc
from typing import Any

from fednl.engine.codecs import as_spec
from fednl.engine.ledger import strategy_round_bytes
from fednl.models.config import LoraConfig, MemoryConfig, ModelConfig


def round_bytes(method: str, model_cfg: ModelConfig, memory_cfg: MemoryConfig, lora_cfg: LoraConfig,
                wire_dtype: str, *, options: dict[str, Any] | None = None, seed: int = 0,
                clients: int = 1) -> dict[str, dict[str, int]]:
    """Bytes per round of ``method`` for ``clients`` clients: ``{group: {bytes_up, bytes_down, numel}, "total": ...}``."""
    from fednl.models.build import build_model
    from fednl.models.groups import param_groups
    from fednl.strategies import get_strategy

    cls = get_strategy(method)
    opts = cls.Options.model_validate(options or {})
    model = build_model(cls.model_spec(opts), model_cfg, memory_cfg, lora_cfg, seed=seed)
    try:
        return strategy_round_bytes(cls(opts, groups=param_groups(model)), model, wire_dtype, clients=clients)
    finally:
        del model
        gc.collect()


def fedavg_lora_round_bytes(model_cfg: ModelConfig, lora_cfg: LoraConfig, wire_dtype: str, *, seed: int = 0,
                            clients: int = 1) -> dict[str, dict[str, int]]:
    """The FedAvg-LoRA reference: plain backbone + LoRA (``lora_cfg``), every adapter sent both ways."""
    return round_bytes("fedavg", model_cfg, MemoryConfig(), lora_cfg, wire_dtype, seed=seed, clients=clients)


def traffic_comparison(model_cfg: ModelConfig, *, r: int = 16, alpha: float = 32.0, wire_dtype: str = "fp32",
                       scope: str = "rules", fednl_targets: list[str] | str | None = None,
                       fedavg_targets: list[str] | str = "all", memory_cfg: MemoryConfig | None = None,
                       seed: int = 0, fedavg_wire: str | None = None) -> dict[str, Any]:
    """FedNL (``scope``, codec ``wire_dtype``) and FedAvg-LoRA (``fedavg_targets``, default all seven linears, codec
    ``fedavg_wire``, default the same) per-round bytes and their ratio. Codecs are labels (``"fp32"``, ``"int8"``,
    ``"int8-row"``, ``"topk-0.01"`` ...; :class:`fednl.engine.codecs.WireSpec`)."""
    wire_dtype = as_spec(wire_dtype).label
    fedavg_wire = wire_dtype if fedavg_wire is None else as_spec(fedavg_wire).label
    mem = memory_cfg or MemoryConfig()
    fednl_lora = LoraConfig(r=r, alpha=alpha) if fednl_targets is None else LoraConfig(r=r, alpha=alpha, targets=fednl_targets)
    fednl = round_bytes("fednl", model_cfg, mem, fednl_lora, wire_dtype, options={"scope": scope}, seed=seed)
    fedavg = fedavg_lora_round_bytes(model_cfg, LoraConfig(r=r, alpha=alpha, targets=fedavg_targets), fedavg_wire,
                                     seed=seed)
    a = fednl["total"]["bytes_up"] + fednl["total"]["bytes_down"]
    b = fedavg["total"]["bytes_up"] + fedavg["total"]["bytes_down"]
    return {
        "model": model_cfg.source, "wire_dtype": wire_dtype, "fedavg_wire": fedavg_wire, "r": r, "fednl_scope": scope,
        "fedavg_targets": fedavg_targets, "fednl": fednl, "fedavg": fedavg,
        "ratio_fedavg_over_fednl": b / a, "ratio_fednl_over_fedavg": a / b,
    }


def format_comparison(rec: dict[str, Any]) -> str:
    wires = rec["wire_dtype"] if rec["wire_dtype"] == rec["fedavg_wire"] else \
        f"FedNL {rec['wire_dtype']}, FedAvg-LoRA {rec['fedavg_wire']}"
    lines = [f"per-round, per-client traffic on {rec['model']} (LoRA r={rec['r']}, wire {wires}), "
             "counted from built and encoded payloads"]
    lines.append(f"{'method':<34} {'group':<8} {'params sent':>14} {'bytes up':>14} {'bytes down':>14}")
    for label, key in ((f"FedNL (scope={rec['fednl_scope']})", "fednl"),
                       (f"FedAvg-LoRA (targets={rec['fedavg_targets']})", "fedavg")):
        for g, v in rec[key].items():
            lines.append(f"{label:<34} {g:<8} {v['numel']:>14,} {v['bytes_up']:>14,} {v['bytes_down']:>14,}")
    lines.append(f"ratio FedAvg-LoRA / FedNL = {rec['ratio_fedavg_over_fednl']:,.1f}x "
                 f"(FedNL / FedAvg-LoRA = {rec['ratio_fednl_over_fedavg']:.5f})")
    return "\n".join(lines)
