"""Optional dispatch to the fla (flash-linear-attention) Triton chunk kernels on CUDA.

Assumed fla signatures (fla-core 0.6, ``fla/ops/{delta_rule,gated_delta_rule}/chunk.py``), always called with
keywords so the different positional order of ``g`` and ``beta`` cannot bite::

    chunk_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False, ...)
    chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, ...)

Both take ``[B, T, H, D]`` inputs, ``beta``/``g`` ``[B, T, H]`` with ``g`` a log-decay, scale ``Dk ** -0.5`` by
default applied to q, state ``[B, H, Dk, Dv]``, and read the output after the update: the semantics of
:mod:`fednl.memory.reference`. The kernels reject float32 inputs, so fla is used only for float16/bfloat16;
the state is passed in float32 (fla keeps its state in float32) and returned in the input dtype.

Policy: ``use_fla=None`` (auto) uses fla when q is on CUDA, the dtype is float16/bfloat16, the rule is the
delta rule, ``mode="chunk"`` and ``fla`` imports. ``use_fla=False`` never uses it; ``use_fla=True`` requires
it and raises a ValueError saying why when it cannot be used. The environment variable ``FEDNL_USE_FLA``
(``0``/``false``/``off`` or ``1``/``true``/``on``; unset or ``auto`` = auto) gives the default for ``use_fla``.
The Hebbian rule always runs on the pure-torch chunk path (on CUDA too).
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from types import ModuleType

import torch

ENV_VAR = "FEDNL_USE_FLA"
FLA_DTYPES = (torch.float16, torch.bfloat16)
_OFF = {"0", "false", "off", "no"}
_ON = {"1", "true", "on", "yes"}


@functools.cache
def _import_fla_ops() -> tuple[ModuleType, ModuleType] | None:
    try:
        return (
            importlib.import_module("fla.ops.delta_rule"),
            importlib.import_module("fla.ops.gated_delta_rule"),
        )
    except Exception:  # noqa: BLE001 - fla without triton raises ModuleNotFoundError, broken installs others
        return None


def fla_available() -> bool:
    """True when fla's delta-rule chunk kernels import (needs fla-core with triton, i.e. a CUDA machine)."""
    return _import_fla_ops() is not None


def env_use_fla() -> bool | None:
    """The default for ``use_fla`` from ``FEDNL_USE_FLA``: None (auto), False or True."""
    raw = os.environ.get(ENV_VAR, "").strip().lower()
    if raw in ("", "auto"):
        return None
    if raw in _OFF:
        return False
    if raw in _ON:
        return True
    raise ValueError(f"environment variable {ENV_VAR}={raw!r} is not understood; use 0, 1 or auto")


def fla_blocker(*, is_cuda: bool, dtype: torch.dtype, rule: str, mode: str, available: bool) -> str | None:
    """Why fla cannot run this call, or None when it can."""
    if rule != "delta":
        return f"fla dispatch covers only the delta rule, not {rule!r}"
    if mode != "chunk":
        return f"fla dispatch covers only mode='chunk', not {mode!r}"
    if not is_cuda:
        return "fla kernels need the inputs on a CUDA device"
    if dtype not in FLA_DTYPES:
        return f"fla chunk kernels need float16 or bfloat16 inputs; got {dtype}"
    if not available:
        return "fla is not importable (install the 'cuda' extra: fla-core with triton)"
    return None


def decide_use_fla(
    use_fla: bool | None, *, is_cuda: bool, dtype: torch.dtype, rule: str, mode: str, available: bool
) -> bool:
    """Apply the dispatch policy (see the module docstring)."""
    source = "use_fla=True"
    if use_fla is None:
        use_fla = env_use_fla()
        source = f"{ENV_VAR} forces fla"
    if use_fla is False:
        return False
    blocker = fla_blocker(is_cuda=is_cuda, dtype=dtype, rule=rule, mode=mode, available=available)
    if use_fla is None:
        return blocker is None
    if blocker is not None:
        raise ValueError(f"{source} but {blocker}")
    return True


def fla_functions() -> tuple[Callable[..., tuple], Callable[..., tuple]]:
    """``(chunk_delta_rule, chunk_gated_delta_rule)`` from fla; ValueError when fla does not import."""
    mods = _import_fla_ops()
    if mods is None:
        raise ValueError("fla is not importable (install the 'cuda' extra: fla-core with triton)")
    return mods[0].chunk_delta_rule, mods[1].chunk_gated_delta_rule


def fla_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    g: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    functions: tuple[Callable[..., tuple], Callable[..., tuple]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run fla's chunk kernel with our conventions. ``functions`` overrides :func:`fla_functions` (tests)."""
    chunk_delta_rule, chunk_gated_delta_rule = functions or fla_functions()
    h0 = None if initial_state is None else initial_state.float()
    if g is None:
        o, s_t = chunk_delta_rule(
            q=q, k=k, v=v, beta=beta, scale=scale, initial_state=h0, output_final_state=output_final_state
        )
    else:
        o, s_t = chunk_gated_delta_rule(
            q=q, k=k, v=v, g=g.float(), beta=beta, scale=scale, initial_state=h0,
            output_final_state=output_final_state,
        )  # fmt: skip
    o = o.to(q.dtype)
    if not output_final_state:
        return o, None
    return o, s_t.to(q.dtype)
