"""Fixtures shared by several test modules (pytest finds them here without an import)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes: one intra-op thread is faster than two contending ones and immune to CPU oversubscription on a
    busy 2-core machine; restored after the module. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
