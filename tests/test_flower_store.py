"""Node-local client state for the Flower ClientApp: round tagging, re-run safety, pruning, bad input."""

from __future__ import annotations

import pytest
import torch

from fednl.client.state import ClientState
from fednl.flower.node import NodeStateStore


def state(cid: str, value: float, rnd: int) -> ClientState:
    return ClientState(cid=cid, tensors={"param/w": torch.full((2, 3), value).bfloat16()}, info={"last_round": rnd})


def test_fresh_partition_starts_empty(tmp_path):
    store = NodeStateStore(tmp_path, "run-1", 0)
    s = store.load_before(1, "c0")
    assert s.cid == "c0" and s.tensors == {} and s.info == {}
    assert store.rounds() == []


def test_round_starts_from_newest_earlier_state_and_bf16_is_exact(tmp_path):
    store = NodeStateStore(tmp_path, "run-1", 3)
    store.save(1, state("c3", 1.5, 1))
    store.save(4, state("c3", 4.25, 4))  # partial participation: rounds 2-3 skipped
    got = store.load_before(5, "c3")
    assert got.info["last_round"] == 4
    assert got.tensors["param/w"].dtype == torch.bfloat16
    assert torch.equal(got.tensors["param/w"], torch.full((2, 3), 4.25).bfloat16())
    assert store.load_before(4, "c3").info["last_round"] == 1  # round 4 re-run starts where it started before
    assert store.load_before(1, "c3").tensors == {}


def test_keeps_two_rounds_so_a_rerun_after_a_crash_is_reproducible(tmp_path):
    store = NodeStateStore(tmp_path, "run-1", 0)
    for r in (1, 2, 3):
        store.save(r, state("c0", float(r), r))
    assert store.rounds() == [2, 3]
    # the server crashed before checkpointing round 3 and resumes from round 2: round 3 re-runs from state 2
    assert store.load_before(3, "c0").info["last_round"] == 2
    store.save(3, state("c0", 30.0, 3))
    assert store.rounds() == [2, 3]
    assert store.load_before(4, "c0").tensors["param/w"][0, 0].item() == 30.0


def test_runs_and_partitions_are_separate(tmp_path):
    NodeStateStore(tmp_path, "run-a", 0).save(1, state("c0", 1.0, 1))
    assert NodeStateStore(tmp_path, "run-b", 0).load_before(2, "c0").tensors == {}
    assert NodeStateStore(tmp_path, "run-a", 1).load_before(2, "c1").tensors == {}
    assert (tmp_path / "run-a" / "partition-0" / "round-00001.safetensors").is_file()


def test_incomplete_state_is_ignored(tmp_path):
    store = NodeStateStore(tmp_path, "r", 0)
    store.save(1, state("c0", 1.0, 1))
    store.save(2, state("c0", 2.0, 2))
    (store.dir / "round-00002.json").unlink()  # crash between the two atomic writes
    assert store.rounds() == [1]
    assert store.load_before(3, "c0").info["last_round"] == 1


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match="run uid"):
        NodeStateStore(tmp_path, "../escape", 0)
    with pytest.raises(ValueError, match="partition id"):
        NodeStateStore(tmp_path, "r", -1)
    with pytest.raises(ValueError, match="keep"):
        NodeStateStore(tmp_path, "r", 0, keep=1)
    store = NodeStateStore(tmp_path, "r", 0)
    with pytest.raises(ValueError, match="round must be"):
        store.save(0, state("c0", 1.0, 0))
    store.save(1, state("c0", 1.0, 1))
    with pytest.raises(ValueError, match="partition-id of this SuperNode changed"):
        store.load_before(2, "c7")
    (store.dir / "round-00001.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable safetensors"):
        store.load_before(2, "c0")
