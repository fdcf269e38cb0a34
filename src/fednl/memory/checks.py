"""Input validation for the memory ops: every bad input gets a ValueError that names the tensor and the problem.

Accepted value ranges (checked on the values, so they cost one small reduction per tensor):

* ``beta`` must lie in ``[0, 2]``. The contract asks for (0, 1) (a sigmoid), but the whole range [0, 2] keeps
  the per-token transition ``I - beta k k^T`` non-expansive for unit-norm keys (eigenvalue ``1 - beta`` in
  [-1, 1]), which DeltaNet variants with negative eigenvalues use; outside it the memory can blow up.
* ``g`` (log-decay) must be finite and ``<= 0`` (decay ``exp(g)`` in (0, 1]). ``-inf`` (a full reset) is
  rejected because the chunk form subtracts cumulative log-decays and ``-inf - -inf`` is undefined.
"""

from __future__ import annotations

import math
import numbers

import torch

MODES = ("chunk", "recurrent")
RULES = ("delta", "hebbian")
BETA_MAX = 2.0


def _require_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")
    return x


def _shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def check_tensors(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    state: torch.Tensor | None,
    *,
    state_name: str = "initial_state",
) -> tuple[int, int, int, int, int]:
    """Check ranks, shapes, dtypes, devices and values. Returns ``(B, T, H, Dk, Dv)``."""
    _require_tensor("q", q)
    if q.ndim != 4:
        raise ValueError(f"q must have shape [B, T, H, Dk] (4 dims); got shape {_shape(q)}")
    B, T, H, Dk = q.shape
    if Dk < 1:
        raise ValueError(f"q must have a head dim Dk >= 1; got shape {_shape(q)}")
    named: list[tuple[str, torch.Tensor]] = [("q", q)]

    _require_tensor("k", k)
    if _shape(k) != (B, T, H, Dk):
        raise ValueError(f"k must have shape [B, T, H, Dk] = {(B, T, H, Dk)} like q; got shape {_shape(k)}")
    named.append(("k", k))

    _require_tensor("v", v)
    if v.ndim != 4 or _shape(v)[:3] != (B, T, H) or v.shape[3] < 1:
        raise ValueError(f"v must have shape [B, T, H, Dv] = {(B, T, H)} + (Dv,) with Dv >= 1; got shape {_shape(v)}")
    Dv = v.shape[3]
    named.append(("v", v))

    _require_tensor("beta", beta)
    if _shape(beta) != (B, T, H):
        raise ValueError(f"beta must have shape [B, T, H] = {(B, T, H)}; got shape {_shape(beta)}")
    named.append(("beta", beta))

    if g is not None:
        _require_tensor("g", g)
        if _shape(g) != (B, T, H):
            raise ValueError(f"g must have shape [B, T, H] = {(B, T, H)}; got shape {_shape(g)}")
        named.append(("g", g))

    if state is not None:
        _require_tensor(state_name, state)
        if _shape(state) != (B, H, Dk, Dv):
            raise ValueError(
                f"{state_name} must have shape [B, H, Dk, Dv] = {(B, H, Dk, Dv)}; got shape {_shape(state)}"
            )
        named.append((state_name, state))

    for name, x in named[1:]:
        if x.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but q has {q.dtype}; all inputs must share one dtype")
        if x.device != q.device:
            raise ValueError(f"{name} is on device {x.device} but q is on {q.device}; all inputs must share one device")

    _check_values(beta, g)
    return B, T, H, Dk, Dv


def _check_values(beta: torch.Tensor, g: torch.Tensor | None) -> None:
    if beta.numel() > 0:
        lo, hi = (float(x) for x in torch.aminmax(beta.detach()))
        if not (lo >= 0.0 and hi <= BETA_MAX):  # written so that NaN fails too
            raise ValueError(f"beta must lie in [0, {BETA_MAX:g}] (usually (0, 1)); got values in [{lo:g}, {hi:g}]")
    if g is not None and g.numel() > 0:
        lo, hi = (float(x) for x in torch.aminmax(g.detach()))
        if not (hi <= 0.0 and math.isfinite(lo)):
            raise ValueError(
                f"g is a log-decay and must be finite and <= 0 (decay exp(g) in (0, 1]); got values in [{lo:g}, {hi:g}]"
            )


def check_options(*, mode: str, chunk_size: object, scale: object, rule: str) -> None:
    """Check the non-tensor arguments."""
    if rule not in RULES:
        raise ValueError(f"unknown memory rule {rule!r}; expected one of {RULES}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1; got {chunk_size!r}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float(scale)):
            raise ValueError(f"scale must be a finite real number or None (= Dk ** -0.5); got {scale!r}")
