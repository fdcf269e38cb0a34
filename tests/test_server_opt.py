"""Server optimisers: two clients, two rounds by hand for each; FedAvgM(μ=0) and DiLoCo(lr=1, μ=0) are FedAvg bit
for bit through the simulator; the optimiser state resumes bit-identically; config errors name the key."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import TypeAdapter

from fednl.strategies.server_opt import ServerOptConfig, server_step
from fednl.strategies.base import ClientReply, Payload
from fednl.strategies.fedavg import FedAvg
from test_resume import assert_same_run
from toy_sim import final, same_globals, toy_sim

pytestmark = pytest.mark.usefixtures("one_thread")

OPT = TypeAdapter(ServerOptConfig)
X0 = [1.0, 2.0]
# two clients, N = 1 and 3 (weights 1/4, 3/4); fixed replies per round
REPLIES = {1: ([0.0, 2.0], [1.0, 0.0]), 2: ([0.5, 0.5], [0.75, 0.25])}
A = {1: [0.75, 0.5], 2: [0.6875, 0.3125]}  # the FedAvg aggregates: 1/4 * c0 + 3/4 * c1


def two_rounds(cfg: dict) -> tuple[list[float], list[float], dict]:
    """x1, x2 after rounds 1 and 2 of FedAvg + the server optimiser ``cfg``, and its state tensors."""
    strat, opt = FedAvg(groups={"frozen": set(), "lora": {"p"}}), OPT.validate_python(cfg)
    x = {"p": torch.tensor(X0)}
    tensors: dict[str, torch.Tensor] = {}
    info: dict = {}
    xs = []
    for rnd in (1, 2):
        replies = [ClientReply(c, Payload({"p": torch.tensor(v)}), n)
                   for c, v, n in zip(("c0", "c1"), REPLIES[rnd], (1, 3))]
        agg = strat.aggregate_train(rnd, replies, x)
        assert agg["p"].tolist() == A[rnd]
        x = server_step(opt, x, agg, tensors, info)
        xs.append(x["p"].tolist())
    assert info["server_opt"] == {"name": cfg["name"], "steps": 2}
    return xs[0], xs[1], tensors


def test_fedavgm_by_hand() -> None:
    # g1 = x0 - a1 = [0.25, 1.5]; v1 = g1; x1 = x0 - v1 = [0.75, 0.5]
    # g2 = x1 - a2 = [0.0625, 0.1875]; v2 = 0.5 v1 + g2 = [0.1875, 0.9375]; x2 = x1 - v2
    x1, x2, st = two_rounds({"name": "fedavgm", "lr": 1.0, "momentum": 0.5})
    assert x1 == [0.75, 0.5] and x2 == [0.5625, -0.4375]
    assert st["opt|v|p"].tolist() == [0.1875, 0.9375]
    # dampening d: v1 = (1 - d) g1 = [0.125, 0.75]; lr 2 -> x1 = x0 - 2 v1 = [0.75, 0.5] again
    x1, _, _ = two_rounds({"name": "fedavgm", "lr": 2.0, "momentum": 0.5, "dampening": 0.5})
    assert x1 == [0.75, 0.5]


def test_diloco_outer_nesterov_by_hand() -> None:
    # lr 0.5, μ 0.5. Round 1: v1 = g1 = [0.25, 1.5]; step = lr (g1 + μ v1) = 0.75 g1 = [0.1875, 1.125]
    #   x1 = [0.8125, 0.875]. Round 2: g2 = x1 - a2 = [0.125, 0.5625]; v2 = μ v1 + g2 = [0.25, 1.3125]
    #   step = 0.5 ([0.125, 0.5625] + 0.5 [0.25, 1.3125]) = [0.125, 0.609375]; x2 = [0.6875, 0.265625]
    x1, x2, _ = two_rounds({"name": "diloco", "lr": 0.5, "momentum": 0.5})
    assert x1 == [0.8125, 0.875] and x2 == [0.6875, 0.265625]


def adaptive(kind: str, lr: float, b1: float, b2: float, tau: float) -> tuple[list[float], list[float]]:
    """Reddi et al. Alg. 2 written out per coordinate in float64 (Δ = −g): m0 = 0, v0 = τ²."""
    x, m, v = list(X0), [0.0, 0.0], [tau**2] * 2
    out = []
    for rnd in (1, 2):
        g = [xi - ai for xi, ai in zip(x, A[rnd])]
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        if kind == "fedadam":
            v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
        elif kind == "fedyogi":
            v = [vi - (1 - b2) * gi * gi * math.copysign(1.0, vi - gi * gi) for vi, gi in zip(v, g)]
        else:
            v = [vi + gi * gi for vi, gi in zip(v, g)]
        x = [xi - lr * mi / (math.sqrt(vi) + tau) for xi, mi, vi in zip(x, m, v)]
        out.append(x)
    return out[0], out[1]


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_server_optimisers_by_hand(name) -> None:
    cfg = {"name": name, "lr": 0.1, "beta1": 0.5, "tau": 0.01, **({} if name == "fedadagrad" else {"beta2": 0.75})}
    x1, x2, st = two_rounds(cfg)
    e1, e2 = adaptive(name, 0.1, 0.5, 0.75, 0.01)
    assert x1 == pytest.approx(e1, rel=1e-6) and x2 == pytest.approx(e2, rel=1e-6)
    assert set(st) == {"opt|m|p", "opt|v|p"}
    # e.g. FedAdam round 1, coordinate 0: m = 0.125, v = 0.75e-4 + 0.25 * 0.0625, x = 1 - 0.1 m / (sqrt(v) + τ)
    if name == "fedadam":
        assert x1[0] == pytest.approx(1 - 0.1 * 0.125 / (math.sqrt(0.75e-4 + 0.015625) + 0.01), rel=1e-6)


# ---------------------------------------------------------------------------------------------- simulator
@pytest.mark.parametrize("cfg", [{"name": "fedavgm", "momentum": 0.0}, {"name": "diloco", "lr": 1.0, "momentum": 0.0}])
def test_no_momentum_lr_one_is_fedavg_bit_for_bit(tmp_path, cfg) -> None:
    toy_sim(tmp_path / "avg", "fedavg").run()
    toy_sim(tmp_path / "opt", "fedavg", server_opt=OPT.validate_python(cfg)).run()
    assert same_globals(tmp_path / "avg", tmp_path / "opt")
    assert final(tmp_path / "opt").engine_info["server_opt"]["steps"] == 2


def test_momentum_changes_the_run_and_resumes_bit_identically(tmp_path) -> None:
    opt = OPT.validate_python({"name": "fedadam", "lr": 0.01})
    toy_sim(tmp_path / "avg", "fedavg", rounds=3).run()
    toy_sim(tmp_path / "straight", "fedavg", rounds=3, server_opt=opt).run()
    assert not same_globals(tmp_path / "avg", tmp_path / "straight")
    assert toy_sim(tmp_path / "broken", "fedavg", rounds=3, server_opt=opt).run(stop_after=1) is None
    assert set(final(tmp_path / "broken").engine_tensors) == {f"opt|{s}|{n}" for s in "mv"
                                                               for n in ("gate", "lora_A", "lora_B", "rule_beta",
                                                                         "rule_k")}
    toy_sim(tmp_path / "broken", "fedavg", rounds=3, server_opt=opt).run(resume=True)
    assert_same_run(tmp_path / "straight", tmp_path / "broken")
    a, b = final(tmp_path / "straight"), final(tmp_path / "broken")
    assert all(torch.equal(a.engine_tensors[k], b.engine_tensors[k]) for k in a.engine_tensors)


def test_server_opt_config_is_typed_and_checked_against_the_method() -> None:
    from fednl.config import ConfigError, validate_config

    base = {"method": {"name": "fedavg"}, "task": {"name": "niah7", "quickstart": True}}
    cfg = validate_config({**base, "server_opt": {"name": "diloco"}})
    assert (cfg.server_opt.lr, cfg.server_opt.momentum) == (0.7, 0.9)
    assert cfg.to_dict()["server_opt"] == {"name": "diloco", "lr": 0.7, "momentum": 0.9}
    assert "server_opt" not in validate_config(base).to_dict()  # unset: nothing new in the resolved config
    with pytest.raises(ConfigError, match=r"server_opt.lr2: Extra inputs are not permitted"):
        validate_config({**base, "server_opt": {"name": "fedadam", "lr2": 1}})
    with pytest.raises(ConfigError, match=r"server_opt.beta2: Extra inputs are not permitted"):
        validate_config({**base, "server_opt": {"name": "fedadagrad", "beta2": 0.9}})
    with pytest.raises(ConfigError, match=r"server_opt: Input tag 'sgd' found using 'name' does not match"):
        validate_config({**base, "server_opt": {"name": "sgd"}})
    with pytest.raises(ConfigError, match=r"server_opt.momentum: Input should be less than 1"):
        validate_config({**base, "server_opt": {"name": "fedavgm", "momentum": 1.0}})
    with pytest.raises(ConfigError, match=r"server_opt: method 'fedtreelora' makes its own server update"):
        validate_config({**base, "method": {"name": "fedtreelora"}, "server_opt": {"name": "fedavgm"}})
