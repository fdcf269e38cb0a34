"""`fednl run` then `fednl run --resume DIR`: 3 rounds straight == 1 round + resume + 2 rounds, bit for bit,
with the real tiny model (Titans conversion + LoRA) and a small JSONL task."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from typer.testing import CliRunner

from fednl.cli import app
from fednl.engine.runstate import load_checkpoint
from tiny_model import tiny_model_toml

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_task(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.jsonl"
    rows = []
    for c, shift in (("north", 0), ("south", 1), ("east", 2)):
        for i in range(6):
            gold = (i + shift) % 3
            rows.append({"question": f"{c} {i}: pick {'xyz'[gold]}", "choices": ["x", "y", "z"], "answer": gold,
                         "client": c, "split": "train" if i < 4 else "test"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(tmp_path: Path, data: Path, fraction: float = 1.0) -> Path:
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"""
seed = 11
rounds = 3
[method]
name = "fednl"
scope = "rules"
fraction_fit = {fraction}
{tiny_model_toml(hidden=32, intermediate=64)}[task]
name = "jsonl"
path = "{data}"
[train]
batch_size = 2
seq_len = 96
lr = 5e-3
persist_optimizer = true
[engine]
progress = false
threads = 1
""")
    return cfg


def run(*args: str) -> str:
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, res.output
    return res.output


def test_three_rounds_straight_equals_one_plus_resume_two(tmp_path) -> None:
    cfg = write_config(tmp_path, write_task(tmp_path), fraction=0.67)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run("run", str(cfg), "--out", str(straight))
    run("run", str(cfg), "--out", str(resumed), "--set", "rounds=1")
    assert load_checkpoint(resumed / "checkpoint").round == 1
    out = run("run", "--resume", str(resumed), "--set", "rounds=3")
    assert "resuming" in out and "after round 1" in out
    a, b = load_checkpoint(straight / "checkpoint"), load_checkpoint(resumed / "checkpoint")
    assert a.round == b.round == 3
    assert a.global_params.keys() == b.global_params.keys() and a.global_params
    for n in a.global_params:
        assert torch.equal(a.global_params[n], b.global_params[n]), n
    for cid in a.clients:
        assert a.clients[cid].tensors.keys() == b.clients[cid].tensors.keys()
        for k in a.clients[cid].tensors:
            assert torch.equal(a.clients[cid].tensors[k], b.clients[cid].tensors[k]), (cid, k)
    assert a.schedule == b.schedule and a.ledger.to_json() == b.ledger.to_json()
    ra, rb = (json.loads((p / "results.json").read_text()) for p in (straight, resumed))
    assert ra.pop("wall_s") >= 0 and rb.pop("wall_s") >= 0
    assert ra == rb


def test_resume_refuses_a_changed_setting(tmp_path) -> None:
    cfg = write_config(tmp_path, write_task(tmp_path))
    out = tmp_path / "r"
    run("run", str(cfg), "--out", str(out), "--set", "rounds=1")
    res = CliRunner().invoke(app, ["run", "--resume", str(out), "--set", "train.lr=0.1"])
    assert res.exit_code == 2 and "config differs from the checkpointed run in ['train.lr']" in res.output
    (out / "checkpoint" / "round-0001" / "global.safetensors").write_bytes(b"\0" * 10)
    res = CliRunner().invoke(app, ["run", "--resume", str(out), "--set", "rounds=2"])
    assert res.exit_code == 2 and "corrupted checkpoint" in res.output and "global.safetensors" in res.output
