"""Per-client state on the SuperNode's own disk, keyed by run and partition id — not in ``Context.state``.

Flower copies ``Context.state`` between the SuperNode and the ClientApp process on every message, so a client's
local LoRA, routers, optimiser moments and memory statistics live here instead, as
:class:`~fednl.client.state.ClientState` files (``.safetensors`` + ``.json``, each written atomically)::

    <root>/<run_uid>/partition-<pid>/round-00003.safetensors
                                     round-00003.json

A state is saved under the round that produced it, and round ``r`` starts from the newest state saved by a round
``< r``. The newest :data:`KEEP` rounds are kept, so a round that is run again after a server restart (resume
from the checkpoint of round ``r - 1`` after a crash during round ``r``) starts from exactly the state it
started from the first time, whatever the client managed to save before the crash.
"""

from __future__ import annotations

import re
from pathlib import Path

from fednl.client.state import ClientState

KEEP = 2
_ROUND = re.compile(r"^round-(\d{5,})\.safetensors$")
_SAFE = re.compile(r"^[A-Za-z0-9._-]+$")


class NodeStateStore:
    """Client states of one partition of one run, on local disk."""

    def __init__(self, root: str | Path, run_uid: str, partition_id: int, *, keep: int = KEEP):
        if not _SAFE.match(run_uid or ""):
            raise ValueError(f"run uid {run_uid!r} must be non-empty and use only letters, digits, '.', '_', '-'")
        if int(partition_id) < 0:
            raise ValueError(f"partition id must be >= 0, got {partition_id}")
        if keep < 2:
            raise ValueError(f"keep must be >= 2 (a re-run round needs its starting state), got {keep}")
        self.dir = Path(root) / run_uid / f"partition-{int(partition_id)}"
        self.keep = keep

    def _stem(self, rnd: int) -> Path:
        return self.dir / f"round-{rnd:05d}"

    def rounds(self) -> list[int]:
        """Rounds with a complete saved state (both files present), ascending."""
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.iterdir():
            m = _ROUND.match(p.name)
            if m and p.with_suffix(".json").is_file():
                out.append(int(m.group(1)))
        return sorted(out)

    def load_before(self, rnd: int, cid: str) -> ClientState:
        """The state round ``rnd`` starts from: the newest saved by a round ``< rnd``, else a fresh one."""
        earlier = [r for r in self.rounds() if r < rnd]
        if not earlier:
            return ClientState(cid=cid)
        state = ClientState.load(self._stem(earlier[-1]))
        if state.cid != cid:
            raise ValueError(f"{self.dir}: saved state belongs to client {state.cid!r}, this node now serves "
                             f"{cid!r}; the partition-id of this SuperNode changed within the run")
        return state

    def save(self, rnd: int, state: ClientState) -> Path:
        """Save the state produced by round ``rnd``; drop states older than the newest ``keep`` rounds."""
        if rnd < 1:
            raise ValueError(f"round must be >= 1, got {rnd}")
        stem = self._stem(rnd)
        state.save(stem)
        for old in self.rounds()[: -self.keep]:
            for suffix in (".json", ".safetensors"):  # json first: a half-removed state is never "complete"
                self._stem(old).with_suffix(suffix).unlink(missing_ok=True)
        return stem
