"""Token-by-token reference of the (gated) delta rule and the Hebbian update.

This file is the *specification* of the memory op: every fast path (chunkwise WY form, streaming step,
fla CUDA kernels) is tested against it on values and gradients.

Conventions (identical to fla's current kernels):
    q, k: [B, T, H, Dk]   v: [B, T, H, Dv]   beta: [B, T, H]   g (log-decay, <= 0): [B, T, H]
    state S: [B, H, Dk, Dv]   (S maps a key to a value: v_hat = S^T k)
    delta rule:   S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T,   a_t = exp(g_t)  (a_t = 1 without g)
    hebbian:      S_t = a_t S_{t-1} + beta_t k_t v_t^T
    output:       o_t = scale * S_t^T q_t      (read *after* the update of step t)
"""

from __future__ import annotations

import torch


def recurrent_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    scale: float,
    initial_state: torch.Tensor | None = None,
    rule: str = "delta",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the memory update one token at a time. Returns ``(o [B,T,H,Dv], S_T [B,H,Dk,Dv])``."""
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    S = q.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state.to(q.dtype)
    outputs = []
    for t in range(T):
        k_t, v_t, q_t = k[:, t], v[:, t], q[:, t]  # [B, H, D]
        b_t = beta[:, t, :, None]  # [B, H, 1]
        if g is not None:
            S = S * g[:, t].exp()[:, :, None, None]  # forget: a_t S_{t-1}
        if rule == "delta":
            v_old = torch.einsum("bhkv,bhk->bhv", S, k_t)  # what the memory currently returns for k_t
            write = b_t * (v_t - v_old)  # one gradient step on 1/2 ||S^T k - v||^2
        elif rule == "hebbian":
            write = b_t * v_t
        else:
            raise ValueError(f"unknown memory rule {rule!r}; expected 'delta' or 'hebbian'")
        S = S + torch.einsum("bhk,bhv->bhkv", k_t, write)
        outputs.append(scale * torch.einsum("bhkv,bhk->bhv", S, q_t))
    if not outputs:  # T == 0: nothing to read, the state is unchanged
        return v.new_zeros(B, 0, H, Dv), S
    return torch.stack(outputs, dim=1), S
