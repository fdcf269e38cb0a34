"""FedNL vs FedAvg-LoRA per-round bytes for a real model built by fednl.models (tiny Llama), from payloads."""

from __future__ import annotations

import os

import pytest

from fednl.engine.comm import fedavg_lora_round_bytes, format_comparison, traffic_comparison
from fednl.models.build import build_model
from fednl.models.config import LoraConfig, MemoryConfig, ModelConfig
from fednl.models.groups import group_counts

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TINY = ModelConfig(source="tiny", tiny_hidden=32, tiny_layers=2, tiny_heads=2, tiny_kv_heads=1, tiny_intermediate=64)


def test_fedavg_lora_all_seven_linears_by_hand() -> None:
    # per layer, sum(in + out) over q(32+32) k(32+16) v(32+16) o(32+32) gate(32+64) up(32+64) down(64+32) = 512
    rec = fedavg_lora_round_bytes(TINY, LoraConfig(r=4, targets="all"), "fp32", clients=3)
    assert rec["total"]["numel"] == 2 * 4 * 512
    assert rec["total"]["bytes_up"] == rec["total"]["bytes_down"] == 2 * 4 * 512 * 4 * 3
    assert set(rec) == {"lora", "total"}


def test_fednl_rules_payload_equals_rule_and_gate_groups_and_ratio() -> None:
    rec = traffic_comparison(TINY, r=4, alpha=8.0, wire_dtype="bf16")
    counts = group_counts(build_model("titans", TINY, MemoryConfig(), LoraConfig(r=4, alpha=8.0)))
    assert rec["fednl"]["total"]["numel"] == counts["rule"] + counts["gate"] > 0
    assert rec["fednl"]["total"]["bytes_up"] == 2 * rec["fednl"]["total"]["numel"]  # bf16: 2 bytes
    assert "lora" not in rec["fednl"]
    assert rec["ratio_fedavg_over_fednl"] == pytest.approx(4096 / rec["fednl"]["total"]["numel"])
    assert rec["ratio_fednl_over_fedavg"] == pytest.approx(1 / rec["ratio_fedavg_over_fednl"])
    text = format_comparison(rec)
    assert "FedNL (scope=rules)" in text and "ratio FedAvg-LoRA / FedNL" in text


def test_scope_rules_plus_lora_sends_the_adapters() -> None:
    rec = traffic_comparison(TINY, r=4, alpha=8.0, scope="rules+lora", fednl_targets=["q_proj"], fedavg_targets="all")
    # FedNL's own LoRA (q only): 2 layers x 4 x (32 + 32) = 512 adapter parameters now cross the wire
    assert rec["fednl"]["lora"]["numel"] == 512


def test_fednl_int8_against_fedavg_fp32_is_counted_from_encoded_payloads() -> None:
    rec = traffic_comparison(TINY, r=4, alpha=8.0, wire_dtype="int8", fedavg_wire="fp32")
    model = build_model("titans", TINY, MemoryConfig(), LoraConfig(r=4, alpha=8.0))
    from fednl.models.groups import param_groups

    shared = param_groups(model)["rule"] | param_groups(model)["gate"]
    numel = sum(p.numel() for n, p in model.named_parameters() if n in shared)
    # int8: one byte per value plus one float32 scale per tensor; FedAvg-LoRA: 4 bytes per value
    assert rec["fednl"]["total"]["bytes_up"] == numel + 4 * len(shared) == rec["fednl"]["total"]["bytes_down"]
    assert rec["fedavg"]["total"]["bytes_up"] == 2 * 4 * 512 * 4
    assert (rec["wire_dtype"], rec["fedavg_wire"]) == ("int8", "fp32")
    assert rec["ratio_fedavg_over_fednl"] == pytest.approx(2 * 4 * 512 * 4 / (numel + 4 * len(shared)))
    assert "FedNL int8, FedAvg-LoRA fp32" in format_comparison(rec)


def test_comm_cli_fedavg_wire_flag_and_bad_codecs() -> None:
    import json

    from typer.testing import CliRunner

    from fednl.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["comm", "--model", "tiny", "--r", "4", "--wire", "int8-row", "--fedavg-wire", "fp32",
                              "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.output)
    assert {"ratio_fedavg_over_fednl", "fednl", "fedavg", "wire_dtype", "fedavg_wire"} <= set(rec)
    assert rec["fednl"]["total"]["bytes_up"] < rec["fedavg"]["total"]["bytes_up"]
    bad = runner.invoke(app, ["comm", "--model", "tiny", "--fedavg-wire", "int4"])
    assert bad.exit_code == 2 and "--fedavg-wire: unknown wire codec 'int4'" in bad.output
