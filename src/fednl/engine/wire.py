"""The wire: cast payload tensors to the wire dtype (and back) and count their bytes.

Both engines send every payload through :func:`encode` (server->client and client->server), so what is
counted is what a real transport would carry: ``bytes = sum(numel * itemsize)`` over the payload's tensors,
in the wire dtype. Floating tensors are cast; integer/bool tensors cross unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fednl.strategies.base import Params, Payload

WIRE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def wire_dtype(name: str) -> torch.dtype:
    try:
        return WIRE_DTYPES[name]
    except KeyError:
        raise ValueError(f"engine.wire_dtype: unknown wire dtype {name!r}; expected one of {sorted(WIRE_DTYPES)}") from None


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def encode(payload: Payload, dtype: str) -> Payload:
    """A copy of ``payload`` with floating tensors cast to the wire dtype (contiguous, on CPU)."""
    target = wire_dtype(dtype)
    out: Params = {}
    for n, t in payload.tensors.items():
        t = t.detach()
        t = t.to(device="cpu", dtype=target, copy=True) if t.is_floating_point() else t.to("cpu", copy=True)
        out[n] = t.contiguous()
    return Payload(out, dict(payload.meta))


def decode(payload: Payload, like: Mapping[str, torch.Tensor] | None = None) -> Payload:
    """Cast floating wire tensors back to ``like[name].dtype`` (float32 where ``like`` lacks the name)."""
    out: Params = {}
    for n, t in payload.tensors.items():
        if t.is_floating_point():
            ref = like.get(n) if like is not None else None
            out[n] = t.to(ref.dtype if ref is not None else torch.float32)
        else:
            out[n] = t.clone()
    return Payload(out, dict(payload.meta))


def payload_bytes(payload: Payload) -> int:
    return sum(tensor_bytes(t) for t in payload.tensors.values())
