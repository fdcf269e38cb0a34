"""Shared helpers for the comparator-strategy tests (tiny models through the real simulator), plus their checks.

``run_sim`` drives :class:`fednl.engine.simulator.Simulator` — the engine every run goes through — on a tiny
random Llama (or a model kind built for a strategy) and the toy multiple-choice task of the engine tests.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel

from fednl.client.state import ClientState
from fednl.config import EngineConfig, TrainConfig
from fednl.engine.runstate import load_checkpoint
from fednl.engine.simulator import RunSpec, Simulator
from fednl.models import LoraConfig, ModelConfig, ModelSpec, build_model, param_groups
from fednl.strategies import get_strategy
from fednl.strategies.base import ClientContext, Strategy
from lost_replies import lose_replies
from test_engine_toy import tokenizer, toy_task

# Tiny shapes: one intra-op thread is much faster than two on a shared 2-core machine (no oversubscription).
torch.set_num_threads(1)

TINY = ModelConfig(source="tiny", tiny_hidden=32, tiny_layers=2, tiny_heads=4, tiny_kv_heads=2, tiny_intermediate=64)
LORA = LoraConfig(r=2, alpha=4.0)


def build_for(name: str, options: BaseModel | None = None, *, kind: ModelSpec | str | None = None, lora: LoraConfig = LORA,
              seed: int = 0) -> tuple[torch.nn.Module, Strategy]:
    """A fresh tiny model of the strategy's kind (or ``kind``) and the strategy on its parameter groups."""
    cls = get_strategy(name)
    opts = options if options is not None else cls.Options()
    model = build_model(kind or cls.model_spec(opts), TINY, None, lora, seed)
    return model, cls(opts, groups=param_groups(model))


def run_sim(model: torch.nn.Module, strategy: Strategy, out: Path, *, rounds: int = 2, seed: int = 3,
            lr: float = 0.05, optimizer: str = "adamw", max_steps: int | None = 2, grad_clip: float = 1.0,
            stop_after: int | None = None, resume: bool = False,
            silent: set[tuple[int, str]] | None = None) -> Simulator:
    """Run ``rounds`` rounds of the real simulator on the 3-client toy task (or stop after ``stop_after``, or
    resume the run in ``out``); returns the simulator. ``silent``: (round, client) pairs whose reply never
    arrives (a drop-out)."""
    train = TrainConfig(batch_size=2, seq_len=32, lr=lr, optimizer=optimizer, max_steps=max_steps, grad_clip=grad_clip)
    engine = EngineConfig(progress=False, eval_every=0)
    spec = RunSpec(rounds=rounds, seed=seed, train=train, engine=engine, out=out, method=strategy.name,
                   model_name="tiny", config={"rounds": rounds})
    sim = Simulator(model, tokenizer(), toy_task(), strategy, spec, log=lambda s: None)
    if silent:
        lose_replies(sim, silent)
    sim.run(resume=resume, stop_after=stop_after)
    return sim


def final_global(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "checkpoint").global_params


def final_state(out: Path):
    return load_checkpoint(out / "checkpoint")


def hand_ctx(params: dict[str, torch.Tensor], *, cid: str = "c0", rnd: int = 1, groups=None, state=None,
             forward_loss=None, batches=None, num_examples: int = 4) -> ClientContext:
    """A ClientContext over hand-made leaf tensors (turned into Parameters)."""
    live = {n: torch.nn.Parameter(t.detach().clone().double()) for n, t in params.items()}
    return ClientContext(cid=cid, rnd=rnd, params=live, groups=groups or {"frozen": set(), "lora": set(live)},
                         state=state if state is not None else ClientState(cid), num_examples=num_examples,
                         generator=torch.Generator().manual_seed(0), forward_loss=forward_loss, batches=batches)


# ---------------------------------------------------------------------------------------------- checks
def test_run_sim_trains_every_client_and_moves_the_global_lora(tmp_path) -> None:
    # Prepare
    model, strat = build_for("fedavg")
    # Execute
    sim = run_sim(model, strat, tmp_path, rounds=1)
    st = sim.state
    # Assert: 3 clients with 4, 5, 6 training examples; the global LoRA moved away from its init
    assert sorted(st.clients) == ["client0", "client1", "client2"]
    assert all(st.clients[c].info["rounds_trained"] == 1 for c in st.clients)
    b_names = [n for n in st.global_params if n.endswith("lora_B")]
    assert b_names and all(st.global_params[n].abs().sum() > 0 for n in b_names)


def test_build_for_uses_the_strategy_kind() -> None:
    model, strat = build_for("floral")
    assert getattr(model, "fednl_kind") == "floral" and "router" in strat.groups
