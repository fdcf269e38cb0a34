"""``fednl score FILE``: next-token cross-entropy of a text file streamed through a converted model with a rule.

The file is tokenized (no BOS/EOS added), the converted model is built with the rule's memory design (window
and sinks from the caller), the rule is installed (:func:`fednl.models.rules.install_rule`), and the tokens are
fed through :class:`fednl.models.streaming.StreamingLM` ``chunk`` at a time: the carried state is the memory
plus the sinks and the window (and, with ``write = "evicted"``, the window's pending writes) — bounded in the
file's length; no KV cache of the whole file is ever held. ``memory = "off"`` forces every gate to 0
(:func:`fednl.models.titans.set_gate_override`): exactly the softmax path with the same window and sinks.

Bins follow :func:`fednl.eval.position.ce_by_position`: position ``t`` is the 0-based index of the *predicted*
token (the input at ``t - 1`` predicts it), bin ``i`` holds positions ``[i * bin_size, (i + 1) * bin_size)``, so
bin 0 holds ``bin_size - 1`` scored tokens. ``ce`` is the token-weighted mean over every scored token.

The LoRA adapters that :func:`fednl.models.build_model` adds to a titans model are rank 1 and frozen, with
``B = 0``: they compute exactly nothing (a rule carries no LoRA).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from fednl.models.config import DEFAULT_SINKS, LoraConfig, MemoryConfig, ModelConfig
from fednl.models.rules import Rule, UnknownRule, backbone_id, install_rule, load_rule

DEFAULT_RULE = "default"  # -> "default-<backbone>": the packaged rule of the backbone
NO_RULE = "none"  # an untrained memory (the conversion's initial values)
DEFAULT_MODEL = "smollm2"
WINDOW = 64
SINKS = DEFAULT_SINKS
BIN_SIZE = 256
CHUNK = 256
#: The adapters a titans model gets: a no-op (B starts at zero and is frozen).
NOOP_LORA = LoraConfig(targets=["q_proj"], r=1, alpha=1.0, trainable=False)


def default_rule_name(source: str) -> str:
    """The packaged rule that ``--rule default`` means for a backbone."""
    if source.startswith("hf:"):
        raise ValueError(f"there is no default rule for {source!r}: give --rule PATH (a rule file for this "
                         "backbone) or --rule none (an untrained memory)")
    return f"default-{source}"


def _check_file(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    return path


def _check_sizes(bin_size: int, chunk: int) -> None:
    if bin_size < 1 or chunk < 1:
        raise ValueError(f"--bin-size and --chunk must be >= 1, got {bin_size} and {chunk}")


def read_tokens(path: str | os.PathLike[str], tokenizer: Any, max_tokens: int | None = None) -> list[int]:
    """The token ids of text file ``path`` (UTF-8), at most ``max_tokens`` of them (only a prefix of a long file
    is tokenized then). ``ValueError`` for a missing, empty, non-text or single-token file."""
    path = _check_file(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (bad byte at offset {exc.start})") from None
    if not text:
        raise ValueError(f"{path} is empty")
    if max_tokens is None:
        ids = tokenizer.encode(text)
    else:
        n = max_tokens * 8 + 256
        while True:  # a prefix comfortably longer than max_tokens tokens: its first max_tokens are the file's
            ids = tokenizer.encode(text[:n])
            if n >= len(text) or len(ids) >= max_tokens + 64:
                break
            n *= 2
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"{path} has {len(ids)} token(s); scoring needs at least 2")
    return ids


def _validated(cls: type[BaseModel], data: dict[str, Any], what: str) -> Any:
    """``cls(**data)``, its first validation error as one ``ValueError`` line."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise ValueError(f"{what}: {msg}") from None


