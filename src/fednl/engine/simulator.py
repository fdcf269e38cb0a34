"""The round loop (:class:`RoundLoop`), once for every engine, and the in-process run (:class:`Simulator`).

:class:`RoundLoop` is the server: it samples the clients of a round, builds each one's payload
(``strategy.configure_train``), encodes it with the run's :class:`~fednl.engine.wire.Wire` and counts it in the
ledger, hands the jobs to a :class:`~fednl.engine.executor.ClientExecutor` (in this process, or Flower
SuperNodes), counts and decodes the replies that came back, aggregates them (:meth:`RoundLoop._aggregate`: the one
place between the clients' answers and the global state), evaluates, writes metrics.jsonl and checkpoints.
:class:`Simulator` is the loop with :class:`~fednl.engine.clients.InProcessExecutor`: every client of the task in
this process, on one shared model.

Determinism: client sampling uses a seeded :class:`random.Random` whose state is checkpointed; each
(round, client) trains with a torch generator (shuffling) and a forked global torch RNG seeded from
``sha256(seed, round, cid)``, so the result does not depend on what ran before in the process or where the
client runs. After every round the full run state is checkpointed (:mod:`fednl.engine.runstate`), and
``resume=True`` continues from the newest checkpoint to a bit-identical end — from wherever the run was killed:
every reply is stored as it arrives (:mod:`fednl.engine.journal`) and reused when the round is run again, and a run
killed before its first checkpoint starts again from round 0 (reusing the replies it stored).

Faults (docs/ROBUSTNESS.md): ``engine.dropout`` takes a seeded fraction of each round's sampled clients offline;
an executor may return fewer replies than jobs (``engine.deadline_s``, a node gone); every reply must carry its
job's round and nonce (:func:`~fednl.engine.screening.check_fresh`: ``stale`` / ``replay`` are refused); a round
with fewer accepted updates than ``engine.min_clients`` is skipped (recorded, the global state unchanged).

Every payload crosses the wire (the run's codec per direction) and is counted by the ledger when it crosses: a
round's downlink payloads when they are sent, an uplink payload when its reply arrives (a client that does not
answer sends nothing). ``engine.max_bytes`` ends the run after the last round whose traffic fits (the round that
would cross it is discarded and the run rolls back to the checkpoint before it). ``[server_opt]`` puts an outer
optimiser on the strategy's aggregate (:mod:`fednl.strategies.server_opt`).
"""

from __future__ import annotations

import hashlib
import json
import random
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fednl.client.state import ClientState
from fednl.engine.clients import ClientRuntime, InProcessExecutor
from fednl.engine.executor import ClientExecutor, TrainJob, TrainReply
from fednl.engine.guard import GuardStep, UpdateGuard
from fednl.engine.journal import JOURNAL_DIR, ReplyJournal, payload_digest
from fednl.engine.screening import Rejection, check_fresh
from fednl.engine.ledger import group_index
from fednl.engine.runstate import LATEST, RunState, load_checkpoint, save_checkpoint
from fednl.engine.wire import Wire, payload_bytes
from fednl.records import (
    RESULTS_NAME,
    BudgetStop,
    EvalRecord,
    PrivacyStop,
    Record,
    Results,
    RoundRecord,
    StopRecord,
    append_metrics,
)
from fednl.strategies.base import ClientReply, Params, Payload, Strategy, StrategyError
from fednl.strategies.server_opt import server_step
from fednl.util.atomic import atomic_write_text
from fednl.util.faults import kill_point

if TYPE_CHECKING:
    from fednl.config import EngineConfig, RunConfig, TrainConfig
    from fednl.data.types import Example, FederatedTask

