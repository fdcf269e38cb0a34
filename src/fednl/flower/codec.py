"""Payloads <-> Flower records, bit-exact for every dtype (bf16 included), with exact byte accounting.

Flower's own ``Array.from_torch_tensor`` goes through numpy, which has no bfloat16, and prefixes every tensor
with a ~128-byte ``.npy`` header. fednl ships each tensor instead as its raw little-endian bytes in an
``Array`` whose ``stype`` is :data:`STYPE` and whose ``dtype`` is the torch dtype name (``"bfloat16"``, ...).
Consequences:

* bf16 (and fp16/fp32/...) payloads cross Flower bit-exactly — the bytes *are* the tensor's storage;
* ``len(array.data) == numel * itemsize``, so the payload bytes of a message equal the in-process ledger's
  ``sum(numel * itemsize)`` exactly, and ``ArrayRecord.count_bytes()`` is that plus the key lengths.

The byte terms used throughout the Flower adapter (see ``docs/FLOWER.md``):

``payload``  Σ numel × itemsize of the tensors of one message (what the in-process ledger counts);
``overhead`` everything else fednl puts in the message's records: the ``ArrayRecord`` key bytes plus the
             ``count_bytes()`` of its ``ConfigRecord``/``MetricRecord`` entries (round, cid, config text, metrics).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fednl.strategies.base import Params, Payload, Scalar

STYPE = "fednl.raw-le"  # raw little-endian tensor storage, C order

# Record names inside a message's RecordDict.
TENSORS = "fednl.tensors"
META = "fednl.meta"

_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def _require_little_endian() -> None:
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise ValueError(f"fednl's Flower codec needs a little-endian host, this one is {sys.byteorder!r}")


def tensor_to_array(name: str, tensor: torch.Tensor) -> Array:
    """One tensor as an :class:`Array` holding its raw bytes (no copy of semantics, no header)."""
    _require_little_endian()
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"payload entry {name!r} is a {type(tensor).__name__}, expected a torch.Tensor")
    if tensor.dtype not in _NAMES:
        raise ValueError(f"payload entry {name!r} has dtype {tensor.dtype}, which the Flower codec cannot ship; "
                         f"supported: {', '.join(sorted(_DTYPES))}")
    if tensor.numel() == 0:
        raise ValueError(f"payload entry {name!r} is empty (shape {tuple(tensor.shape)}); nothing to ship")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes()
    return Array(dtype=_NAMES[tensor.dtype], shape=tuple(int(s) for s in tensor.shape), stype=STYPE, data=data)


def array_to_tensor(name: str, array: Array) -> torch.Tensor:
    """Inverse of :func:`tensor_to_array`; validates stype, dtype and byte count."""
    _require_little_endian()
    if array.stype != STYPE:
        raise ValueError(f"array {name!r} has stype {array.stype!r}, expected {STYPE!r} (not sent by fednl?)")
    if array.dtype not in _DTYPES:
        raise ValueError(f"array {name!r} has unsupported dtype {array.dtype!r}")
    dtype = _DTYPES[array.dtype]
    shape = tuple(int(s) for s in array.shape)
    numel = 1
    for s in shape:
        numel *= s
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(array.data) != numel * itemsize:
        raise ValueError(f"array {name!r}: {len(array.data)} bytes for shape {shape} of {array.dtype} "
                         f"(expected {numel * itemsize})")
    raw = torch.frombuffer(bytearray(array.data), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape).clone()


def tensors_to_record(tensors: Params) -> ArrayRecord:
    """Named tensors -> ArrayRecord (keys kept in sorted order so messages are reproducible)."""
    rec = ArrayRecord()
    for name in sorted(tensors):
        rec[name] = tensor_to_array(name, tensors[name])
    return rec


def record_to_tensors(rec: ArrayRecord) -> Params:
    return {name: array_to_tensor(name, arr) for name, arr in rec.items()}


def meta_to_record(meta: dict[str, Scalar]) -> ConfigRecord:
    for k, v in meta.items():
        if not isinstance(v, int | float | str | bool):
            raise ValueError(f"payload meta {k!r} is a {type(v).__name__}; only int, float, str and bool cross "
                             "the wire")
    return ConfigRecord(dict(meta))


def encode_payload(payload: Payload) -> RecordDict:
    """A :class:`Payload` as the two records fednl puts in a message (tensors + meta)."""
    return RecordDict({TENSORS: tensors_to_record(payload.tensors), META: meta_to_record(payload.meta)})


def decode_payload(content: RecordDict) -> Payload:
    for key, kind in ((TENSORS, ArrayRecord), (META, ConfigRecord)):
        if key not in content or not isinstance(content[key], kind):
            raise ValueError(f"message lacks the {kind.__name__} {key!r}; records present: {sorted(content)}")
    meta = dict(content[META])
    return Payload(record_to_tensors(content[TENSORS]), meta)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ accounting
@dataclass(frozen=True)
class MessageBytes:
    """Bytes of one message as fednl accounts for them (see the module docstring)."""

    payload: int   # Σ numel × itemsize of the shipped tensors == the in-process ledger
    overhead: int  # ArrayRecord key bytes + count_bytes() of every other record fednl put in the message

    @property
    def total(self) -> int:
        return self.payload + self.overhead


def payload_bytes(rec: ArrayRecord) -> int:
    """Σ ``len(array.data)`` — for fednl arrays exactly Σ numel × itemsize."""
    return sum(len(arr.data) for arr in rec.values())


def message_bytes(content: RecordDict) -> MessageBytes:
    """Split ``count_bytes()`` of every record in ``content`` into payload and overhead."""
    payload = 0
    overhead = 0
    for rec in content.values():
        if isinstance(rec, ArrayRecord):
            p = payload_bytes(rec)
            payload += p
            overhead += rec.count_bytes() - p
        elif isinstance(rec, ConfigRecord | MetricRecord):
            overhead += rec.count_bytes()
        else:  # pragma: no cover - RecordDict accepts only these three kinds
            raise ValueError(f"unexpected record type {type(rec).__name__}")
    return MessageBytes(payload=payload, overhead=overhead)
