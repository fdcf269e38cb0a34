"""Run state: an atomic checkpoint after every round, and its verified reload for ``--resume``.

Layout under ``<out>/checkpoint/``::

    LATEST                      name of the newest complete checkpoint directory (replaced atomically)
    round-0003/
      manifest.json             format, round, and {file: {"sha256", "bytes"}} for every file below
      run.json                  round, schedule, ledger, python RNG state, client file index, engine info
      global.safetensors        global (shared) parameters
      initial_local.safetensors starting values of the local parameters (a client's first round)
      server.safetensors/.json  strategy server state
      engine.safetensors/.json  engine server state: server optimiser (``opt|...``), top-k wire copies
                                (``wire|...``); absent from checkpoints written before they existed
      rng.safetensors           torch RNG state(s)
      clients/c0000.safetensors/.json ...   every client's ClientState

A checkpoint directory is first written as ``round-0003.tmp-<pid>``, renamed when complete, and only then
named in ``LATEST``; temporary folders left by a killed process are removed by the next save. Loading verifies every file of the manifest (presence, size, sha256): a truncated or
corrupted checkpoint raises ``ValueError`` naming the file — never a silent restart.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fednl.client.state import ClientState
from fednl.util.atomic import atomic_write_text
from fednl.util.faults import kill_point
from fednl.engine.ledger import Ledger
from fednl.strategies.base import Params

FORMAT = 1
LATEST = "LATEST"


@dataclass
class RunState:
    """Everything needed to continue a run bit-identically after round ``round``."""

    round: int
    global_params: Params
    initial_local: Params
    clients: dict[str, ClientState]
    server_tensors: Params = field(default_factory=dict)
    server_info: dict[str, Any] = field(default_factory=dict)
    engine_tensors: Params = field(default_factory=dict)  # server optimiser and wire state (not the strategy's)
    engine_info: dict[str, Any] = field(default_factory=dict)
    python_random: Any = None  # random.Random.getstate()
    torch_rng: torch.Tensor | None = None  # torch.get_rng_state()
    schedule: list[dict[str, Any]] = field(default_factory=list)
    ledger: Ledger = field(default_factory=Ledger)
    info: dict[str, Any] = field(default_factory=dict)  # config, wall time, last evaluation ...


def _random_state_to_json(state: Any) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _random_state_from_json(obj: Any) -> Any:
    try:
        version, internal, gauss = obj
        state = (int(version), tuple(int(x) for x in internal), gauss)
        random.Random().setstate(state)  # validate
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint run.json: malformed python RNG state ({exc})") from None
    return state


def _tensor_blob(tensors: Params) -> bytes:
    return st_save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()})


def save_checkpoint(root: str | os.PathLike[str], state: RunState, *, keep: int = 1) -> Path:
    """Write ``state`` as ``root/round-NNNN`` (atomic) and point ``root/LATEST`` at it; returns the directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"round-{state.round:04d}"
    tmp = root / f"{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "clients").mkdir(parents=True)
    files: dict[str, dict[str, Any]] = {}

    def put(rel: str, data: bytes) -> None:
        path = tmp / rel
        with open(path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        files[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    client_index: dict[str, str] = {}
    for i, cid in enumerate(sorted(state.clients)):
        stem = f"clients/c{i:04d}"
        blob, meta = state.clients[cid].to_bytes()
        put(stem + ".safetensors", blob)
        put(stem + ".json", meta)
        client_index[cid] = stem
    put("global.safetensors", _tensor_blob(state.global_params))
    put("initial_local.safetensors", _tensor_blob(state.initial_local))
    put("server.safetensors", _tensor_blob(state.server_tensors))
    put("server.json", (json.dumps(state.server_info, sort_keys=True, indent=2) + "\n").encode())
    put("engine.safetensors", _tensor_blob(state.engine_tensors))
    put("engine.json", (json.dumps(state.engine_info, sort_keys=True, indent=2) + "\n").encode())
    rng = {} if state.torch_rng is None else {"torch_cpu": state.torch_rng}
    put("rng.safetensors", _tensor_blob(rng))
    kill_point("checkpoint_writing", state.round)
    run = {
        "round": state.round,
        "schedule": state.schedule,
        "ledger": state.ledger.to_json(),
        "python_random": None if state.python_random is None else _random_state_to_json(state.python_random),
        "clients": client_index,
        "info": state.info,
    }
    put("run.json", (json.dumps(run, sort_keys=True) + "\n").encode())
    manifest = {"format": FORMAT, "round": state.round, "files": files}
    put("manifest.json", (json.dumps(manifest, sort_keys=True, indent=2) + "\n").encode())
    final = root / name
    if final.exists():  # left by a crash between the rename and the LATEST update
        shutil.rmtree(final)
    os.replace(tmp, final)
    kill_point("checkpoint_renamed", state.round)
    atomic_write_text(root / LATEST, name + "\n")
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("round-") and ".tmp-" not in p.name)
    for old in done[:-keep] if keep > 0 else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("round-*.tmp-*"):  # left by a process killed while writing a checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(root: str | os.PathLike[str]) -> Path:
    """The directory named by ``root/LATEST`` (``FileNotFoundError`` if there is none)."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {pointer} does not exist")
    name = pointer.read_text().strip()
    if not name.startswith("round-") or "/" in name:
        raise ValueError(f"corrupted checkpoint pointer {pointer}: {name!r}")
    path = root / name
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} named in {pointer} is missing")
    return path


def _verified(path: Path, rel: str, files: dict[str, Any]) -> bytes:
    entry = files.get(rel)
    if entry is None:
        raise ValueError(f"corrupted checkpoint {path}: manifest does not list {rel}")
    fpath = path / rel
    if not fpath.is_file():
        raise ValueError(f"corrupted checkpoint {path}: file {rel} is missing")
    data = fpath.read_bytes()
    if len(data) != entry["bytes"]:
        raise ValueError(f"corrupted checkpoint {path}: {rel} has {len(data)} bytes, manifest says {entry['bytes']} (truncated?)")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"corrupted checkpoint {path}: {rel} fails its sha256 check")
    return data


def _tensors(path: Path, rel: str, files: dict[str, Any]) -> Params:
    try:
        return dict(st_load(_verified(path, rel, files)))
    except ValueError:
        raise
    except Exception as exc:  # safetensors' own error types
        raise ValueError(f"corrupted checkpoint {path}: cannot read {rel} ({exc})") from None


def load_checkpoint(root: str | os.PathLike[str]) -> RunState:
    """Load and verify the newest checkpoint under ``root`` (the ``<out>/checkpoint`` directory)."""
    path = latest_checkpoint(root)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise ValueError(f"corrupted checkpoint {path}: manifest.json is missing")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        fmt = manifest["format"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"corrupted checkpoint {path}: unreadable manifest.json ({exc})") from None
    if fmt != FORMAT:
        raise ValueError(f"checkpoint {path} has format {fmt}, this version reads format {FORMAT}")
    try:
        run = json.loads(_verified(path, "run.json", files))
        server_info = json.loads(_verified(path, "server.json", files))
        engine_info = json.loads(_verified(path, "engine.json", files)) if "engine.json" in files else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"corrupted checkpoint {path}: bad JSON ({exc})") from None
    clients: dict[str, ClientState] = {}
    for cid, stem in run["clients"].items():
        blob = _verified(path, stem + ".safetensors", files)
        meta = _verified(path, stem + ".json", files)
        clients[cid] = ClientState.from_bytes(blob, meta, source=str(path / stem))
    rng = _tensors(path, "rng.safetensors", files)
    return RunState(
        round=int(run["round"]),
        global_params=_tensors(path, "global.safetensors", files),
        initial_local=_tensors(path, "initial_local.safetensors", files),
        clients=clients,
        server_tensors=_tensors(path, "server.safetensors", files),
        server_info=server_info,
        engine_tensors=_tensors(path, "engine.safetensors", files) if "engine.safetensors" in files else {},
        engine_info=engine_info,
        python_random=None if run["python_random"] is None else _random_state_from_json(run["python_random"]),
        torch_rng=rng.get("torch_cpu"),
        schedule=list(run["schedule"]),
        ledger=Ledger.from_json(run["ledger"]),
        info=dict(run["info"]),
    )
