"""The communication ledger: exact bytes of every payload, per round, client, direction and parameter group.

Entries are counted from the (wire-encoded) payload tensors themselves — never from formulas — so the
FedNL/FedAvg-LoRA ratio of a run is a ratio of counted bytes. :func:`strategy_round_bytes` builds the payload a
strategy would send for a given model and counts it, which is how the FedAvg-LoRA reference is obtained for a
model that was not actually run with FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fednl.client.state import ClientState
from fednl.engine.codecs import VALUE_PARTS, WireSpec, base_name, part_name
from fednl.engine.wire import Wire, tensor_bytes
from fednl.strategies.base import Payload, Strategy

DIRECTIONS = ("up", "down")
OTHER_GROUP = "other"  # payload tensors that are not model parameters (e.g. control variates)


@dataclass(frozen=True)
class LedgerEntry:
    round: int
    cid: str
    direction: str  # "down" = server -> client, "up" = client -> server
    group: str
    dtype: str  # the direction's codec label: "fp32", "bf16", "int8-row", "topk-0.01" ...
    numel: int  # values carried (cast entries, int8 codes, top-k values); not indices, scales or shapes
    bytes: int  # every byte of the encoded tensors: values + indices + scales + shapes


def group_index(groups: Mapping[str, set[str]]) -> dict[str, str]:
    """parameter name -> group name (each name must be in exactly one group)."""
    index: dict[str, str] = {}
    for g, names in groups.items():
        for n in names:
            if n in index and index[n] != g:
                raise ValueError(f"parameter {n!r} is in two groups: {index[n]!r} and {g!r}")
            index[n] = g
    return index


class Ledger:
    """Append-only record of :class:`LedgerEntry` with totals and breakdowns."""

    def __init__(self, entries: list[LedgerEntry] | None = None):
        self.entries: list[LedgerEntry] = list(entries or [])

    # ------------------------------------------------------------------ recording
    def record(self, rnd: int, cid: str, direction: str, payload: Payload, index: Mapping[str, str], dtype: str) -> int:
        """Record an already wire-encoded payload (a codec's ``"<name>|<part>"`` tensors count for ``<name>``'s
        group); returns its bytes. ``dtype`` is the codec label."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        per_group: dict[str, list[int]] = {}
        for n, t in payload.tensors.items():
            acc = per_group.setdefault(index.get(base_name(n), OTHER_GROUP), [0, 0])
            acc[0] += t.numel() if part_name(n) in VALUE_PARTS else 0
            acc[1] += tensor_bytes(t)
        for g in sorted(per_group):
            numel, nbytes = per_group[g]
            self.entries.append(LedgerEntry(rnd, cid, direction, g, dtype, numel, nbytes))
        return sum(v[1] for v in per_group.values())

    # ------------------------------------------------------------------ totals
    def total(self, direction: str | None = None, rnd: int | None = None) -> int:
        return sum(
            e.bytes for e in self.entries
            if (direction is None or e.direction == direction) and (rnd is None or e.round == rnd)
        )

    @property
    def bytes_up(self) -> int:
        return self.total("up")

    @property
    def bytes_down(self) -> int:
        return self.total("down")

    def rounds(self) -> list[int]:
        return sorted({e.round for e in self.entries})

    def per_round(self) -> list[dict[str, int]]:
        return [{"round": r, "bytes_up": self.total("up", r), "bytes_down": self.total("down", r)} for r in self.rounds()]

    def by_group(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for e in self.entries:
            rec = out.setdefault(e.group, {"bytes_up": 0, "bytes_down": 0})
            rec[f"bytes_{e.direction}"] += e.bytes
        return dict(sorted(out.items()))

    def by_client(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for e in self.entries:
            rec = out.setdefault(e.cid, {"bytes_up": 0, "bytes_down": 0})
            rec[f"bytes_{e.direction}"] += e.bytes
        return dict(sorted(out.items()))

    def mean_round_bytes(self) -> float:
        """Mean bytes (up + down) per round."""
        rounds = self.rounds()
        return self.total() / len(rounds) if rounds else 0.0

    def ratio_to(self, other: Ledger) -> float:
        """``self`` traffic / ``other`` traffic (total bytes, both directions); < 1 means ``self`` sends less."""
        denom = other.total()
        if denom == 0:
            raise ValueError("ratio_to: the other ledger recorded no bytes")
        return self.total() / denom

    def summary(self) -> dict[str, Any]:
        """The ``comm`` block of results.json."""
        return {"bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "per_round": self.per_round(),
                "by_group": self.by_group()}

    # ------------------------------------------------------------------ persistence
    def to_json(self) -> list[dict[str, Any]]:
        return [asdict(e) for e in self.entries]

    @classmethod
    def from_json(cls, records: list[dict[str, Any]]) -> Ledger:
        try:
            return cls([LedgerEntry(**r) for r in records])
        except TypeError as exc:
            raise ValueError(f"malformed ledger record in checkpoint: {exc}") from None


def strategy_round_bytes(
    strategy: Strategy, model: torch.nn.Module, wire_dtype: str | WireSpec, *, clients: int = 1,
    wire_up: str | WireSpec | None = None,
) -> dict[str, dict[str, int]]:
    """Bytes one round of ``strategy`` moves for ``model``: the payloads are built, encoded and counted.

    Down: ``configure_train`` on the initial global parameters; up: ``client_reply``'s names (the shared
    parameters at their current values). ``wire_dtype`` is the downlink codec (a label such as ``"fp32"`` or
    ``"int8-row"``) and, unless ``wire_up`` is given, the uplink one too. A top-k downlink is counted for a
    returning client (a client's first round receives the payload dense). Returns
    ``{group: {"bytes_up", "bytes_down", "numel"}}`` plus a ``"total"`` entry, multiplied by ``clients``.
    """
    params = {n: p.detach() for n, p in model.named_parameters()}
    index = group_index(strategy.groups)
    global_params = strategy.init_server(params)
    wire = Wire(wire_up if wire_up is not None else wire_dtype, wire_dtype)
    store: dict[str, torch.Tensor] = {}
    payload = strategy.configure_train(1, "probe", global_params)
    if wire.down.stateful:  # the steady state: the probe client already holds the payload
        wire.encode_down("probe", payload, store)
    down, received = wire.encode_down("probe", payload, store)
    reply = Payload({n: params[n] for n in sorted(strategy.shared_names())})
    up = wire.encode_up(reply, received if received is not None else Payload({}), ClientState("probe"))
    ledger = Ledger()
    ledger.record(1, "probe", "down", down, index, wire.label("down"))
    ledger.record(1, "probe", "up", up, index, wire.label("up"))
    out: dict[str, dict[str, int]] = {}
    for e in ledger.entries:
        rec = out.setdefault(e.group, {"bytes_up": 0, "bytes_down": 0, "numel": 0})
        rec[f"bytes_{e.direction}"] += e.bytes * clients
        if e.direction == "up":
            rec["numel"] += e.numel
    out["total"] = {k: sum(v[k] for v in out.values()) for k in ("bytes_up", "bytes_down", "numel")}
    return out
