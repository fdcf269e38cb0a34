"""Chunkwise-parallel form of the (gated) delta rule and of the Hebbian update, in pure torch.

Split the sequence into N chunks of C tokens. Inside a chunk, with chunk-start state ``S0``, positions
``i = 1..C``, cumulative log-decay ``G_i = g_1 + ... + g_i`` and ``D_ij = exp(G_i - G_j)`` (j <= i)::

    S_i = exp(G_i) S0 + sum_{j<=i} D_ij k_j u_j^T

Delta rule. ``u_i = beta_i (v_i - (a_i S_{i-1})^T k_i)``; substituting ``a_i S_{i-1}`` gives the unit lower
triangular system (the WY/UT form)::

    (I + A) U = diag(beta) V - diag(beta * exp(G)) K S0,     A_ij = beta_i D_ij k_i.k_j   (j < i)

so ``U = U0 - W S0`` with ``[U0 | W] = (I + A)^{-1} [diag(beta) V | diag(beta exp(G)) K]`` (one batched
triangular solve for all chunks). Hebbian: ``U = diag(beta) V`` and ``W = 0``.

Outputs and the state handed to the next chunk, with ``P = scale * tril(Q K^T * D)`` (diagonal included)::

    O      = P U0 + (scale * exp(G) Q - P W) S0
    S_next = (exp(G_C) I - K_d^T W) S0 + K_d^T U0,         K_d = diag(exp(G_C - G)) K

Everything except ``S0`` is computed for all chunks at once on ``[B, H, N, C, D]`` tensors; the only loop is the
cheap state recurrence ``S_{n+1} = M_n S_n + X_n`` (one [Dk, Dk] x [Dk, Dv] product per chunk). A ragged last
chunk is padded with ``k = v = q = 0, beta = 0, g = 0`` tokens, which leave the state unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Low-precision inputs are computed in float32 and cast back (the triangular solve and the decays need it).
_UPCAST = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _chunked(x: torch.Tensor, n_chunks: int, size: int, pad: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, (D)] -> [B, H, N, C, (D)], zero-padded along time."""
    x = x.to(dtype).transpose(1, 2)
    if x.ndim == 4:
        x = F.pad(x, (0, 0, 0, pad))
        return x.reshape(x.shape[0], x.shape[1], n_chunks, size, x.shape[-1])
    x = F.pad(x, (0, pad))
    return x.reshape(x.shape[0], x.shape[1], n_chunks, size)


def chunk_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    g: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    chunk_size: int,
    rule: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise memory op (inputs already validated). Returns ``(o [B,T,H,Dv], S_T [B,H,Dk,Dv])``."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    out_dtype = q.dtype
    dtype = _UPCAST.get(q.dtype, q.dtype)
    S = q.new_zeros(B, H, Dk, Dv, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    if T == 0:
        return v.new_zeros(B, 0, H, Dv), S.to(out_dtype)

    C = min(chunk_size, T)
    N = -(-T // C)
    pad = N * C - T
    qc, kc, vc = (_chunked(x, N, C, pad, dtype) for x in (q, k, v))  # [B, H, N, C, D]
    bc = _chunked(beta, N, C, pad, dtype)  # [B, H, N, C]

    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if g is None:
        decay, decay_q, decay_k, chunk_decay = None, None, None, None
    else:
        G = _chunked(g, N, C, pad, dtype).cumsum(-1)  # [B, H, N, C]
        G_last = G[..., -1:]
        decay_q = G.exp()  # exp(G_i): chunk start -> i
        decay_k = (G_last - G).exp()  # exp(G_C - G_j): j -> chunk end
        chunk_decay = G_last.exp()  # [B, H, N, 1]
        diff = G[..., :, None] - G[..., None, :]
        decay = diff.masked_fill(~causal, float("-inf")).exp()  # D_ij, zero above the diagonal

    q_s = qc * scale
    attn = q_s @ kc.transpose(-1, -2)
    if decay is not None:
        attn = attn * decay
    attn = attn.masked_fill(~causal, 0.0)  # P: [B, H, N, C, C]
    bv = bc[..., None] * vc

    if rule == "delta":
        kk = kc @ kc.transpose(-1, -2)
        if decay is not None:
            kk = kk * decay
        eye = torch.eye(C, dtype=dtype, device=q.device)
        lower = (bc[..., None] * kk).tril(-1) + eye
        bk = bc[..., None] * kc
        if decay_q is not None:
            bk = bk * decay_q[..., None]
        sol = torch.linalg.solve_triangular(lower, torch.cat([bv, bk], -1), upper=False, unitriangular=True)
        u0, w = sol.split([Dv, Dk], dim=-1)
    else:
        u0, w = bv, None

    q_in = q_s if decay_q is None else q_s * decay_q[..., None]
    k_out = kc if decay_k is None else kc * decay_k[..., None]
    k_out_t = k_out.transpose(-1, -2)  # [B, H, N, Dk, C]
    x = k_out_t @ u0  # state increment of each chunk from a zero start: [B, H, N, Dk, Dv]
    o_intra = attn @ u0

    if w is not None:
        q_in = q_in - attn @ w
        eye_k = torch.eye(Dk, dtype=dtype, device=q.device)
        diag = eye_k if chunk_decay is None else chunk_decay[..., None] * eye_k
        trans = diag - k_out_t @ w  # M_n: [B, H, N, Dk, Dk]
        starts = []
        for m_n, x_n in zip(trans.unbind(2), x.unbind(2), strict=True):
            starts.append(S)
            S = m_n @ S + x_n
        s_start = torch.stack(starts, dim=2)
    elif chunk_decay is not None:
        starts = []
        for a_n, x_n in zip(chunk_decay[..., None].unbind(2), x.unbind(2), strict=True):
            starts.append(S)
            S = a_n * S + x_n
        s_start = torch.stack(starts, dim=2)
    else:  # undecayed Hebbian: the chunk-start states are a prefix sum
        csum = x.cumsum(dim=2)
        s_start = torch.cat([torch.zeros_like(x[:, :, :1]), csum[:, :, :-1]], dim=2) + S[:, :, None]
        S = S + csum[:, :, -1]

    o = o_intra + q_in @ s_start  # [B, H, N, C, Dv]
    o = o.reshape(B, H, N * C, Dv)[:, :, :T].transpose(1, 2)
    return o.to(out_dtype), S.to(out_dtype)
