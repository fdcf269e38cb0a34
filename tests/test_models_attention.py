"""Softmax attention of the converted layer: fast path (sdpa) vs the explicit reference and a brute-force loop."""

from __future__ import annotations

import pytest
import torch

from fednl.models.attention import apply_rope, attention_reference, band_mask, rotate_half, softmax_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def _qkv(B=2, H=4, Hkv=2, T=11, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(B, h, T, D, dtype=torch.float64, generator=g).requires_grad_(True)  # noqa: E731
    return mk(H), mk(Hkv), mk(Hkv)


def _brute_force(q, k, v, scale, window):
    """Per query: softmax over exactly the keys in its window, written as loops."""
    B, H, T, D = q.shape
    n_rep = H // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                lo = 0 if window is None else max(0, i - window + 1)
                keys, vals = k[b, h // n_rep, lo : i + 1], v[b, h // n_rep, lo : i + 1]
                w = torch.softmax(keys @ q[b, h, i] * scale, dim=0)
                out[b, h, i] = w @ vals
    return out


def test_band_mask_by_hand():
    m = band_mask(torch.arange(5), torch.arange(5), 2)
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]])
    assert torch.equal(m.int(), expected)
    assert torch.equal(band_mask(torch.arange(4), torch.arange(4), None), torch.ones(4, 4).tril().bool())
    # streaming: queries 10..11 against keys 8..11 with window 3 (query 10 sees 8, 9, 10)
    assert band_mask(torch.arange(10, 12), torch.arange(8, 12), 3).int().tolist() == [[1, 1, 1, 0], [0, 1, 1, 1]]


@pytest.mark.parametrize("window", [None, 1, 3, 11, 50])
def test_fast_path_matches_reference_and_brute_force_values_and_grads(window):
    q, k, v = _qkv()
    scale = 8**-0.5
    pos = torch.arange(11)
    mask = band_mask(pos, pos, window)
    fast = softmax_attention(q, k, v, scale=scale, mask=mask)
    ref = attention_reference(q, k, v, scale=scale, mask=mask)
    brute = _brute_force(q, k, v, scale, window)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref, brute, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(fast)
    grads_fast = torch.autograd.grad((fast * w).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((brute * w).sum(), (q, k, v))
    for a, b in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_window_at_least_T_equals_full_causal_and_smaller_differs():
    q, k, v = _qkv(T=9)
    pos = torch.arange(9)
    full = softmax_attention(q, k, v, scale=0.3, causal=True)
    torch.testing.assert_close(softmax_attention(q, k, v, scale=0.3, mask=band_mask(pos, pos, 9)), full)
    assert (softmax_attention(q, k, v, scale=0.3, mask=band_mask(pos, pos, 4)) - full).abs().max() > 1e-3


def test_empty_rows_give_zeros_not_nan():
    q, k, v = _qkv(T=4)
    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    mask[2] = False
    out = softmax_attention(q, k, v, scale=1.0, mask=mask)
    assert torch.isfinite(out).all() and out[:, :, 2].abs().max() == 0
    torch.testing.assert_close(out, attention_reference(q, k, v, scale=1.0, mask=mask))
    with pytest.raises(ValueError, match="either a mask or causal"):
        softmax_attention(q, k, v, scale=1.0, mask=mask, causal=True)


def test_rope_is_a_rotation_with_relative_scores():
    """RoPE keeps norms and makes q·k depend only on the position difference (HF's rotate_half convention)."""
    D = 8
    inv = 1.0 / (100.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))

    def cs(p):
        f = torch.tensor([[float(p)]], dtype=torch.float64)[..., None] * inv
        e = torch.cat([f, f], -1)
        return e.cos(), e.sin()

    x = torch.randn(1, 1, 1, D, dtype=torch.float64)
    y = torch.randn(1, 1, 1, D, dtype=torch.float64)
    assert torch.allclose(apply_rope(x, *cs(7)).norm(), x.norm())
    s1 = (apply_rope(x, *cs(10)) * apply_rope(y, *cs(4))).sum()
    s2 = (apply_rope(x, *cs(106)) * apply_rope(y, *cs(100))).sum()
    torch.testing.assert_close(s1, s2)
    assert torch.equal(rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.tensor([-3.0, -4.0, 1.0, 2.0]))
