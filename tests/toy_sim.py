"""A simulator over the toy memory LM (test_engine_toy) with any strategy, engine settings and server optimiser."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fednl.config import EngineConfig, TrainConfig
from fednl.engine.runstate import RunState, load_checkpoint
from fednl.engine.simulator import RunSpec, Simulator
from fednl.strategies import get_strategy
from test_engine_toy import ToyMemoryLM, tokenizer, toy_task


def toy_sim(out: Path, method: str = "fedavg", *, options: dict[str, Any] | None = None, rounds: int = 2,
            engine: dict[str, Any] | None = None, server_opt: Any = None, lr: float = 0.05, optimizer: str = "adamw",
            seed: int = 3, log=None) -> Simulator:
    """A fresh toy model (seeded, so every call builds the same one) under ``method`` on the 3-client toy task."""
    model = ToyMemoryLM(seed=1)
    with torch.no_grad():
        model.gate.fill_(1.0)
    cls = get_strategy(method)
    strategy = cls(cls.Options.model_validate(options or {}), groups=model.groups())
    train = TrainConfig(batch_size=2, seq_len=32, lr=lr, optimizer=optimizer, max_steps=2)
    eng = EngineConfig.model_validate({"progress": False, **(engine or {})})
    config = {"rounds": rounds, "method": method, "options": options or {}, "engine": eng.model_dump(mode="json"),
              "server_opt": None if server_opt is None else server_opt.model_dump()}
    spec = RunSpec(rounds=rounds, seed=seed, train=train, engine=eng, out=out, method=method, model_name="toy",
                   config=config, server_opt=server_opt)
    return Simulator(model, tokenizer(), toy_task(), strategy, spec, log=log or (lambda s: None))


def final(out: Path) -> RunState:
    return load_checkpoint(out / "checkpoint")


def same_globals(a: Path, b: Path) -> bool:
    ga, gb = final(a).global_params, final(b).global_params
    return ga.keys() == gb.keys() and all(torch.equal(ga[n], gb[n]) for n in ga)
