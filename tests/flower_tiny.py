"""What the Flower tests share: the tiny run config (tiny Llama, streaming text, a few clients, seconds per round)
and the one check that a Flower run ended exactly where the in-process run did."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny_model import tiny_model_toml


def tiny_config(*, seed: int, rounds: int, method: str, n_clients: int = 2, parts_per_book: int = 2, extra: str = "",
                heldout: int = 0, data: str = "") -> str:
    """A fednl TOML config; ``extra`` is appended (e.g. ``'wire_dtype = "bf16"'`` lands in ``[engine]``);
    ``heldout`` clients are set aside; ``data`` is the book file (default: the embedded one)."""
    task_extra = (f"heldout = {heldout}\n" if heldout else "") + (f"data_dir = {json.dumps(data)}\n" if data else "")
    return f"""
seed = {seed}
rounds = {rounds}
[method]
name = "{method}"
{tiny_model_toml()}[task]
name = "stream"
doc_length = 32
parts_per_book = {parts_per_book}
max_train = 2
max_test = 2
bin_size = 16
{task_extra}[task.partition]
kind = "iid"
n_clients = {n_clients}
[train]
batch_size = 2
seq_len = 32
max_steps = 1
lr = 1e-2
[engine]
threads = 1
{extra}"""


# ---------------------------------------------------------------------------------------------- the parity check
TIMING = {"s_round", "peak_mem_mb", "wall_s"}  # wall-clock measurements: the only fields allowed to differ


def _records(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _newest_tensors(run_dir: Path) -> dict[str, dict[str, bytes]]:
    from safetensors.torch import load_file

    ckpt = run_dir / "checkpoint"
    latest = ckpt / (ckpt / "LATEST").read_text().strip()
    out = {}
    for name in ("global", "server", "engine"):
        path = latest / f"{name}.safetensors"
        tensors = load_file(str(path)) if path.is_file() else {}
        out[name] = {k: (str(t.dtype), tuple(t.shape), t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                     for k, t in tensors.items()}
    return out


def assert_flower_equals_inprocess(inprocess_dir: Path, flower_dir: Path) -> dict:
    """The Flower run in ``flower_dir`` ended exactly where the in-process run in ``inprocess_dir`` did, bit for
    bit: results.json (but ``wall_s``), every metrics.jsonl record (but its timing fields) and the newest
    checkpoint's global, server and engine tensors; and the hop's payload bytes equal the ledger, round by round
    and direction by direction. Returns the Flower run's results."""
    expected = json.loads((inprocess_dir / "results.json").read_text())
    got = json.loads((flower_dir / "results.json").read_text())
    assert got["clients"], "no client was evaluated"
    assert got["comm"] == expected["comm"]
    assert {k: v for k, v in got.items() if k not in TIMING} == {k: v for k, v in expected.items() if k not in TIMING}
    assert _records(flower_dir) == _records(inprocess_dir)
    assert _newest_tensors(flower_dir) == _newest_tensors(inprocess_dir)
    record = json.loads((flower_dir / "flower.json").read_text())
    assert record["hop_bytes"]["train_down"]["payload"] == got["comm"]["bytes_down"]
    assert record["hop_bytes"]["train_up"]["payload"] == got["comm"]["bytes_up"]
    for per in got["comm"]["per_round"]:
        rows = [h for h in record["hop"] if h["round"] == per["round"] and h["kind"] == "train"]
        assert sum(h["payload"] for h in rows if h["direction"] == "down") == per["bytes_down"]
        assert sum(h["payload"] for h in rows if h["direction"] == "up") == per["bytes_up"]
    assert all(h["overhead"] > 0 for h in record["hop"])  # keys + run record are reported, separately
    return got
