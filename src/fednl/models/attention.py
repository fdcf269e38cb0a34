"""Softmax attention pieces of the converted layer: RoPE, causal / sliding-window masks, and attention itself.

Layout ``[B, H, T, D]`` (HF's). Window semantics: with ``window = W`` a query at absolute position ``p`` sees the
keys at positions ``p - W + 1 .. p`` (the ``W`` most recent tokens, itself included) and, with ``sinks = N``, also
the first ``N`` tokens of the stream (positions ``0 .. N - 1``, StreamingLLM's "attention sinks").

:func:`softmax_attention` (``scaled_dot_product_attention``) is the fast path; :func:`attention_reference` is
the readable explicit-softmax reference it is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` ``[B, H, T, D]`` with ``cos``/``sin`` ``[B, T, D]`` (as HF's rotary module gives)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def band_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, sinks: int = 0
) -> torch.Tensor:
    """Boolean ``[Tq, Tk]`` mask, True where query position ``q_pos[i]`` may attend key position ``k_pos[j]``:
    causal (``k <= q``) and, with a window, ``k > q - window`` or ``k < sinks`` (the sink tokens)."""
    diff = q_pos[:, None] - k_pos[None, :]
    causal = diff >= 0
    if window is None:
        return causal
    allowed = causal & (diff < window)
    if sinks > 0:
        allowed = allowed | (causal & (k_pos[None, :] < sinks))
    return allowed


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, Hkv, T, D] -> [B, Hkv * n_rep, T, D]``; query head ``h`` uses key/value head ``h // n_rep``."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Fast path. ``q`` ``[B, H, Tq, D]``, ``k``/``v`` ``[B, Hkv, Tk, D]`` (GQA), ``mask`` boolean broadcastable to
    ``[B, H, Tq, Tk]`` (True = attend) or ``causal=True`` (no mask, ``Tq == Tk``). ``dropout`` on the attention
    weights (training only; HF's ``attention_dropout``). Returns ``[B, H, Tq, D]``.

    Rows whose mask is all False (padding queries) return zeros instead of NaN.
    """
    if mask is not None and causal:
        raise ValueError("give either a mask or causal=True, not both")
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, dropout_p=dropout)
    empty = ~mask.any(dim=-1, keepdim=True)  # [.., Tq, 1]
    if bool(empty.any()):
        mask = mask | empty  # let empty rows attend somewhere, then zero them
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout)
        return out.masked_fill(empty, 0.0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Readable reference: ``softmax(scale * q k^T masked to -inf) v``, GQA by repeating heads, empty rows -> 0."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    weights = torch.nan_to_num(weights, nan=0.0)  # all-masked rows
    return torch.matmul(weights, v)
