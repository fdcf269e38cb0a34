"""The step between replies and aggregation (screening -> robust -> DP) with real strategies, and the config
sections that choose it: validated at load, with errors that name the key."""

from __future__ import annotations

import tomllib

import pytest
import torch

from fednl.config import ConfigError, to_toml, validate_config
from fednl.engine.dp import DPConfig
from fednl.engine.guard import UpdateGuard
from fednl.engine.robust import RobustConfig
from fednl.engine.screening import ScreenConfig
from fednl.strategies.base import ClientReply, Payload
from fednl.strategies.fedavg import FedAvg
from fednl.strategies.scaffold import DC_UP, Scaffold

GROUPS = {"frozen": set(), "lora": {"x", "y"}}
GLOBAL = {"x": torch.zeros(2), "y": torch.zeros(1)}
POISON = 12345.0


def rep(cid: str, x: list[float], y: float = 0.0, n: int = 1) -> ClientReply:
    return ClientReply(cid, Payload({"x": torch.tensor(x), "y": torch.tensor([y])}), n)


def honest() -> list[ClientReply]:
    return [rep("h1", [1.0, 0.0], 0.5, 2), rep("h2", [0.0, 1.0], -0.5, 1), rep("h3", [1.0, 1.0], 0.0, 1)]


def hostile() -> list[ClientReply]:
    return [
        rep("nan", [float("nan"), POISON], POISON, 5),
        ClientReply("shape", Payload({"x": torch.full((3,), POISON), "y": torch.tensor([POISON])}), 5),
        ClientReply("names", Payload({"x": torch.full((2,), POISON), "z": torch.tensor([POISON])}), 5),
        rep("huge", [POISON, POISON], POISON, 5),
    ]


def aggregate(strategy, guard: UpdateGuard, replies: list[ClientReply], m: int, seed: int = 0):
    step = guard.prepare(1, replies, reference=GLOBAL, like=strategy.reply_like(GLOBAL), m=m, noise_seed=seed)
    with strategy.averaging(step.mean):
        out = strategy.aggregate_train(1, step.replies, GLOBAL)
    return out, step


def test_rejected_updates_never_reach_the_aggregate() -> None:
    """NaN, wrong shape, wrong names and a huge norm are left out; the aggregate is exactly the honest clients'
    weighted mean, and no poison value is in it."""
    s = FedAvg(groups=GROUPS)
    replies = honest()[:1] + hostile() + honest()[1:]
    out, step = aggregate(s, UpdateGuard(screen=ScreenConfig(norm_k=10), n_clients=7), replies, m=7)
    assert {r.cid: r.check for r in step.rejected} == {"nan": "nonfinite", "shape": "shape", "names": "names",
                                                      "huge": "norm"}
    assert [r.cid for r in step.replies] == ["h1", "h2", "h3"]
    want = FedAvg(groups=GROUPS).aggregate_train(1, honest(), GLOBAL)
    assert all(torch.equal(out[n], want[n]) for n in GLOBAL)
    assert all(float(out[n].abs().max()) < 10 for n in out)
    rec = step.to_record()
    assert set(rec) == {"rejected"} and [r["client"] for r in rec["rejected"]] == ["nan", "shape", "names", "huge"]
    assert rec["rejected"][3]["check"] == "norm" and rec["rejected"][3]["ratio"] > 10
    assert "rejected nan (nonfinite" in step.summary() and step.console().startswith(" | rejected nan")


def test_without_screen_config_the_structural_checks_still_run() -> None:
    s = FedAvg(groups=GROUPS)
    out, step = aggregate(s, UpdateGuard(n_clients=7), hostile()[:3] + honest(), m=7)
    assert [r.cid for r in step.rejected] == ["nan", "shape", "names"]
    want = FedAvg(groups=GROUPS).aggregate_train(1, honest(), GLOBAL)
    assert all(torch.equal(out[n], want[n]) for n in GLOBAL)


def test_sign_flip_attackers_median_vs_mean() -> None:
    """5 honest clients near (1, 1); 2 send −10× that. The weighted mean is dragged to negative values; the
    coordinate-wise median stays on an honest value; Multi-Krum keeps honest clients only."""
    good = [rep(f"h{i}", [1.0 + 0.1 * i, 1.0 - 0.1 * i], 1.0) for i in range(5)]
    bad = [rep(f"b{i}", [-10.0 * (1.0 + 0.1 * i), -10.0], -10.0) for i in range(2)]
    replies = good[:2] + bad[:1] + good[2:] + bad[1:]
    s = FedAvg(groups=GROUPS)
    mean, _ = aggregate(s, UpdateGuard(n_clients=7), replies, m=7)
    assert float(mean["y"]) == pytest.approx((5 - 20) / 7)
    med, _ = aggregate(s, UpdateGuard(robust=RobustConfig(rule="median"), n_clients=7), replies, m=7)
    # x0: -11, -10, 1.0, 1.1, 1.2, 1.3, 1.4 -> 1.1;  x1: -10, -10, 0.6, 0.7, 0.8, 0.9, 1.0 -> 0.7;  y -> 1
    assert torch.allclose(med["x"], torch.tensor([1.1, 0.7])) and float(med["y"]) == 1.0
    krum, step = aggregate(s, UpdateGuard(robust=RobustConfig(rule="krum", num_malicious=2, select=3), n_clients=7),
                           replies, m=7)
    assert set(step.krum_dropped) >= {"b0", "b1"} and all(r.cid.startswith("h") for r in step.replies)


