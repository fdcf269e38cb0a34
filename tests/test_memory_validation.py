"""Bad input to the memory ops raises a ValueError that names the problem; the comparison helper fails loudly."""

from __future__ import annotations

import pytest
import torch

from fednl.memory import assert_close, delta_rule, hebbian, rel_rms_error

pytestmark = pytest.mark.usefixtures("one_thread")


B, T, H, D = 2, 5, 3, 4


def good() -> dict:
    return {
        "q": torch.randn(B, T, H, D),
        "k": torch.randn(B, T, H, D),
        "v": torch.randn(B, T, H, D + 1),
        "beta": torch.rand(B, T, H),
    }


def call(fn=delta_rule, **changes):
    x = good()
    kwargs = {name: changes.pop(name) for name in list(changes) if name not in x}
    x.update(changes)
    return fn(x["q"], x["k"], x["v"], x["beta"], **kwargs)


@pytest.mark.parametrize("fn", [delta_rule, hebbian])
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"q": torch.randn(B, T, D)}, r"q must have shape \[B, T, H, Dk\] \(4 dims\); got shape \(2, 5, 4\)"),
        ({"k": torch.randn(B, T, H, D + 2)}, r"k must have shape \[B, T, H, Dk\] = \(2, 5, 3, 4\) like q"),
        ({"v": torch.randn(B, T + 1, H, D)}, r"v must have shape \[B, T, H, Dv\] = \(2, 5, 3\) \+ \(Dv,\)"),
        ({"beta": torch.rand(B, T, H, 1)}, r"beta must have shape \[B, T, H\] = \(2, 5, 3\); got shape \(2, 5, 3, 1\)"),
        ({"g": -torch.rand(B, H, T)}, r"g must have shape \[B, T, H\] = \(2, 5, 3\); got shape \(2, 3, 5\)"),
        ({"initial_state": torch.zeros(B, H, D, D)}, r"initial_state must have shape \[B, H, Dk, Dv\] = \(2, 3, 4, 5"),
        ({"q": torch.ones(B, T, H, D, dtype=torch.int64)}, "q must be a floating-point tensor; got dtype torch.int64"),
        ({"beta": torch.ones(B, T, H, dtype=torch.bool)}, "beta must be a floating-point tensor"),
        ({"v": torch.randn(B, T, H, D + 1, dtype=torch.float64)}, "v has dtype torch.float64 but q has torch.float32"),
        ({"initial_state": torch.zeros(B, H, D, D + 1, dtype=torch.float64)}, "initial_state has dtype torch.float64"),
        ({"k": torch.randn(B, T, H, D, device="meta")}, "k is on device meta but q is on cpu"),
        ({"q": [[1.0]]}, "q must be a torch.Tensor; got list"),
        ({"beta": torch.full((B, T, H), 2.5)}, r"beta must lie in \[0, 2\] .*got values in \[2.5, 2.5\]"),
        ({"beta": torch.full((B, T, H), -0.1)}, r"beta must lie in \[0, 2\]"),
        ({"beta": torch.full((B, T, H), float("nan"))}, r"beta must lie in \[0, 2\]"),
        ({"g": torch.full((B, T, H), 0.1)}, r"g is a log-decay and must be finite and <= 0 .*got values in \[0.1, 0"),
        ({"g": torch.full((B, T, H), float("-inf"))}, "g is a log-decay and must be finite"),
        ({"chunk_size": 0}, "chunk_size must be an integer >= 1; got 0"),
        ({"chunk_size": 2.5}, "chunk_size must be an integer >= 1; got 2.5"),
        ({"chunk_size": True}, "chunk_size must be an integer >= 1; got True"),
        ({"mode": "parallel"}, r"unknown mode 'parallel'; expected one of \('chunk', 'recurrent'\)"),
        ({"scale": float("nan")}, "scale must be a finite real number or None"),
        ({"scale": "0.5"}, "scale must be a finite real number or None"),
    ],
)
def test_bad_inputs_raise_clear_errors(fn, changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(fn, **changes)


def test_beta_up_to_two_is_accepted_and_stays_bounded() -> None:
    # beta in (1, 2] flips the sign along the written key; with unit keys the state norm cannot grow.
    x = good()
    k = torch.nn.functional.normalize(x["k"], dim=-1)
    s0 = torch.randn(B, H, D, D + 1)
    _, s_t = delta_rule(x["q"], k, torch.zeros_like(x["v"]), torch.full((B, T, H), 2.0), initial_state=s0)
    assert (s_t.flatten(2).norm(dim=-1) <= s0.flatten(2).norm(dim=-1) * (1 + 1e-5)).all()


def test_use_fla_true_on_cpu_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="use_fla=True but fla kernels need the inputs on a CUDA device"):
        call(use_fla=True)
    with pytest.raises(ValueError, match="use_fla=True but fla dispatch covers only the delta rule"):
        call(hebbian, use_fla=True)


def test_assert_close_reports_and_fails() -> None:
    ref = torch.tensor([1.0, 2.0, 3.0])
    assert rel_rms_error(ref, ref) == 0.0
    assert rel_rms_error(ref, ref * 1.1) == pytest.approx(0.1)
    assert_close("same", ref, ref * (1 + 1e-6), 1e-5)
    with pytest.raises(AssertionError, match=r"my tensor: relative RMS error 1\.000e-01 > tol 1\.0e-04"):
        assert_close("my tensor", ref, ref * 1.1, 1e-4)
    with pytest.raises(AssertionError, match="nan"):
        assert_close("nan", ref, torch.full_like(ref, float("nan")), 1.0)
    with pytest.raises(ValueError, match=r"shape mismatch: reference \(3,\) vs got \(2,\)"):
        rel_rms_error(ref, ref[:2])
