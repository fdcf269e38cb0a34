"""fednl.util.threads.torch_threads: sets the count for the block and restores it, also on an error."""

from __future__ import annotations

import pytest
import torch

from fednl.util.threads import torch_threads


def test_sets_and_restores_even_on_error() -> None:
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with torch_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(other):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with torch_threads(None):  # None leaves the count alone
        assert torch.get_num_threads() == before
