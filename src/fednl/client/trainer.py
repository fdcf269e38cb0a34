"""Level 1: one client's local round — the ONE function both engines (simulator, Flower ClientApp) call.

:func:`run_client_round` swaps the client's tensors into the shared model, lets the strategy install what the
server sent, trains E local epochs (or ``max_steps`` steps) with back-propagation through the whole memory
trajectory (each forward call starts every sequence's memory at zero), stores what stays local back into the
:class:`~fednl.client.state.ClientState` and returns the reply. The model object is shared by all clients;
nothing here copies it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from fednl.client.batching import IGNORE, Batch, Encoded, Tokenizer, collate, encode_cached
from fednl.client.state import OPT_PREFIX, PARAM_PREFIX, ClientState
from fednl.strategies.base import ClientContext, ClientReply, Params, Payload, Strategy, StrategyError

if TYPE_CHECKING:  # the config module imports model/data configs; the trainer only reads attributes
    from fednl.config import TrainConfig


def model_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, T, V]`` from a model that returns a tensor, a tuple, or an object with ``.logits``."""
    out = model(input_ids)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"model returned {type(out).__name__}; expected logits, a tuple or an object with .logits")


# HF causal LMs whose logits are exactly ``lm_head(model(...).last_hidden_state)`` (no soft-capping / scaling).
_PLAIN_HEAD_MODELS = frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"})


def _body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    if type(model).__name__ not in _PLAIN_HEAD_MODELS:
        return None
    body, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if isinstance(body, torch.nn.Module) and isinstance(head, torch.nn.Module):
        return body, head
    return None


