"""Model kinds: a registry of builders and :func:`build_model`, which a strategy's :class:`ModelSpec` goes through.

A builder is ``builder(backbone, memory_cfg, lora_cfg, seed, **params) -> nn.Module``; it receives a fresh deep
copy of the cached backbone (frozen: every parameter has ``requires_grad=False``) and the spec's parameters as
keyword-only arguments, and returns the model to train, whose new trainable parameters are claimed by groups (see
:mod:`fednl.models.groups`). Kinds registered here: ``"titans"`` (Titans dual-path conversion + LoRA) and
``"lora"`` (plain backbone + LoRA). Other kinds (``floral``, ``treelora``, ``mamba``) register themselves in their
own modules of this package (:func:`register_model_kind`), which the registry imports on the first look-up.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from fednl.models.config import LoraConfig, MemoryConfig, ModelConfig
from fednl.models.groups import param_groups
from fednl.models.loading import load_backbone
from fednl.models.lora import inject_lora
from fednl.models.spec import ModelSpec
from fednl.models.titans import convert_to_titans
from fednl.util.registry import Registry

ModelBuilder = Callable[..., nn.Module]

KINDS: Registry[ModelBuilder] = Registry("model kind", "fednl.models")


def register_model_kind(kind: str, builder: ModelBuilder) -> ModelBuilder:
    """Register ``builder`` under ``kind`` (re-registering the same builder is a no-op). Returns ``builder``."""
    return KINDS.register(kind, builder)


def model_kinds() -> list[str]:
    """All registered model kinds."""
    return KINDS.names()


def kind_params(kind: str) -> dict[str, Any]:
    """The parameters a kind's builder takes (keyword-only arguments) and their defaults."""
    sig = inspect.signature(KINDS.get(kind))
    return {n: p.default for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def build_titans(backbone: nn.Module, memory_cfg: MemoryConfig, lora_cfg: LoraConfig, seed: int) -> nn.Module:
    """Titans conversion of every attention layer, then LoRA on ``lora_cfg.targets``."""
    convert_to_titans(backbone, memory_cfg, seed=seed)
    inject_lora(backbone, lora_cfg.target_names(), lora_cfg.r, lora_cfg.alpha, seed, trainable=lora_cfg.trainable)
    return backbone


def build_lora(backbone: nn.Module, memory_cfg: MemoryConfig, lora_cfg: LoraConfig, seed: int) -> nn.Module:
    """The plain backbone with LoRA on ``lora_cfg.targets``.

    Only the softmax window of ``memory_cfg`` is used: with ``attn_window`` set, every attention layer is limited to
    the same window + sinks as the memory models (a converted layer with its gate fixed at 0, which skips the memory
    and has no trainable memory parameter), so windowed comparisons give the LoRA baselines the same context.
    """
    if memory_cfg.attn_window is not None:
        softmax_only = MemoryConfig(attn_window=memory_cfg.attn_window, attn_sinks=memory_cfg.sinks, gate="fixed",
                                    gate_fixed_value=0.0)
        convert_to_titans(backbone, softmax_only, seed=seed)
        backbone.requires_grad_(False)
    inject_lora(backbone, lora_cfg.target_names(), lora_cfg.r, lora_cfg.alpha, seed, trainable=lora_cfg.trainable)
    return backbone


register_model_kind("titans", build_titans)
register_model_kind("lora", build_lora)


def build_model(
    spec: ModelSpec | str,
    model_cfg: ModelConfig,
    memory_cfg: MemoryConfig | None = None,
    lora_cfg: LoraConfig | None = None,
    seed: int = 0,
) -> nn.Module:
    """Build a fresh model of ``spec`` (a :class:`ModelSpec`, or a bare kind name) on a deep copy of the
    (process-cached) backbone of ``model_cfg``.

    Every backbone parameter stays frozen; the result's parameter groups are validated (each trainable tensor
    belongs to a group). ``model.fednl_kind`` records the kind, ``model.fednl_model_spec`` the spec and
    ``model.fednl_model_config`` the backbone. Raises ``ValueError`` for an unknown kind (listing the known ones)
    or a parameter the kind does not take.
    """
    spec = ModelSpec.of(spec)
    builder = KINDS.get(spec.kind)
    known = kind_params(spec.kind)
    unknown = sorted(set(spec.params) - set(known))
    if unknown:
        takes = f"it takes {sorted(known)}" if known else "it takes none"
        raise ValueError(f"model kind {spec.kind!r}: unknown parameter(s) {unknown}; {takes}")
    backbone, _ = load_backbone(model_cfg)
    fresh = copy.deepcopy(backbone)
    fresh.requires_grad_(False)
    model = builder(fresh, memory_cfg or MemoryConfig(), lora_cfg or LoraConfig(), int(seed), **spec.params)
    param_groups(model)  # raises if a trainable parameter is claimed by no group
    model.fednl_kind = spec.kind
    model.fednl_model_spec = spec
    model.fednl_model_config = model_cfg  # the backbone's identity (checked when a rule file is installed)
    if spec.kind == "titans" and memory_cfg is not None and memory_cfg.init_rule:
        from fednl.models.rules import install_rule, load_rule

        install_rule(model, load_rule(memory_cfg.init_rule))
    return model
