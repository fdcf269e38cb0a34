"""Flower codec: bit-exact payloads (bf16 included) through Flower's real object serialisation, exact bytes."""

from __future__ import annotations

import pytest
import torch

flwr = pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects  # noqa: E402
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents  # noqa: E402

from fednl.flower.codec import (  # noqa: E402
    META,
    STYPE,
    TENSORS,
    array_to_tensor,
    decode_payload,
    encode_payload,
    message_bytes,
    payload_bytes,
    tensor_to_array,
)
from fednl.strategies.base import Payload  # noqa: E402


def wire(obj):
    """Deflate every nested object and inflate them back: what Flower does on each hop."""
    contents = {oid: o.deflate() for oid, o in get_all_nested_objects(obj).items()}
    return inflate_object_from_contents(obj.object_id, contents)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The storage bits of ``t`` as an integer tensor (compares NaN payloads and -0.0 exactly)."""
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(view) if t.dtype != torch.bool else t.to(torch.uint8)


def special_bf16() -> torch.Tensor:
    raw = torch.tensor(
        [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC1, 0x0001, 0x8001, 0x3F80, 0x7F7F, 0x1234], dtype=torch.int32
    )
    return raw.to(torch.int16).view(torch.bfloat16)  # 0, -0, +inf, -inf, a NaN payload, subnormals, 1, max, junk


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.uint8, torch.bool],
)
def test_tensor_roundtrip_bit_exact_through_flower_serialisation(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 7, generator=g) * 100).to(dtype)
    rec = wire(ArrayRecord({"w": tensor_to_array("w", x)}))
    y = array_to_tensor("w", rec["w"])
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(bits(y), bits(x))


def test_bf16_special_values_survive_bit_exactly():
    x = special_bf16()
    with pytest.raises(TypeError):  # the reason for the codec: Flower's own path rejects bf16
        Array(x)
    y = array_to_tensor("s", wire(ArrayRecord({"s": tensor_to_array("s", x)}))["s"])
    assert torch.equal(y.view(torch.int16), x.view(torch.int16))


def test_non_contiguous_and_scalar_tensors():
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # non-contiguous view
    assert torch.equal(array_to_tensor("x", tensor_to_array("x", x)), x)
    s = torch.tensor(2.5, dtype=torch.bfloat16)
    back = array_to_tensor("s", tensor_to_array("s", s))
    assert back.shape == () and back.item() == 2.5


def test_payload_roundtrip_and_meta():
    p = Payload(
        {"b.lora_A": torch.randn(4, 8).bfloat16(), "a.gate": torch.randn(8, dtype=torch.float16)},
        {"round": 3, "tree_level": "cluster-1", "mu": 0.01, "flag": True},
    )
    q = decode_payload(wire(encode_payload(p)))
    assert q.meta == p.meta and type(q.meta["round"]) is int
    assert set(q.tensors) == set(p.tensors)
    for n, t in p.tensors.items():
        assert q.tensors[n].dtype == t.dtype and torch.equal(bits(q.tensors[n]), bits(t))


def test_payload_bytes_are_numel_times_itemsize_and_overhead_is_keys_plus_records():
    tensors = {"x.w": torch.zeros(10, 3, dtype=torch.bfloat16), "y": torch.zeros(7, dtype=torch.float32)}
    content = encode_payload(Payload(tensors, {"round": 1}))
    expected_payload = 30 * 2 + 7 * 4
    assert payload_bytes(content[TENSORS]) == expected_payload
    assert content[TENSORS].count_bytes() == expected_payload + len("x.w") + len("y")
    content["extra"] = MetricRecord({"loss": 0.5})
    mb = message_bytes(content)
    # ConfigRecord/MetricRecord count_bytes: key length + 8 bytes per int/float
    assert mb.payload == expected_payload
    assert mb.overhead == (len("x.w") + len("y")) + (len("round") + 8) + (len("loss") + 8)
    assert mb.total == mb.payload + mb.overhead


def test_bad_input_is_refused_with_a_precise_message():
    with pytest.raises(ValueError, match="complex64"):
        tensor_to_array("z", torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="empty"):
        tensor_to_array("e", torch.zeros(0))
    with pytest.raises(ValueError, match="torch.Tensor"):
        tensor_to_array("n", [1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stype"):
        array_to_tensor("n", Array(torch.zeros(2)))  # a plain Flower numpy array, not ours
    short = Array(dtype="float32", shape=(4,), stype=STYPE, data=b"\x00" * 12)
    with pytest.raises(ValueError, match="12 bytes for shape"):
        array_to_tensor("short", short)
    with pytest.raises(ValueError, match="unsupported dtype"):
        array_to_tensor("c", Array(dtype="complex64", shape=(1,), stype=STYPE, data=b"\x00" * 8))
    with pytest.raises(ValueError, match=TENSORS):
        decode_payload(RecordDict({META: ConfigRecord({"round": 1})}))
    with pytest.raises(ValueError, match="list"):
        encode_payload(Payload({"a": torch.zeros(1)}, {"bad": [1, 2]}))  # type: ignore[dict-item]
