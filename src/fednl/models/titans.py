"""The Titans dual-path conversion of a Hugging Face Llama-family causal LM (Llama, Qwen2, SmolLM2).

Every self-attention module is replaced by :class:`TitansAttention`, which keeps the layer's own
``q_proj/k_proj/v_proj/o_proj`` (same parameter names) and computes, per layer::

    softmax path   O_soft = Attn(RoPE(q), RoPE(k), v)          causal, optionally a sliding window of W tokens
    linear path    O_mem  = DeltaRule(q̂, k̂, v, beta, g)        q̂, k̂ = per-head L2-normalised q, k (pre-RoPE),
                                                               KV heads repeated; memory starts at zero
    mix (MaG)      O      = g_gate * O_mem + (1 - g_gate) * O_soft      (per head or per channel)
    output         o_proj(O)                                   both paths share the layer's o-projection

Learned parameters added per layer (names under ``...self_attn.``):

* ``gate_logit`` — group ``gate``: ``g_gate = sigmoid(gate_logit)``, ``[H]`` or ``[H * D]``. Initialised to
  ``logit(gate_init)`` (default ``g = 0.1``): the converted model stays close to the pretrained one (90 % softmax)
  while ``dL/dlogit = g (1 - g) <dL/dO, O_mem - O_soft>`` is far from saturated, so the gate can open.
* ``beta.weight``/``beta.bias`` (``beta_source="key"``: ``beta_t = sigmoid(<w_h, k̂_t> + b_h)``, ``[H, Dk] + [H]``)
  or ``beta.proj.weight``/``beta.proj.bias`` (``"input"``: ``Linear(hidden -> H)``) — group ``rule``. Weights start
  at zero and the bias at ``logit(beta_init)`` (default ``beta = 0.5``: a half-step of the delta rule, well inside
  the stable range), so β is input-independent at start and becomes data-dependent as the weights learn.
* with ``decay=True``: ``decay.a_proj.weight`` ``[H, hidden]`` (zeros), ``decay.A_log`` ``[H]`` (log of a seeded
  uniform draw in [1, 16]) and ``decay.dt_bias`` ``[H]`` (inverse softplus of a seeded log-uniform draw in
  [1e-3, 1e-1]) — group ``rule``: ``g_t = -exp(A_log) * softplus(a_proj(x_t) + dt_bias)`` (Gated-DeltaNet).

LoRA is injected afterwards on the shared projections (:mod:`fednl.models.lora`), so it acts on both paths.
Padding: when HF passes a 4-D boolean padding mask, padded positions write nothing to the memory (β = 0, g = 0,
k = v = 0) and the softmax path honours the mask. Streaming (``StreamingLM``) installs a per-layer
:class:`LayerStream` that carries the memory state and a bounded KV window across calls.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fednl.models.attention import apply_rope, band_mask, softmax_attention
from fednl.models.config import MemoryConfig
from fednl.models.seeding import named_generator

SUPPORTED_ATTENTION = ("LlamaAttention", "Qwen2Attention")


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class KeyBeta(nn.Module):
    """``beta_t,h = sigmoid(<w_h, k̂_t,h> + b_h)`` from the normalised key (TPTT-style)."""

    def __init__(self, num_heads: int, head_dim: int, beta_init: float, dtype: torch.dtype, device: Any = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_heads, head_dim, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.full((num_heads,), _logit(beta_init), dtype=dtype, device=device))

    def forward(self, k_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        del x
        return torch.sigmoid((k_hat * self.weight).sum(-1) + self.bias)

    def fednl_param_groups(self) -> dict[str, str]:
        return {"weight": "rule", "bias": "rule"}


class InputBeta(nn.Module):
    """``beta_t = sigmoid(Linear(hidden -> H)(x_t))`` from the layer input."""

    def __init__(self, hidden: int, num_heads: int, beta_init: float, dtype: torch.dtype, device: Any = None):
        super().__init__()
        self.proj = nn.Linear(hidden, num_heads, bias=True, dtype=dtype, device=device)
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.bias.fill_(_logit(beta_init))

    def forward(self, k_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        del k_hat
        return torch.sigmoid(self.proj(x))

    def fednl_param_groups(self) -> dict[str, str]:
        return {"proj.weight": "rule", "proj.bias": "rule"}


class Decay(nn.Module):
    """Per-head log-decay ``g_t = -exp(A_log) * softplus(z_t + dt_bias)`` (<= 0), Gated-DeltaNet's form.

    ``source`` picks ``z_t``: ``"input"`` — ``a_proj(x_t)`` (``[H, hidden]``, the paper's / GDN's choice),
    ``"key"`` — ``<w_h, k̂_t,h>`` from the normalised key (``[H, D]``, like the key-based β) or ``"const"`` — 0 (a
    learned, data-independent decay per head: 2 parameters per head). Projection weights start at zero.
    """

    def __init__(self, hidden: int, num_heads: int, generator: torch.Generator, dtype: torch.dtype, device: Any = None,
                 *, source: str = "input", head_dim: int = 0):
        super().__init__()
        self.source = source
        if source == "input":
            self.a_proj = nn.Linear(hidden, num_heads, bias=False, dtype=dtype, device=device)
            with torch.no_grad():
                self.a_proj.weight.zero_()
        elif source == "key":
            self.k_weight = nn.Parameter(torch.zeros(num_heads, head_dim, dtype=dtype, device=device))
        elif source != "const":
            raise ValueError(f"unknown decay source {source!r}")
        a = torch.empty(num_heads, dtype=torch.float64).uniform_(1.0, 16.0, generator=generator)
        u = torch.rand(num_heads, dtype=torch.float64, generator=generator)
        dt = torch.exp(u * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3))
        dt_bias = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
        self.A_log = nn.Parameter(a.log().to(dtype=dtype, device=device))
        self.dt_bias = nn.Parameter(dt_bias.to(dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, k_hat: torch.Tensor | None = None) -> torch.Tensor:
        if self.source == "input":
            z = self.a_proj(x)
        elif self.source == "key":
            if k_hat is None:
                raise ValueError("a key-based decay needs the normalised key")
            z = (k_hat * self.k_weight).sum(-1)
        else:
            z = x.new_zeros(x.shape[:-1] + (self.dt_bias.shape[0],))
        return -torch.exp(self.A_log) * F.softplus(z + self.dt_bias)

    def fednl_param_groups(self) -> dict[str, str]:
        own = {"input": {"a_proj.weight": "rule"}, "key": {"k_weight": "rule"}, "const": {}}[self.source]
        return {**own, "A_log": "rule", "dt_bias": "rule"}


class TokenGate(nn.Module):
    """Per-token, per-head Memory-as-Gate ``g_t,h = sigmoid(<w_h, z_t,h> + b_h)`` (``[B, T, H, 1]``).

    ``source="query"``: ``z`` is the normalised query head ``q̂_t,h`` (``w`` is ``[H, D]``); ``"input"``: ``z`` is the
    layer input ``x_t`` shared by all heads (``w`` is ``[H, hidden]``). ``w`` starts at zero and ``b`` at
    ``logit(gate_init)``, so at initialisation the gate is the constant ``gate_init`` of the paper's design.
    """

    def __init__(self, source: str, width: int, num_heads: int, gate_init: float, dtype: torch.dtype, device: Any = None):
        super().__init__()
        self.source = source
        self.weight = nn.Parameter(torch.zeros(num_heads, width, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.full((num_heads,), _logit(gate_init), dtype=dtype, device=device))

    def forward(self, q_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.source == "query":
            z = (q_hat * self.weight).sum(-1)  # [B, T, H]
        else:
            z = x @ self.weight.t()
        return torch.sigmoid(z + self.bias).unsqueeze(-1)

    def fednl_param_groups(self) -> dict[str, str]:
        return {"weight": "gate", "bias": "gate"}


@dataclass
class LayerStream:
    """Streaming state of one converted layer: memory ``state`` ``[B, H, Dk, Dv]``; the post-RoPE keys/values the
    softmax path still sees, ``k``/``v`` ``[B, Hkv, L, D]`` at absolute positions ``k_pos`` ``[L]`` (the sink tokens
    plus the last ``window - 1``; all of them when the window is None); with ``write = "evicted"``, the last
    ``window`` tokens' memory inputs not yet written (``pending``: k̂, v, β, g); and the tokens seen so far.
    Everything is bounded by ``sinks + 2 window`` tokens when a window is set.

    With a sparse cache (``MemoryConfig.cache``): the kept evicted tokens of each KV head (``cache_k``/``cache_v``
    ``[B, Hkv, C, D]``, their positions ``cache_pos`` and surprise ``cache_score`` ``[B, Hkv, C]``), the tokens not
    yet scored (``ring``: post-RoPE k, v and normalised k̂, ``[B, Hkv, L, D]`` at ``ring_pos``; at most
    ``window + cache_every`` of them) and the memory state at the last cache update (``scored_state``)."""

    state: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    k_pos: torch.Tensor | None = None
    pending: tuple[torch.Tensor, ...] | None = None
    pos: int = 0
    cache_k: torch.Tensor | None = None
    cache_v: torch.Tensor | None = None
    cache_pos: torch.Tensor | None = None
    cache_score: torch.Tensor | None = None
    ring: tuple[torch.Tensor, ...] | None = None
    ring_pos: torch.Tensor | None = None
    scored_state: torch.Tensor | None = None

    _TENSORS = ("state", "k", "v", "cache_k", "cache_v", "cache_pos", "cache_score", "scored_state")

    def tensors(self) -> list[torch.Tensor]:
        named = [getattr(self, n) for n in self._TENSORS]
        return [t for t in (*named, *(self.pending or ()), *(self.ring or ())) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def detach_(self) -> None:
        """Cut the autograd history (truncated BPTT between segments); values are kept."""
        for name in self._TENSORS:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.detach())
        if self.pending is not None:
            self.pending = tuple(t.detach() for t in self.pending)
        if self.ring is not None:
            self.ring = tuple(t.detach() for t in self.ring)


class TitansAttention(nn.Module):
    """Dual-path (softmax + delta-rule memory) replacement of a HF Llama/Qwen2 attention module."""

    def __init__(self, attn: nn.Module, cfg: MemoryConfig, generator: torch.Generator):
        super().__init__()
        self.config = attn.config
        self.layer_idx = attn.layer_idx
        self.head_dim = int(attn.head_dim)
        self.scaling = float(attn.scaling)
        self.attention_dropout = float(getattr(attn, "attention_dropout", 0.0) or 0.0)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.num_heads = self.q_proj.out_features // self.head_dim
        self.num_kv_heads = self.k_proj.out_features // self.head_dim
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.hidden_size = self.q_proj.in_features
        self.memory_cfg = cfg
        self.window = cfg.attn_window
        self.sinks = cfg.sinks
        self.cache_size = int(cfg.cache)  # evicted tokens kept per KV head (0: no sparse cache)
        self.cache_every = int(cfg.cache_every)
        self.cache_select = cfg.cache_select
        self.gate_override: float | None = cfg.gate_override
        self.memory_zero = False  # True: the memory output is forced to zero (the "zeroed-memory twin")
        self.transfer = False  # True: attention-transfer mode (see forward)
        self.transfer_loss: torch.Tensor | None = None
        self.stream: LayerStream | None = None
        w = self.q_proj.weight
        dtype, device = w.dtype, w.device
        H, D = self.num_heads, self.head_dim
        self.token_gate: TokenGate | None = None
        if cfg.gate == "learned" and cfg.gate_source != "const":
            width = D if cfg.gate_source == "query" else self.hidden_size
            self.token_gate = TokenGate(cfg.gate_source, width, H, cfg.gate_init, dtype, device)
            self.gate_logit = None
        elif cfg.gate == "learned":
            n = H if cfg.gate_granularity == "head" else H * D
            self.gate_logit = nn.Parameter(torch.full((n,), _logit(cfg.gate_init), dtype=dtype, device=device))
        else:
            self.gate_logit = None
        if cfg.beta_source == "key":
            self.beta: nn.Module = KeyBeta(H, D, cfg.beta_init, dtype, device)
        else:
            self.beta = InputBeta(self.hidden_size, H, cfg.beta_init, dtype, device)
        self.decay = (Decay(self.hidden_size, H, generator, dtype, device, source=cfg.decay_source, head_dim=D)
                      if cfg.decay else None)

    # ------------------------------------------------------------------ groups
    def fednl_param_groups(self) -> dict[str, str]:
        return {"gate_logit": "gate"} if self.gate_logit is not None else {}

    # ------------------------------------------------------------------ gate
    def gate(self, q_hat: torch.Tensor | None = None, x: torch.Tensor | None = None) -> torch.Tensor | float:
        """The mixing weight of the memory path: a float, ``[H, 1]`` / ``[H, D]`` or (per-token gate, given the
        normalised query ``q_hat`` and the input ``x``) ``[B, T, H, 1]``, broadcastable to ``[B, T, H, D]``."""
        if self.gate_override is not None:
            return float(self.gate_override)
        if self.token_gate is not None:
            if q_hat is None or x is None:
                raise ValueError("a per-token gate needs the normalised query and the layer input")
            return self.token_gate(q_hat, x)
        if self.gate_logit is None:
            return float(self.memory_cfg.gate_fixed_value)
        g = torch.sigmoid(self.gate_logit)
        return g.view(self.num_heads, 1) if g.numel() == self.num_heads else g.view(self.num_heads, self.head_dim)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        # HF hands the KV cache down as ``past_key_values`` (older transformers) or ``cache`` (its newer name):
        # refuse a filled one under either name.
        for hf_cache in (past_key_values, kwargs.get("cache")):
            if hf_cache is not None and hf_cache.get_seq_length(self.layer_idx) > 0:
                raise ValueError(
                    "a converted (Titans) model keeps its own memory state and window cache; "
                    "use fednl.models.streaming.StreamingLM instead of a filled HF past_key_values cache"
                )
        if position_embeddings is None:
            raise ValueError("TitansAttention needs position_embeddings (cos, sin) from the HF model")
        if self._cache_on():
            return self._forward_cached(hidden_states, position_embeddings, attention_mask)
        return self._forward(hidden_states, position_embeddings, attention_mask)

    def _cache_on(self) -> bool:
        return self.cache_size > 0 and self.window is not None

    def _forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, None]:
        B, T, _ = hidden_states.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(hidden_states).view(B, T, H, D)
        k = self.k_proj(hidden_states).view(B, T, Hkv, D)
        v = self.v_proj(hidden_states).view(B, T, Hkv, D)

        cos, sin = position_embeddings
        q_rot = apply_rope(q.transpose(1, 2), cos, sin)
        k_rot = apply_rope(k.transpose(1, 2), cos, sin)
        v_t = v.transpose(1, 2)
        if self.stream is not None:
            if self._cache_on():
                self._ring_append(k_rot, v_t, k)
            o_soft = self._stream_softmax(q_rot, k_rot, v_t)
            valid = None
        else:
            o_soft = self._softmax(q_rot, k_rot, v_t, attention_mask)
            valid = _valid_positions(attention_mask, T)
        o_soft = o_soft.transpose(1, 2)  # [B, T, H, D]

        q_hat = F.normalize(q, dim=-1)
        g = self.gate(q_hat, hidden_states)
        if isinstance(g, float) and g == 0.0 and self.stream is None:
            # the memory is mixed in with weight exactly 0: the output is the softmax path alone (both mixes), so
            # skip the memory (the memory-off view, and windowed baselines built with a zero fixed gate)
            o = o_soft
            out = self.o_proj(o.reshape(B, T, H * D))
            return self._transfer(out, q_rot, k_rot, v_t, valid) if self.transfer else (out, None)
        o_mem = self._memory(hidden_states, q_hat, k, v, valid)
        if self.memory_zero:
            o_mem = torch.zeros_like(o_mem)
        if self.memory_cfg.write == "evicted" and self.memory_cfg.mix == "convex" and not isinstance(g, float):
            # nothing has been evicted before position W + sinks: the memory is empty there, so mix nothing in
            if self.window is None:  # no token ever leaves an unbounded window: the memory stays empty
                g = g * 0.0
            else:
                start = self.stream.pos - T if self.stream is not None else 0
                pos = torch.arange(start, start + T, device=o_mem.device)
                filled = (pos >= int(self.window) + self.sinks).to(o_mem.dtype)[None, :, None, None]
                g = g * filled
        if self.memory_cfg.mix == "residual":
            o = o_soft + g * o_mem
        else:
            o = g * o_mem + (1.0 - g) * o_soft
        out = self.o_proj(o.reshape(B, T, H * D))
        if self.transfer:
            return self._transfer(out, q_rot, k_rot, v_t, valid)
        return out, None

    def _transfer(
        self, out: torch.Tensor, q_rot: torch.Tensor, k_rot: torch.Tensor, v_t: torch.Tensor, valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, None]:
        """Attention transfer (LoLCATs stage 1): the teacher is this layer's full causal softmax attention on the
        same input; the layer's loss is the MSE of its output to the teacher's, and the teacher's output is what
        flows on, so every layer learns from the frozen model's own hidden states."""
        if self.stream is not None:
            raise ValueError("attention transfer compares full forwards; it does not run on a stream")
        B, T, _ = out.shape
        with torch.no_grad():
            o_full = softmax_attention(q_rot, k_rot, v_t, scale=self.scaling, causal=True).transpose(1, 2)
            teacher = self.o_proj(o_full.reshape(B, T, -1))
        err = (out - teacher).float().pow(2)
        if valid is not None:
            err = err[valid]
        self.transfer_loss = err.mean()
        return teacher, None

    def _softmax(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        T = q.shape[2]
        p = self.attention_dropout if self.training else 0.0
        if self.window is None and attention_mask is None:
            return softmax_attention(q, k, v, scale=self.scaling, causal=True, dropout=p)
        pos = torch.arange(T, device=q.device)
        mask = band_mask(pos, pos, self.window, self.sinks)
        if attention_mask is not None:
            mask = mask & _as_bool_mask(attention_mask)
        return softmax_attention(q, k, v, scale=self.scaling, mask=mask, dropout=p)

    def _stream_softmax(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        st = self.stream
        assert st is not None
        T = q.shape[2]
        new_pos = torch.arange(st.pos, st.pos + T, device=q.device)
        if st.k is not None:
            if st.k.shape[0] != k.shape[0]:
                raise ValueError(f"batch size changed mid-stream ({st.k.shape[0]} -> {k.shape[0]}); call reset()")
            k_all, v_all = torch.cat([st.k, k], dim=2), torch.cat([st.v, v], dim=2)
            k_pos = torch.cat([st.k_pos, new_pos])
        else:
            k_all, v_all, k_pos = k, v, new_pos
        mask = band_mask(new_pos, k_pos, self.window, self.sinks)
        if st.cache_k is not None and self._cache_on():  # the cached evicted tokens: always in the past, never in band
            B, H = q.shape[0], q.shape[1]
            seen = (st.cache_pos >= 0).repeat_interleave(self.num_key_value_groups, dim=1)  # [B, H, C]
            mask = torch.cat([seen[:, :, None, :].expand(B, H, T, -1), mask.expand(B, H, T, -1)], dim=-1)
            out = softmax_attention(q, torch.cat([st.cache_k, k_all], dim=2), torch.cat([st.cache_v, v_all], dim=2),
                                    scale=self.scaling, mask=mask)
        else:
            out = softmax_attention(q, k_all, v_all, scale=self.scaling, mask=mask)
        st.pos += T
        if self.window is None:
            st.k, st.v, st.k_pos = k_all, v_all, k_pos
        else:  # keep the sinks and the last window - 1 tokens: what the next query can still see
            keep = (k_pos < self.sinks) | (k_pos > st.pos - self.window)
            if bool(keep.all()):
                st.k, st.v, st.k_pos = k_all, v_all, k_pos
            elif bool(keep.any()):
                idx = keep.nonzero().squeeze(1)  # index_select copies: the old buffer is freed
                st.k, st.v, st.k_pos = k_all.index_select(2, idx), v_all.index_select(2, idx), k_pos[idx]
            else:
                st.k = st.v = st.k_pos = None
        return out

    # ------------------------------------------------------------------ sparse cache
    def _forward_cached(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, None]:
        """The layer with a sparse cache: the input is cut at the cache's update points (every ``cache_every``
        absolute positions) and run piece by piece through the streaming path, so a full forward and a stream
        see the same cache at every position. A full forward streams through a temporary state."""
        if self.transfer:
            raise ValueError("attention transfer does not run with a sparse cache (memory.cache); train without it "
                             "and set the cache at evaluation")
        T = hidden_states.shape[1]
        valid = _valid_positions(attention_mask, T)
        if valid is not None and not bool(valid.all()):
            raise ValueError("the sparse cache (memory.cache) does not take padded batches; score unpadded sequences")
        own = self.stream is None
        if own:
            self.stream = LayerStream()
        st = self.stream
        assert st is not None
        cos, sin = position_embeddings
        outs, a = [], 0
        try:
            while a < T:
                b = min(T, a + self.cache_every - st.pos % self.cache_every)
                outs.append(self._forward(hidden_states[:, a:b], (cos[:, a:b], sin[:, a:b]), None)[0])
                if st.pos % self.cache_every == 0:
                    self._cache_update()
                a = b
        finally:
            if own:
                self.stream = None
        return torch.cat(outs, dim=1), None

    def _ring_append(self, k_rot: torch.Tensor, v_t: torch.Tensor, k: torch.Tensor) -> None:
        """Queue this piece's non-sink tokens for scoring once they have left the window."""
        st = self.stream
        assert st is not None
        T = k_rot.shape[2]
        pos = torch.arange(st.pos, st.pos + T, device=k_rot.device)
        keep = pos >= self.sinks
        if not bool(keep.any()):
            return
        idx = keep.nonzero().squeeze(1)
        new = (k_rot.index_select(2, idx), v_t.index_select(2, idx),
               F.normalize(k, dim=-1).transpose(1, 2).index_select(2, idx))
        if st.ring is None:
            st.ring, st.ring_pos = new, pos[idx]
        else:
            st.ring = tuple(torch.cat([a, b], dim=2) for a, b in zip(st.ring, new))
            st.ring_pos = torch.cat([st.ring_pos, pos[idx]])

    def _surprise(self, k_hat: torch.Tensor, v: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        """``[B, Hkv, L]``: how badly the memory ``state`` recalls each (k̂, v) pair, ``||v - S^T k̂||^2`` averaged
        over the query heads that share the KV head (an empty memory recalls nothing: ``||v||^2``)."""
        with torch.no_grad():
            if state is None:
                return v.float().pow(2).sum(-1)
            n = self.num_key_value_groups
            B, Hkv, L, _ = v.shape
            pred = k_hat.float().repeat_interleave(n, dim=1) @ state.float()  # [B, H, L, Dv]
            err = (v.float().repeat_interleave(n, dim=1) - pred).pow(2).sum(-1)
            return err.view(B, Hkv, n, L).mean(dim=2)

    def _cache_update(self) -> None:
        """At an update point: score the queued tokens that have left the window against the memory as it was at
        the previous update (none of them written yet), merge them with the cache, keep the top ``cache_size`` per
        KV head; the rest are dropped (the memory holds them)."""
        st = self.stream
        assert st is not None and self.window is not None
        if st.ring_pos is not None:
            out = st.ring_pos <= st.pos - int(self.window)  # the query at st.pos no longer sees these
            if bool(out.any()):
                idx, rest = out.nonzero().squeeze(1), (~out).nonzero().squeeze(1)
                k_rot, v, k_hat = (t.index_select(2, idx) for t in st.ring)
                pos = st.ring_pos[idx]
                if rest.numel():
                    st.ring, st.ring_pos = tuple(t.index_select(2, rest) for t in st.ring), st.ring_pos[rest]
                else:
                    st.ring = st.ring_pos = None
                if self.cache_select == "random":
                    score = _position_hash(pos, self.layer_idx, k_hat.shape[1]).expand(k_hat.shape[0], -1, -1)
                else:
                    score = self._surprise(k_hat, v, st.scored_state)
                B, Hkv, L = score.shape
                pos = pos.view(1, 1, L).expand(B, Hkv, L)
                if st.cache_k is not None:
                    k_rot, v = torch.cat([st.cache_k, k_rot], dim=2), torch.cat([st.cache_v, v], dim=2)
                    pos, score = torch.cat([st.cache_pos, pos], dim=-1), torch.cat([st.cache_score, score], dim=-1)
                if score.shape[-1] > self.cache_size:
                    top = score.topk(self.cache_size, dim=-1).indices.sort(dim=-1).values  # keep stream order
                    rows = top[..., None].expand(-1, -1, -1, k_rot.shape[-1])
                    k_rot, v = k_rot.gather(2, rows), v.gather(2, rows)
                    pos, score = pos.gather(-1, top), score.gather(-1, top)
                st.cache_k, st.cache_v, st.cache_pos, st.cache_score = k_rot, v, pos, score
        st.scored_state = None if st.state is None else st.state.detach()

    def _memory(
        self,
        x: torch.Tensor,
        q_hat: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        valid: torch.Tensor | None,
    ) -> torch.Tensor:
        import fednl.memory as memory

        cfg = self.memory_cfg
        n_rep = self.num_key_value_groups
        k_hat = F.normalize(k, dim=-1)
        if n_rep > 1:  # query head h reads key/value head h // n_rep
            k_hat = k_hat.repeat_interleave(n_rep, dim=2)
            v = v.repeat_interleave(n_rep, dim=2)
        beta = self.beta(k_hat, x)
        g = self.decay(x, k_hat) if self.decay is not None else None
        if g is None and cfg.write == "evicted":
            g = torch.zeros_like(beta)  # the delayed write carries g alongside k, v, beta
        if valid is not None:  # padded positions write nothing and forget nothing
            m = valid[:, :, None]
            k_hat = torch.where(m[..., None], k_hat, torch.zeros_like(k_hat))
            v = torch.where(m[..., None], v, torch.zeros_like(v))
            beta = torch.where(m, beta, torch.zeros_like(beta))
            if g is not None:
                g = torch.where(m, g, torch.zeros_like(g))
        if cfg.write == "evicted" and self.window is None:
            beta = torch.zeros_like(beta)  # window lifted (the "full" condition): nothing is ever evicted or written
        elif cfg.write == "evicted":
            k_hat, v, beta, g = self._evicted_writes(k_hat, v, beta, g)
        if self.stream is not None:  # streaming: carry the state (memory_step picks its own chunking)
            o, self.stream.state = memory.memory_step(
                q_hat, k_hat, v, beta, self.stream.state, g=g, scale=cfg.scale, rule=cfg.rule
            )
            return o
        fn = memory.delta_rule if cfg.rule == "delta" else memory.hebbian
        o, _ = fn(
            q_hat, k_hat, v, beta, g=g, scale=cfg.scale, mode=cfg.mode, chunk_size=cfg.chunk_size,
            output_final_state=False,
        )  # fmt: skip
        return o

    def _evicted_writes(
        self, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Delay every write by the window: step ``t`` writes token ``t - W`` (the one leaving the window), so the
        memory read at ``t`` holds exactly the tokens the softmax path cannot see. Sink tokens are never written.

        In a full forward the missing first ``W`` writes are zeros (β = 0, g = 0); in a stream the last ``W``
        tokens' inputs wait in ``stream.pending`` for the next call.
        """
        W = int(self.window)  # type: ignore[arg-type]
        B, T = beta.shape[:2]
        st = self.stream
        start = st.pos - T if st is not None else 0  # _stream_softmax already advanced the position
        pos = torch.arange(start, start + T, device=beta.device)
        beta = beta * (pos >= self.sinks).to(beta.dtype)[None, :, None]
        new = (k, v, beta, g)
        if st is not None and st.pending is not None:
            if st.pending[0].shape[0] != B:
                raise ValueError(f"batch size changed mid-stream ({st.pending[0].shape[0]} -> {B}); call reset()")
            prev = st.pending
        else:
            prev = tuple(torch.zeros((B, W, *t.shape[2:]), dtype=t.dtype, device=t.device) for t in new)
        cand = tuple(torch.cat([a, b], dim=1) for a, b in zip(prev, new))  # tokens start - W .. start + T - 1
        if st is not None:
            st.pending = tuple(c[:, T:].clone() for c in cand)
        k, v, beta, g = (c[:, :T] for c in cand)
        return k, v, beta, g

    def extra_repr(self) -> str:
        c = self.memory_cfg
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, rule={c.rule}, "
            f"decay={c.decay}, gate={c.gate}/{c.gate_granularity}/{c.gate_source}, window={self.window}, "
            f"sinks={self.sinks}, write={c.write}, mix={c.mix}" + (f", cache={self.cache_size}" if self.cache_size else "")
        )


def _position_hash(pos: torch.Tensor, layer: int, heads: int) -> torch.Tensor:
    """``[1, heads, L]`` pseudo-random scores in [0, 1) from the absolute positions, the layer and the head: the same
    in a stream and a full forward, and independent of the text (the random-selection twin of the cache)."""
    h = torch.arange(heads, device=pos.device, dtype=torch.float64)[:, None]
    x = torch.sin(pos.double()[None, :] * 12.9898 + h * 78.233 + float(layer) * 37.719) * 43758.5453
    return (x - torch.floor(x)).float()[None]


def _as_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask == 0


def _valid_positions(attention_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """``[B, T]`` True at real (non-padding) tokens, read from the diagonal of HF's 4-D mask; None if no padding."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(
            f"TitansAttention supports HF's 'sdpa' and 'eager' attention masks (tensors); got "
            f"{type(attention_mask).__name__} — load the backbone with attn_implementation='sdpa'"
        )
    if attention_mask.dim() != 4 or attention_mask.shape[-1] != T or attention_mask.shape[-2] != T:
        raise ValueError(
            f"TitansAttention expects a [B, 1, T, T] attention mask (no HF cache); got shape "
            f"{tuple(attention_mask.shape)}"
        )
    valid = _as_bool_mask(attention_mask)[:, 0].diagonal(dim1=-2, dim2=-1)
    return None if bool(valid.all()) else valid


# ---------------------------------------------------------------------------------------------- conversion
def _supported_classes() -> tuple[type, ...]:
    classes: list[type] = []
    try:
        from transformers.models.llama.modeling_llama import LlamaAttention

        classes.append(LlamaAttention)
    except ImportError:  # transformers missing: nothing is convertible
        pass
    try:
        from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

        classes.append(Qwen2Attention)
    except ImportError:
        pass
    return tuple(classes)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a HF ``*ForCausalLM`` (``model.model.layers``); ValueError for other layouts."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(
            f"cannot convert {type(model).__name__}: expected a Llama-family causal LM with model.layers[i].self_attn "
            f"(supported attention classes: {', '.join(SUPPORTED_ATTENTION)})"
        )
    return layers


def convert_to_titans(model: nn.Module, cfg: MemoryConfig, seed: int = 0) -> nn.Module:
    """Wrap every self-attention layer of ``model`` in :class:`TitansAttention`, in place; returns ``model``.

    Raises ``ValueError`` naming the class for an unsupported architecture, an attention module with its own
    sliding window, or a model that is already converted. Sets ``use_cache = False`` in the model's config and
    generation config: the converted model keeps its own streaming state (:class:`fednl.models.streaming.StreamingLM`),
    and HF ``generate()`` then recomputes the prefix at each step (correct, quadratic).
    """
    layers = decoder_layers(model)
    supported = _supported_classes()
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        if isinstance(attn, TitansAttention):
            raise ValueError(f"{type(model).__name__} is already converted (layer {i} is a TitansAttention)")
        if not isinstance(attn, supported):
            raise ValueError(
                f"cannot convert attention class {type(attn).__name__} (layer {i} of {type(model).__name__}); "
                f"supported: {', '.join(SUPPORTED_ATTENTION)}"
            )
        if getattr(attn, "sliding_window", None):
            raise ValueError(
                f"layer {i} uses its own sliding window ({attn.sliding_window}); converting such layers is not "
                "supported — disable it in the checkpoint config or use MemoryConfig.attn_window"
            )
    for i, layer in enumerate(layers):
        layer.self_attn = TitansAttention(layer.self_attn, cfg, named_generator(seed, f"model.layers.{i}.self_attn"))
    model.config.use_cache = False
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None:  # HF generate() must recompute the prefix: HF caches cannot hold the memory state
        gen_cfg.use_cache = False
    model.fednl_memory_config = cfg
    return model


def titans_layers(model: nn.Module) -> list[TitansAttention]:
    """All :class:`TitansAttention` modules of ``model`` in layer order (empty for an unconverted model)."""
    return [m for m in model.modules() if isinstance(m, TitansAttention)]


def set_memory_zero(model: nn.Module, value: bool) -> None:
    """Force the memory output of every converted layer to zero (``True``) or let it through (``False``): the
    zeroed-memory twin keeps everything else, including the gate (so with ``mix = "convex"`` the softmax path is
    still scaled by ``1 - g``)."""
    layers = titans_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no converted (Titans) attention layers")
    for layer in layers:
        layer.memory_zero = bool(value)


@contextlib.contextmanager
def attention_transfer(model: nn.Module) -> Iterator[list[TitansAttention]]:
    """Within the block every converted layer runs in attention-transfer mode: it passes on its frozen full-attention
    teacher's output and leaves ``layer.transfer_loss`` (the MSE of its hybrid output to the teacher's). Yields the
    layers; :func:`transfer_loss` sums their losses after a forward."""
    layers = titans_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no converted (Titans) attention layers")
    for layer in layers:
        layer.transfer, layer.transfer_loss = True, None
    try:
        yield layers
    finally:
        for layer in layers:
            layer.transfer, layer.transfer_loss = False, None


def transfer_loss(layers: list[TitansAttention]) -> torch.Tensor:
    """Sum over layers of the attention-transfer losses of the last forward (inside :func:`attention_transfer`)."""
    losses = [layer.transfer_loss for layer in layers]
    if any(x is None for x in losses):
        raise RuntimeError("no attention-transfer loss recorded: run a forward inside attention_transfer(model)")
    return torch.stack([x for x in losses if x is not None]).sum()


def set_gate_override(model: nn.Module, value: float | None) -> None:
    """Force the memory gate of every converted layer to ``value`` (``0.0`` = exactly the softmax path,
    ``None`` = back to the configured gate)."""
    if value is not None and not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"gate override must lie in [0, 1], got {value}")
    layers = titans_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no converted (Titans) attention layers")
    for layer in layers:
        layer.gate_override = None if value is None else float(value)
