"""The wire: every payload crosses it, encoded by its direction's codec, and its bytes are what is counted.

Both engines send every payload through :class:`Wire` (server->client and client->server), so what is counted
is what a real transport would carry: ``bytes = sum(numel * itemsize)`` over the encoded payload's tensors
(values, indices, scales). The default codec of both directions is a plain cast to ``engine.wire_dtype``
(:func:`encode` / :func:`decode`: floating tensors cast, integer/bool tensors unchanged); ``engine.wire_up`` /
``engine.wire_down`` pick another one per direction (:mod:`fednl.engine.codecs`: fp16, bf16, int8, top-k).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fednl.engine.codecs import CASTS, WireSpec, as_spec, decode_parts, encode_tensor, group_parts
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


# ---------------------------------------------------------------------------------------------- per-direction codecs
CLIENT_DOWN = "wire/down/"  # client state: the client's copy of each top-k-coded downlink tensor
CLIENT_RESIDUAL = "wire/residual/"  # client state: top-k uplink error-feedback residual per reply tensor
SERVER_DOWN = "wire|down|"  # server state: the server's copy of each client's downlink tensors ("wire|down|cid|name")


def _mirrored(t: torch.Tensor) -> bool:
    """Top-k codes floating tensors with at least one dim against a reference; others cross as plain casts."""
    return t.is_floating_point() and t.dim() > 0


def _add_delta(ref: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return ref.to(torch.float32) + delta


class Wire:
    """The codecs of a run's two directions (:mod:`fednl.engine.codecs`) and the state top-k keeps.

    Plain casts (``fp32``/``fp16``/``bf16``) go through :func:`encode`/:func:`decode` exactly as before. ``int8``
    is stateless. ``topk`` is delta coding with error feedback:

    * downlink: server and client each keep the client's copy ``m`` of every tensor sent to it (server state
      ``wire|down|<cid>|<name>``, client state ``wire/down/<name>``). The first send of a tensor is dense (cast to
      the ``values`` dtype); afterwards the server sends ``topk(x - m)`` and both sides set ``m += decoded``: what
      top-k left out (``x - m``) is sent in later rounds.
    * uplink: the reference is what the client received under the same name this round (zeros for a name it did
      not receive); the client sends ``topk(e)``, ``e = x - ref + r``, and keeps the residual ``r = e - decoded``
      in its state (``wire/residual/<name>``); the server adds the decoded tensor to the same reference.
    """

    def __init__(self, up: WireSpec | str, down: WireSpec | str):
        self.up, self.down = as_spec(up), as_spec(down)

    @classmethod
    def from_engine(cls, engine: object) -> Wire:
        """From an :class:`~fednl.config.EngineConfig`: ``wire_up`` / ``wire_down``, else ``wire_dtype``."""
        base = str(getattr(engine, "wire_dtype", "fp32"))
        return cls(getattr(engine, "wire_up", None) or base, getattr(engine, "wire_down", None) or base)

    def label(self, direction: str) -> str:
        return (self.up if direction == "up" else self.down).label

    # ------------------------------------------------------------------ server -> client
    def encode_down(self, cid: str, payload: Payload, store: dict[str, torch.Tensor]) -> tuple[Payload, Payload | None]:
        """``(wire payload, what the client will decode)`` for client ``cid``; top-k updates ``store`` (the run's
        server wire state). The second item is ``None`` when no uplink codec needs it."""
        spec = self.down
        if spec.kind in CASTS:
            enc = encode(payload, spec.kind)
            return enc, (decode(enc) if self.up.stateful else None)
        out: Params = {}
        received: Params = {}
        for n, t in payload.tensors.items():
            key = f"{SERVER_DOWN}{cid}|{n}"
            ref = store.get(key) if spec.stateful and _mirrored(t) else None
            if spec.stateful and _mirrored(t) and (ref is None or ref.shape != t.shape):
                parts = encode_tensor(n, t, WireSpec(kind=spec.values))  # first send: dense
            elif ref is not None:
                parts = encode_tensor(n, t.detach().to("cpu", torch.float32) - ref, spec)
            else:
                parts = encode_tensor(n, t, spec)
            value, delta = decode_parts(n, group_parts(parts)[n])
            value = _add_delta(ref, value) if delta else value
            if spec.stateful and _mirrored(t):
                store[key] = value.to(torch.float32)
            received[n] = value.to(torch.float32) if value.is_floating_point() else value.clone()
            out.update(parts)
        return Payload(out, dict(payload.meta)), Payload(received, dict(payload.meta))

    def decode_down(self, payload: Payload, client: Any) -> Payload:
        """The client's view of a downlink payload (floating tensors float32); top-k updates ``client.tensors``."""
        if self.down.kind in CASTS:
            return decode(payload)
        out: Params = {}
        for n, parts in group_parts(payload.tensors).items():
            value, delta = decode_parts(n, parts)
            key = CLIENT_DOWN + n
            if delta:
                ref = client.tensors.get(key)
                if ref is None or tuple(ref.shape) != tuple(value.shape):
                    raise ValueError(f"wire: top-k update of {n!r} for a client that holds no copy of it")
                value = _add_delta(ref, value)
            if self.down.stateful and _mirrored(value):
                client.tensors[key] = value.to(torch.float32)
            out[n] = value.to(torch.float32) if value.is_floating_point() else value.clone()
        return Payload(out, dict(payload.meta))

    # ------------------------------------------------------------------ client -> server
    def encode_up(self, reply: Payload, received: Payload, client: Any) -> Payload:
        """The client's wire payload of ``reply``; top-k keeps its residual in ``client.tensors``."""
        spec = self.up
        if spec.kind in CASTS:
            return encode(reply, spec.kind)
        out: Params = {}
        for n, t in reply.tensors.items():
            if not (spec.stateful and _mirrored(t)):
                out.update(encode_tensor(n, t, spec))
                continue
            x = t.detach().to("cpu", torch.float32)
            e = x - _reference(received.tensors, n, x.shape)
            residual = client.tensors.get(CLIENT_RESIDUAL + n)
            if residual is not None and residual.shape == x.shape:
                e = e + residual
            parts = encode_tensor(n, e, spec)
            sent, _ = decode_parts(n, group_parts(parts)[n])
            client.tensors[CLIENT_RESIDUAL + n] = e - sent
            out.update(parts)
        return Payload(out, dict(reply.meta))

    def decode_up(self, payload: Payload, received: Payload | None, like: Mapping[str, torch.Tensor]) -> Payload:
        """The server's view of a client's reply, floating tensors in ``like``'s dtypes (float32 elsewhere)."""
        if self.up.kind in CASTS:
            return decode(payload, like=like)
        out: Params = {}
        for n, parts in group_parts(payload.tensors).items():
            value, delta = decode_parts(n, parts)
            if delta:
                value = _reference(received.tensors if received is not None else {}, n, value.shape) + value
            if value.is_floating_point():
                ref = like.get(n)
                value = value.to(ref.dtype if ref is not None else torch.float32)
            out[n] = value if value.is_floating_point() else value.clone()
        return Payload(out, dict(payload.meta))

    def check(self, payload: Payload, direction: str) -> None:
        """Raise ``ValueError`` when ``payload`` is not what this direction's codec writes (another config?)."""
        spec = self.up if direction == "up" else self.down
        for n, parts in group_parts(payload.tensors).items():
            kinds = set(parts)
            if kinds == {""} and not parts[""].is_floating_point():
                continue  # integer and bool tensors cross unchanged
            if spec.kind in CASTS:
                ok = kinds == {""} and parts[""].dtype == CASTS[spec.kind]
            elif spec.kind == "int8":
                ok = kinds == {"", "scale"} and parts[""].dtype == torch.int8
            else:
                values = CASTS[str(spec.values)]
                ok = (kinds == {"values", "indices", "shape"} and parts["values"].dtype == values) or (
                    kinds == {""} and parts[""].dtype == values)
            if not ok:
                got = ", ".join(f"{p or 'value'}: {t.dtype}" for p, t in sorted(parts.items()))
                raise ValueError(f"{n} arrived as ({got}); the {direction}link codec is {spec.label}")


def _reference(tensors: Mapping[str, torch.Tensor], name: str, shape: torch.Size) -> torch.Tensor:
    ref = tensors.get(name)
    if ref is None or tuple(ref.shape) != tuple(shape) or not ref.is_floating_point():
        return torch.zeros(shape, dtype=torch.float32)
    return ref.to(torch.float32)
