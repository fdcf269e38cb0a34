"""The maths of the memory rules: hand-computed examples and invariances, in every mode."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fednl.memory import assert_close, delta_rule, hebbian, memory_step

pytestmark = pytest.mark.usefixtures("one_thread")


F64 = torch.float64


def run_all_modes(rule: str, q, k, v, beta, *, g=None, scale=None, initial_state=None):
    """(o, S_T) from recurrent, chunk (C=1 and C=2) and streaming one token at a time."""
    fn = delta_rule if rule == "delta" else hebbian
    results = {
        "recurrent": fn(q, k, v, beta, g=g, scale=scale, initial_state=initial_state, mode="recurrent"),
        "chunk1": fn(q, k, v, beta, g=g, scale=scale, initial_state=initial_state, chunk_size=1),
        "chunk2": fn(q, k, v, beta, g=g, scale=scale, initial_state=initial_state, chunk_size=2),
        "chunk64": fn(q, k, v, beta, g=g, scale=scale, initial_state=initial_state),
    }
    state, outs = initial_state, []
    for t in range(q.shape[1]):
        sl = slice(t, t + 1)
        o_t, state = memory_step(q[:, sl], k[:, sl], v[:, sl], beta[:, sl], state,
                                 g=None if g is None else g[:, sl], scale=scale, rule=rule)  # fmt: skip
        outs.append(o_t)
    results["stream"] = (torch.cat(outs, dim=1), state)
    return results


def two_tokens(log_a2: float = 0.0):
    """1 batch, 1 head, D=2: k1=(1,0), k2=(0.6,0.8), v1=(1,2), v2=(0,1), beta=0.5, q1=(1,1), q2=(0,1)."""
    q = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=F64).view(1, 2, 1, 2)
    k = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=F64).view(1, 2, 1, 2)
    v = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=F64).view(1, 2, 1, 2)
    beta = torch.full((1, 2, 1), 0.5, dtype=F64)
    g = torch.tensor([0.0, log_a2], dtype=F64).view(1, 2, 1)
    return q, k, v, beta, g


def expect(rule: str, got: dict, o_expected: list[list[float]], s_expected: list[list[float]]) -> None:
    o_ref = torch.tensor(o_expected, dtype=F64).view(1, 2, 1, 2)
    s_ref = torch.tensor(s_expected, dtype=F64).view(1, 1, 2, 2)
    for mode, (o, s) in got.items():
        torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-12, msg=lambda m, mode=mode: f"{rule}/{mode} o: {m}")
        torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-12, msg=lambda m, mode=mode: f"{rule}/{mode} S: {m}")


def test_delta_rule_by_hand() -> None:
    # S1 = k1 (0.5 (v1 - 0))^T = [[0.5, 1], [0, 0]]
    # S1^T k2 = 0.6 (0.5, 1) = (0.3, 0.6);  write = 0.5 ((0, 1) - (0.3, 0.6)) = (-0.15, 0.2)
    # S2 = S1 + k2 write^T = [[0.5 - 0.09, 1 + 0.12], [-0.12, 0.16]] = [[0.41, 1.12], [-0.12, 0.16]]
    # o1 = S1^T q1 = (0.5, 1);  o2 = S2^T q2 = (-0.12, 0.16)     (scale = 1)
    q, k, v, beta, _ = two_tokens()
    got = run_all_modes("delta", q, k, v, beta, scale=1.0)
    expect("delta", got, [[0.5, 1.0], [-0.12, 0.16]], [[0.41, 1.12], [-0.12, 0.16]])


def test_gated_delta_rule_by_hand() -> None:
    # a2 = 0.5: a2 S1 = [[0.25, 0.5], [0, 0]];  (a2 S1)^T k2 = (0.15, 0.3)
    # write = 0.5 ((0, 1) - (0.15, 0.3)) = (-0.075, 0.35)
    # S2 = a2 S1 + k2 write^T = [[0.25 - 0.045, 0.5 + 0.21], [-0.06, 0.28]] = [[0.205, 0.71], [-0.06, 0.28]]
    q, k, v, beta, g = two_tokens(math.log(0.5))
    got = run_all_modes("delta", q, k, v, beta, g=g, scale=1.0)
    expect("gated delta", got, [[0.5, 1.0], [-0.06, 0.28]], [[0.205, 0.71], [-0.06, 0.28]])


def test_hebbian_by_hand() -> None:
    # S2 = S1 + k2 (0.5 v2)^T = [[0.5, 1], [0, 0]] + [[0, 0.3], [0, 0.4]] = [[0.5, 1.3], [0, 0.4]]
    q, k, v, beta, _ = two_tokens()
    got = run_all_modes("hebbian", q, k, v, beta, scale=1.0)
    expect("hebbian", got, [[0.5, 1.0], [0.0, 0.4]], [[0.5, 1.3], [0.0, 0.4]])
    # with decay a2 = 0.5: S2 = 0.5 S1 + k2 (0.5 v2)^T = [[0.25, 0.8], [0, 0.4]]
    q, k, v, beta, g = two_tokens(math.log(0.5))
    got = run_all_modes("hebbian", q, k, v, beta, g=g, scale=1.0)
    expect("gated hebbian", got, [[0.5, 1.0], [0.0, 0.4]], [[0.25, 0.8], [0.0, 0.4]])


def test_default_scale_is_inverse_sqrt_dk() -> None:
    q, k, v, beta, _ = two_tokens()
    o_default, _ = delta_rule(q, k, v, beta)
    o_one, _ = delta_rule(q, k, v, beta, scale=1.0)
    torch.testing.assert_close(o_default, o_one * 2**-0.5, rtol=0, atol=1e-14)


def random_inputs(T: int, *, D: int = 8, B: int = 2, H: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=gen, dtype=F64)
    k = F.normalize(torch.randn(B, T, H, D, generator=gen, dtype=F64), dim=-1)
    v = torch.randn(B, T, H, D, generator=gen, dtype=F64)
    beta = torch.rand(B, T, H, generator=gen, dtype=F64)
    g = -torch.rand(B, T, H, generator=gen, dtype=F64) * 0.3
    s0 = torch.randn(B, H, D, D, generator=gen, dtype=F64)
    return q, k, v, beta, g, s0


@pytest.mark.parametrize("mode", ["recurrent", "chunk"])
def test_beta_one_with_unit_key_retrieves_last_write_exactly(mode: str) -> None:
    q, k, v, beta, g, s0 = random_inputs(19)
    beta[:, -1] = 1.0
    q[:, -1] = k[:, -1]  # read with the key just written
    o, s_t = delta_rule(q, k, v, beta, g=g, initial_state=s0, scale=1.0, mode=mode, chunk_size=4)
    retrieved = torch.einsum("bhkv,bhk->bhv", s_t, k[:, -1])
    torch.testing.assert_close(retrieved, v[:, -1], rtol=0, atol=1e-12)
    torch.testing.assert_close(o[:, -1], v[:, -1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["recurrent", "chunk"])
def test_orthonormal_keys_with_beta_one_store_every_pair(mode: str) -> None:
    # Writes along orthonormal keys do not interfere: S^T k_i = v_i for all i, starting from any state.
    D = 6
    basis, _ = torch.linalg.qr(torch.randn(D, D, dtype=F64, generator=torch.Generator().manual_seed(3)))
    k = basis.T.reshape(1, D, 1, D)  # token i has key = i-th orthonormal vector
    v = torch.randn(1, D, 1, 4, dtype=F64)
    s0 = torch.randn(1, 1, D, 4, dtype=F64)
    _, s_t = delta_rule(k.clone(), k, v, torch.ones(1, D, 1, dtype=F64), initial_state=s0, mode=mode, chunk_size=4)
    torch.testing.assert_close(torch.einsum("kv,tk->tv", s_t[0, 0], k[0, :, 0]), v[0, :, 0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("rule", ["delta", "hebbian"])
@pytest.mark.parametrize("mode", ["recurrent", "chunk"])
def test_beta_zero_only_decays_the_state(rule: str, mode: str) -> None:
    q, k, v, beta, g, s0 = random_inputs(13)
    fn = delta_rule if rule == "delta" else hebbian
    o, s_t = fn(q, k, v, torch.zeros_like(beta), g=g, initial_state=s0, mode=mode, chunk_size=5)
    decay = g.cumsum(1).exp()  # [B, T, H]
    torch.testing.assert_close(s_t, s0 * decay[:, -1, :, None, None], rtol=0, atol=1e-12)
    expected_o = torch.einsum("bhkv,bthk->bthv", s0, q) * decay[..., None] * 8**-0.5
    torch.testing.assert_close(o, expected_o, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rule", ["delta", "hebbian"])
def test_heads_and_batch_are_independent(rule: str) -> None:
    # Permuting heads (or batch rows) permutes the outputs and states the same way.
    q, k, v, beta, g, s0 = random_inputs(11)
    fn = delta_rule if rule == "delta" else hebbian
    o, s_t = fn(q, k, v, beta, g=g, initial_state=s0, chunk_size=4)
    perm = torch.tensor([2, 0, 1])
    o_p, s_p = fn(q[:, :, perm], k[:, :, perm], v[:, :, perm], beta[:, :, perm], g=g[:, :, perm],
                  initial_state=s0[:, perm], chunk_size=4)  # fmt: skip
    torch.testing.assert_close(o_p, o[:, :, perm], rtol=0, atol=1e-12)
    torch.testing.assert_close(s_p, s_t[:, perm], rtol=0, atol=1e-12)
    o_b, s_b = fn(q[1:], k[1:], v[1:], beta[1:], g=g[1:], initial_state=s0[1:], chunk_size=4)
    torch.testing.assert_close(o_b, o[1:], rtol=0, atol=1e-12)
    torch.testing.assert_close(s_b, s_t[1:], rtol=0, atol=1e-12)


def test_hebbian_is_linear_in_values_and_delta_is_not() -> None:
    q, k, v, beta, g, s0 = random_inputs(9)
    o1, _ = hebbian(q, k, v, beta, g=g)
    o2, _ = hebbian(q, k, 3 * v, beta, g=g)
    torch.testing.assert_close(o2, 3 * o1, rtol=0, atol=1e-12)
    # The delta rule is linear in (v, S0) jointly: scaling both scales the outputs and the state.
    d1, s1 = delta_rule(q, k, v, beta, g=g, initial_state=s0)
    d2, s2 = delta_rule(q, k, 3 * v, beta, g=g, initial_state=3 * s0)
    torch.testing.assert_close(d2, 3 * d1, rtol=0, atol=1e-12)
    torch.testing.assert_close(s2, 3 * s1, rtol=0, atol=1e-12)
    # ... but, unlike Hebbian, rewriting the same (k, v) pair does not keep accumulating.
    kk = k[:, :1].expand(-1, 9, -1, -1)
    vv = v[:, :1].expand(-1, 9, -1, -1)
    ones = torch.ones_like(beta)
    _, s_delta = delta_rule(q, kk, vv, ones)
    _, s_hebb = hebbian(q, kk, vv, ones)
    read = lambda s: torch.einsum("bhkv,bhk->bhv", s, k[:, 0])  # noqa: E731
    torch.testing.assert_close(read(s_delta), v[:, 0], rtol=0, atol=1e-12)
    torch.testing.assert_close(read(s_hebb), 9 * v[:, 0], rtol=0, atol=1e-12)


def test_empty_sequence_returns_initial_state() -> None:
    q, k, v, beta, g, s0 = random_inputs(0)
    for mode in ("recurrent", "chunk"):
        o, s_t = delta_rule(q, k, v, beta, g=g, initial_state=s0, mode=mode)
        assert o.shape == (2, 0, 3, 8)
        torch.testing.assert_close(s_t, s0, rtol=0, atol=0)


def test_chunk_size_larger_than_sequence_and_gradcheck() -> None:
    q, k, v, beta, g, s0 = random_inputs(5, D=3, B=1, H=1)
    inputs = tuple(x.requires_grad_() for x in (q, k, v, beta, g, s0))

    def f(q, k, v, beta, g, s0):
        return delta_rule(q, k, v, beta, g=g, initial_state=s0, chunk_size=64)

    assert torch.autograd.gradcheck(f, inputs)
    ref = delta_rule(*inputs[:4], g=g, initial_state=s0, mode="recurrent")
    assert_close("o C>T", ref[0], f(*inputs)[0], 1e-12)
