"""Checkpoint after every round; interrupted + resumed == uninterrupted, bit for bit; corrupted -> clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fednl.config import EngineConfig, TrainConfig
from fednl.engine.runstate import load_checkpoint
from fednl.engine.simulator import RunSpec, Simulator
from fednl.strategies.fedavg import FedAvg
from fednl.strategies.fednl import FedNL
from test_engine_toy import ToyMemoryLM, tokenizer, toy_task

pytestmark = pytest.mark.usefixtures("one_thread")

VOLATILE = {"s_round", "peak_mem_mb"}


def make(out: Path, rounds: int = 3, strategy: str = "fednl", fraction: float = 1.0, persist: bool = False,
         lr: float = 0.05, seed: int = 3, log=None) -> Simulator:
    model = ToyMemoryLM(seed=1)
    with torch.no_grad():
        model.gate.fill_(1.0)
    cls = FedNL if strategy == "fednl" else FedAvg
    strat = cls(cls.Options(fraction_fit=fraction), groups=model.groups())
    train = TrainConfig(batch_size=2, seq_len=32, lr=lr, persist_optimizer=persist)
    engine = EngineConfig(progress=False, eval_every=1)
    spec = RunSpec(rounds=rounds, seed=seed, train=train, engine=engine, out=out, method=strategy, model_name="toy",
                   config={"rounds": rounds, "train": train.model_dump(), "strategy": strategy, "fraction": fraction})
    return Simulator(model, tokenizer(), toy_task(), strat, spec, log=log or (lambda s: None))


def final_state(out: Path):
    return load_checkpoint(out / "checkpoint")


def assert_same_run(a: Path, b: Path) -> None:
    sa, sb = final_state(a), final_state(b)
    assert sa.round == sb.round
    assert sa.global_params.keys() == sb.global_params.keys()
    for n in sa.global_params:
        assert torch.equal(sa.global_params[n], sb.global_params[n]), n
    assert sa.clients.keys() == sb.clients.keys()
    for cid in sa.clients:
        ta, tb = sa.clients[cid].tensors, sb.clients[cid].tensors
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (cid, k)
        assert sa.clients[cid].info == sb.clients[cid].info
    assert sa.schedule == sb.schedule and sa.ledger.to_json() == sb.ledger.to_json()
    assert sa.python_random == sb.python_random
    ra, rb = (json.loads((p / "results.json").read_text()) for p in (a, b))
    ra.pop("wall_s"), rb.pop("wall_s")
    assert ra == rb

    def records(p: Path) -> list[dict]:
        out = []
        for line in (p / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            out.append({k: v for k, v in rec.items() if k not in VOLATILE})
        return out

    assert records(a) == records(b)


@pytest.mark.parametrize("strategy,fraction,persist", [("fednl", 1.0, False), ("fedavg", 0.67, True)])
def test_interrupted_then_resumed_is_bit_identical(tmp_path, strategy, fraction, persist) -> None:
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    res = make(straight, strategy=strategy, fraction=fraction, persist=persist).run()
    assert res is not None and res["rounds"] == 3
    assert make(broken, strategy=strategy, fraction=fraction, persist=persist).run(stop_after=1) is None
    assert final_state(broken).round == 1 and not (broken / "results.json").exists()
    # a brand-new process would rebuild the model from the seed: a fresh Simulator does exactly that
    make(broken, strategy=strategy, fraction=fraction, persist=persist).run(resume=True)
    assert_same_run(straight, broken)


def test_extending_rounds_on_resume_matches_straight_run(tmp_path) -> None:
    straight, short = tmp_path / "straight", tmp_path / "short"
    make(straight, rounds=3).run()
    make(short, rounds=1).run()
    make(short, rounds=3).run(resume=True)
    a, b = final_state(straight), final_state(short)
    for n in a.global_params:
        assert torch.equal(a.global_params[n], b.global_params[n])
    for cid in a.clients:
        for k in a.clients[cid].tensors:
            assert torch.equal(a.clients[cid].tensors[k], b.clients[cid].tensors[k])


def test_only_the_latest_checkpoint_is_kept_and_no_temp_dirs(tmp_path) -> None:
    make(tmp_path / "r").run()
    ck = tmp_path / "r" / "checkpoint"
    assert sorted(p.name for p in ck.iterdir()) == ["LATEST", "round-0003"]
    assert (ck / "LATEST").read_text().strip() == "round-0003"


def _broken_copy(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    make(out).run(stop_after=1)
    return out / "checkpoint" / "round-0001"


def test_truncated_checkpoint_file_is_a_clear_error(tmp_path) -> None:
    ck = _broken_copy(tmp_path)
    f = ck / "clients" / "c0000.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(ValueError, match=r"clients/c0000.safetensors has \d+ bytes, manifest says \d+ \(truncated\?\)"):
        make(tmp_path / "run").run(resume=True)


def test_corrupted_checkpoint_file_fails_checksum(tmp_path) -> None:
    ck = _broken_copy(tmp_path)
    f = ck / "global.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="global.safetensors fails its sha256 check"):
        make(tmp_path / "run").run(resume=True)


def test_missing_pieces_are_clear_errors(tmp_path) -> None:
    ck = _broken_copy(tmp_path)
    (ck / "run.json").unlink()
    with pytest.raises(ValueError, match="file run.json is missing"):
        make(tmp_path / "run").run(resume=True)
    (ck / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable manifest.json"):
        make(tmp_path / "run").run(resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        make(tmp_path / "never-ran").run(resume=True)


def test_a_run_without_a_checkpoint_resumes_from_round_zero(tmp_path) -> None:
    """No ``LATEST`` yet (killed before the first checkpoint was complete): ``resume`` starts from round 0 in
    the same folder and ends like the straight run; a folder with results but no checkpoint is refused."""
    make(tmp_path / "straight").run()
    ck = _broken_copy(tmp_path)
    (ck.parent / "LATEST").unlink()
    lines: list[str] = []
    make(tmp_path / "run", log=lines.append).run(resume=True)
    assert any("no checkpoint was written yet, starting from round 0" in ln for ln in lines)
    assert_same_run(tmp_path / "straight", tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoint")
    with pytest.raises(ValueError, match="holds results.json but no checkpoint"):
        make(tmp_path / "run").run(resume=True)


def test_resume_refuses_a_different_config_or_model(tmp_path) -> None:
    out = tmp_path / "run"
    make(out).run(stop_after=1)
    with pytest.raises(ValueError, match=r"config differs from the checkpointed run in \['train.lr'\]"):
        make(out, lr=0.01).run(resume=True)
    sim = make(out)
    with torch.no_grad():
        next(sim.model.parameters()).add_(1.0)
    from fednl.engine.simulator import model_fingerprint

    sim.fingerprint = model_fingerprint(sim.model)
    with pytest.raises(ValueError, match="rebuilt model differs"):
        sim.run(resume=True)
