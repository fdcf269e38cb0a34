"""Public memory ops: ``delta_rule``, ``hebbian`` and the streaming ``memory_step``.

Conventions (fla's): q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]``, beta and g ``[B, T, H]``, state
``[B, H, Dk, Dv]``; ``scale`` defaults to ``Dk ** -0.5`` and multiplies q; ``o_t = scale * S_t^T q_t`` is read
after the update of step t. See :mod:`fednl.memory.reference` for the specification and
:mod:`fednl.memory.checks` for the accepted ranges.
"""

from __future__ import annotations

import torch

from fednl.memory.checks import check_options, check_tensors
from fednl.memory.chunk import chunk_memory
from fednl.memory.fla_backend import decide_use_fla, env_use_fla, fla_available, fla_delta_rule
from fednl.memory.reference import recurrent_reference

STREAM_CHUNK = 64  # chunk size memory_step uses for a multi-token step


def _memory(
    rule: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    g: torch.Tensor | None,
    scale: float | None,
    initial_state: torch.Tensor | None,
    mode: str,
    chunk_size: int,
    output_final_state: bool,
    use_fla: bool | None,
    state_name: str = "initial_state",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    check_options(mode=mode, chunk_size=chunk_size, scale=scale, rule=rule)
    _, _, _, Dk, _ = check_tensors(q, k, v, beta, g, initial_state, state_name=state_name)
    scale = Dk**-0.5 if scale is None else float(scale)

    available = fla_available() if (use_fla is not False and q.is_cuda) else False
    # An empty sequence never reaches a kernel: the torch paths return the initial state.
    if q.shape[1] > 0 and decide_use_fla(
        use_fla, is_cuda=q.is_cuda, dtype=q.dtype, rule=rule, mode=mode, available=available
    ):
        return fla_delta_rule(
            q, k, v, beta, g=g, scale=scale, initial_state=initial_state, output_final_state=output_final_state
        )
    if mode == "recurrent":
        o, s_t = recurrent_reference(q, k, v, beta, g=g, scale=scale, initial_state=initial_state, rule=rule)
    else:
        o, s_t = chunk_memory(
            q, k, v, beta, g=g, scale=scale, initial_state=initial_state, chunk_size=int(chunk_size), rule=rule
        )
    return o, (s_t if output_final_state else None)


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    mode: str = "chunk",
    chunk_size: int = 64,
    output_final_state: bool = True,
    use_fla: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Gated) delta rule ``S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T``, ``a_t = exp(g_t)``.

    Parameters
    ----------
    q, k, v : ``[B, T, H, Dk]``, ``[B, T, H, Dk]``, ``[B, T, H, Dv]`` floating tensors of one dtype and device.
    beta : ``[B, T, H]`` write strength, values in [0, 2] (normally (0, 1)).
    g : optional ``[B, T, H]`` log-decay, finite and <= 0; None = no decay.
    scale : multiplies q; default ``Dk ** -0.5``.
    initial_state : optional ``[B, H, Dk, Dv]`` state before the first token (default zeros).
    mode : ``"chunk"`` (chunkwise-parallel WY form, the fast path) or ``"recurrent"`` (token by token, the spec).
    chunk_size : tokens per chunk in chunk mode (any T; the last chunk may be shorter). The fla kernels use
        their own fixed chunk; the result is the same up to rounding.
    output_final_state : return ``S_T`` (else None).
    use_fla : None = auto (fla Triton kernels for float16/bfloat16 CUDA inputs when importable), False = never,
        True = required (ValueError when impossible). Default from the env var ``FEDNL_USE_FLA``.

    Returns
    -------
    ``(o [B, T, H, Dv], S_T [B, H, Dk, Dv] or None)``, both in the input dtype.
    """
    return _memory(
        "delta", q, k, v, beta, g=g, scale=scale, initial_state=initial_state, mode=mode, chunk_size=chunk_size,
        output_final_state=output_final_state, use_fla=use_fla,
    )  # fmt: skip


def hebbian(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    mode: str = "chunk",
    chunk_size: int = 64,
    output_final_state: bool = True,
    use_fla: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hebbian (plain linear-attention) update ``S_t = a_t S_{t-1} + beta_t k_t v_t^T``, the paper's ablation.

    Same arguments and returns as :func:`delta_rule`. There is no fla kernel behind it: ``use_fla=True``
    raises, auto always runs the pure-torch path.
    """
    return _memory(
        "hebbian", q, k, v, beta, g=g, scale=scale, initial_state=initial_state, mode=mode, chunk_size=chunk_size,
        output_final_state=output_final_state, use_fla=use_fla,
    )  # fmt: skip


def memory_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None,
    *,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    rule: str = "delta",
    use_fla: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Streaming step: advance ``state`` over one token or a short chunk ``[B, t, H, D]``.

    Memory is O(t) for the step and O(1) in the length of the stream: only the ``[B, H, Dk, Dv]`` state is
    carried. ``state=None`` starts from zeros. A single token runs the recurrent update; a longer step runs
    the chunk form (chunks of 64); when fla is forced (``use_fla=True`` or ``FEDNL_USE_FLA=1``) every step
    runs the chunk form. Feeding a sequence piece by piece gives the full-sequence op's outputs and
    final state. Returns ``(o [B, t, H, Dv], new_state [B, H, Dk, Dv])``.
    """
    if rule not in ("delta", "hebbian"):
        raise ValueError(f"unknown memory rule {rule!r}; expected one of ('delta', 'hebbian')")
    t = q.shape[1] if isinstance(q, torch.Tensor) and q.ndim == 4 else 0
    fla_forced = (use_fla if use_fla is not None else env_use_fla()) is True
    mode = "recurrent" if t == 1 and not fla_forced else "chunk"
    o, new_state = _memory(
        rule, q, k, v, beta, g=g, scale=scale, initial_state=state, mode=mode, chunk_size=STREAM_CHUNK,
        output_final_state=True, use_fla=use_fla, state_name="state",
    )  # fmt: skip
    if new_state is None:  # output_final_state=True above always returns a state
        raise RuntimeError("memory op returned no final state")
    return o, new_state
