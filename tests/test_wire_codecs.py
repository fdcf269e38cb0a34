"""Wire codecs by hand: int8 (per tensor / per row), top-k with error feedback, exact byte counts, config."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from fednl.client.state import ClientState
from fednl.engine import wire as plain
from fednl.engine.codecs import WireSpec, decode_parts, encode_tensor, group_parts, topk_count
from fednl.engine.ledger import Ledger
from fednl.engine.wire import CLIENT_DOWN, CLIENT_RESIDUAL, Wire, payload_bytes
from fednl.strategies.base import Payload

pytestmark = pytest.mark.usefixtures("one_thread")


def roundtrip(name: str, x: torch.Tensor, spec: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    parts = encode_tensor(name, x, WireSpec.model_validate(spec))
    value, _ = decode_parts(name, group_parts(parts)[name])
    return parts, value


# ---------------------------------------------------------------------------------------------- int8
def test_int8_per_tensor_by_hand() -> None:
    # max|x| = 254 -> s = 254 / 127 = 2; x / s = [127, 1.5, -2.5, 0.5] -> round half to even [127, 2, -2, 0]
    parts, value = roundtrip("w", torch.tensor([254.0, 3.0, -5.0, 1.0]), "int8")
    assert set(parts) == {"w", "w|scale"}
    assert parts["w"].dtype == torch.int8 and parts["w"].tolist() == [127, 2, -2, 0]
    assert parts["w|scale"].tolist() == [2.0] and parts["w|scale"].dtype == torch.float32
    assert value.tolist() == [254.0, 4.0, -4.0, 0.0]
    assert payload_bytes(Payload(parts)) == 4 * 1 + 1 * 4


def test_int8_per_row_by_hand_and_zero_rows() -> None:
    # row 0: max 127 -> s = 1: codes [127, -4] (-3.5 -> -4, half to even); row 1: all zero -> s = 0, codes 0;
    # row 2: max 254 -> s = 2: [1.0 -> 0.5 -> 0, 254 -> 127]
    x = torch.tensor([[127.0, -3.5], [0.0, 0.0], [1.0, 254.0]])
    parts, value = roundtrip("w", x, "int8-row")
    assert parts["w"].tolist() == [[127, -4], [0, 0], [0, 127]]
    assert parts["w|scale"].tolist() == [1.0, 0.0, 2.0]
    assert value.tolist() == [[127.0, -4.0], [0.0, 0.0], [0.0, 254.0]]
    assert payload_bytes(Payload(parts)) == 6 + 3 * 4
    # per tensor on the same values: one scale, s = 2
    parts, value = roundtrip("w", x, "int8")
    assert parts["w|scale"].tolist() == [2.0] and value.tolist() == [[128.0, -4.0], [0.0, 0.0], [0.0, 254.0]]
    # a 1-dim tensor has one row
    assert roundtrip("v", torch.tensor([0.5, -1.0]), "int8-row")[0]["v|scale"].numel() == 1


# ---------------------------------------------------------------------------------------------- top-k
def test_topk_by_hand_ties_to_the_lower_index() -> None:
    # |x| = [.5, 3, 1, 3, 0, .25]; k = ceil(0.5 * 6) = 3 -> flat indices 1, 3 (the tie at 3.0, lower first), 2
    x = torch.tensor([[0.5, -3.0, 1.0], [3.0, 0.0, -0.25]])
    parts, value = roundtrip("w", x, "topk-0.5")
    assert set(parts) == {"w|values", "w|indices", "w|shape"}
    assert parts["w|indices"].tolist() == [1, 2, 3] and parts["w|indices"].dtype == torch.int16
    assert parts["w|values"].tolist() == [-3.0, 1.0, 3.0] and parts["w|values"].dtype == torch.float32
    assert parts["w|shape"].tolist() == [2, 3] and parts["w|shape"].dtype == torch.int32
    assert value.tolist() == [[0.0, -3.0, 1.0], [3.0, 0.0, 0.0]]
    assert payload_bytes(Payload(parts)) == 3 * 4 + 3 * 2 + 2 * 4  # values + indices + shape
    # bf16 values; the fraction's product is rounded first: 0.1 * 30 -> 3, not 4
    parts, _ = roundtrip("w", torch.arange(30.0), "topk-0.1-bf16")
    assert parts["w|values"].dtype == torch.bfloat16 and parts["w|indices"].tolist() == [27, 28, 29]
    assert topk_count(30, 0.1) == 3 and topk_count(5, 0.01) == 1 and topk_count(40, 1.0) == 40
    assert roundtrip("w", torch.zeros(40000), "topk-0.0001")[0]["w|indices"].dtype == torch.int32


def test_topk_down_is_dense_first_then_deltas_with_the_same_copy_on_both_sides() -> None:
    w = Wire("fp32", "topk-0.25")
    store: dict[str, torch.Tensor] = {}
    client = ClientState("c0")
    # round 1: dense (the values dtype), both sides hold x1
    x1 = torch.tensor([1.0, 2.0, 3.0, 4.0])
    down, received = w.encode_down("c0", Payload({"p": x1}), store)
    assert set(down.tensors) == {"p"} and payload_bytes(down) == 16
    got = w.decode_down(down, client)
    assert got.tensors["p"].tolist() == x1.tolist() == received.tensors["p"].tolist()
    # round 2: x2 - m = [0, 0.5, -2, 0.25] -> top-1 sends index 2; the rest stays owed
    x2 = torch.tensor([1.0, 2.5, 1.0, 4.25])
    down, received = w.encode_down("c0", Payload({"p": x2}), store)
    assert down.tensors["p|indices"].tolist() == [2] and down.tensors["p|values"].tolist() == [-2.0]
    assert payload_bytes(down) == 4 + 2 + 4
    got = w.decode_down(down, client)
    assert got.tensors["p"].tolist() == [1.0, 2.0, 1.0, 4.0] == received.tensors["p"].tolist()
    assert torch.equal(store["wire|down|c0|p"], client.tensors[CLIENT_DOWN + "p"])
    # round 3, same x2: the next largest owed entry (index 1, 0.5) arrives
    down, _ = w.encode_down("c0", Payload({"p": x2}), store)
    assert w.decode_down(down, client).tensors["p"].tolist() == [1.0, 2.5, 1.0, 4.0]
    with pytest.raises(ValueError, match="holds no copy"):
        w.decode_down(down, ClientState("stranger"))


def test_topk_up_error_feedback_by_hand() -> None:
    w = Wire("topk-0.25", "fp32")
    client = ClientState("c0")
    # round 1: received [1, 1, 1, 1], reply [1.5, 0.9, 1, 3] -> e = [0.5, -0.1, 0, 2] -> send index 3
    received = Payload({"p": torch.ones(4)})
    up = w.encode_up(Payload({"p": torch.tensor([1.5, 0.9, 1.0, 3.0])}), received, client)
    assert up.tensors["p|indices"].tolist() == [3] and up.tensors["p|values"].tolist() == [2.0]
    assert torch.allclose(client.tensors[CLIENT_RESIDUAL + "p"], torch.tensor([0.5, -0.1, 0.0, 0.0]))
    like = {"p": torch.zeros(4)}
    assert w.decode_up(up, received, like).tensors["p"].tolist() == [1.0, 1.0, 1.0, 3.0]
    # round 2: no change of its own, the residual's largest entry (index 0, 0.5) goes out now
    received = Payload({"p": torch.full((4,), 2.0)})
    up = w.encode_up(Payload({"p": torch.full((4,), 2.0)}), received, client)
    assert up.tensors["p|indices"].tolist() == [0] and up.tensors["p|values"].tolist() == [0.5]
    assert w.decode_up(up, received, like).tensors["p"].tolist() == [2.5, 2.0, 2.0, 2.0]
    assert torch.allclose(client.tensors[CLIENT_RESIDUAL + "p"], torch.tensor([0.0, -0.1, 0.0, 0.0]))
    # a reply tensor the client did not receive is coded against zero; integers cross unchanged
    up = w.encode_up(Payload({"dc": torch.tensor([0.0, -1.0, 0.25, 0.0]), "n": torch.tensor([3])}),
                     Payload({}), ClientState("c1"))
    back = w.decode_up(up, Payload({}), {})
    assert back.tensors["dc"].tolist() == [0.0, -1.0, 0.0, 0.0] and back.tensors["n"].tolist() == [3]


def test_plain_wire_is_the_old_cast_path_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(0)
    p = Payload({"a": torch.randn(5, 3, generator=g), "i": torch.arange(4)}, {"round": 1})
    for dtype in ("fp32", "fp16", "bf16"):
        w = Wire(dtype, dtype)
        down, received = w.encode_down("c", p, {})
        assert received is None
        ref = plain.encode(p, dtype)
        assert all(torch.equal(down.tensors[n], ref.tensors[n]) and down.tensors[n].dtype == ref.tensors[n].dtype
                   for n in ref.tensors)
        got = w.decode_down(down, ClientState("c"))
        assert all(torch.equal(got.tensors[n], plain.decode(ref).tensors[n]) for n in p.tensors)


def test_int8_uplink_decodes_to_the_servers_dtype_and_check_rejects_other_codecs() -> None:
    w = Wire("int8-row", "bf16")
    up = w.encode_up(Payload({"p": torch.tensor([[254.0, 3.0]])}), Payload({}), ClientState("c"))
    back = w.decode_up(up, None, {"p": torch.zeros(1, 2, dtype=torch.float64)})
    assert back.tensors["p"].dtype == torch.float64 and back.tensors["p"].tolist() == [[254.0, 4.0]]
    w.check(up, "up")
    with pytest.raises(ValueError, match=r"the downlink codec is bf16"):
        w.check(up, "down")
    with pytest.raises(ValueError, match="no codec writes"):
        w.decode_up(Payload({"p|scale": torch.ones(1)}), None, {})


def test_ledger_counts_values_indices_scales_and_groups_parts_by_tensor() -> None:
    w = Wire("topk-0.5", "int8")
    down, _ = w.encode_down("c", Payload({"r": torch.ones(10), "g": torch.ones(2)}), {})
    up = w.encode_up(Payload({"r": torch.arange(10.0), "cv": torch.ones(3)}), Payload({}), ClientState("c"))
    ledger = Ledger()
    index = {"r": "rule", "g": "gate"}
    assert ledger.record(1, "c", "down", down, index, w.label("down")) == (10 + 4) + (2 + 4)
    # r: 5 values (4 B) + 5 int16 indices + 1 shape; cv: 2 values + 2 indices + 1 shape
    assert ledger.record(1, "c", "up", up, index, w.label("up")) == (20 + 10 + 4) + (8 + 4 + 4)
    assert ledger.by_group() == {"gate": {"bytes_up": 0, "bytes_down": 6},
                                 "other": {"bytes_up": 16, "bytes_down": 0},
                                 "rule": {"bytes_up": 34, "bytes_down": 14}}
    numel = {(e.group, e.direction): e.numel for e in ledger.entries}
    assert numel == {("gate", "down"): 2, ("rule", "down"): 10, ("rule", "up"): 5, ("other", "up"): 2}
    assert {e.dtype for e in ledger.entries} == {"int8", "topk-0.5"}


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("text,fields", [
    ("fp16", {"kind": "fp16"}), ("int8", {"kind": "int8", "scale": "tensor"}),
    ("int8-row", {"kind": "int8", "scale": "row"}),
    ("topk-0.01", {"kind": "topk", "fraction": 0.01, "values": "fp32"}),
    ("topk-0.25-bf16", {"kind": "topk", "fraction": 0.25, "values": "bf16"}),
])
def test_wire_spec_shorthand_and_label_roundtrip(text, fields) -> None:
    spec = WireSpec.model_validate(text)
    assert {k: getattr(spec, k) for k in fields} == fields
    assert spec.label == text and WireSpec.model_validate(spec.model_dump()) == spec
    assert WireSpec.model_validate(fields) == spec


@pytest.mark.parametrize("bad,match", [
    ("int9", "unknown wire codec 'int9'"), ("int8-col", "scale"), ("topk-x", "not a number"),
    ({"kind": "fp16", "scale": "row"}, "scale: only for kind = 'int8'"),
    ({"kind": "topk"}, "fraction: kind = 'topk' needs"), ({"kind": "topk", "fraction": 0}, "greater than 0"),
    ({"kind": "int8", "bits": 4}, "Extra inputs are not permitted"),
])
def test_wire_spec_errors_name_the_key(bad, match) -> None:
    with pytest.raises(ValidationError, match=match):
        WireSpec.model_validate(bad)


def test_engine_config_takes_codecs_per_direction(tmp_path) -> None:
    from fednl.config import ConfigError, load_config, save_resolved, to_toml

    base = {"method": {"name": "fedavg"}, "task": {"name": "niah7", "quickstart": True},
            "engine": {"wire_up": "int8-row", "wire_down": {"kind": "topk", "fraction": 0.1}, "max_bytes": 5000}}
    path = tmp_path / "c.toml"
    path.write_text(to_toml(base))
    cfg = load_config(str(path))
    assert cfg.engine.wire_up.label == "int8-row" and cfg.engine.wire_down.label == "topk-0.1"
    assert cfg.to_dict()["engine"] == {**cfg.to_dict()["engine"], "wire_up": "int8-row", "wire_down": "topk-0.1"}
    (tmp_path / "r").mkdir()
    assert load_config(str(save_resolved(cfg, tmp_path / "r"))) == cfg  # the resolved TOML writes the short forms
    with pytest.raises(ConfigError, match=r"engine.wire_up: .*unknown wire codec 'int3'"):
        load_config(str(path), ["engine.wire_up=int3"])
    with pytest.raises(ConfigError, match=r"engine.max_bytes: Input should be greater than or equal to 1"):
        load_config(str(path), ["engine.max_bytes=0"])
