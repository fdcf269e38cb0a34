"""Model kind ``"mamba"``: a recurrent-state (selective SSM) backbone with LoRA on its linear layers — the FedNL
paper's Fed-Mamba baseline (Mamba-1.4B there).

* Any local Hugging Face Mamba / Mamba-2 checkpoint works: ``ModelConfig(source="hf:<folder>")`` loads it through
  ``AutoModelForCausalLM`` and this builder adds LoRA. **No pretrained Mamba weights are available offline in
  this environment**; supply a folder (e.g. a downloaded ``state-spaces/mamba-130m-hf``) to use real weights.
* On a *randomly initialised* non-Mamba backbone (the ``"tiny"`` test model, recognised by its empty
  ``config._name_or_path``) the builder builds a tiny random ``MambaForCausalLM`` with the same vocabulary,
  width and depth (seeded by ``seed``), so the tokenizer still fits. A pretrained non-Mamba backbone
  (SmolLM2, an HF Llama folder) is refused with a clear error rather than silently replaced.
* LoRA targets: Mamba's own linears (:data:`MAMBA_LINEARS`) are used as given; Llama-style names are translated
  — ``q_proj``/``k_proj``/``v_proj`` → ``in_proj`` (the input projection), ``o_proj`` → ``out_proj`` — and the
  MLP names (Mamba blocks have no MLP) are dropped; ``"all"`` = every Mamba linear. The ``lm_head`` is never
  adapted.
"""

from __future__ import annotations

import torch
from torch import nn

from fednl.models.build import register_model_kind
from fednl.models.config import LLAMA_LINEARS, LoraConfig, MemoryConfig
from fednl.models.lora import inject_lora

KIND = "mamba"
MAMBA_LINEARS: tuple[str, ...] = ("in_proj", "x_proj", "dt_proj", "out_proj")
MAMBA_TYPES = ("mamba", "mamba2")
_TRANSLATE = {"q_proj": "in_proj", "k_proj": "in_proj", "v_proj": "in_proj", "o_proj": "out_proj"}
TINY_STATE_SIZE = 16
TINY_EXPAND = 2
TINY_CONV_KERNEL = 4


def is_mamba(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) in MAMBA_TYPES


def mamba_targets(targets: list[str] | str, available: set[str]) -> tuple[str, ...]:
    """Translate LoRA target names for a Mamba model (see module docstring); raises if nothing remains."""
    if targets == "all":
        out = [t for t in MAMBA_LINEARS if t in available]
    else:
        out = []
        for t in targets:
            if t in available:
                name = t
            elif t in _TRANSLATE:
                name = _TRANSLATE[t]
            elif t in LLAMA_LINEARS:
                continue  # an MLP projection: Mamba blocks have none
            else:
                raise ValueError(f"LoRA target {t!r} is neither a Mamba linear {MAMBA_LINEARS} nor a Llama name")
            if name in available and name not in out:
                out.append(name)
    if not out:
        raise ValueError(f"LoRA targets {targets!r} select no linear layer of this Mamba model ({sorted(available)})")
    return tuple(out)


def tiny_mamba_like(backbone: nn.Module, seed: int) -> nn.Module:
    """A seeded random ``MambaForCausalLM`` with the backbone's vocabulary size, width and depth."""
    from transformers import MambaConfig, MambaForCausalLM

    cfg = backbone.config
    emb = backbone.get_input_embeddings().weight
    config = MambaConfig(
        vocab_size=int(emb.shape[0]),
        hidden_size=int(cfg.hidden_size),
        num_hidden_layers=int(cfg.num_hidden_layers),
        state_size=TINY_STATE_SIZE,
        expand=TINY_EXPAND,
        conv_kernel=TINY_CONV_KERNEL,
        tie_word_embeddings=True,
        eos_token_id=getattr(cfg, "eos_token_id", None),
        bos_token_id=None,
        pad_token_id=None,
        use_cache=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = MambaForCausalLM(config)
    model = model.to(device=emb.device, dtype=emb.dtype)
    model.requires_grad_(False)
    model.eval()
    return model


def build_mamba(backbone: nn.Module, memory_cfg: MemoryConfig, lora_cfg: LoraConfig, seed: int) -> nn.Module:
    """A Mamba backbone (loaded, or a tiny random stand-in for the tiny test model) with LoRA on its linears."""
    del memory_cfg
    if not is_mamba(backbone):
        if getattr(getattr(backbone, "config", None), "_name_or_path", None) != "":
            raise ValueError(
                "model kind 'mamba' needs a Mamba checkpoint (ModelConfig.source = 'hf:<folder with a Mamba "
                f"model>'); got a pretrained {type(backbone).__name__}. No pretrained Mamba weights ship with fednl."
            )
        backbone = tiny_mamba_like(backbone, seed)
    available = {n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if isinstance(m, nn.Linear)}
    targets = mamba_targets(lora_cfg.targets, available - {"lm_head"})
    inject_lora(backbone, targets, lora_cfg.r, lora_cfg.alpha, seed, trainable=lora_cfg.trainable)
    return backbone


register_model_kind(KIND, build_mamba)
