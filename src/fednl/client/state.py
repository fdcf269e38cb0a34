"""Per-client state that survives across rounds: personal parameters, optimiser moments, strategy extras.

Tensors live under ``tensors`` (saved as safetensors), JSON-able values under ``info`` (saved as JSON). The
trainer uses the key prefixes ``param/<name>`` (local parameters) and ``opt/<slot>/<name>`` (optimiser state);
strategies may add their own keys (e.g. control variates) under any other prefix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fednl.util.atomic import atomic_write_bytes

PARAM_PREFIX = "param/"
OPT_PREFIX = "opt/"


@dataclass
class ClientState:
    """Tensors + JSON info persisted for one client (``cid``)."""

    cid: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ views
    def local_params(self) -> dict[str, torch.Tensor]:
        """The persisted local parameters, keyed by parameter name."""
        n = len(PARAM_PREFIX)
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(PARAM_PREFIX)}

    def nbytes(self) -> int:
        """Bytes held by the tensors (numel x itemsize), the figure reported as client-state size."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    # ------------------------------------------------------------------ persistence
    def to_bytes(self) -> tuple[bytes, bytes]:
        """Serialise to ``(safetensors bytes, JSON bytes)``."""
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.tensors.items()}
        meta = {"cid": self.cid, "info": self.info}
        return st_save(tensors), (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()

    def save(self, stem: str | Path) -> tuple[Path, Path]:
        """Atomically write ``<stem>.safetensors`` and ``<stem>.json``; returns both paths."""
        stem = Path(stem)
        blob, meta = self.to_bytes()
        st_path, js_path = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")
        atomic_write_bytes(st_path, blob)
        atomic_write_bytes(js_path, meta)
        return st_path, js_path

    @classmethod
    def from_bytes(cls, blob: bytes, meta: bytes, *, source: str = "<bytes>") -> ClientState:
        try:
            record = json.loads(meta.decode())
            cid, info = record["cid"], record["info"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"client state {source}: malformed JSON record ({exc})") from None
        try:
            tensors = dict(st_load(blob))
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(f"client state {source}: unreadable safetensors ({exc})") from None
        return cls(cid=str(cid), tensors=tensors, info=dict(info))

    @classmethod
    def load(cls, stem: str | Path) -> ClientState:
        """Read a state written by :meth:`save` (``<stem>.safetensors`` + ``<stem>.json``)."""
        stem = Path(stem)
        st_path, js_path = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")
        for p in (st_path, js_path):
            if not p.is_file():
                raise FileNotFoundError(f"client state file missing: {p}")
        return cls.from_bytes(st_path.read_bytes(), js_path.read_bytes(), source=str(stem))
