"""Named kill points for the fault drills: make the process ``SIGKILL`` itself at a chosen moment of a run.

``FEDNL_KILL_AT=<point>[:<round>[:<n>]]`` kills the process the ``n``-th time (default: the first) it passes
``point`` in round ``round`` (default: any round). Unset, :func:`kill_point` does nothing. The points:

=======================  ============================================================================
``run_start``            the run state is loaded or created, before the first round of this session
``reply_stored``         a client's reply was written to the round's journal (``n``: the n-th reply)
``metrics_written``      the round's lines are in metrics.jsonl, its checkpoint is not written yet
``checkpoint_writing``   half of the checkpoint's files are in its temporary folder
``checkpoint_renamed``   the checkpoint folder has its final name; ``LATEST`` still names the previous one
``checkpoint_saved``     ``LATEST`` names the new checkpoint; the round's journal is not deleted yet
``results``              after the last round's checkpoint, before results.json is written
=======================  ============================================================================

A ``SIGKILL`` is what a crash, the OOM killer or ``kill -9`` does: no handler runs, no file is closed cleanly.
The drills (``tests/test_kill_resume.py``, ``scripts/hostile_drill.py``) kill a run at each point and check that
``fednl run --resume DIR`` ends bit-identical to the uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter

ENV = "FEDNL_KILL_AT"
POINTS = ("run_start", "reply_stored", "metrics_written", "checkpoint_writing", "checkpoint_renamed",
          "checkpoint_saved", "results")
_hits: Counter[tuple[str, int | None]] = Counter()


def parse(spec: str) -> tuple[str, int | None, int]:
    """``"reply_stored:2:1"`` -> ``("reply_stored", 2, 1)``; a clear ``ValueError`` for anything else."""
    parts = spec.strip().split(":")
    name = parts[0]
    if name not in POINTS or len(parts) > 3:
        raise ValueError(f"{ENV}={spec!r}: expected <point>[:<round>[:<n>]] with a point of {list(POINTS)}")
    try:
        rnd = int(parts[1]) if len(parts) > 1 and parts[1] != "" else None
        n = int(parts[2]) if len(parts) > 2 else 1
    except ValueError:
        raise ValueError(f"{ENV}={spec!r}: the round and the count must be integers") from None
    if n < 1:
        raise ValueError(f"{ENV}={spec!r}: the count must be >= 1")
    return name, rnd, n


def kill_point(point: str, rnd: int | None = None) -> None:
    """``SIGKILL`` this process if ``FEDNL_KILL_AT`` names this passage of ``point`` (see the module docstring)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, want_round, n = parse(spec)
    if name != point or (want_round is not None and rnd != want_round):
        return
    _hits[(point, rnd)] += 1
    if _hits[(point, rnd)] == n:
        sys.stdout.flush()
        sys.stderr.write(f"{ENV}: killing process {os.getpid()} at {point} (round {rnd}, passage {n})\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
