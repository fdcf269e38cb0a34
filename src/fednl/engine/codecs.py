"""Wire codecs: how one payload tensor is written on the wire and read back, exactly to their definitions.

A codec turns one named tensor into one or more wire tensors. The first is always named after the tensor; the
others are ``"<name>|<part>"`` (:data:`SEP`), so the ledger attributes every byte to the tensor's parameter group
and a decoder finds the parts by name. Integer and bool tensors always cross unchanged.

========== ================================================ =========================================================
kind       wire tensors (bytes)                             decoded value
========== ================================================ =========================================================
``fp32``   ``name``: the tensor cast (4 B each)             the cast back to the receiver's dtype
``fp16``   ``name``: cast to float16 (2 B each)             idem
``bf16``   ``name``: cast to bfloat16 (2 B each)            idem
``int8``   ``name``: int8 codes q (1 B each),               ``q * s`` (float32, per row broadcast)
           ``name|scale``: float32 s, one per tensor
           (``scale = "tensor"``) or per row (``"row"``:
           one per index of dim 0; tensors with < 2 dims
           have one row)
``topk``   ``name|values``: the k entries (``values``       a zero tensor of that shape with the values at the
           dtype), ``name|indices``: their flat indices     indices (scattered into a reference: see
           ascending (int16 when numel <= 32768, else       :mod:`fednl.engine.wire`)
           int32), ``name|shape``: int32, one per dim
========== ================================================ =========================================================

int8 (symmetric, round half to even)::

    s = max|x| / 127   (per tensor or per row, float32)      q = clamp(round(x / s), -127, 127)   (q = 0 where s = 0)

top-k: ``k = max(1, ceil(fraction * numel))``; the k entries of largest magnitude, ties to the lower flat index.
A 0-dim tensor has no shape to send: top-k sends it as a plain cast to the ``values`` dtype.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

SEP = "|"
CASTS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
KINDS = ("fp32", "fp16", "bf16", "int8", "topk")
VALUE_PARTS = ("", "values")  # parts whose entries are values (counted as ``numel`` by the ledger)
INT8_MAX = 127


def base_name(wire_name: str) -> str:
    """``"w|scale"`` -> ``"w"``: the payload tensor a wire tensor belongs to."""
    return wire_name.split(SEP, 1)[0]


def part_name(wire_name: str) -> str:
    """``"w|scale"`` -> ``"scale"``; ``"w"`` -> ``""``."""
    _, _, part = wire_name.partition(SEP)
    return part


class WireSpec(BaseModel):
    """One direction's codec. In TOML a string (``"fp16"``, ``"int8"``, ``"int8-row"``, ``"topk-0.01"``,
    ``"topk-0.01-bf16"``) or a table (``{kind = "topk", fraction = 0.01, values = "bf16"}``)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["fp32", "fp16", "bf16", "int8", "topk"]
    scale: Literal["tensor", "row"] | None = None  # int8 only (default "tensor")
    fraction: float | None = Field(None, gt=0, le=1)  # topk only: share of each tensor's entries sent
    values: Literal["fp32", "fp16", "bf16"] | None = None  # topk only (default "fp32")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return parse_shorthand(data) if isinstance(data, str) else data

    @model_validator(mode="after")
    def _options_fit_kind(self) -> WireSpec:
        own = {"int8": {"scale"}, "topk": {"fraction", "values"}}.get(self.kind, set())
        for key in ("scale", "fraction", "values"):
            if key not in own and getattr(self, key) is not None:
                raise ValueError(f"{key}: only for kind = {'int8' if key == 'scale' else 'topk'!r}, not {self.kind!r}")
        if self.kind == "topk" and self.fraction is None:
            raise ValueError("fraction: kind = 'topk' needs the share of entries to send, e.g. fraction = 0.01")
        if self.kind == "int8" and self.scale is None:
            self.scale = "tensor"
        if self.kind == "topk" and self.values is None:
            self.values = "fp32"
        return self

    @model_serializer(mode="plain")
    def _as_label(self) -> str:
        return self.label

    @property
    def label(self) -> str:
        """Canonical short form (also the ledger's ``dtype`` column)."""
        if self.kind == "int8":
            return "int8" if self.scale == "tensor" else "int8-row"
        if self.kind == "topk":
            return f"topk-{self.fraction:g}" + ("" if self.values == "fp32" else f"-{self.values}")
        return self.kind

    @property
    def stateful(self) -> bool:
        """Top-k sends differences to a reference and keeps the residual (error feedback)."""
        return self.kind == "topk"


def parse_shorthand(text: str) -> dict[str, Any]:
    """``"int8-row"`` -> ``{"kind": "int8", "scale": "row"}`` (see :class:`WireSpec`)."""
    parts = text.strip().split("-")
    kind, rest = parts[0], parts[1:]
    if kind in CASTS and not rest:
        return {"kind": kind}
    if kind == "int8" and len(rest) <= 1:
        return {"kind": "int8", **({"scale": rest[0]} if rest else {})}
    if kind == "topk" and len(rest) in (1, 2):
        try:
            fraction = float(rest[0])
        except ValueError:
            raise ValueError(f"wire codec {text!r}: top-k fraction {rest[0]!r} is not a number") from None
        return {"kind": "topk", "fraction": fraction, **({"values": rest[1]} if len(rest) == 2 else {})}
    raise ValueError(f"unknown wire codec {text!r}; expected fp32, fp16, bf16, int8, int8-row, topk-<fraction> or "
                     "topk-<fraction>-<fp32|fp16|bf16>")


