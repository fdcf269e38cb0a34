"""Torch intra-op threads for one block of work."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block on ``n`` torch intra-op threads (``None`` or 0: leave the count as it is); the previous count
    is restored afterwards, whatever happens. Runs that must agree bit for bit (in process vs on a Flower node)
    need the same count: a reduction split over other threads can differ in the last bits."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
