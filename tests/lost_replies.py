"""The in-process twin of a lost reply: a simulator whose chosen training replies never arrive."""

from __future__ import annotations

from typing import Any


def lose_replies(sim: Any, lost: set[tuple[int, str]]) -> None:
    """From now on ``sim`` drops the training reply of every (round, client) in ``lost`` as if it never came (the
    client was sent its payload and trained; nothing reached the server)."""
    inner = sim.executor.train
    sim.executor.train = lambda rnd, jobs, state: [r for r in inner(rnd, jobs, state) if (rnd, r.cid) not in lost]