def as_spec(spec: WireSpec | str) -> WireSpec:
    """A :class:`WireSpec` from itself or its short form; a bad one raises ``ValueError`` with pydantic's reason."""
    if isinstance(spec, WireSpec):
        return spec
    try:
        return WireSpec.model_validate(spec)
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"]
        raise ValueError(msg.removeprefix("Value error, ")) from None


# ---------------------------------------------------------------------------------------------- int8
def int8_encode(x: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, s)``: int8 codes of ``x`` and their float32 scale(s) (see the module docstring)."""
    xf = x.detach().to("cpu", torch.float32)
    rows = xf.reshape(xf.shape[0], -1) if per_row and xf.dim() >= 2 else xf.reshape(1, -1)
    scale = rows.abs().amax(dim=1) / INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(rows / safe[:, None]), -INT8_MAX, INT8_MAX)
    q = torch.where(scale[:, None] > 0, q, torch.zeros_like(q))
    return q.to(torch.int8).reshape(xf.shape), scale.contiguous()


def int8_decode(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * s`` in float32 (one scale per row of dim 0, or one for the whole tensor)."""
    rows = q.to(torch.float32).reshape(scale.numel(), -1)
    return (rows * scale.to(torch.float32)[:, None]).reshape(q.shape)


# ---------------------------------------------------------------------------------------------- top-k
def topk_count(numel: int, fraction: float) -> int:
    """``max(1, ceil(fraction * numel))`` (the product rounded to 9 decimals first, so 0.1 * 30 is 3, not 4)."""
    return max(1, min(numel, math.ceil(round(fraction * numel, 9))))


def index_dtype(numel: int) -> torch.dtype:
    if numel <= 2**15:
        return torch.int16
    if numel <= 2**31:
        return torch.int32
    raise ValueError(f"top-k: a tensor of {numel} entries is beyond the int32 index range")


def topk_encode(x: torch.Tensor, fraction: float, values: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values, indices, shape)`` of the k largest-magnitude entries of ``x`` (indices ascending)."""
    flat = x.detach().to("cpu", torch.float32).reshape(-1)
    k = topk_count(flat.numel(), fraction)
    order = torch.sort(flat.abs(), descending=True, stable=True).indices[:k]
    idx = torch.sort(order).values
    shape = torch.tensor(list(x.shape), dtype=torch.int32)
    return flat[idx].to(CASTS[values]), idx.to(index_dtype(flat.numel())), shape


def topk_decode(values: torch.Tensor, indices: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """A float32 zero tensor of ``shape`` with ``values`` at the flat ``indices``."""
    dims = [int(d) for d in shape.tolist()]
    numel = math.prod(dims)
    idx = indices.to(torch.int64)
    if idx.numel() != values.numel() or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel)):
        raise ValueError(f"top-k: {idx.numel()} indices / {values.numel()} values do not fit a tensor of shape {dims}")
    out = torch.zeros(numel, dtype=torch.float32)
    out[idx] = values.to(torch.float32)
    return out.reshape(dims)


# ---------------------------------------------------------------------------------------------- one tensor
def encode_tensor(name: str, x: torch.Tensor, spec: WireSpec) -> dict[str, torch.Tensor]:
    """The wire tensors of ``x`` under ``spec`` (stateless: top-k here compresses ``x`` itself)."""
    x = x.detach()
    if not x.is_floating_point():
        return {name: x.to("cpu", copy=True).contiguous()}
    if spec.kind in CASTS:
        return {name: x.to(device="cpu", dtype=CASTS[spec.kind], copy=True).contiguous()}
    if spec.kind == "int8":
        q, s = int8_encode(x, spec.scale == "row")
        return {name: q, f"{name}{SEP}scale": s}
    assert spec.fraction is not None and spec.values is not None
    if x.dim() == 0:
        return {name: x.to(device="cpu", dtype=CASTS[spec.values], copy=True)}
    vals, idx, shape = topk_encode(x, spec.fraction, spec.values)
    return {f"{name}{SEP}values": vals, f"{name}{SEP}indices": idx, f"{name}{SEP}shape": shape}


def group_parts(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Wire tensors grouped by payload tensor: ``{name: {part: tensor}}`` (``""`` = the tensor itself)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for wname, t in tensors.items():
        out.setdefault(base_name(wname), {})[part_name(wname)] = t
    return out


def decode_parts(name: str, parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """``(value, is_delta)`` of one payload tensor from its wire parts; ``is_delta`` for top-k's sparse tensor
    (which the wire adds to its reference). A plain cast comes back in its wire dtype (the caller casts)."""
    kinds = set(parts)
    if kinds == {""}:
        return parts[""], False
    if kinds == {"", "scale"} and parts[""].dtype == torch.int8:
        return int8_decode(parts[""], parts["scale"]), False
    if kinds == {"values", "indices", "shape"}:
        return topk_decode(parts["values"], parts["indices"], parts["shape"]), True
    raise ValueError(f"wire payload: tensor {name!r} arrived with parts {sorted(kinds)}, which no codec writes")