def prepare(
    *, rule: str = DEFAULT_RULE, model: str | None = None, window: int = WINDOW, sinks: int = SINKS,
    memory: str = "on", seed: int = 0, cache: int = 0, cache_every: int = 16,
) -> tuple[nn.Module, Any, Rule | None]:
    """Build the converted model for scoring: ``(model, tokenizer, rule or None)``.

    ``rule``: a packaged rule name, a path, ``"default"`` (the backbone's packaged rule) or ``"none"`` (an
    untrained memory). ``model``: the backbone source; ``None`` = the rule's own (``smollm2`` without a rule).
    The rule's memory design is used with ``attn_window = window`` and ``attn_sinks = sinks``; ``cache`` > 0 adds
    the surprise-selected sparse cache of evicted tokens (``MemoryConfig.cache``, updated every ``cache_every``
    tokens), which stays on with ``memory = "off"`` (it is part of the softmax path).
    """
    from fednl.models.build import build_model
    from fednl.models.loading import load_backbone
    from fednl.models.titans import set_gate_override

    if window < 1:
        raise ValueError(f"--window must be >= 1 (the softmax path needs at least the current token), got {window}")
    if sinks < 0:
        raise ValueError(f"--sinks must be >= 0, got {sinks}")
    if memory not in ("on", "off"):
        raise ValueError(f"--memory must be 'on' or 'off', got {memory!r}")
    source = model if model is not None else DEFAULT_MODEL
    if model is not None:
        _validated(ModelConfig, {"source": model}, "--model")
    loaded: Rule | None = None
    if rule == NO_RULE:
        model_cfg, design = ModelConfig(source=source), MemoryConfig()
    else:
        try:
            loaded = load_rule(default_rule_name(source) if rule == DEFAULT_RULE else rule)
        except UnknownRule as exc:
            raise UnknownRule(f"{exc}, or --rule none to score with an untrained memory") from None
        if model is not None and backbone_id(model) != backbone_id(loaded.model_source):
            raise ValueError(f"rule {loaded.origin} was trained for backbone {loaded.model_source!r}, not {model!r}")
        model_cfg = loaded.model_config
        if model is not None and model != model_cfg.source:  # the same hf folder name at another place
            model_cfg = model_cfg.model_copy(update={"source": model})
        design = loaded.memory_config
    mem_cfg = _validated(MemoryConfig, {**design.model_dump(), "attn_window": int(window), "attn_sinks": int(sinks),
                                        "gate_override": None, "cache": int(cache), "cache_every": int(cache_every)}, "memory design")
    net = build_model("titans", model_cfg, mem_cfg, NOOP_LORA, seed=seed)
    if loaded is not None:
        install_rule(net, loaded)
    if memory == "off":
        set_gate_override(net, 0.0)
    net.eval()
    _, tokenizer = load_backbone(model_cfg)
    return net, tokenizer, loaded


def stream_ce(model: nn.Module, ids: list[int], *, bin_size: int = BIN_SIZE, chunk: int = CHUNK,
              progress: bool = False) -> dict[str, Any]:
    """Stream ``ids`` through ``model`` ``chunk`` tokens at a time; CE per position bin, overall CE, the number
    of scored tokens and the peak bytes of the carried state. ``progress``: a tqdm bar on stderr."""
    from tqdm import tqdm

    from fednl.models.streaming import StreamingLM

    _check_sizes(bin_size, chunk)
    if len(ids) < 2:
        raise ValueError(f"scoring needs at least 2 tokens, got {len(ids)}")
    lm = StreamingLM(model)
    stream = torch.tensor(ids, dtype=torch.long)
    n_in = len(ids) - 1  # the last token predicts nothing
    n_bins = n_in // bin_size + 1  # predicted positions 1 .. n_in
    sums = torch.zeros(n_bins, dtype=torch.float64)
    counts = torch.zeros(n_bins, dtype=torch.float64)
    state_bytes = 0
    bar = tqdm(total=n_in, unit="tok", file=sys.stderr, disable=not progress, desc="scoring", leave=False)
    start = time.perf_counter()
    try:
        for s in range(0, n_in, chunk):
            e = min(s + chunk, n_in)
            lp = lm.feed(stream[s:e].unsqueeze(0))[0]
            target = stream[s + 1 : e + 1].to(lp.device)
            ce = -lp.gather(-1, target.unsqueeze(-1)).squeeze(-1).double().cpu()
            b = torch.arange(s + 1, e + 1) // bin_size
            sums.index_add_(0, b, ce)
            counts.index_add_(0, b, torch.ones_like(ce))
            state_bytes = max(state_bytes, lm.state_nbytes())
            bar.update(e - s)
            bar.set_postfix(ce=f"{float(sums.sum() / counts.sum()):.4f}", refresh=False)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    bins = [{"start": i * bin_size, "tokens": int(counts[i]), "ce": float(sums[i] / counts[i])}
            for i in range(n_bins) if counts[i] > 0]
    return {"bins": bins, "ce": float(sums.sum() / counts.sum()), "tokens": int(counts.sum()),
            "state_bytes": int(state_bytes), "seconds": round(seconds, 3)}


