"""The replies of the round in progress, kept on disk until that round's checkpoint is written.

A long round must not be lost to a crash: every reply the round loop receives is written here the moment it
arrives (one file, atomically), and a run resumed in the middle of that round reuses it instead of training the
client again. Layout::

    <out>/journal/round-0003/<client>.safetensors

One file per reply holds the wire reply's tensors (``payload/<name>``), the client's state after its round
(``state``, the bytes of :meth:`ClientState.to_bytes`: what an in-process client keeps in the run state; a Flower
node keeps its own) and, in the safetensors header, the round, the client, the job's nonce, the sha256 of the
downlink payload it answers, ``num_examples``, the training metrics and the payload's metadata.

:meth:`ReplyJournal.load` returns an entry only when its round, client, nonce and downlink digest all equal the
job's: an entry of another run, round or config (or one that does not read) is ignored and the client trains
again. The loop deletes a round's folder once the checkpoint after that round is written.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fednl.client.state import ClientState
from fednl.engine.executor import TrainReply
from fednl.strategies.base import Payload
from fednl.util.atomic import atomic_write_bytes

FORMAT = "1"
JOURNAL_DIR = "journal"
_SAFE = re.compile(r"^[A-Za-z0-9._-]{1,120}$")
_PAYLOAD = "payload/"
_STATE = "state"
_STATE_META = "state/"  # tensors of the stored client state's JSON record


def payload_digest(payload: Payload) -> str:
    """sha256 over a payload's tensors (name, dtype, shape, bytes; in name order) and its metadata."""
    h = hashlib.sha256()
    for name in sorted(payload.tensors):
        t = payload.tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(payload.meta, sort_keys=True, default=str).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class StoredReply:
    """A reply read back from the journal, with the client state it left behind (``None``: none was stored)."""

    reply: TrainReply
    client: ClientState | None


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


class ReplyJournal:
    """The journal folder of a run (``<out>/journal``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _dir(self, rnd: int) -> Path:
        return self.root / f"round-{rnd:04d}"

    @staticmethod
    def _name(cid: str) -> str:
        return cid if _SAFE.match(cid) else "c-" + hashlib.sha256(cid.encode()).hexdigest()[:20]

    def path(self, rnd: int, cid: str) -> Path:
        return self._dir(rnd) / f"{self._name(cid)}.safetensors"

    def put(self, reply: TrainReply, *, down_digest: str, client: ClientState | None) -> Path:
        """Write ``reply`` (which answers the job whose downlink payload has ``down_digest``) atomically."""
        tensors = {_PAYLOAD + n: t.detach().to("cpu").contiguous() for n, t in reply.payload.tensors.items()}
        meta = {"format": FORMAT, "round": str(reply.round), "cid": reply.cid, "nonce": reply.nonce,
                "down": down_digest, "num_examples": str(int(reply.num_examples)),
                "metrics": json.dumps(reply.metrics, sort_keys=True),
                "payload_meta": json.dumps(reply.payload.meta, sort_keys=True)}
        if client is not None:
            blob, record = client.to_bytes()
            tensors[_STATE] = _bytes_tensor(blob)
            tensors[_STATE_META] = _bytes_tensor(record)
        path = self.path(reply.round, reply.cid)
        atomic_write_bytes(path, st_save(tensors, metadata=meta))
        return path

    def load(self, rnd: int, expected: dict[str, tuple[str, str]]) -> dict[str, StoredReply]:
        """The stored replies of round ``rnd`` that answer the jobs ``expected`` (client -> ``(nonce, downlink
        digest)``); anything else in the folder is ignored."""
        folder = self._dir(rnd)
        if not folder.is_dir():
            return {}
        out: dict[str, StoredReply] = {}
        for cid, (nonce, digest) in expected.items():
            path = self.path(rnd, cid)
            if not path.is_file():
                continue
            stored = self._read(path)
            if stored is None:
                continue
            reply, down, client = stored
            if (reply.round, reply.cid, reply.nonce, down) != (rnd, cid, nonce, digest):
                continue
            out[cid] = StoredReply(reply, client)
        return out

    @staticmethod
    def _read(path: Path) -> tuple[TrainReply, str, ClientState | None] | None:
        try:
            data = path.read_bytes()
            tensors = st_load(data)
            meta = _header(data)
            if meta.get("format") != FORMAT:
                return None
            payload = Payload({k[len(_PAYLOAD):]: v for k, v in tensors.items() if k.startswith(_PAYLOAD)},
                              dict(json.loads(meta["payload_meta"])))
            reply = TrainReply(meta["cid"], payload, int(meta["num_examples"]),
                               {k: float(v) for k, v in json.loads(meta["metrics"]).items()},
                               round=int(meta["round"]), nonce=meta["nonce"])
            client = None
            if _STATE in tensors:
                client = ClientState.from_bytes(tensors[_STATE].numpy().tobytes(),
                                                tensors[_STATE_META].numpy().tobytes(), source=str(path))
        except Exception:  # noqa: BLE001 - an unreadable entry is not reused: the client trains again
            return None
        return reply, str(meta.get("down")), client

    def clear(self, upto: int | None = None) -> None:
        """Delete the folders of rounds ``<= upto`` (every round when ``upto`` is None)."""
        if not self.root.is_dir():
            return
        for d in self.root.iterdir():
            m = re.match(r"^round-(\d+)$", d.name)
            if d.is_dir() and m and (upto is None or int(m.group(1)) <= upto):
                shutil.rmtree(d, ignore_errors=True)
        if upto is None or not any(self.root.iterdir()):
            shutil.rmtree(self.root, ignore_errors=True)


def _header(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    return dict(header.get("__metadata__") or {})
