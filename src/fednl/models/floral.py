"""Model kind ``"floral"`` (FLoRAL, Almansoori et al., CPAL 2025): C low-rank adaptors per adapted linear layer,
mixed by one private client router shared by all layers.

For an adapted linear ``m`` and client ``k``::

    out(x) = m(x) + s · Σ_c p_c · (B_c A_c x + b_c),      s = alpha / r
    p      = max(π, min_prob),   π = softmax((θ + noise) / T)

* ``lora_A`` ``[C, r, in]``, ``lora_B`` ``[C, out, r]``, ``lora_bias`` ``[C, out]`` (group ``lora``): the C
  adaptors, stacked along the first dimension. ``A_0`` is drawn exactly like the plain ``"lora"`` kind's ``A``
  (same seed and name), ``A_c`` (c ≥ 1) from ``(seed, name + "/floral<c>")``; ``B`` and the bias start at zero.
* ``floral_router.weight`` ``[C]`` (group ``router``): the client's router θ_k, zeros at init. The router is
  evaluated once per forward pass (its cache is reset by a forward pre-hook on the input embedding, where every
  pass starts) and read by every adapted layer.
* During training, ``noise = noise_std · U[0, 1)`` (uniform, as the reference implementation; drawn from the
  global torch RNG, which the engine seeds per client and round); no noise in ``eval()`` mode.
* ``min_prob`` = 0.01 and ``T`` = 1 as in the reference (``p`` is clamped, not renormalised).

Model kind ``"floral"`` with parameter ``n_adaptors`` (C, default :data:`DEFAULT_ADAPTORS`):
``ModelSpec(kind="floral", params={"n_adaptors": 3})``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fednl.models.build import register_model_kind
from fednl.models.config import LoraConfig, MemoryConfig
from fednl.models.lora import inject_lora
from fednl.models.seeding import named_generator

DEFAULT_ADAPTORS = 4
NOISE_STD = 1.0
TEMPERATURE = 1.0
MIN_PROB = 0.01
ROUTER_NAME = "floral_router"


class FloralRouter(nn.Module):
    """A client's router θ ∈ R^C; :meth:`probs` gives the mixture weights of the current forward pass."""

    def __init__(self, n_adaptors: int, *, noise_std: float = NOISE_STD, temperature: float = TEMPERATURE,
                 min_prob: float = MIN_PROB, device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if n_adaptors < 1:
            raise ValueError(f"FLoRAL needs at least one adaptor, got C={n_adaptors}")
        if temperature <= 0:
            raise ValueError(f"router temperature must be > 0, got {temperature}")
        if not 0.0 <= min_prob < 1.0 / n_adaptors + 1e-12:
            raise ValueError(f"router min_prob must lie in [0, 1/C], got {min_prob}")
        self.n_adaptors = int(n_adaptors)
        self.noise_std, self.temperature, self.min_prob = float(noise_std), float(temperature), float(min_prob)
        self.weight = nn.Parameter(torch.zeros(self.n_adaptors, device=device, dtype=dtype))
        self._cache: torch.Tensor | None = None

    def mixture(self, *, noise: torch.Tensor | None = None) -> torch.Tensor:
        """``max(softmax((θ + noise) / T), min_prob)`` (differentiable in θ)."""
        logits = self.weight if noise is None else self.weight + noise
        pi = torch.softmax(logits / self.temperature, dim=0)
        return pi.clamp(min=self.min_prob) if self.min_prob > 0 else pi

    def reset(self) -> None:
        """Forget the cached weights (called at the start of every forward pass of the top model)."""
        self._cache = None

    def probs(self) -> torch.Tensor:
        """The mixture weights of the current forward pass (noisy in training mode), computed once per pass."""
        if self._cache is None:
            noise = None
            if self.training and self.noise_std > 0:
                noise = self.noise_std * torch.rand(self.weight.shape, dtype=self.weight.dtype).to(self.weight.device)
            self._cache = self.mixture(noise=noise)
        return self._cache

    def fednl_param_groups(self) -> dict[str, str]:
        return {"weight": "router"}


class FloralLinear(nn.Module):
    """A frozen ``nn.Linear`` plus C stacked low-rank adaptors with biases, mixed by a shared router."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, router: FloralRouter, *, seed: int, name: str,
                 trainable: bool = True):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"FloralLinear wraps an nn.Linear, got {type(base).__name__}")
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        C = router.n_adaptors
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scale, self.n_adaptors = int(r), float(alpha), float(alpha) / int(r), C
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        w = base.weight
        bound = 1.0 / self.in_features ** 0.5
        a = torch.empty(C, self.r, self.in_features, dtype=torch.float64)
        for c in range(C):
            gen = named_generator(seed, name if c == 0 else f"{name}/floral{c}")
            a[c].uniform_(-bound, bound, generator=gen)
        kw = {"device": w.device, "dtype": w.dtype}
        self.lora_A = nn.Parameter(a.to(**kw), requires_grad=trainable)
        self.lora_B = nn.Parameter(torch.zeros(C, self.out_features, self.r, **kw), requires_grad=trainable)
        self.lora_bias = nn.Parameter(torch.zeros(C, self.out_features, **kw), requires_grad=trainable)
        object.__setattr__(self, "_router", router)  # registered once, on the top model

    def adaptor_out(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Fast path: ``Σ_c p_c (B_c A_c x + b_c)`` with two batched contractions over the C adaptors."""
        p = p.to(x.dtype)
        u = torch.einsum("...i,cri->...cr", x, self.lora_A) * p[:, None]  # [..., C, r]
        return torch.einsum("...cr,cor->...o", u, self.lora_B) + p @ self.lora_bias

    def adaptor_out_reference(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Readable reference: one adaptor at a time."""
        out = torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device)
        for c in range(self.n_adaptors):
            out = out + p[c].to(x.dtype) * F.linear(F.linear(x, self.lora_A[c]), self.lora_B[c], self.lora_bias[c])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * self.adaptor_out(x, self._router.probs())

    def fednl_param_groups(self) -> dict[str, str]:
        return {"lora_A": "lora", "lora_B": "lora", "lora_bias": "lora"}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, C={self.n_adaptors}"


def _reset_router(module: nn.Module, args: object) -> None:
    """Forward pre-hook: start a new pass of the router the module points to (survives ``copy.deepcopy``)."""
    module.__dict__["_floral_router"].reset()


def inject_floral(model: nn.Module, lora_cfg: LoraConfig, seed: int, n_adaptors: int = DEFAULT_ADAPTORS) -> list[str]:
    """Add the router (``model.floral_router``) and wrap every target linear in a :class:`FloralLinear`."""
    if hasattr(model, ROUTER_NAME):
        raise ValueError("model already has a FLoRAL router; inject_floral must be called once")
    w = next(iter(model.parameters()))
    router = FloralRouter(n_adaptors, device=w.device, dtype=w.dtype)
    setattr(model, ROUTER_NAME, router)
    # A new forward pass starts at the input embedding, whichever module the caller enters through (the top model,
    # or its body when the trainer applies the head itself): reset the router's per-pass cache there.
    get_emb = getattr(model, "get_input_embeddings", None)
    entry = get_emb() if callable(get_emb) else None
    if not isinstance(entry, nn.Module):
        raise ValueError(f"FLoRAL needs a model with get_input_embeddings(); got {type(model).__name__}")
    for mod in (entry, model):
        object.__setattr__(mod, "_floral_router", router)  # a plain reference, not a registered submodule
        mod.register_forward_pre_hook(_reset_router)

    def factory(linear: nn.Linear, qual: str) -> nn.Module:
        return FloralLinear(linear, lora_cfg.r, lora_cfg.alpha, router, seed=seed, name=qual,
                            trainable=lora_cfg.trainable)

    return inject_lora(model, lora_cfg.target_names(), factory=factory)


def floral_modules(model: nn.Module) -> dict[str, FloralLinear]:
    """Qualified name -> :class:`FloralLinear` of every adapted module."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FloralLinear)}


def build_floral(backbone: nn.Module, memory_cfg: MemoryConfig, lora_cfg: LoraConfig, seed: int, *,
                 n_adaptors: int = DEFAULT_ADAPTORS) -> nn.Module:
    """Plain backbone + FLoRAL adaptors (C = ``n_adaptors``) on ``lora_cfg.targets`` (``memory_cfg`` unused)."""
    del memory_cfg
    inject_floral(backbone, lora_cfg, seed, int(n_adaptors))
    return backbone


register_model_kind("floral", build_floral)
