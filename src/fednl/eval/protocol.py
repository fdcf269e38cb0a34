"""Post-hoc evaluation protocol of a finished run (``fednl evaluate RUN_DIR``).

The run's simulator is rebuilt from ``config.resolved.toml`` and its newest checkpoint (the state after the
final round's aggregation, round ``R``). Views, each on every training client's test split:

* ``personalised`` — the client's local parameters kept + what the strategy installs for evaluation
  (``Simulator.install_client``); the number a run reports.
* ``global``       — global shared parameters + the *initial* values of the local parameters (as a client that
  never trained would see it).
* ``memory_off``   — titans models only: ``personalised`` with the memory gate forced to the softmax side
  (``set_gate_override(model, 0.0)``), so ``personalised - memory_off`` is the memory's contribution.
* ``memory_zero``  — titans models only: ``personalised`` with the memory's output forced to zero and the gate
  kept (``set_memory_zero(model, True)``): the twin that removes only the memory read, so with ``mix = "convex"``
  the softmax path is still scaled by ``1 - g``; ``personalised - memory_zero`` is what the memory's content adds.
* ``heldout``      — held-out clients (never trained): global + initial local, on all their examples.

Each view gets ``summary`` = mean, worst client and (population) std of the task's primary metric.

**Aggregation drop** (paper Fig. 3). For each client, one more local round ``R + 1`` is run from its
personalised post-aggregation state exactly as the simulator would run it (``Simulator.train_client`` with the
payload ``strategy.configure_train(R + 1, cid, global)`` passed through the run's wire, the same seed derivation
``derive_seed(seed, "client" | "torch", R + 1, cid)``); the resulting *locally fine-tuned* model is evaluated
before anything is sent back. ``local - aggregated`` is reported raw (``delta``) and as ``drop``, signed so that
a positive drop means aggregation cost that client performance (``local - aggregated`` for higher-is-better
metrics, ``aggregated - local`` for CE). Nothing is written back: the checkpoint is left untouched.

**NIAH by depth**: mc examples grouped by ``meta["depth"]`` (:mod:`fednl.eval.depth`), per client and pooled.
**Streaming CE by position**: per-token CE binned by ``task.bin_size`` (:mod:`fednl.eval.position`), each bin
relative to the first: over the documents of a text task, and over the test prompts of a question task that has
a ``bin_size`` (NIAH-7: the prompt read as a stream, as in the paper's Fig. 5). For the personalised view, and for
``memory_off`` and ``memory_zero`` on titans models.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from fednl.client.metrics import HIGHER_IS_BETTER, PRIMARY_METRIC, eval_seq_len, evaluate_examples
from fednl.client.scoring import McScore, mc_metrics
from fednl.client.state import ClientState
from fednl.engine.runstate import RunState, load_checkpoint
from fednl.engine.simulator import Simulator
from fednl.eval.depth import depth_table, evaluate_with_depths, merge_depths
from fednl.eval.position import ce_by_position
from fednl.eval.summary import aggregation_drop, summarise
from fednl.models.titans import set_gate_override, set_memory_zero, titans_layers
from fednl.records import (
    EVAL_NAME,
    AggregationDrop,
    DepthView,
    Drop,
    EvalReport,
    PooledCurve,
    PositionCurve,
    PositionView,
    View,
)
from fednl.util.threads import torch_threads


def _is_titans(sim: Simulator) -> bool:
    """A model with a memory path (a windowed LoRA baseline is converted too, but with its gate fixed at 0)."""
    return getattr(sim.model, "fednl_kind", "titans") != "lora" and bool(titans_layers(sim.model))


#: The twins of the personalised view on titans models: view -> (setter, the layer attribute it sets, value).
TWINS: dict[str, tuple[Callable[[torch.nn.Module, Any], None], str, Any]] = {
    "memory_off": (set_gate_override, "gate_override", 0.0),
    "memory_zero": (set_memory_zero, "memory_zero", True),
}


@contextlib.contextmanager
def _twin(model: torch.nn.Module, view: str) -> Iterator[None]:
    """Within the block ``model`` is the ``view`` twin (``memory_off``: every gate forced to 0; ``memory_zero``:
    every memory read zeroed, gate kept); each layer's previous setting is restored afterwards. Any other view
    (``personalised``) leaves the model as it is."""
    if view not in TWINS:
        yield
        return
    setter, attr, value = TWINS[view]
    layers = titans_layers(model)
    saved = [getattr(layer, attr) for layer in layers]
    setter(model, value)
    try:
        yield
    finally:
        for layer, old in zip(layers, saved):
            setattr(layer, attr, old)


def load_run(run_dir: str | Path, *, log: Any = print) -> tuple[Simulator, RunState]:
    """Rebuild the simulator of ``run_dir`` and load its newest checkpoint (verified)."""
    from fednl.experiment import build_simulator, finished_run

    cfg, ckpt = finished_run(run_dir, verb="evaluate")
    sim = build_simulator(cfg, run_dir, log=log)
    state = load_checkpoint(ckpt)
    if state.info.get("fingerprint") not in (None, sim.fingerprint):
        raise ValueError(f"{run_dir}: the rebuilt model differs from the checkpointed run's model")
    if set(state.clients) != set(sim.client_names):
        raise ValueError(f"{run_dir}: checkpoint clients {sorted(state.clients)} != task clients {sim.client_names}")
    sim.strategy.load_server_state(state.server_tensors, state.server_info)
    return sim, state


def _bs(sim: Simulator) -> int:
    return int(sim.spec.engine.eval_batch_size or sim.spec.train.batch_size)


def _eval_now(sim: Simulator, examples: list[Any]) -> dict[str, float]:
    return evaluate_examples(sim.model, sim.tokenizer, examples, seq_len=eval_seq_len(sim.spec),
                             batch_size=_bs(sim))


def _local_round(sim: Simulator, state: RunState, cid: str) -> dict[str, float]:
    """Round ``R + 1`` of client ``cid`` from a copy of its state, as the simulator runs it; the locally
    fine-tuned model's metrics on its test split."""
    rnd = state.round + 1
    client = ClientState.from_bytes(*state.clients[cid].to_bytes(), source=f"copy of {cid}")
    store = dict(state.engine_tensors)  # a copy: the wire's server state of the run is not changed
    down, _ = sim.wire.encode_down(cid, sim.strategy.configure_train(rnd, cid, state.global_params), store)
    _, reply = sim.client_round(rnd, cid, down, client, initial_local=state.initial_local)
    out = _eval_now(sim, sim.data[cid].test)
    out["train_loss"] = float(reply.metrics["train_loss"])
    return out


