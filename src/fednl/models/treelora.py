"""Model kind ``"treelora"`` (FedTreeLoRA): per adapted linear, a *cluster* and an *external* LoRA expert mixed
by one learnable scalar per transformer block.

For block ``l`` of client ``k`` (FedTreeLoRA, Step 4)::

    h(x) = W x + b + s · [ λ_eff · B_clus A_clus x + (1 − λ_eff) · B_ext A_ext x ],    s = alpha / r
    λ_eff = 1 − g · (1 − sigmoid(ρ))

* ``lora_A``/``lora_B`` (group ``lora``): the cluster expert, trained locally and sent back — the same tensors,
  names and seeded initialisation as the plain ``"lora"`` kind.
* ``ext_A``/``ext_B`` (group ``tree_ext``): the external expert (mean of the other clusters), received from the
  server and *frozen* during local training: the forward pass detaches them, so they never get a gradient and
  the optimiser skips them.
* per block, ``<block>.treelora_mix.rho`` (group ``tree_mix``): the client's mixing logit, λ = sigmoid(ρ),
  private to the client; ``<block>.treelora_mix.gate`` (group ``tree_ext``): ``g`` ∈ {0, 1}, received from the
  server — 0 while the block is fully shared (the root of the tree: no external expert, λ_eff = 1, exactly
  plain LoRA), 1 once the block is split into several clusters. Also detached in the forward pass.

At initialisation ``B = ext = 0`` and ``g = 0``: the model computes exactly what the backbone computes. While
``g = 0`` the forward pass *is* :meth:`LoRALinear.forward` (the external path is not even in the graph), so a
fully shared tree trains bit-for-bit like plain LoRA.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from fednl.models.build import register_model_kind
from fednl.models.config import LoraConfig, MemoryConfig
from fednl.models.lora import LoRALinear, inject_lora
from fednl.models.seeding import named_generator

KIND = "treelora"
_BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.(\d+)(?:\.|$)")


def block_index(name: str) -> int | None:
    """The transformer-block index in a parameter/module name (``model.layers.3.self_attn.q_proj`` -> 3)."""
    m = _BLOCK_RE.search(name)
    return int(m.group(1)) if m else None


def block_prefix(name: str) -> str | None:
    """The block module's qualified name (``model.layers.3``), or ``None`` outside any block."""
    m = _BLOCK_RE.search(name)
    if not m:
        return None
    return name[: m.end(1)].lstrip(".")


class TreeMix(nn.Module):
    """One block's mixing scalar ``λ = sigmoid(rho)`` and the server's gate ``g`` (see module docstring); both are
    one-element vectors."""

    def __init__(self, lambda_init: float = 0.5, *, device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if not 0.0 < lambda_init < 1.0:
            raise ValueError(f"lambda_init must lie in (0, 1), got {lambda_init}")
        logit = math.log(lambda_init / (1.0 - lambda_init))
        self.rho = nn.Parameter(torch.full((1,), logit, device=device, dtype=dtype))
        self.gate = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))

    def lam(self) -> torch.Tensor:
        """The learnable mixing weight λ = sigmoid(ρ)."""
        return torch.sigmoid(self.rho)

    def effective(self) -> torch.Tensor:
        """λ_eff = 1 − g (1 − λ): 1 at the root (g = 0), λ in a split block (g = 1)."""
        return 1.0 - self.gate.detach() * (1.0 - self.lam())

    def fednl_param_groups(self) -> dict[str, str]:
        return {"rho": "tree_mix", "gate": "tree_ext"}


class TreeLoRALinear(LoRALinear):
    """A frozen linear layer + cluster LoRA expert (trained) + external expert (frozen), mixed by ``mix``."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, mix: TreeMix, *, generator: torch.Generator | None = None,
                 trainable: bool = True):
        super().__init__(base, r, alpha, generator=generator, trainable=trainable)
        w = base.weight
        self.ext_A = nn.Parameter(torch.zeros(self.r, self.in_features, device=w.device, dtype=w.dtype),
                                  requires_grad=trainable)
        self.ext_B = nn.Parameter(torch.zeros(self.out_features, self.r, device=w.device, dtype=w.dtype),
                                  requires_grad=trainable)
        object.__setattr__(self, "_mix", mix)  # owned (and registered) by the block, not by this module

    @property
    def mix(self) -> TreeMix:
        return self._mix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self._mix.gate.detach().any()):
            return super().forward(x)  # g = 0 (a root block): exactly plain LoRA, no external path in the graph
        lam = self._mix.effective().to(x.dtype)
        clus = F.linear(F.linear(x, self.lora_A), self.lora_B)
        ext = F.linear(F.linear(x, self.ext_A.detach()), self.ext_B.detach())
        return F.linear(x, self.weight, self.bias) + self.scale * (lam * clus + (1.0 - lam) * ext)

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``s [λ_eff B A + (1 − λ_eff) B_ext A_ext]`` ``[out, in]`` (external part detached)."""
        lam = self._mix.effective()
        ext = self.ext_B.detach() @ self.ext_A.detach()
        return self.scale * (lam * (self.lora_B @ self.lora_A) + (1.0 - lam) * ext)

    def fednl_param_groups(self) -> dict[str, str]:
        return {"lora_A": "lora", "lora_B": "lora", "ext_A": "tree_ext", "ext_B": "tree_ext"}


def inject_treelora(model: nn.Module, lora_cfg: LoraConfig, seed: int, *, lambda_init: float = 0.5) -> list[str]:
    """Wrap every target linear in a :class:`TreeLoRALinear`; one :class:`TreeMix` per block, registered on the
    block as ``treelora_mix``. Raises ``ValueError`` for a target outside any transformer block."""
    modules = dict(model.named_modules())

    def factory(linear: nn.Linear, qual: str) -> nn.Module:
        prefix = block_prefix(qual)
        if prefix is None or prefix not in modules:
            raise ValueError(f"treelora: adapted module {qual!r} is not inside a transformer block (layers.<i>)")
        block = modules[prefix]
        mix = getattr(block, "treelora_mix", None)
        if mix is None:
            mix = TreeMix(lambda_init, device=linear.weight.device, dtype=linear.weight.dtype)
            block.treelora_mix = mix
        return TreeLoRALinear(linear, lora_cfg.r, lora_cfg.alpha, mix, generator=named_generator(seed, qual),
                              trainable=lora_cfg.trainable)

    return inject_lora(model, lora_cfg.target_names(), factory=factory)


def build_treelora(backbone: nn.Module, memory_cfg: MemoryConfig, lora_cfg: LoraConfig, seed: int) -> nn.Module:
    """The plain backbone with :class:`TreeLoRALinear` on ``lora_cfg.targets`` (``memory_cfg`` unused)."""
    del memory_cfg
    inject_treelora(backbone, lora_cfg, seed)
    return backbone


def treelora_modules(model: nn.Module) -> dict[str, TreeLoRALinear]:
    """Qualified name -> :class:`TreeLoRALinear` of every adapted module."""
    return {n: m for n, m in model.named_modules() if isinstance(m, TreeLoRALinear)}


register_model_kind(KIND, build_treelora)