def score_file(
    path: str | os.PathLike[str], *, rule: str = DEFAULT_RULE, model: str | None = None, window: int = WINDOW,
    sinks: int = SINKS, memory: str = "on", bin_size: int = BIN_SIZE, max_tokens: int | None = None,
    chunk: int = CHUNK, progress: bool = False, log: Any = None, free_backbone: bool = False, cache: int = 0,
    cache_every: int = 16,
) -> dict[str, Any]:
    """The whole ``fednl score`` record (see the CLI's ``--json``). ``log``: where notes go (a callable).
    ``free_backbone``: drop the process's cached backbone once the scoring model is built (a command that
    scores once needs one copy of the weights in memory, not two)."""
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"--max-tokens must be >= 2, got {max_tokens}")
    _check_sizes(bin_size, chunk)
    path = _check_file(path)  # before the (slow) model build
    net, tokenizer, loaded = prepare(rule=rule, model=model, window=window, sinks=sinks, memory=memory, cache=cache,
                                     cache_every=cache_every)
    if free_backbone:
        from fednl.models.loading import clear_backbone_cache

        clear_backbone_cache()
    trained = loaded.memory_config if loaded is not None else None
    if log is not None and trained is not None and (trained.attn_window, trained.sinks) != (window, sinks):
        log(f"note: rule {loaded.origin} was trained with window {trained.attn_window} and {trained.sinks} sinks; "
            f"scoring with window {window} and {sinks} sinks")
    ids = read_tokens(path, tokenizer, max_tokens)
    res = stream_ce(net, ids, bin_size=bin_size, chunk=chunk, progress=progress)
    source = net.fednl_model_config.source
    return {"bins": res["bins"], "ce": res["ce"], "tokens": res["tokens"],
            "rule": loaded.origin if loaded is not None else NO_RULE, "window": int(window), "sinks": int(sinks),
            "memory": memory, "seconds": res["seconds"], "state_bytes": res["state_bytes"], "model": source,
            "bin_size": int(bin_size), "cache": int(cache)}


def format_score(rec: dict[str, Any], path: str) -> str:
    """The plain-text report of a :func:`score_file` record."""
    lines = [f"{path}: model {rec['model']}, rule {rec['rule']}, window {rec['window']} + {rec['sinks']} sinks, "
             f"memory {rec['memory']}",
             f"{'start':>8} {'tokens':>8} {'ce':>8}"]
    lines += [f"{b['start']:>8} {b['tokens']:>8} {b['ce']:>8.4f}" for b in rec["bins"]]
    lines.append(f"overall CE {rec['ce']:.4f} nats over {rec['tokens']} tokens ({rec['seconds']:.1f} s, carried "
                 f"state {rec['state_bytes']:,} bytes)")
    return "\n".join(lines)


__all__ = ["BIN_SIZE", "CHUNK", "DEFAULT_RULE", "NO_RULE", "SINKS", "WINDOW", "default_rule_name", "format_score",
           "prepare", "read_tokens", "score_file", "stream_ce"]