def _positions(sim: Simulator, examples: list[Any]) -> dict[str, Any] | None:
    """CE by position bin when the task has a ``bin_size``: over text documents, or over the prompts of
    question examples read as a stream (NIAH: the haystack as the prompt unfolds, paper Fig. 5)."""
    cfg = sim.spec.run_config
    bin_size = getattr(cfg.task, "bin_size", None) if cfg is not None else None
    if bin_size is None or not examples:
        return None
    return ce_by_position(sim.model, sim.tokenizer, examples, seq_len=eval_seq_len(sim.spec),
                          bin_size=int(bin_size), batch_size=_bs(sim))


def _installed(sim: Simulator, cid: str, state: RunState) -> dict[str, bytes]:
    """Install client ``cid``'s model from ``state`` and return the exact bytes of every parameter the install
    writes (its local parameters and the strategy's evaluation parameters), to compare two installs."""
    sim.install_client(cid, state.global_params, state)
    names = set(sim.strategy.local_names()) | set(sim.strategy.eval_params(cid, state.global_params,
                                                                            state.clients[cid]))
    live = dict(sim.model.named_parameters())
    return {n: live[n].detach().cpu().contiguous().numpy().tobytes() for n in sorted(names)}


def _view(sim: Simulator, examples: list[Any]) -> tuple[dict[str, float], dict[str, Any], dict[str, Any] | None]:
    """``(metrics, depth table, CE by position)`` of the installed model. A text-only test split is scored once:
    its overall CE is the token-weighted mean of the per-token CEs that the position bins are made of."""
    p = _positions(sim, examples)
    if p is not None and all(e.kind == "text" for e in examples):
        return {"ce": p["ce_mean"], "tokens": float(p["tokens"]), "n": float(p["n"])}, {}, p
    if p is not None and all(e.kind == "mc" for e in examples):  # answered in the position pass
        answers = [(r["depth"], McScore(bool(r["correct"]), r["answer_loglik"])) for r in p.pop("mc")]
        return mc_metrics(s for _, s in answers), depth_table(answers), p
    metrics, d = evaluate_with_depths(sim.model, sim.tokenizer, examples, seq_len=eval_seq_len(sim.spec),
                                      batch_size=_bs(sim))
    return metrics, d, p


