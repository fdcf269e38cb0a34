"""Streaming: feeding a long sequence token by token / chunk by chunk equals the full-sequence op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fednl.memory import assert_close, delta_rule, hebbian, memory_step

pytestmark = pytest.mark.usefixtures("one_thread")


F64 = torch.float64


def inputs(T: int, *, seed: int = 0, dtype: torch.dtype = F64):
    gen = torch.Generator().manual_seed(seed)
    B, H, D = 2, 2, 8
    q = torch.randn(B, T, H, D, generator=gen, dtype=F64)
    k = F.normalize(torch.randn(B, T, H, D, generator=gen, dtype=F64), dim=-1)
    v = torch.randn(B, T, H, D, generator=gen, dtype=F64)
    beta = torch.rand(B, T, H, generator=gen, dtype=F64) * 0.98 + 0.01
    g = -torch.rand(B, T, H, generator=gen, dtype=F64) * 0.2
    s0 = torch.randn(B, H, D, D, generator=gen, dtype=F64)
    return tuple(x.to(dtype) for x in (q, k, v, beta, g, s0))


def stream(rule: str, q, k, v, beta, g, state, sizes: list[int]):
    outs, t = [], 0
    for size in sizes:
        sl = slice(t, t + size)
        o, state = memory_step(q[:, sl], k[:, sl], v[:, sl], beta[:, sl], state,
                               g=None if g is None else g[:, sl], rule=rule)  # fmt: skip
        outs.append(o)
        t += size
    assert t == q.shape[1]
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("rule", ["delta", "hebbian"])
@pytest.mark.parametrize("decay", [False, True], ids=["nodecay", "decay"])
@pytest.mark.parametrize("init", [False, True], ids=["zero0", "init0"])
def test_token_by_token_equals_full_sequence(rule: str, decay: bool, init: bool) -> None:
    T = 200
    q, k, v, beta, g, s0 = inputs(T)
    g = g if decay else None
    s0 = s0 if init else None
    fn = delta_rule if rule == "delta" else hebbian
    o_full, s_full = fn(q, k, v, beta, g=g, initial_state=s0)
    o_str, s_str = stream(rule, q, k, v, beta, g, s0, [1] * T)
    assert_close(f"{rule} stream o", o_full, o_str, 1e-10)
    assert_close(f"{rule} stream S", s_full, s_str, 1e-10)


@pytest.mark.parametrize("rule", ["delta", "hebbian"])
def test_irregular_chunks_equal_full_sequence(rule: str) -> None:
    sizes = [1, 5, 17, 64, 3, 100, 2, 8]  # one step longer than the internal chunk of 64
    T = sum(sizes)
    q, k, v, beta, g, s0 = inputs(T, seed=1)
    fn = delta_rule if rule == "delta" else hebbian
    o_full, s_full = fn(q, k, v, beta, g=g, initial_state=s0, mode="recurrent")
    o_str, s_str = stream(rule, q, k, v, beta, g, s0, sizes)
    assert_close(f"{rule} chunked stream o", o_full, o_str, 1e-10)
    assert_close(f"{rule} chunked stream S", s_full, s_str, 1e-10)


def test_long_stream_float32_stays_close_to_full_op() -> None:
    T = 2048
    q, k, v, beta, g, s0 = inputs(T, seed=2, dtype=torch.float32)
    o_full, s_full = delta_rule(q, k, v, beta, g=g, initial_state=s0)
    o_str, s_str = stream("delta", q, k, v, beta, g, s0, [32] * (T // 32))
    assert_close("float32 stream o", o_full, o_str, 1e-4)
    assert_close("float32 stream S", s_full, s_str, 1e-4)


def test_state_none_is_zeros_and_state_keeps_its_shape() -> None:
    q, k, v, beta, g, s0 = inputs(4)
    o_none, s_none = memory_step(q, k, v, beta, None, g=g)
    o_zero, s_zero = memory_step(q, k, v, beta, torch.zeros_like(s0), g=g)
    torch.testing.assert_close(o_none, o_zero, rtol=0, atol=0)
    torch.testing.assert_close(s_none, s_zero, rtol=0, atol=0)
    assert s_none.shape == s0.shape and o_none.shape == v.shape


def test_gradients_flow_through_streamed_steps() -> None:
    # BPTT across step boundaries: gradients of the streamed run equal those of the full op.
    q, k, v, beta, g, s0 = inputs(30, seed=3)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, beta, g, s0)]
    o_full, s_full = delta_rule(*leaves[:4], g=leaves[4], initial_state=leaves[5])
    grads_full = torch.autograd.grad(o_full.square().sum() + s_full.sum(), leaves)
    o_str, s_str = stream("delta", *leaves, [7, 1, 12, 10])
    grads_str = torch.autograd.grad(o_str.square().sum() + s_str.sum(), leaves)
    for name, a, b in zip(["q", "k", "v", "beta", "g", "state"], grads_full, grads_str, strict=True):
        assert_close(f"d{name}", a, b, 1e-10)


def test_memory_step_rejects_bad_state_and_rule() -> None:
    q, k, v, beta, g, s0 = inputs(3)
    with pytest.raises(ValueError, match=r"state must have shape \[B, H, Dk, Dv\]"):
        memory_step(q, k, v, beta, s0[:, :1])
    with pytest.raises(ValueError, match="unknown memory rule 'oja'"):
        memory_step(q, k, v, beta, s0, rule="oja")
