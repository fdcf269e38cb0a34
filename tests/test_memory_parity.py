"""Chunkwise (WY form) vs token-by-token reference: outputs, final state and every gradient (fla-style)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from fednl.memory import assert_close, delta_rule, hebbian

pytestmark = pytest.mark.usefixtures("one_thread")


RULES = {"delta": delta_rule, "hebbian": hebbian}
TOL = {torch.float64: 1e-5, torch.float32: 1e-4}
B, H, DK, DV = 2, 2, 8, 6


def make_inputs(T: int, *, decay: bool, init: bool, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = {
        "q": randn(B, T, H, DK),
        "k": F.normalize(randn(B, T, H, DK), dim=-1),
        "v": randn(B, T, H, DV),
        "beta": torch.rand(B, T, H, generator=gen, dtype=torch.float64) * 0.98 + 0.01,
    }
    if decay:
        x["g"] = -torch.rand(B, T, H, generator=gen, dtype=torch.float64) * 0.5  # decay in (0.6, 1]
    if init:
        x["initial_state"] = randn(B, H, DK, DV) * 0.5
    return {name: t.to(dtype).requires_grad_() for name, t in x.items()}


def run_with_grads(
    rule: str, inputs: dict[str, torch.Tensor], *, mode: str, chunk_size: int = 64, seed: int = 1
) -> dict[str, torch.Tensor]:
    """Outputs, final state and gradients of a random linear functional of both."""
    q, k, v, beta = (inputs[n] for n in ("q", "k", "v", "beta"))
    o, s_t = RULES[rule](
        q, k, v, beta, g=inputs.get("g"), initial_state=inputs.get("initial_state"), mode=mode, chunk_size=chunk_size
    )
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    ds = torch.randn(s_t.shape, generator=gen, dtype=torch.float64).to(s_t.dtype)
    names = list(inputs)
    grads = torch.autograd.grad((o * do).sum() + (s_t * ds).sum(), [inputs[n] for n in names])
    return {"o": o.detach(), "S_T": s_t.detach(), **{f"d{n}": gr for n, gr in zip(names, grads, strict=True)}}


@functools.cache
def reference(rule: str, T: int, decay: bool, init: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return run_with_grads(rule, make_inputs(T, decay=decay, init=init, dtype=dtype), mode="recurrent")


def check_parity(rule: str, T: int, chunk_size: int, decay: bool, init: bool, dtype: torch.dtype) -> None:
    ref = reference(rule, T, decay, init, dtype)
    got = run_with_grads(rule, make_inputs(T, decay=decay, init=init, dtype=dtype), mode="chunk", chunk_size=chunk_size)
    assert set(got) == set(ref)
    expected = {"o", "S_T", "dq", "dk", "dv", "dbeta"} | ({"dg"} if decay else set()) | (
        {"dinitial_state"} if init else set()
    )
    assert set(ref) == expected
    for name in ref:
        tag = f"{rule} T={T} C={chunk_size} decay={decay} init={init} {dtype}: {name}"
        assert_close(tag, ref[name], got[name], TOL[dtype])


@pytest.mark.parametrize("rule", ["delta", "hebbian"])
@pytest.mark.parametrize("decay", [False, True], ids=["nodecay", "decay"])
@pytest.mark.parametrize("init", [False, True], ids=["zero0", "init0"])
@pytest.mark.parametrize("chunk_size", [1, 3, 16, 64])
@pytest.mark.parametrize("T", [37, 10], ids=["T37-ragged", "T10-short"])
def test_chunk_matches_recurrent_float64(rule: str, T: int, chunk_size: int, decay: bool, init: bool) -> None:
    check_parity(rule, T, chunk_size, decay, init, torch.float64)


@pytest.mark.parametrize("rule", ["delta", "hebbian"])
@pytest.mark.parametrize("decay", [False, True], ids=["nodecay", "decay"])
@pytest.mark.parametrize("chunk_size", [3, 16])
def test_chunk_matches_recurrent_float32(rule: str, chunk_size: int, decay: bool) -> None:
    check_parity(rule, 37, chunk_size, decay, True, torch.float32)


@pytest.mark.parametrize("rule", ["delta", "hebbian"])
@pytest.mark.parametrize(("T", "chunk_size"), [(1, 64), (48, 16), (64, 64), (5, 5)])
def test_chunk_exact_multiples_and_single_token(rule: str, T: int, chunk_size: int) -> None:
    check_parity(rule, T, chunk_size, True, True, torch.float64)


def test_long_sequence_many_chunks_float32() -> None:
    # 300 tokens in chunks of 16: errors must not accumulate through the state passing.
    for rule in RULES:
        check_parity(rule, 300, 16, True, True, torch.float32)


def test_half_precision_runs_in_float32_and_returns_input_dtype() -> None:
    x = make_inputs(40, decay=True, init=True, dtype=torch.float32)
    o32, s32 = delta_rule(*(x[n].detach() for n in ("q", "k", "v", "beta")), g=x["g"].detach(),
                          initial_state=x["initial_state"].detach(), chunk_size=16)  # fmt: skip
    xb = {n: t.detach().to(torch.bfloat16) for n, t in x.items()}
    ob, sb = delta_rule(xb["q"], xb["k"], xb["v"], xb["beta"], g=xb["g"], initial_state=xb["initial_state"],
                        chunk_size=16)  # fmt: skip
    assert ob.dtype == torch.bfloat16 and sb.dtype == torch.bfloat16
    assert_close("bf16 o vs fp32", o32, ob.float(), 2e-2)
    assert_close("bf16 S_T vs fp32", s32, sb.float(), 2e-2)


def test_output_final_state_false_returns_none_and_same_output() -> None:
    x = {n: t.detach() for n, t in make_inputs(20, decay=False, init=False, dtype=torch.float64).items()}
    for rule, fn in RULES.items():
        for mode in ("chunk", "recurrent"):
            o_full, s_full = fn(x["q"], x["k"], x["v"], x["beta"], mode=mode)
            o, s = fn(x["q"], x["k"], x["v"], x["beta"], mode=mode, output_final_state=False)
            assert s is None and s_full is not None, (rule, mode)
            assert torch.equal(o, o_full), (rule, mode)