COUNT_KEYS = frozenset({"n", "tokens"})  # per-client counts, not averaged into "mean"
# settings a resume may change: they affect speed, logging or evaluation, never the trained parameters
RESUME_MUTABLE = ("rounds", "out", "description", "engine.progress", "engine.device", "engine.threads",
                  "engine.eval_every", "engine.eval_batch_size", "engine.max_bytes", "engine.deadline_s",
                  "dp.max_epsilon")


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from ``seed`` and labels (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256("/".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, shape, dtype and bytes (checks a rebuilt model on resume)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        # reshape(-1): a 0-dim tensor cannot be viewed as bytes; for ndim >= 1 the bytes are the same
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_drift(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two resolved configs, ignoring what a resume may change."""
    a, b = _flatten(saved), _flatten(current)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not any(k == m or k.startswith(m + ".") for m in RESUME_MUTABLE)]


@dataclass
class RunSpec:
    """What a run needs besides the model, tokenizer, clients and strategy."""

    rounds: int
    seed: int
    train: TrainConfig
    engine: EngineConfig
    out: Path
    method: str
    model_name: str
    config: dict[str, Any] = field(default_factory=dict)  # resolved config (JSON form), checked on resume
    run_config: RunConfig | None = None  # the typed config the run was built from (None for a hand-built run)
    server_opt: Any = None  # a fednl.strategies.server_opt.ServerOptConfig, or None (the aggregate is the new global)
    screen: Any = None  # fednl.engine.screening.ScreenConfig (the norm check), or None
    robust: Any = None  # fednl.engine.robust.RobustConfig, or None
    dp: Any = None  # fednl.engine.dp.DPConfig (client-level DP), or None

    @classmethod
    def from_config(cls, cfg: RunConfig, out: str | Path, *, model_name: str) -> RunSpec:
        """The spec of a run built from ``cfg``, which it carries (``run_config``) with its JSON form (``config``)."""
        return cls(rounds=cfg.rounds, seed=cfg.seed, train=cfg.train, engine=cfg.engine, out=Path(out),
                   method=cfg.method.name, model_name=model_name, config=cfg.to_dict(), run_config=cfg,
                   server_opt=cfg.server_opt, screen=cfg.screen, robust=cfg.robust, dp=cfg.dp)


class BudgetExhausted(Exception):
    """A message would take the run's traffic past ``engine.max_bytes``."""

    def __init__(self, rnd: int, cid: str, direction: str, nbytes: int, spent: int, limit: int):
        self.rnd, self.cid, self.direction, self.nbytes, self.spent, self.limit = rnd, cid, direction, nbytes, spent, limit
        super().__init__(f"round {rnd}: {direction} payload of {cid} ({nbytes} B) after {spent} B > max_bytes {limit}")


@dataclass
class RoundIO:
    """What crossed in one round: the sample, the decoded fresh replies, what each client was sent, the replies
    refused before screening (``stale``, ``replay``, ``wire``) and the silent clients with the reason."""

    chosen: list[str]
    sent: dict[str, Params]
    replies: list[ClientReply] = field(default_factory=list)
    refused: list[Rejection] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # cid -> "dropout" | "deadline: ..." | ...

    def console(self) -> str:
        if not self.dropped:
            return ""
        return " | dropped " + ", ".join(f"{c} ({why})" for c, why in self.dropped.items())


class RoundLoop:
    """Run ``spec.rounds`` federated rounds of ``strategy``; ``executor`` runs the clients (see the module
    docstring). ``model`` is the server's copy of the model: the initial global parameters, the initial values of
    the local parameters and the fingerprint a resume (and every Flower node) checks come from it."""

    def __init__(self, model: torch.nn.Module, strategy: Strategy, spec: RunSpec, executor: ClientExecutor, *,
                 log: Callable[[str], None] = print):
        self.model, self.strategy, self.spec, self.executor, self.log = model, strategy, spec, executor, log
        self.federation = executor.federation
        self.client_names = list(self.federation.clients)
        self.index = group_index(strategy.groups)
        self.device = next(iter(model.parameters())).device
        self.wire = Wire.from_engine(spec.engine)
        self.guard = UpdateGuard(screen=spec.screen, robust=spec.robust, dp=spec.dp, n_clients=len(self.client_names))
        self.out = Path(spec.out)
        self.ckpt_dir = self.out / "checkpoint"
        self.metrics_path = self.out / "metrics.jsonl"
        self.journal = ReplyJournal(self.out / JOURNAL_DIR)
        live = {n: p.detach() for n, p in model.named_parameters()}
        self.fingerprint = model_fingerprint(model)
        self._fresh = RunState(
            round=0,
            global_params=strategy.init_server(live),
            initial_local={n: live[n].to("cpu").clone() for n in sorted(strategy.local_names())},
            clients={cid: ClientState(cid) for cid in self.client_names},
        )

    @property
    def initial_local(self) -> Params:
        """The initial values of the strategy's local parameters (what a client that never trained holds)."""
        return self._fresh.initial_local

    def client_seeds(self, rnd: int, cid: str) -> tuple[int, int]:
        """``(shuffling generator seed, global torch seed)`` of client ``cid`` in round ``rnd``."""
        return derive_seed(self.spec.seed, "client", rnd, cid), derive_seed(self.spec.seed, "torch", rnd, cid)

    def job_nonce(self, rnd: int, cid: str) -> str:
        """The nonce of client ``cid``'s job in round ``rnd``, which its reply must carry back (a function of the
        run seed: a resumed round sends the same one)."""
        return f"{derive_seed(self.spec.seed, 'nonce', rnd, cid):016x}"

    def offline(self, rnd: int, chosen: Sequence[str]) -> list[str]:
        """The sampled clients that ``engine.dropout`` takes offline in round ``rnd``: ``round(dropout × len)``
        of them, drawn by a generator seeded from the run seed and the round (not the sampling generator, so the
        sample is the same as without drop-outs)."""
        p = self.spec.engine.dropout
        if not p:
            return []
        k = min(len(chosen), round(float(p) * len(chosen)))
        gone = set(random.Random(derive_seed(self.spec.seed, "dropout", rnd)).sample(sorted(chosen), k))
        return [c for c in chosen if c in gone]

    # ------------------------------------------------------------------ one round
    def _send(self, state: RunState, rnd: int, cid: str, direction: str, payload: Payload) -> None:
        """Count a wire payload in the ledger, or raise :class:`BudgetExhausted` if it would cross the budget."""
        limit = self.spec.engine.max_bytes
        nbytes, spent = payload_bytes(payload), state.ledger.total()
        if limit is not None and spent + nbytes > limit:
            raise BudgetExhausted(rnd, cid, direction, nbytes, spent, int(limit))
        state.ledger.record(rnd, cid, direction, payload, self.index, self.wire.label(direction))

    def _sample_round(self, rnd: int, state: RunState,
                      rng: random.Random) -> tuple[list[str], dict[str, tuple[int, int]]]:
        """The clients of round ``rnd`` (the strategy's sample, checked) and their :meth:`client_seeds`, recorded
        in ``state.schedule``."""
        chosen = self.strategy.sample(rnd, list(self.client_names), rng)
        unknown = [c for c in chosen if c not in self.client_names]
        if not chosen or unknown or len(set(chosen)) != len(chosen):
            raise StrategyError(f"strategy {self.strategy.name!r} sampled an invalid client set {chosen}")
        seeds = {cid: self.client_seeds(rnd, cid) for cid in chosen}
        state.schedule.append({"round": rnd, "clients": list(chosen),
                               "seeds": {c: str(s[0]) for c, s in seeds.items()}})
        return chosen, seeds

    def _round(self, rnd: int, state: RunState, rng: random.Random) -> RoundIO:
        """Sample, send every sampled client that is online its payload, receive. Returns the decoded fresh replies
        (in sampling order: aggregation sums in the same order whatever the executor), the tensors each client
        was sent (what its update is measured against), the refused replies (``stale`` / ``replay``, and
        ``wire``: not what the uplink codec writes; their bytes are in the ledger, they are never decoded
        further) and why each silent client gave no reply."""
        chosen, seeds = self._sample_round(rnd, state, rng)
        offline = set(self.offline(rnd, chosen))
        jobs: list[TrainJob] = []
        received: dict[str, Payload | None] = {}
        sent: dict[str, Params] = {}
        for cid in chosen:
            if cid in offline:  # never reached: nothing crosses in either direction
                continue
            payload = self.strategy.configure_train(rnd, cid, state.global_params)
            down, received[cid] = self.wire.encode_down(cid, payload, state.engine_tensors)
            sent[cid] = received[cid].tensors if received[cid] is not None else payload.tensors
            self._send(state, rnd, cid, "down", down)
            jobs.append(TrainJob(cid, down, seeds[cid], self.job_nonce(rnd, cid)))
        arrived = self._train(rnd, jobs, state)
        missing = dict(getattr(self.executor, "missing", {}))
        fresh, stale = check_fresh(rnd, {j.cid: j.nonce for j in jobs}, arrived)
        io = RoundIO(chosen=chosen, sent=sent)
        for reply, why in stale:  # they crossed: counted, never decoded
            self._send(state, rnd, reply.cid, "up", reply.payload)
            io.refused.append(why)
        for cid in chosen:
            answer = fresh.get(cid)
            if answer is None:  # its uplink never crossed
                if not any(r.cid == cid for r in io.refused):
                    io.dropped[cid] = "dropout" if cid in offline else missing.get(cid, "no reply")
                continue
            self._send(state, rnd, cid, "up", answer.payload)  # it crossed, whatever it holds
            try:
                self.wire.check(answer.payload, "up")
                decoded = self.wire.decode_up(answer.payload, received[cid], like=state.global_params)
            except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as exc:  # a malformed payload
                io.refused.append(Rejection(cid, "wire", f"not a {self.wire.label('up')} uplink payload: {exc}",
                                            {"codec": self.wire.label("up")}))
                continue
            io.replies.append(ClientReply(cid, decoded, answer.num_examples, dict(answer.metrics)))
        return io

    def _train(self, rnd: int, jobs: list[TrainJob], state: RunState) -> list[TrainReply]:
        """The replies to ``jobs``: those stored in the journal by an earlier, killed attempt at round ``rnd``
        (their clients' states restored, not trained again), then the executor's for the others, each stored as it
        arrives."""
        digests = {j.cid: payload_digest(j.payload) for j in jobs}
        stored = self.journal.load(rnd, {j.cid: (j.nonce, digests[j.cid]) for j in jobs})
        for cid, entry in stored.items():
            if entry.client is not None and cid in state.clients:
                state.clients[cid] = entry.client
        if stored:
            self.log(f"round {rnd}: reusing the stored replies of {len(stored)} client(s): {', '.join(stored)}")
            self.executor.reused(rnd, list(stored))
        pending = [j for j in jobs if j.cid not in stored]
        nonces = {j.cid: j.nonce for j in pending}
        kept: set[str] = set()

        def store(reply: TrainReply) -> None:
            if reply.cid in kept or nonces.get(reply.cid) != reply.nonce or reply.round != rnd:
                return  # only a fresh answer to a pending job is worth keeping
            self.journal.put(reply, down_digest=digests[reply.cid], client=state.clients.get(reply.cid))
            kept.add(reply.cid)
            kill_point("reply_stored", rnd)

        self.executor.missing = {}
        self.executor.on_reply = store
        try:
            got = list(self.executor.train(rnd, pending, state)) if pending else []
        finally:
            self.executor.on_reply = None
        return [*(stored[j.cid].reply for j in jobs if j.cid in stored), *got]

    def _aggregate(self, rnd: int, replies: list[ClientReply], state: RunState, *, m: int,
                   sent: dict[str, Params], refused: list[Rejection] | None = None) -> tuple[Params, GuardStep]:
        """The replies of round ``rnd`` -> the new global parameters: the one step between the clients' answers
        and the global state. :class:`~fednl.engine.guard.UpdateGuard` screens the replies (a rejected one never
        reaches the strategy), applies ``[robust]``'s clipping and Krum or ``[dp]``'s clipping, and sets the mean
        the strategy averages with (median, trimmed mean, DP's noisy mean over the ``m`` sampled clients); then
        the strategy's aggregate and the server optimiser's step on it (``[server_opt]``). With fewer accepted
        updates than ``engine.min_clients`` (default 1) the round is skipped: the global parameters stay as they
        are and ``step.skipped`` says why."""
        step = self.guard.prepare(rnd, replies, reference=state.global_params,
                                  like=self.strategy.reply_like(state.global_params), m=m,
                                  noise_seed=derive_seed(self.spec.seed, "dp", rnd), received=sent)
        step.rejected = [*(refused or []), *step.rejected]
        accepted = len(step.replies) + len(step.krum_dropped)  # passed screening (Krum then picks among them)
        need = int(self.spec.engine.min_clients or 1)
        if accepted < need:
            step.skipped = {"reason": "min_clients", "accepted": accepted, "min_clients": need, "sampled": m,
                            "message": f"{accepted} accepted update(s) of {m} sampled < engine.min_clients {need}"}
            step.replies = []
            return state.global_params, step
        with self.strategy.averaging(step.mean):
            aggregate = self.strategy.aggregate_train(rnd, step.replies, state.global_params)
        step.privacy = self.guard.released(m)
        if self.spec.server_opt is None:
            return aggregate, step
        return server_step(self.spec.server_opt, state.global_params, aggregate, state.engine_tensors,
                           state.engine_info), step

    # ------------------------------------------------------------------ the run
    def _start(self, resume: bool) -> tuple[RunState, random.Random]:
        rng = random.Random(self.spec.seed)
        if resume and not (self.ckpt_dir / LATEST).is_file():
            if not self.out.is_dir():
                raise FileNotFoundError(f"no checkpoint to resume from: {self.out} does not exist")
            if (self.out / RESULTS_NAME).is_file():
                raise ValueError(f"cannot resume {self.out}: it holds results.json but no checkpoint "
                                 f"({self.ckpt_dir / LATEST} is missing)")
            self.log(f"resuming {self.out}: no checkpoint was written yet, starting from round 0"
                     + (" (stored replies are reused)" if self.journal.root.is_dir() else ""))
            resume = False
        elif not resume:
            self.journal.clear()
        if not resume:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.metrics_path, "")
            state = self._fresh
            state.python_random = rng.getstate()
            state.info = {"config": self.spec.config, "wall_s": 0.0, "fingerprint": self.fingerprint, "last_eval": {}}
            return state, rng
        state = load_checkpoint(self.ckpt_dir)
        drift = config_drift(state.info.get("config", {}), self.spec.config)
        if drift:
            raise ValueError(f"cannot resume {self.out}: the config differs from the checkpointed run in {drift}")
        if state.info.get("fingerprint") != self.fingerprint:
            raise ValueError(f"cannot resume {self.out}: the rebuilt model differs from the checkpointed run's model")
        if set(state.clients) != set(self.client_names):
            raise ValueError(f"cannot resume {self.out}: checkpoint clients {sorted(state.clients)} != task clients")
        self.strategy.load_server_state(state.server_tensors, state.server_info)
        self.guard.load_state(state.engine_info)
        state.info.pop("stopped", None)
        if state.python_random is not None:
            rng.setstate(state.python_random)
        if state.torch_rng is not None:
            torch.set_rng_state(state.torch_rng)
        self._truncate_metrics(state.round)
        state.info["config"] = self.spec.config
        self.log(f"resuming {self.out} after round {state.round}")
        return state, rng

    def _truncate_metrics(self, last_round: int) -> None:
        """Keep the metrics.jsonl lines of rounds ``<= last_round``; a torn last line (the process was killed
        while appending) is dropped, a torn line elsewhere is an error."""
        keep: list[str] = []
        if self.metrics_path.is_file():
            lines = self.metrics_path.read_text().splitlines()
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    if i == len(lines) - 1:
                        continue
                    raise ValueError(f"cannot resume {self.out}: {self.metrics_path} line {i + 1} is not JSON") from None
                if rec.get("round", 0) <= last_round:
                    keep.append(line)
        atomic_write_text(self.metrics_path, "".join(k + "\n" for k in keep))

    def _append_metrics(self, records: list[Record]) -> None:
        append_metrics(self.metrics_path, records)

    def _is_eval_round(self, rnd: int) -> bool:
        every = int(self.spec.engine.eval_every)
        return rnd == self.spec.rounds or (every > 0 and rnd % every == 0)

    def run(self, *, resume: bool = False, stop_after: int | None = None) -> dict[str, Any] | None:
        """Run (or continue) to ``spec.rounds``; returns results.json's content, or ``None`` when
        ``stop_after`` interrupts the run early (used to test resume)."""
        state, rng = self._start(resume)
        if state.round > self.spec.rounds:
            raise ValueError(f"checkpoint is at round {state.round}, beyond rounds={self.spec.rounds}")
        self.executor.start(state, resumed=resume)
        kill_point("run_start", state.round)
        session_start = time.perf_counter()
        wall_before = float(state.info.get("wall_s", 0.0))
        if self.spec.engine.max_bytes is not None and state.round == 0:
            save_checkpoint(self.ckpt_dir, state)  # round 0: what a budget stop in round 1 rolls back to
        for rnd in range(state.round + 1, self.spec.rounds + 1):
            t0 = time.perf_counter()
            if self.guard.budget_exhausted(len(self.client_names)):  # (ε does not depend on the sample size)
                return self._stop_on_privacy(rnd, state, wall_before + time.perf_counter() - session_start)
            try:
                io = self._round(rnd, state, rng)
            except BudgetExhausted as stop:
                return self._stop_on_budget(stop, wall_before + time.perf_counter() - session_start)
            replies, chosen = io.replies, io.chosen
            state.global_params, step = self._aggregate(rnd, replies, state, m=len(chosen), sent=io.sent,
                                                        refused=io.refused)
            state.server_tensors, state.server_info = self.strategy.server_state()
            state.engine_info.update(self.guard.state())
            rejected = {r.cid for r in step.rejected[len(io.refused):]}  # screened out (not the refused extras)
            kept = [r for r in replies if r.cid not in rejected]
            weights = [r.num_examples for r in kept]
            loss = (sum(r.metrics["train_loss"] * w for r, w in zip(kept, weights)) / sum(weights) if kept
                    else float("nan"))
            records: list[Record] = []
            evals: dict[str, dict[str, float]] = {}
            if self._is_eval_round(rnd):
                evals, eval_records = self._evaluate_round(rnd, state)
                records += eval_records
            s_round = time.perf_counter() - t0
            up, down = state.ledger.total("up", rnd), state.ledger.total("down", rnd)
            peak = peak_memory_mb(self.device)
            records.insert(0, RoundRecord(
                round=rnd, clients=chosen, train_loss=loss, bytes_up=up, bytes_down=down, s_round=s_round,
                peak_mem_mb=peak, client_train={r.cid: {**r.metrics, "num_examples": r.num_examples} for r in replies},
                dropped=list(io.dropped) or None, dropped_reason=dict(io.dropped) or None, **step.to_record()))
            self._append_metrics(records)
            kill_point("metrics_written", rnd)
            state.round = rnd
            state.python_random = rng.getstate()
            state.torch_rng = torch.get_rng_state()
            state.info["wall_s"] = wall_before + time.perf_counter() - session_start
            save_checkpoint(self.ckpt_dir, state)
            kill_point("checkpoint_saved", rnd)
            self.journal.clear(upto=rnd)
            self.log(self._line(rnd, loss, evals, up, down, s_round, peak) + io.console() + step.console())
            if stop_after is not None and rnd >= stop_after and rnd < self.spec.rounds:
                return None
        state.info["wall_s"] = wall_before + time.perf_counter() - session_start
        results = self.results(state)
        kill_point("results")
        results.write(self.out / RESULTS_NAME)
        self.state = state
        return results.to_json()

    def _evaluate_round(self, rnd: int, state: RunState) -> tuple[dict[str, dict[str, float]], list[EvalRecord]]:
        """Evaluate every tested client (and the held-out ones) after round ``rnd``; record it in ``state.info``."""
        fed = self.federation
        evals = self.executor.evaluate(rnd, fed.tested, state) if fed.tested else {}
        state.info["last_eval"] = evals
        state.info["last_eval_round"] = rnd
        records = [EvalRecord(round=rnd, client=c, metrics=m) for c, m in evals.items()]
        if fed.heldout:
            records += [EvalRecord(round=rnd, client=c, heldout=True, metrics=m)
                        for c, m in self.executor.evaluate(rnd, fed.heldout, state).items()]
        return evals, records

    def _stop_on_budget(self, stop: BudgetExhausted, wall_s: float) -> dict[str, Any]:
        """Discard round ``stop.rnd``, go back to the last checkpoint, evaluate it if it was not, write results."""
        state = load_checkpoint(self.ckpt_dir)
        self.strategy.load_server_state(state.server_tensors, state.server_info)
        self.guard.load_state(state.engine_info)
        record = BudgetStop(max_bytes=stop.limit, bytes=state.ledger.total(), rounds_completed=state.round,
                            round=stop.rnd, bytes_needed=stop.spent + stop.nbytes,
                            message=f"{stop.direction} {stop.cid}")
        cover = f"rounds 1-{state.round}" if state.round else "the initial model (no round fits)"
        return self._stop(state, record, wall_s, f"stopped: the {stop.direction}link payload of {stop.cid} in round "
                          f"{stop.rnd} would bring the traffic to {stop.spent + stop.nbytes:,} B, past "
                          f"engine.max_bytes = {stop.limit:,} B; results cover {cover} ({state.ledger.total():,} B)")

    def _stop_on_privacy(self, rnd: int, state: RunState, wall_s: float) -> dict[str, Any]:
        """``[dp] max_epsilon``: round ``rnd``'s release would pass the budget; end after round ``rnd - 1``."""
        spent = self.guard.spent() or {}
        limit = float(self.spec.dp.max_epsilon)
        record = PrivacyStop(max_epsilon=limit, epsilon=spent.get("epsilon", 0.0), delta=spent.get("delta"),
                             rounds_completed=state.round, round=rnd,
                             message=f"the release of round {rnd} would take epsilon past {limit:g}")
        cover = f"rounds 1-{state.round}" if state.round else "the initial model (no round fits)"
        return self._stop(state, record, wall_s, f"stopped: round {rnd}'s release would take ε past dp.max_epsilon = "
                          f"{limit:g} (ε = {record.epsilon:.4g} at δ = {record.delta:g} after {state.round} "
                          f"rounds); results cover {cover}")

    def _stop(self, state: RunState, record: BudgetStop | PrivacyStop, wall_s: float, message: str) -> dict[str, Any]:
        """End the run cleanly at ``state``: evaluate it if it was not, a stop record, checkpoint, results."""
        records: list[Record] = []
        if state.info.get("last_eval_round") != state.round:
            records += self._evaluate_round(state.round, state)[1]
        self._append_metrics([*records, StopRecord(stop=record)])
        state.info["stopped"] = record.to_json()
        state.info["wall_s"] = wall_s
        save_checkpoint(self.ckpt_dir, state)
        self.journal.clear()
        results = self.results(state).model_copy(update={"stopped": record})
        results.write(self.out / RESULTS_NAME)
        self.state = state
        self.log(message)
        return results.to_json()

    # ------------------------------------------------------------------ reporting
    def _line(self, rnd: int, loss: float, evals: dict[str, dict[str, float]], up: int, down: int,
              s_round: float, peak: float) -> str:
        key = self.federation.metric
        vals = [m[key] for m in evals.values() if key in m]
        metric = f"{key} {sum(vals) / len(vals):.4f}" if vals else f"{key} -"
        return (f"round {rnd:>3}/{self.spec.rounds} | loss {loss:.4f} | {metric} | "
                f"↑ {human_bytes(up)} ↓ {human_bytes(down)} | {s_round:.2f} s/round | peak mem {peak:.0f} MB")

    def results(self, state: RunState) -> Results:
        clients: dict[str, dict[str, float]] = state.info.get("last_eval", {})
        keys = sorted({k for m in clients.values() for k in m if k not in COUNT_KEYS})
        mean = {k: sum(m[k] for m in clients.values() if k in m) / sum(1 for m in clients.values() if k in m)
                for k in keys}
        return Results(method=self.spec.method, model=self.spec.model_name, task=self.federation.task,
                       rounds=self.spec.rounds, clients=clients, mean=mean, comm=state.ledger.summary(),
                       wall_s=round(float(state.info.get("wall_s", 0.0)), 3), seed=self.spec.seed)


class Simulator(RoundLoop):
    """The in-process run: the round loop with every client of ``task`` in this process, on the one ``model``
    (:class:`~fednl.engine.clients.InProcessExecutor`). The per-client steps below are what ``fednl evaluate`` and
    ``fednl memory-eval`` use on a rebuilt run."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, task: FederatedTask, strategy: Strategy, spec: RunSpec,
                 *, log: Callable[[str], None] = print):
        self.runtime = ClientRuntime(model, tokenizer, strategy, spec)
        executor = InProcessExecutor(self.runtime, task)
        super().__init__(model, strategy, spec, executor, log=log)
        self.tokenizer, self.task, self.data = tokenizer, task, executor.data

    def install_client(self, cid: str, global_params: Params, state: RunState) -> None:
        """Load client ``cid``'s personalised model (its state in ``state``) into the shared model."""
        self.runtime.install(cid, global_params, state.clients[cid], state.initial_local)

    def evaluate_client(self, cid: str, examples: list[Example], state: RunState,
                        client: ClientState | None = None) -> dict[str, float]:
        """Client ``cid``'s personalised model on ``examples``; ``client`` evaluates a client outside ``state``
        (a held-out one) with that throw-away state instead."""
        return self.runtime.evaluate(cid, examples, state.global_params,
                                     state.clients[cid] if client is None else client, state.initial_local)

    def evaluate_heldout(self, state: RunState) -> dict[str, dict[str, float]]:
        """Held-out clients (never trained): global shared + initial local parameters, on all their examples."""
        return self.executor.evaluate(state.round, self.federation.heldout, state)

    def train_client(self, rnd: int, cid: str, payload: Payload, client: ClientState, *, initial_local: Params,
                     seeds: tuple[int, int] | None = None) -> ClientReply:
        """Client ``cid``'s local round ``rnd`` on the decoded ``payload``, as the round loop runs it (seeds
        default to :meth:`client_seeds`)."""
        return self.runtime.train(rnd, cid, payload, client, self.data[cid].train, initial_local=initial_local,
                                  seeds=self.client_seeds(rnd, cid) if seeds is None else seeds)

    def client_round(self, rnd: int, cid: str, down: Payload, client: ClientState, *, initial_local: Params,
                     seeds: tuple[int, int] | None = None) -> tuple[Payload, ClientReply]:
        """Client ``cid``'s whole side of round ``rnd`` on the wire payload ``down``: ``(wire reply, reply)``."""
        return self.runtime.round(rnd, cid, down, client, self.data[cid].train, initial_local=initial_local,
                                  seeds=self.client_seeds(rnd, cid) if seeds is None else seeds)
