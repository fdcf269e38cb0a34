"""Streaming scoring and greedy generation over arbitrarily long token streams.

``StreamingLM(model)`` feeds a stream chunk by chunk. For a converted (Titans) model it carries, per layer, the
delta-rule memory state and the bounded window KV cache (the last ``attn_window - 1`` keys/values), so with
``attn_window`` set its memory is bounded in the stream length; RoPE positions keep increasing across calls.
For an unconverted HF model it carries HF's full KV cache (``DynamicCache``) — the growing-memory baseline.

Feeding a sequence in pieces gives the same log-probabilities as one full forward of the same model (same
window): the memory state and the window cache are exactly what the full forward sees at each position.
Streaming assumes unpadded, position-aligned batches.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fednl.models.titans import LayerStream, TitansAttention, titans_layers


def hf_cache_kwarg(model: nn.Module) -> str:
    """The keyword under which ``model.forward`` takes HF's KV cache: ``cache`` (its current name in transformers
    5.x) or ``past_key_values`` (older releases, where ``cache`` is unknown)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    # a wrapper whose forward only takes **kwargs: go by the name the installed transformers declares
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def hf_output_cache(out: Any) -> Any:
    """The KV cache an HF model output carries, read under the name its output class declares (``cache`` or
    ``past_key_values``), so no deprecated alias is touched."""
    fields = getattr(out, "__dataclass_fields__", {})
    return getattr(out, "cache" if "cache" in fields else "past_key_values", None)


@contextlib.contextmanager
def _installed(layers: list[TitansAttention], streams: list[LayerStream]) -> Iterator[None]:
    for layer, st in zip(layers, streams):
        layer.stream = st
    try:
        yield
    finally:
        for layer in layers:
            layer.stream = None


class StreamingLM:
    """Stateful scorer / greedy generator around a causal LM (converted or not).

    Parameters
    ----------
    model: a HF causal LM, possibly converted by :func:`fednl.models.titans.convert_to_titans`.
    grad: keep the autograd graph across calls (default False: every call runs under ``torch.no_grad()``).
    """

    def __init__(self, model: nn.Module, *, grad: bool = False):
        self.model = model
        self.grad = grad
        self.layers = titans_layers(model)
        self.converted = bool(self.layers)
        self.reset()

    def reset(self) -> None:
        """Forget the stream: zero memory, empty caches, position 0."""
        self.position = 0
        self.batch_size: int | None = None
        self.streams = [LayerStream() for _ in self.layers]
        self.cache = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def state_nbytes(self) -> int:
        """Bytes held by the carried state (memory states + window caches, or the HF KV cache)."""
        if self.converted:
            return sum(st.nbytes() for st in self.streams)
        if self.cache is None:
            return 0
        total = 0
        for layer in getattr(self.cache, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total

    def _check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2:
            raise ValueError(f"ids must be an integer tensor [B, t]; got {getattr(ids, 'dtype', type(ids))} "
                             f"with shape {tuple(getattr(ids, 'shape', ()))}")
        if ids.shape[1] < 1:
            raise ValueError("ids must contain at least one token per row")
        if self.batch_size is not None and ids.shape[0] != self.batch_size:
            raise ValueError(f"batch size changed mid-stream ({self.batch_size} -> {ids.shape[0]}); call reset()")
        return ids.to(device=self.device, dtype=torch.long)

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed the next ``t`` tokens ``[B, t]``; return next-token log-probabilities ``[B, t, V]``."""
        ids = self._check_ids(ids)
        B, t = ids.shape
        pos = torch.arange(self.position, self.position + t, device=ids.device).unsqueeze(0).expand(B, t)
        grad_ctx = contextlib.nullcontext() if self.grad else torch.no_grad()
        with grad_ctx:
            if self.converted:
                with _installed(self.layers, self.streams):
                    out = self.model(input_ids=ids, position_ids=pos, use_cache=False)
            else:
                if self.cache is None:
                    from transformers import DynamicCache

                    self.cache = DynamicCache(config=self.model.config)
                cache_kw = {hf_cache_kwarg(self.model): self.cache}
                out = self.model(input_ids=ids, position_ids=pos, use_cache=True, **cache_kw)
                self.cache = hf_output_cache(out)
            logits = out.logits
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            logprobs = F.log_softmax(logits, dim=-1)
        self.position += t
        self.batch_size = B
        return logprobs

    def score(self, ids: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
        """Log-probability of every next token of ``ids`` ``[B, T]`` -> ``[B, T - 1]``, fed in chunks (continues the
        current stream; call :meth:`reset` first for a fresh one)."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        ids = self._check_ids(ids)
        pieces = []
        for s in range(0, ids.shape[1], chunk_size):
            lp = self.feed(ids[:, s : s + chunk_size])
            nxt = ids[:, s + 1 : s + 1 + lp.shape[1]]
            pieces.append(lp[:, : nxt.shape[1]].gather(-1, nxt.unsqueeze(-1)).squeeze(-1))
        return torch.cat(pieces, dim=1)

    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_id: int | None = None) -> torch.Tensor:
        """Greedy continuation: feed ``ids`` ``[B, t]`` then ``max_new_tokens`` argmax tokens one at a time.

        Returns the new tokens ``[B, n]`` (``n <= max_new_tokens``; stops early once every row has produced
        ``eos_id``)."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        lp = self.feed(ids)
        out: list[torch.Tensor] = []
        done = torch.zeros(lp.shape[0], dtype=torch.bool, device=lp.device)
        for i in range(max_new_tokens):
            nxt = lp[:, -1].argmax(dim=-1)
            out.append(nxt)
            if eos_id is not None:
                done |= nxt == eos_id
                if bool(done.all()):
                    break
            if i + 1 < max_new_tokens:
                lp = self.feed(nxt.unsqueeze(1))
        if not out:
            return torch.empty(lp.shape[0], 0, dtype=torch.long, device=lp.device)
        return torch.stack(out, dim=1)