def evaluate_run(run_dir: str | Path, *, aggregation: bool = True, log: Any = print) -> EvalReport:
    """The full protocol on ``run_dir``; returns the report written to ``eval.json``. Uses the run's
    ``engine.threads`` like ``fednl run`` does."""
    with torch_threads(None):  # the run's count is set once the run is loaded; the caller's is restored after
        return _evaluate_run(run_dir, aggregation=aggregation, log=log)


def _evaluate_run(run_dir: str | Path, *, aggregation: bool, log: Any) -> EvalReport:
    t0 = time.perf_counter()
    sim, state = load_run(run_dir, log=log)
    if sim.spec.engine.threads:
        torch.set_num_threads(int(sim.spec.engine.threads))
    metric = PRIMARY_METRIC.get(sim.task.kind, "accuracy")
    titans = _is_titans(sim)
    own = ["personalised", *TWINS] if titans else ["personalised"]  # views evaluated on the installed model
    views: dict[str, dict[str, dict[str, float]]] = {"personalised": {}, "global": {}, **{v: {} for v in own}}
    depth: dict[str, dict[str, Any]] = {v: {} for v in own}
    position: dict[str, dict[str, Any]] = {v: {} for v in own}
    tested = [c for c in sim.client_names if sim.data[c].test]
    for cid in tested:
        test = sim.data[cid].test
        fresh = RunState(state.round, state.global_params, state.initial_local, {cid: ClientState(cid)})
        global_same = _installed(sim, cid, fresh) == _installed(sim, cid, state)  # leaves personalised installed
        for view in own:
            with _twin(sim.model, view):
                views[view][cid], d, p = _view(sim, test)
            if d:
                depth[view][cid] = d
            if p is not None:
                position[view][cid] = p
        # the global view needs its own pass only when it installs different values (local parts, FedALA...)
        views["global"][cid] = (dict(views["personalised"][cid]) if global_same
                                else sim.evaluate_client(cid, test, state, ClientState(cid)))
    views["heldout"] = sim.evaluate_heldout(state)

    agg: dict[str, Drop] = {}
    if aggregation:
        for cid in tested:
            if not sim.data[cid].train:
                continue
            local = _local_round(sim, state, cid)
            after = views["personalised"][cid]
            agg[cid] = Drop(local=local[metric], aggregated=after[metric], delta=local[metric] - after[metric],
                            drop=aggregation_drop(local[metric], after[metric], metric),
                            local_train_loss=local["train_loss"])
    drops = summarise({c: {"drop": a.drop} for c, a in agg.items()}, "drop", higher_is_better=False) if agg else None
    return EvalReport(
        run_dir=str(Path(run_dir)), method=sim.spec.method, model=sim.spec.model_name, task=sim.task.name,
        task_kind=sim.task.kind, rounds=state.round, seed=sim.spec.seed, metric=metric,
        higher_is_better=HIGHER_IS_BETTER.get(metric, True), titans=titans,
        views={v: View(clients=per, summary=summarise(per, metric)) for v, per in views.items()},
        aggregation_drop=AggregationDrop(round=state.round + 1, clients=agg, summary=drops),
        depth={v: DepthView(clients=per, pooled=merge_depths(per.values())) for v, per in depth.items() if per},
        position={v: PositionView(clients={c: PositionCurve(**p) for c, p in per.items()},
                                  pooled=_pool_positions(per)) for v, per in position.items() if per},
        wall_s=round(time.perf_counter() - t0, 3),
    )


def _pool_positions(per: dict[str, dict[str, Any]]) -> PooledCurve:
    """Token-weighted pooling is not recoverable from bin means alone; pool by example-count weights per bin."""
    starts = sorted({s for p in per.values() for s in p["bin_start"]})
    ce = []
    for s in starts:
        num = den = 0.0
        for p in per.values():
            if s in p["bin_start"]:
                i = p["bin_start"].index(s)
                num += p["ce"][i] * p["n"]
                den += p["n"]
        ce.append(num / den)
    first = ce[0]
    return PooledCurve(bin_start=starts, ce=ce, relative=[(c - first) / first for c in ce])


def write_eval(run_dir: str | Path, out: str | Path | None = None, **kwargs: Any) -> Path:
    """Run :func:`evaluate_run` and write the report atomically (default ``RUN_DIR/eval.json``)."""
    path = Path(out) if out is not None else Path(run_dir) / EVAL_NAME
    evaluate_run(run_dir, **kwargs).write(path)
    return path


__all__ = ["EVAL_NAME", "aggregation_drop", "evaluate_run", "load_run", "summarise", "write_eval"]
