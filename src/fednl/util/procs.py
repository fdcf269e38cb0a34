"""Process groups a drill or a deployment test started (each process in its own session): whether one is still
there, and stopping them all."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable


def group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` still has a process (one we may not signal counts as alive)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_groups(pgids: Iterable[int], *, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, every process group in ``pgids``; waits up to ``grace_s`` after each signal for them
    to be gone."""
    pgids = list(pgids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for g in pgids:
            try:
                os.killpg(g, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace_s
        while any(group_alive(g) for g in pgids) and time.monotonic() < deadline:
            time.sleep(0.2)
