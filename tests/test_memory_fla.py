"""The fla CUDA dispatch: the policy and the argument wiring on CPU, true parity where CUDA and fla exist."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fednl.memory import assert_close, delta_rule, fla_available, recurrent_reference
from fednl.memory.fla_backend import ENV_VAR, decide_use_fla, env_use_fla, fla_delta_rule

pytestmark = pytest.mark.usefixtures("one_thread")


BF16 = torch.bfloat16


def decide(use_fla, *, is_cuda=True, dtype=BF16, rule="delta", mode="chunk", available=True) -> bool:
    return decide_use_fla(use_fla, is_cuda=is_cuda, dtype=dtype, rule=rule, mode=mode, available=available)


def test_auto_uses_fla_only_when_every_condition_holds(monkeypatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert decide(None) is True
    assert decide(None, dtype=torch.float16) is True
    assert decide(None, is_cuda=False) is False
    assert decide(None, dtype=torch.float32) is False  # fla's chunk kernels reject float32
    assert decide(None, rule="hebbian") is False
    assert decide(None, mode="recurrent") is False
    assert decide(None, available=False) is False
    assert decide(False) is False


def test_forcing_fla_raises_with_the_reason(monkeypatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert decide(True) is True
    with pytest.raises(ValueError, match="need float16 or bfloat16 inputs; got torch.float32"):
        decide(True, dtype=torch.float32)
    with pytest.raises(ValueError, match="fla is not importable"):
        decide(True, available=False)
    with pytest.raises(ValueError, match="covers only mode='chunk', not 'recurrent'"):
        decide(True, mode="recurrent")


def test_env_var_sets_the_default_and_the_keyword_wins(monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, "0")
    assert env_use_fla() is False and decide(None) is False and decide(True) is True
    monkeypatch.setenv(ENV_VAR, "on")
    assert env_use_fla() is True and decide(False) is False
    with pytest.raises(ValueError, match=f"{ENV_VAR} forces fla but fla kernels need the inputs on a CUDA device"):
        decide(None, is_cuda=False)
    monkeypatch.setenv(ENV_VAR, "auto")
    assert env_use_fla() is None
    monkeypatch.setenv(ENV_VAR, "maybe")
    with pytest.raises(ValueError, match=f"environment variable {ENV_VAR}='maybe' is not understood"):
        env_use_fla()


def test_env_var_off_keeps_cpu_calls_on_torch(monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, "0")
    q = torch.randn(1, 4, 1, 4)
    o, _ = delta_rule(q, q, q, torch.rand(1, 4, 1))
    assert o.shape == (1, 4, 1, 4)


class FakeFla:
    """Stands in for fla's two kernels with fla's keyword names, recording what they receive."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def _run(self, name, *, q, k, v, beta, scale, initial_state, output_final_state, g=None):
        self.calls.append((name, {"g": g, "initial_state": initial_state, "scale": scale, "q": q}))
        s0 = None if initial_state is None else initial_state.to(q.dtype)
        g = None if g is None else g.to(q.dtype)
        o, s_t = recurrent_reference(q, k, v, beta, g=g, scale=scale, initial_state=s0)
        return o, (s_t.float() if output_final_state else None)  # fla returns its state in float32

    def chunk_delta_rule(self, *, q, k, v, beta, scale=None, initial_state=None, output_final_state=False):
        return self._run("delta", q=q, k=k, v=v, beta=beta, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state)  # fmt: skip

    def chunk_gated_delta_rule(self, *, q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
        return self._run("gated", q=q, k=k, v=v, beta=beta, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, g=g)  # fmt: skip


def small_inputs(dtype: torch.dtype, device: str = "cpu", T: int = 12):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, T, 2, 8, generator=gen)
    k = F.normalize(torch.randn(2, T, 2, 8, generator=gen), dim=-1)
    v = torch.randn(2, T, 2, 8, generator=gen)
    beta = torch.rand(2, T, 2, generator=gen)
    g = -torch.rand(2, T, 2, generator=gen) * 0.3
    s0 = torch.randn(2, 2, 8, 8, generator=gen)
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v, beta, g, s0))


@pytest.mark.parametrize("gated", [False, True])
def test_fla_wiring_passes_fla_conventions(gated: bool) -> None:
    fake = FakeFla()
    q, k, v, beta, g, s0 = small_inputs(torch.float64)
    g = g if gated else None
    o, s_t = fla_delta_rule(q, k, v, beta, g=g, scale=0.3, initial_state=s0, output_final_state=True,
                            functions=(fake.chunk_delta_rule, fake.chunk_gated_delta_rule))  # fmt: skip
    name, seen = fake.calls[-1]
    assert name == ("gated" if gated else "delta")
    assert seen["scale"] == 0.3 and seen["initial_state"].dtype == torch.float32
    assert gated == (seen["g"] is not None) and (not gated or seen["g"].dtype == torch.float32)
    assert o.dtype == q.dtype and s_t.dtype == q.dtype  # state handed back in the input dtype
    o_ref, s_ref = delta_rule(q, k, v, beta, g=g, scale=0.3, initial_state=s0)
    assert_close("wired o", o_ref, o, 1e-6)
    assert_close("wired S_T", s_ref, s_t, 1e-6)
    o2, s2 = fla_delta_rule(q, k, v, beta, g=g, scale=0.3, initial_state=None, output_final_state=False,
                            functions=(fake.chunk_delta_rule, fake.chunk_gated_delta_rule))  # fmt: skip
    assert s2 is None and fake.calls[-1][1]["initial_state"] is None


@pytest.mark.skipif(not (torch.cuda.is_available() and fla_available()), reason="needs CUDA and fla (triton)")
@pytest.mark.parametrize("gated", [False, True])
def test_fla_cuda_matches_pure_torch(gated: bool) -> None:
    q, k, v, beta, g, s0 = (x.requires_grad_() for x in small_inputs(BF16, "cuda", T=200))
    g_in = g if gated else None
    leaves = [q, k, v, beta, s0] + ([g] if gated else [])

    def grads(use_fla: bool):
        o, s_t = delta_rule(q, k, v, beta, g=g_in, initial_state=s0, use_fla=use_fla)
        gen = torch.Generator(device="cuda").manual_seed(1)
        loss = (o.float() * torch.randn(o.shape, device="cuda", generator=gen)).sum() + s_t.float().sum()
        return [o, s_t, *torch.autograd.grad(loss, leaves)]

    ref = grads(False)
    got = grads(True)
    names = ["o", "S_T", "dq", "dk", "dv", "dbeta", "dS0"] + (["dg"] if gated else [])
    for name, a, b in zip(names, ref, got, strict=True):
        assert_close(f"fla vs torch {name}", a.float(), b.float(), 2e-2)