def selected_logits(model: torch.nn.Module, input_ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Logits ``[N, V]`` at positions ``(rows[i], cols[i])`` only.

    Fast path (Llama-family HF models): run the decoder body and apply the LM head to the selected hidden
    states only — for multiple choice one position per sequence instead of all T, a ~20% saving with
    SmolLM2's 49k vocabulary. Any other model: the full logits, indexed (the reference).
    """
    split = _body_and_head(model)
    if split is None:
        return model_logits(model, input_ids)[rows, cols]
    body, head = split
    out = body(input_ids=input_ids)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return head(hidden[rows, cols])


def task_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the batch's target tokens (padding and unsupervised positions ignored)."""
    rows, cols = (batch.targets != IGNORE).nonzero(as_tuple=True)
    logits = selected_logits(model, batch.input_ids, rows, cols)
    return F.cross_entropy(logits.float(), batch.targets[rows, cols])


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def encode_all(examples: Sequence[Any], tokenizer: Tokenizer, seq_len: int) -> list[Encoded]:
    return [encode_cached(ex, tokenizer, seq_len) for ex in examples]


def shuffled_batches(
    encoded: Sequence[Encoded], batch_size: int, eos_id: int, generator: torch.Generator
) -> Iterator[Batch]:
    """Endless stream of batches: a fresh seeded permutation per pass over the data (last batch may be short)."""
    n = len(encoded)
    while True:
        perm = torch.randperm(n, generator=generator).tolist()
        for i in range(0, n, batch_size):
            yield collate([encoded[j] for j in perm[i : i + batch_size]], eos_id)


def steps_per_round(num_examples: int, train_cfg: TrainConfig) -> int:
    """``max_steps`` if set, else ``epochs * ceil(N / batch_size)``."""
    if train_cfg.max_steps is not None:
        return int(train_cfg.max_steps)
    return int(train_cfg.epochs) * math.ceil(num_examples / int(train_cfg.batch_size))


def param_group_of(groups: Mapping[str, set[str]], name: str) -> str:
    for gname, names in groups.items():
        if name in names:
            return gname
    raise StrategyError(f"parameter {name!r} belongs to no group")


def make_optimizer(
    params: Mapping[str, torch.nn.Parameter],
    train_cfg: TrainConfig,
    groups: Mapping[str, set[str]] | None = None,
) -> torch.optim.Optimizer:
    """AdamW or SGD over ``params``; one optimiser group per distinct (lr, weight decay, warm-up, schedule) of the
    parameters' model groups (:meth:`TrainConfig.group_settings`). Each optimiser group records ``base_lr``,
    ``warmup_steps`` and ``schedule`` for :func:`apply_schedule`."""
    by_setting: dict[tuple, list[torch.nn.Parameter]] = {}
    for n in sorted(params):
        gname = param_group_of(groups, n) if groups is not None else ""
        st = train_cfg.group_settings(gname)
        key = (float(st["lr"]), float(st["weight_decay"]), int(st["warmup_steps"]), str(st["schedule"]))
        by_setting.setdefault(key, []).append(params[n])
    unknown = sorted(set(train_cfg.groups) - set(groups or {}))
    if unknown:
        raise ValueError(f"train.groups: the model has no parameter group(s) {unknown}; it has {sorted(groups or {})}")
    pgroups = [
        {"params": plist, "lr": lr, "weight_decay": wd, "base_lr": lr, "warmup_steps": wu, "schedule": sched}
        for (lr, wd, wu, sched), plist in by_setting.items()
    ]
    if train_cfg.optimizer == "adamw":
        return torch.optim.AdamW(pgroups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(pgroups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, momentum=train_cfg.momentum)
    raise ValueError(f"train.optimizer: unknown optimizer {train_cfg.optimizer!r}; expected 'adamw' or 'sgd'")


def lr_factor(step: int, *, warmup_steps: int, schedule: str, decay_steps: int | None, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate at (0-based) cumulative step ``step``: linear warm-up over
    ``warmup_steps`` (step 0 gets ``1 / warmup_steps``), then constant, or cosine / linear decay from 1 at the end
    of warm-up to ``min_lr_ratio`` at ``decay_steps`` (held there afterwards)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if decay_steps is None:
        raise ValueError(f"schedule {schedule!r} needs decay_steps")
    span = max(1, decay_steps - warmup_steps)
    frac = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * frac))
    elif schedule == "linear":
        shape = 1.0 - frac
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def apply_schedule(opt: torch.optim.Optimizer, step: int, train_cfg: TrainConfig) -> None:
    """Set every optimiser group's ``lr`` for cumulative step ``step`` (see :func:`lr_factor`)."""
    for group in opt.param_groups:
        group["lr"] = group["base_lr"] * lr_factor(
            step, warmup_steps=int(group["warmup_steps"]), schedule=str(group["schedule"]),
            decay_steps=train_cfg.decay_steps, min_lr_ratio=float(train_cfg.min_lr_ratio),
        )  # fmt: skip


def transfer_objective_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Attention-transfer loss (sum over converted layers of each layer's MSE to its full-attention teacher)."""
    from fednl.models.titans import attention_transfer, transfer_loss

    with attention_transfer(model) as layers:
        model(batch.input_ids)
        return transfer_loss(layers)


def segmented_lm_backward(
    model: torch.nn.Module, batch: Batch, segment_len: int, loss_fn: Any
) -> torch.Tensor:
    """Truncated BPTT: feed ``batch`` in segments of ``segment_len`` tokens through a gradient-carrying
    :class:`~fednl.models.streaming.StreamingLM`; after each segment back-propagate its share of the mean loss and
    detach the carried state (memory, window cache, pending writes). Returns the mean loss (detached).

    ``loss_fn(loss)`` maps the segment's loss before backward (the strategy's ``client_loss``: a proximal term is
    added once, with the first segment). Right padding is harmless: padded tokens follow every real one.
    """
    from fednl.models.streaming import StreamingLM

    stream = StreamingLM(model, grad=True)
    total = batch.num_target_tokens
    if total == 0:
        raise ValueError("batch has no target tokens")
    acc = torch.zeros((), dtype=torch.float64)
    T = batch.input_ids.shape[1]
    for i, s in enumerate(range(0, T, segment_len)):
        ids, tgt = batch.input_ids[:, s : s + segment_len], batch.targets[:, s : s + segment_len]
        lp = stream.feed(ids)
        mask = tgt != IGNORE
        if bool(mask.any()):
            nll = -lp[mask].gather(-1, tgt[mask].unsqueeze(-1)).sum()
            seg_loss = nll / total
            (loss_fn(seg_loss) if i == 0 else seg_loss).backward()
            acc += seg_loss.detach().double()
        for st in stream.streams:
            st.detach_()
    return acc.float()


def save_optimizer_state(opt: torch.optim.Optimizer, params: Mapping[str, torch.nn.Parameter], state: ClientState) -> None:
    """Store per-parameter optimiser slots as ``opt/<slot>/<name>`` tensors in the client state."""
    for k in [k for k in state.tensors if k.startswith(OPT_PREFIX)]:
        del state.tensors[k]
    for name, p in params.items():
        for slot, value in opt.state.get(p, {}).items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            state.tensors[f"{OPT_PREFIX}{slot}/{name}"] = t.detach().to("cpu").clone()


def load_optimizer_state(opt: torch.optim.Optimizer, params: Mapping[str, torch.nn.Parameter], state: ClientState) -> None:
    """Inverse of :func:`save_optimizer_state` (no-op when the client has no saved slots)."""
    slots: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.tensors.items():
        if key.startswith(OPT_PREFIX):
            slot, _, name = key[len(OPT_PREFIX) :].partition("/")
            if name not in params:
                raise StrategyError(f"client {state.cid}: saved optimiser state for unknown parameter {name!r}")
            slots.setdefault(name, {})[slot] = t
    for name, record in slots.items():
        p = params[name]
        opt.state[p] = {
            s: (v.to(p.device) if s == "step" else v.to(device=p.device, dtype=p.dtype)).clone() for s, v in record.items()
        }


def run_client_round(
    model: torch.nn.Module,
    strategy: Strategy,
    cid: str,
    payload: Payload,
    client_state: ClientState,
    train_examples: Sequence[Any],
    tokenizer: Tokenizer,
    train_cfg: TrainConfig,
    rnd: int,
    generator: torch.Generator,
    *,
    initial_local: Params | None = None,
) -> ClientReply:
    """Run client ``cid``'s local round ``rnd`` on the shared ``model`` and return its reply.

    ``initial_local`` holds the starting values of the strategy's local (never-sent) parameters, used the
    first time a client trains; afterwards its own values come from ``client_state``.
    """
    if not train_examples:
        raise ValueError(f"client {cid!r} has no training examples")
    trainable = strategy.trainable_names()
    live = dict(model.named_parameters())
    unknown = sorted(trainable - set(live))
    if unknown:
        raise StrategyError(f"strategy {strategy.name!r} trains parameters the model lacks: {unknown[:5]}")
    for n, p in live.items():
        p.requires_grad_(n in trainable)
    params = {n: live[n] for n in sorted(trainable)}

    # 1. swap this client's local parameters in (persisted, or the initial values on its first round)
    stored = client_state.local_params()
    with torch.no_grad():
        for n in sorted(strategy.local_names()):
            src = stored.get(n)
            if src is None and initial_local is not None:
                src = initial_local.get(n)
            if src is None:
                raise StrategyError(f"client {cid!r}: no persisted or initial value for local parameter {n!r}")
            params[n].copy_(src.to(device=params[n].device, dtype=params[n].dtype))

    device = model_device(model)
    encoded = encode_all(train_examples, tokenizer, int(train_cfg.seq_len))
    eos = int(tokenizer.eos_id)
    bs = int(train_cfg.batch_size)

    def forward_loss(batch: Batch) -> torch.Tensor:
        return task_loss(model, batch.to(device))

    def batches(n: int) -> Iterator[Batch]:
        stream = shuffled_batches(encoded, bs, eos, generator)
        for _ in range(n):
            yield next(stream)

    ctx = ClientContext(
        cid=cid, rnd=rnd, params=params, groups=strategy.groups, state=client_state,
        num_examples=len(train_examples), generator=generator, forward_loss=forward_loss, batches=batches,
    )
    # 2. the strategy installs what the server sent
    strategy.client_receive(ctx, payload)

    # 3. local training through the memory trajectory
    opt = make_optimizer(params, train_cfg, strategy.groups)
    if train_cfg.persist_optimizer:
        load_optimizer_state(opt, params, client_state)
    objective = train_cfg.objective_at(rnd)
    scheduled = train_cfg.schedule != "constant" or train_cfg.warmup_steps > 0 or any(
        g["warmup_steps"] or g["schedule"] != "constant" for g in opt.param_groups
    )
    done_steps = int(client_state.info.get("steps_trained", 0))
    model.train()
    n_steps = steps_per_round(len(train_examples), train_cfg)
    losses: list[float] = []
    tokens = 0
    stream = shuffled_batches(encoded, bs, eos, generator)
    plist = list(params.values())
    for i in range(n_steps):
        batch = next(stream).to(device)
        opt.zero_grad(set_to_none=True)
        if scheduled:
            apply_schedule(opt, done_steps + i, train_cfg)
        if train_cfg.segment_len is not None and batch.input_ids.shape[1] > train_cfg.segment_len:
            loss = segmented_lm_backward(
                model, batch, int(train_cfg.segment_len), lambda x: strategy.client_loss(ctx, x)
            )
            if not torch.isfinite(loss):
                raise FloatingPointError(f"client {cid!r}, round {rnd}: training loss is {loss.item()}")
        else:
            if objective == "attention_transfer":
                loss = transfer_objective_loss(model, batch)
            elif objective == "mixed":
                loss = task_loss(model, batch) + float(train_cfg.transfer_weight) * transfer_objective_loss(model, batch)
            else:
                loss = task_loss(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"client {cid!r}, round {rnd}: training loss is {loss.item()}")
            strategy.client_loss(ctx, loss).backward()
        strategy.client_after_backward(ctx)
        if train_cfg.grad_clip and train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(plist, float(train_cfg.grad_clip))
        opt.step()
        losses.append(float(loss.detach()))
        tokens += batch.num_target_tokens
    model.eval()
    client_state.info["steps_trained"] = done_steps + n_steps

    # 4. persist what stays on the client
    with torch.no_grad():
        for n in sorted(strategy.local_names()):
            client_state.tensors[f"{PARAM_PREFIX}{n}"] = params[n].detach().to("cpu").clone()
    if train_cfg.persist_optimizer:
        save_optimizer_state(opt, params, client_state)
    client_state.info["rounds_trained"] = int(client_state.info.get("rounds_trained", 0)) + 1
    client_state.info["last_round"] = rnd

    reply_payload = strategy.client_reply(ctx)
    for p in plist:
        p.grad = None
    metrics = {"train_loss": sum(losses) / len(losses), "steps": float(n_steps), "train_tokens": float(tokens)}
    return ClientReply(cid=cid, payload=reply_payload, num_examples=len(train_examples), metrics=metrics)
