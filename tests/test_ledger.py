"""Wire casts and the byte ledger: exact counts, per group / direction / round, ratios."""

from __future__ import annotations

import pytest
import torch

from fednl.engine import wire
from fednl.engine.ledger import Ledger, group_index, strategy_round_bytes
from fednl.strategies.base import Payload
from fednl.strategies.fedavg import FedAvg
from fednl.strategies.fednl import FedNL
from test_engine_toy import ToyMemoryLM

pytestmark = pytest.mark.usefixtures("one_thread")


def test_wire_casts_both_ways_and_counts_itemsize() -> None:
    p = Payload({"a": torch.tensor([1.0, 1.0009765625, 3.1]), "i": torch.tensor([1, 2], dtype=torch.int64)})
    for name, dtype, item in (("fp32", torch.float32, 4), ("fp16", torch.float16, 2), ("bf16", torch.bfloat16, 2)):
        enc = wire.encode(p, name)
        assert enc.tensors["a"].dtype == dtype and enc.tensors["i"].dtype == torch.int64
        assert wire.payload_bytes(enc) == 3 * item + 2 * 8
        dec = wire.decode(enc)
        assert dec.tensors["a"].dtype == torch.float32
        assert torch.equal(dec.tensors["a"], p.tensors["a"].to(dtype).float())
    # bf16 keeps 8 mantissa bits: 1 + 2^-10 rounds to 1
    assert float(wire.decode(wire.encode(p, "bf16")).tensors["a"][1]) == 1.0
    assert float(wire.decode(wire.encode(p, "fp16")).tensors["a"][1]) == 1.0009765625
    # the encoded payload never aliases the sender's tensors
    enc = wire.encode(p, "fp32")
    enc.tensors["a"][0] = 99.0
    assert float(p.tensors["a"][0]) == 1.0
    with pytest.raises(ValueError, match="engine.wire_dtype"):
        wire.encode(p, "fp8")


def test_ledger_totals_by_round_client_direction_group() -> None:
    index = group_index({"rule": {"r"}, "gate": {"g"}, "lora": {"l"}, "frozen": set()})
    led = Ledger()
    down = wire.encode(Payload({"r": torch.zeros(10), "g": torch.zeros(2)}), "fp16")
    up = wire.encode(Payload({"r": torch.zeros(10), "g": torch.zeros(2), "cv": torch.zeros(3)}), "fp16")
    assert led.record(1, "a", "down", down, index, "fp16") == 24
    assert led.record(1, "a", "up", up, index, "fp16") == 30
    led.record(2, "b", "down", down, index, "fp16")
    assert led.bytes_down == 48 and led.bytes_up == 30 and led.total() == 78
    assert led.per_round() == [{"round": 1, "bytes_up": 30, "bytes_down": 24},
                               {"round": 2, "bytes_up": 0, "bytes_down": 24}]
    assert led.by_group() == {"gate": {"bytes_up": 4, "bytes_down": 8}, "other": {"bytes_up": 6, "bytes_down": 0},
                              "rule": {"bytes_up": 20, "bytes_down": 40}}
    assert led.by_client() == {"a": {"bytes_up": 30, "bytes_down": 24}, "b": {"bytes_up": 0, "bytes_down": 24}}
    assert {e.dtype for e in led.entries} == {"fp16"}
    assert Ledger.from_json(led.to_json()).to_json() == led.to_json()
    other = Ledger()
    other.record(1, "a", "down", wire.encode(Payload({"l": torch.zeros(39)}), "fp32"), index, "fp32")
    assert led.ratio_to(other) == 78 / 156 and other.ratio_to(led) == 2.0
    with pytest.raises(ValueError, match="no bytes"):
        led.ratio_to(Ledger())
    assert led.summary()["by_group"] == led.by_group()


def test_group_index_rejects_overlaps() -> None:
    with pytest.raises(ValueError, match="two groups"):
        group_index({"a": {"x"}, "b": {"x"}})


def test_strategy_round_bytes_counts_built_payloads() -> None:
    model = ToyMemoryLM(d=16, r=2)
    fednl = strategy_round_bytes(FedNL(groups=model.groups()), model, "fp32")
    # rule_k 16x16 + rule_beta 1 + gate 1 = 258 floats each way
    assert fednl["total"] == {"bytes_up": 258 * 4, "bytes_down": 258 * 4, "numel": 258}
    assert set(fednl) == {"rule", "gate", "total"}
    avg = strategy_round_bytes(FedAvg(groups=model.groups()), model, "bf16", clients=3)
    # FedAvg on the same model trains and sends everything non-frozen: 258 + LoRA (2x16 + 16x2) = 322
    assert avg["total"]["numel"] == 322 and avg["total"]["bytes_up"] == 322 * 2 * 3
    assert avg["lora"]["bytes_down"] == 64 * 2 * 3
