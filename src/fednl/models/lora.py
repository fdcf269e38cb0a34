"""Hand-written LoRA: ``y = x W^T + b + (alpha / r) * (x A^T) B^T``.

* ``A`` ``[r, in]`` starts from a seeded Kaiming-uniform draw (bound ``1/sqrt(in)``), ``B`` ``[out, r]`` from zeros,
  so an injected model computes exactly what the base model computes until ``B`` moves.
* The base ``weight``/``bias`` stay the *same* ``nn.Parameter`` objects under the same names
  (``...q_proj.weight``), frozen; the adapters are ``...q_proj.lora_A`` and ``...q_proj.lora_B``.
* The draw of ``A`` depends only on ``(seed, module name)``: the same seed gives the same ``A`` whatever else is
  injected and whichever model kind wraps the module.

Reusable by other model kinds: subclass :class:`LoRALinear` (e.g. a mixture of adapters) and pass a ``factory``
to :func:`inject_lora`. Parameters of a module are assigned to groups through ``fednl_param_groups()`` (see
:mod:`fednl.models.groups`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fednl.models.config import LLAMA_LINEARS
from fednl.models.seeding import named_generator


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

    Parameters
    ----------
    base: the ``nn.Linear`` to adapt; its ``weight`` and ``bias`` parameters are reused (not copied) and frozen.
    r, alpha: rank and scaling numerator (scale ``alpha / r``).
    generator: draws ``A`` (seeded by :func:`inject_lora`); ``None`` uses the global RNG.
    trainable: ``False`` freezes the adapters too (ablation).
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        *,
        generator: torch.Generator | None = None,
        trainable: bool = True,
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scale = int(r), float(alpha), float(alpha) / int(r)
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        w = base.weight
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) bound, as nn.Linear uses
        a = torch.empty(self.r, self.in_features, dtype=torch.float64).uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(device=w.device, dtype=w.dtype), requires_grad=trainable)
        self.lora_B = nn.Parameter(
            torch.zeros(self.out_features, self.r, device=w.device, dtype=w.dtype), requires_grad=trainable
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``(alpha / r) B A`` ``[out, in]``."""
        return (self.lora_B @ self.lora_A) * self.scale

    def merged_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reference path: one matmul with the merged weight ``W + (alpha/r) B A`` (same values as ``forward``)."""
        return F.linear(x, self.weight + self.delta_weight(), self.bias)

    def fednl_param_groups(self) -> dict[str, str]:
        return {"lora_A": "lora", "lora_B": "lora"}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}"


LoRAFactory = Callable[[nn.Linear, str], nn.Module]


def resolve_targets(targets: Iterable[str] | str) -> tuple[str, ...]:
    """``"all"`` -> the seven Llama linears; otherwise the given names (validated non-empty)."""
    if isinstance(targets, str):
        if targets != "all":
            raise ValueError(f"LoRA targets must be 'all' or a list of module names, got {targets!r}")
        return LLAMA_LINEARS
    names = tuple(targets)
    if not names:
        raise ValueError("LoRA targets must not be empty")
    return names


def inject_lora(
    model: nn.Module,
    targets: Iterable[str] | str = ("q_proj", "k_proj", "v_proj"),
    r: int = 16,
    alpha: float = 32.0,
    seed: int = 0,
    *,
    trainable: bool = True,
    factory: LoRAFactory | None = None,
) -> list[str]:
    """Replace every ``nn.Linear`` whose attribute name is in ``targets`` by a LoRA-wrapped one, in place.

    Parameters
    ----------
    model: any module tree (a HF causal LM, converted or not).
    targets: attribute names such as ``"q_proj"``, or ``"all"`` (q, k, v, o, gate, up, down).
    r, alpha, seed, trainable: see :class:`LoRALinear`; ``A`` is drawn from
        ``fednl.models.seeding.named_generator(seed, qualified_name)``.
    factory: ``factory(linear, qualified_name) -> nn.Module`` to build something other than :class:`LoRALinear`
        (it must keep the layer's call signature); ``r``/``alpha``/``seed``/``trainable`` are then the factory's
        business.

    Returns the qualified names of the wrapped modules. Raises ``ValueError`` when a target matches no linear
    layer or a matched module already carries LoRA.
    """
    names = resolve_targets(targets)
    wanted = set(names)
    found: dict[str, int] = {n: 0 for n in names}
    replaced: list[str] = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name not in wanted:
                continue
            qual = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, LoRALinear):
                raise ValueError(f"module {qual!r} already has LoRA; inject_lora must be called once")
            if not isinstance(child, nn.Linear):
                continue
            if factory is not None:
                new = factory(child, qual)
            else:
                new = LoRALinear(child, r, alpha, generator=named_generator(seed, qual), trainable=trainable)
            setattr(parent, child_name, new)
            found[child_name] += 1
            replaced.append(qual)
    missing = [n for n, c in found.items() if c == 0]
    if missing:
        raise ValueError(f"LoRA targets {missing} match no nn.Linear in {type(model).__name__}")
    return replaced


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Qualified name -> :class:`LoRALinear` for every adapter in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
