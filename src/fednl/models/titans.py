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

import math
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
    """Per-head log-decay ``g_t = -exp(A_log) * softplus(a_proj(x_t) + dt_bias)`` (<= 0)."""

    def __init__(self, hidden: int, num_heads: int, generator: torch.Generator, dtype: torch.dtype, device: Any = None):
        super().__init__()
        self.a_proj = nn.Linear(hidden, num_heads, bias=False, dtype=dtype, device=device)
        a = torch.empty(num_heads, dtype=torch.float64).uniform_(1.0, 16.0, generator=generator)
        u = torch.rand(num_heads, dtype=torch.float64, generator=generator)
        dt = torch.exp(u * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3))
        dt_bias = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
        with torch.no_grad():
            self.a_proj.weight.zero_()
        self.A_log = nn.Parameter(a.log().to(dtype=dtype, device=device))
        self.dt_bias = nn.Parameter(dt_bias.to(dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.exp(self.A_log) * F.softplus(self.a_proj(x) + self.dt_bias)

    def fednl_param_groups(self) -> dict[str, str]:
        return {"a_proj.weight": "rule", "A_log": "rule", "dt_bias": "rule"}


@dataclass
class LayerStream:
    """Streaming state of one converted layer: memory ``state`` ``[B, H, Dk, Dv]``, the last ``window - 1``
    post-RoPE keys/values ``[B, Hkv, L, D]`` (all of them when the window is None) and tokens seen so far."""

    state: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    pos: int = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.state, self.k, self.v) if t is not None)


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
        self.gate_override: float | None = cfg.gate_override
        self.stream: LayerStream | None = None
        w = self.q_proj.weight
        dtype, device = w.dtype, w.device
        H, D = self.num_heads, self.head_dim
        if cfg.gate == "learned":
            n = H if cfg.gate_granularity == "head" else H * D
            self.gate_logit = nn.Parameter(torch.full((n,), _logit(cfg.gate_init), dtype=dtype, device=device))
        else:
            self.gate_logit = None
        if cfg.beta_source == "key":
            self.beta: nn.Module = KeyBeta(H, D, cfg.beta_init, dtype, device)
        else:
            self.beta = InputBeta(self.hidden_size, H, cfg.beta_init, dtype, device)
        self.decay = Decay(self.hidden_size, H, generator, dtype, device) if cfg.decay else None

    # ------------------------------------------------------------------ groups
    def fednl_param_groups(self) -> dict[str, str]:
        return {"gate_logit": "gate"} if self.gate_logit is not None else {}

    # ------------------------------------------------------------------ gate
    def gate(self) -> torch.Tensor | float:
        """The mixing weight of the memory path: a float, or ``[H, 1]`` / ``[H, D]`` broadcastable to ``[B,T,H,D]``."""
        if self.gate_override is not None:
            return float(self.gate_override)
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
        if past_key_values is not None and past_key_values.get_seq_length(self.layer_idx) > 0:
            raise ValueError(
                "a converted (Titans) model keeps its own memory state and window cache; "
                "use fednl.models.streaming.StreamingLM instead of a filled HF past_key_values cache"
            )
        if position_embeddings is None:
            raise ValueError("TitansAttention needs position_embeddings (cos, sin) from the HF model")
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
            o_soft = self._stream_softmax(q_rot, k_rot, v_t)
            valid = None
        else:
            o_soft = self._softmax(q_rot, k_rot, v_t, attention_mask)
            valid = _valid_positions(attention_mask, T)
        o_soft = o_soft.transpose(1, 2)  # [B, T, H, D]

        o_mem = self._memory(hidden_states, q, k, v, valid)
        g = self.gate()
        o = g * o_mem + (1.0 - g) * o_soft
        return self.o_proj(o.reshape(B, T, H * D)), None

    def _softmax(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        T = q.shape[2]
        p = self.attention_dropout if self.training else 0.0
        if self.window is None and attention_mask is None:
            return softmax_attention(q, k, v, scale=self.scaling, causal=True, dropout=p)
        pos = torch.arange(T, device=q.device)
        mask = band_mask(pos, pos, self.window)
        if attention_mask is not None:
            mask = mask & _as_bool_mask(attention_mask)
        return softmax_attention(q, k, v, scale=self.scaling, mask=mask, dropout=p)

    def _stream_softmax(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        st = self.stream
        assert st is not None
        T = q.shape[2]
        if st.k is not None:
            if st.k.shape[0] != k.shape[0]:
                raise ValueError(f"batch size changed mid-stream ({st.k.shape[0]} -> {k.shape[0]}); call reset()")
            k_all, v_all = torch.cat([st.k, k], dim=2), torch.cat([st.v, v], dim=2)
        else:
            k_all, v_all = k, v
        n_old = k_all.shape[2] - T
        q_pos = torch.arange(st.pos, st.pos + T, device=q.device)
        k_pos = torch.arange(st.pos - n_old, st.pos + T, device=q.device)
        out = softmax_attention(q, k_all, v_all, scale=self.scaling, mask=band_mask(q_pos, k_pos, self.window))
        if self.window is None:
            st.k, st.v = k_all, v_all
        elif self.window > 1:
            keep = self.window - 1
            st.k, st.v = k_all[:, :, -keep:].clone(), v_all[:, :, -keep:].clone()  # clone: free the old buffer
        else:
            st.k = st.v = None
        st.pos += T
        return out

    def _memory(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        valid: torch.Tensor | None,
    ) -> torch.Tensor:
        import fednl.memory as memory

        cfg = self.memory_cfg
        n_rep = self.num_key_value_groups
        q_hat = F.normalize(q, dim=-1)
        k_hat = F.normalize(k, dim=-1)
        if n_rep > 1:  # query head h reads key/value head h // n_rep
            k_hat = k_hat.repeat_interleave(n_rep, dim=2)
            v = v.repeat_interleave(n_rep, dim=2)
        beta = self.beta(k_hat, x)
        g = self.decay(x) if self.decay is not None else None
        if valid is not None:  # padded positions write nothing and forget nothing
            m = valid[:, :, None]
            k_hat = torch.where(m[..., None], k_hat, torch.zeros_like(k_hat))
            v = torch.where(m[..., None], v, torch.zeros_like(v))
            beta = torch.where(m, beta, torch.zeros_like(beta))
            if g is not None:
                g = torch.where(m, g, torch.zeros_like(g))
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

    def extra_repr(self) -> str:
        c = self.memory_cfg
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, rule={c.rule}, "
            f"decay={c.decay}, gate={c.gate}/{c.gate_granularity}, window={self.window}"
        )


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