def test_dp_round_clips_noises_and_accounts() -> None:
    s = FedAvg(groups=GROUPS)
    guard = UpdateGuard(dp=DPConfig(clip_norm=2.0, noise_multiplier=1.0, max_epsilon=10.0), n_clients=4)
    assert not guard.budget_exhausted(4)
    out, step = aggregate(s, guard, honest() + [rep("big", [30.0, 40.0])], m=4, seed=5)
    assert step.clipped == {"big": 50.0}  # the honest updates' norms are 1.118, 1.118, 1.414 <= 2
    a, b = aggregate(FedAvg(groups=GROUPS), UpdateGuard(dp=DPConfig(clip_norm=2.0, noise_multiplier=1.0),
                                                        n_clients=4), honest() + [rep("big", [30.0, 40.0])],
                     m=4, seed=5)[0], out
    assert all(torch.equal(a[n], b[n]) for n in GLOBAL)  # same seed, same noise
    spent = guard.released(4)
    assert spent is not None and spent["releases"] == 1 and spent["epsilon"] > 0
    state = guard.state()
    again = UpdateGuard(dp=DPConfig(clip_norm=2.0, noise_multiplier=1.0, max_epsilon=10.0), n_clients=4)
    again.load_state(state)
    assert again.spent() == guard.spent()
    assert UpdateGuard(n_clients=4).state() == {} and UpdateGuard(n_clients=4).released(4) is None


def test_scaffold_median_covers_the_model_and_the_control_variates() -> None:
    def replies() -> list[ClientReply]:  # client c sends an outlying model and an outlying correction Δc
        return [ClientReply(c, Payload({"x": torch.tensor(v), "y": torch.zeros(1), DC_UP + "x": torch.full((2,), d),
                                        DC_UP + "y": torch.ones(1)}), 1)
                for c, v, d in (("a", [1.0, 1.0], 1.0), ("b", [2.0, 2.0], 3.0), ("c", [90.0, 90.0], 500.0))]

    s = Scaffold(groups=GROUPS)
    s.sample(1, ["a", "b", "c"], __import__("random").Random(0))
    out, step = aggregate(s, UpdateGuard(robust=RobustConfig(rule="median"), n_clients=3), replies(), m=3)
    assert step.rejected == [] and torch.equal(out["x"], torch.tensor([2.0, 2.0]))
    # c ← c + (|S|/N) · median(Δc) = 0 + 1 · 3; the plain mean would be (1 + 3 + 500) / 3 = 168
    assert torch.equal(s._controls(out)["x"], torch.tensor([3.0, 3.0]))
    plain = Scaffold(groups=GROUPS)
    plain.sample(1, ["a", "b", "c"], __import__("random").Random(0))
    out, _ = aggregate(plain, UpdateGuard(n_clients=3), replies(), m=3)
    assert torch.equal(plain._controls(out)["x"], torch.tensor([168.0, 168.0]))


# ---------------------------------------------------------------------------------------------- config
BASE = {"method": {"name": "fedavg"}, "task": {"name": "niah7"}}


def test_config_sections_load_and_round_trip() -> None:
    cfg = validate_config({**BASE, "screen": {"norm_k": 10}, "robust": {"rule": "trimmed_mean", "trim": 0.3}})
    assert cfg.screen.norm_k == 10 and cfg.robust.trim == 0.3 and cfg.dp is None
    again = validate_config(tomllib.loads(to_toml(cfg.to_dict())))
    assert again == cfg
    cfg = validate_config({**BASE, "dp": {"clip_norm": 0.5, "noise_multiplier": 1.1, "max_epsilon": 8}})
    assert validate_config(tomllib.loads(to_toml(cfg.to_dict()))) == cfg
    off = validate_config(BASE)  # defaults: all off, nothing written
    assert off.screen is None and off.robust is None and off.dp is None
    assert not {"screen", "robust", "dp"} & set(off.to_dict())


@pytest.mark.parametrize(("extra", "key", "words"), [
    ({"robust": {"rule": "median"}, "method": {"name": "floral"}}, "robust.rule", "does not aggregate through"),
    ({"robust": {"rule": "krum"}, "method": {"name": "fedtreelora"}}, "robust", "every sampled client"),
    ({"dp": {"clip_norm": 1, "noise_multiplier": 1}, "method": {"name": "scaffold"}}, "dp", "client-level DP"),
    ({"dp": {"clip_norm": 1, "noise_multiplier": 1}, "robust": {"rule": "median"}}, "robust", "accountant"),
    ({"dp": {"clip_norm": 1, "noise_multiplier": 1}, "screen": {"norm_k": 3}}, "screen.norm_k", "DP accountant"),
    ({"robust": {"rule": "mean"}}, "robust", "changes nothing"),
    ({"robust": {"rule": "median", "select": 2}}, "robust", "applies to rule = 'krum'"),
    ({"dp": {"clip_norm": 1}}, "dp.noise_multiplier", "Field required"),
    ({"screen": {"norm_k": 0.5}}, "screen.norm_k", "greater than 1"),
])
def test_config_errors_name_the_key(extra: dict, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_config({**BASE, **extra})
    assert f"{key}: " in str(err.value) and words in str(err.value)
