"""Evaluation protocol: per-token CE (reference vs fast, values and gradients), position bins, depth grouping,
summaries, and the full protocol on real tiny runs (views, invariances, the aggregation-drop round)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fednl.client.batching import IGNORE
from fednl.client.state import PARAM_PREFIX
from fednl.config import load_config
from fednl.experiment import run_config
from fednl.engine.runstate import load_checkpoint
from fednl.eval.depth import depth_key, group_by_depth, merge_depths
from fednl.eval.position import ce_by_position
from fednl.client.scoring import token_ce, token_ce_reference
from fednl.eval.protocol import _local_round, aggregation_drop, evaluate_run, load_run, summarise, write_eval
from fednl.models.tokenizer import ByteTokenizer

TINY = ["task.templates=['passkey', 'uuid']", "task.train_lengths=[768]", "task.test_lengths=[768]",
        "train.seq_len=768", "memory.chunk_size=32"]


def _run(tmp: Path, name: str, extra: list[str] = ()) -> Path:
    cfg = load_config("tiny", [*TINY, *extra])
    out = tmp / name
    run_config(cfg, out, log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("protocol")
    return {"r1": _run(tmp, "r1", ["rounds=1"]), "r2": _run(tmp, "r2", ["rounds=2"])}


# ------------------------------------------------------------------ per-token CE
def test_token_ce_matches_reference_values_and_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    targets = torch.randint(0, 7, (2, 5), generator=g)
    targets[0, 4] = IGNORE
    targets[1, 0] = IGNORE
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    fast, ref = token_ce(a, targets), token_ce_reference(b, targets)
    torch.testing.assert_close(fast, ref)
    assert fast[0, 4] == 0 and fast[1, 0] == 0
    w = torch.randn(2, 5, generator=g)
    (fast * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_token_ce_hand_value_and_bad_shape() -> None:
    logits = torch.zeros(1, 1, 4)  # uniform over 4 tokens: CE = log 4
    assert float(token_ce(logits, torch.tensor([[2]]))) == pytest.approx(math.log(4))
    with pytest.raises(ValueError, match="expected logits"):
        token_ce(torch.zeros(1, 3, 4), torch.zeros(1, 2, dtype=torch.long))


class _Uniform(torch.nn.Module):
    """Logits that are 0 everywhere, except a huge logit on the true next byte for positions >= 8."""

    def __init__(self, ids: list[int], vocab: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.ids, self.vocab = ids, vocab

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        out = torch.zeros(B, T, self.vocab)
        for t in range(8, min(T, len(self.ids) - 1)):
            out[:, t, self.ids[t + 1]] = 100.0
        return out


def test_ce_by_position_hand_computed() -> None:
    tok = ByteTokenizer()
    text = "abcdefghijklmnop"  # 16 bytes -> positions 1..15 are predicted
    ids = tok.encode(text)
    ex = SimpleNamespace(kind="text", prompt=text, choices=(), answer="", meta={}, uid="u/0")
    model = _Uniform(ids, tok.vocab_size)
    res = ce_by_position(model, tok, [ex], seq_len=64, bin_size=4, batch_size=2)
    logv = math.log(tok.vocab_size)
    # positions 1..8 predicted by inputs 0..7 (uniform: log V), positions 9..15 are near-certain (~0)
    assert res["bin_start"] == [0, 4, 8, 12] and res["tokens"] == 15
    assert res["ce"][0] == pytest.approx(logv) and res["ce"][1] == pytest.approx(logv)
    assert res["ce"][2] == pytest.approx(logv / 4, rel=1e-4)  # position 8 uniform, 9..11 ~0
    assert res["ce"][3] == pytest.approx(0.0, abs=1e-4)
    assert res["relative"][0] == 0.0 and res["relative"][3] == pytest.approx(-1.0, abs=1e-4)


# ------------------------------------------------------------------ depth, summaries
def test_depth_grouping_and_pooling() -> None:
    mk = lambda kind, d: SimpleNamespace(kind=kind, meta={"depth": d})  # noqa: E731
    groups = group_by_depth([mk("mc", 0.5), mk("mc", 0.1), mk("mc", None), mk("text", 0.1), mk("mc", 0.1)])
    assert list(groups) == ["0.10", "0.50"] and len(groups["0.10"]) == 2
    assert depth_key(0.3) == "0.30"
    pooled = merge_depths([{"0.10": {"accuracy": 1.0, "n": 1.0}}, {"0.10": {"accuracy": 0.25, "n": 3.0}}])
    assert pooled == {"0.10": {"accuracy": pytest.approx(0.4375), "n": 4.0}}


def test_summarise_and_drop_sign() -> None:
    s = summarise({"a": {"accuracy": 0.5}, "b": {"accuracy": 1.0}, "c": {"accuracy": 0.0}}, "accuracy")
    assert s.mean == pytest.approx(0.5) and s.worst == 0.0 and s.worst_client == "c" and s.n_clients == 3
    assert s.std == pytest.approx(math.sqrt(1 / 6))
    ce = summarise({"a": {"ce": 2.0}, "b": {"ce": 3.0}}, "ce")
    assert ce.worst_client == "b" and ce.std == pytest.approx(0.5)
    assert summarise({}, "ce").to_json() == {"metric": "ce", "mean": None, "worst": None, "worst_client": None,
                                             "std": None, "n_clients": 0}
    assert aggregation_drop(0.75, 0.5, "accuracy") == 0.25  # aggregation lost 0.25 accuracy
    assert aggregation_drop(2.0, 2.5, "ce") == 0.5  # aggregation raised CE by 0.5


def test_twins_set_and_restore_each_layer() -> None:
    from fednl.eval.protocol import TWINS, _twin
    from fednl.models import LoraConfig, MemoryConfig, ModelConfig, build_model
    from fednl.models.titans import titans_layers

    model = build_model("titans", ModelConfig(source="tiny"), MemoryConfig(), LoraConfig(r=2))
    layers = titans_layers(model)
    layers[0].gate_override = 0.5  # a setting in force before: restored afterwards
    assert set(TWINS) == {"memory_off", "memory_zero"}
    with _twin(model, "memory_off"):
        assert [m.gate_override for m in layers] == [0.0] * len(layers)
        assert not any(m.memory_zero for m in layers)
    assert layers[0].gate_override == 0.5 and all(m.gate_override is None for m in layers[1:])
    with pytest.raises(RuntimeError), _twin(model, "memory_zero"):
        assert all(m.memory_zero for m in layers) and layers[0].gate_override == 0.5
        raise RuntimeError("restored even when the view fails")
    assert not any(m.memory_zero for m in layers)
    with _twin(model, "personalised"):
        assert layers[0].gate_override == 0.5 and not any(m.memory_zero for m in layers)


# ------------------------------------------------------------------ the protocol on real runs
def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_protocol_views_and_invariances(runs) -> None:
    run = runs["r1"]
    before = _tree_digest(run / "checkpoint")
    path = write_eval(run)
    rec = json.loads(path.read_text())
    assert _tree_digest(run / "checkpoint") == before  # post-hoc evaluation never writes the checkpoint
    results = json.loads((run / "results.json").read_text())
    assert rec["titans"] and set(rec["views"]) == {"personalised", "global", "memory_off", "memory_zero", "heldout"}
    # the personalised view is exactly what the run reported
    for cid, m in results["clients"].items():
        assert rec["views"]["personalised"]["clients"][cid] == pytest.approx(m)
    # FedNL (scope=rules) keeps LoRA local: the memory gate override changes the model's output
    p, off = rec["views"]["personalised"]["clients"], rec["views"]["memory_off"]["clients"]
    assert any(p[c]["answer_loglik"] != off[c]["answer_loglik"] for c in p)
    # the zeroed-memory twin keeps the gate: with the convex mix the softmax path stays scaled by 1 - g, so it
    # differs from both the full model and the gate-off twin
    zero = rec["views"]["memory_zero"]["clients"]
    assert all(zero[c]["answer_loglik"] not in (p[c]["answer_loglik"], off[c]["answer_loglik"]) for c in p)
    # depth tables cover every keyed test example, at the configured depths
    for view in ("personalised", "memory_off", "memory_zero"):
        pooled = rec["depth"][view]["pooled"]
        assert set(pooled) <= {"0.10", "0.30", "0.50", "0.70"}
        assert sum(v["n"] for v in pooled.values()) == sum(m["n"] for m in results["clients"].values())
    s = rec["views"]["personalised"]["summary"]
    assert s["mean"] == pytest.approx(results["mean"]["accuracy"])
    drop = rec["aggregation_drop"]
    assert drop["round"] == 2 and set(drop["clients"]) == set(results["clients"])
    for a in drop["clients"].values():
        assert a["drop"] == pytest.approx(a["local"] - a["aggregated"])
    # NIAH has a bin_size: its prompts are read as a stream (Fig. 5), in both views
    assert set(rec["position"]) == {"personalised", "memory_off", "memory_zero"}
    pooled = rec["position"]["personalised"]["pooled"]
    assert pooled["bin_start"][0] == 0 and pooled["relative"][0] == 0.0
    # FedNL keeps LoRA local, so the global view (initial LoRA) is evaluated on its own and differs
    g = rec["views"]["global"]["clients"]
    assert any(g[c]["answer_loglik"] != p[c]["answer_loglik"] for c in p)


def test_aggregation_round_reproduces_the_simulator(runs) -> None:
    """The extra local round from the round-1 state trains exactly what the 2-round run's round 2 trained:
    the locally kept LoRA tensors equal the 2-round checkpoint's, bit for bit."""
    sim, state = load_run(runs["r1"], log=lambda s: None)
    later = load_checkpoint(runs["r2"] / "checkpoint")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the run did (engine.threads = 1); results do not depend on it
    try:
        for cid in sim.client_names:
            _local_round(sim, state, cid)
            live = dict(sim.model.named_parameters())
            kept = later.clients[cid].tensors
            names = sorted(sim.strategy.local_names())
            assert names
            for n in names:
                assert torch.equal(live[n].detach(), kept[f"{PARAM_PREFIX}{n}"]), (cid, n)
    finally:
        torch.set_num_threads(threads)


def test_stream_run_has_position_bins(tmp_path) -> None:
    run = _run(tmp_path, "stream", ["rounds=1", "task={name='stream', quickstart=true, max_train=2, max_test=1}",
                                    "train.seq_len=256"])
    rec = evaluate_run(run, aggregation=False).to_json()
    pooled = rec["position"]["personalised"]["pooled"]
    assert pooled["bin_start"][:2] == [0, 64] and pooled["relative"][0] == 0.0
    assert rec["metric"] == "ce" and rec["aggregation_drop"]["clients"] == {}
    assert "memory_off" in rec["position"]
    # one pass per view: the overall CE comes from the position pass and equals what the run reported
    results = json.loads((run / "results.json").read_text())
    for cid, m in results["clients"].items():
        v = rec["views"]["personalised"]["clients"][cid]
        assert v["ce"] == pytest.approx(m["ce"], rel=1e-5) and v["tokens"] == m["tokens"]
        assert rec["position"]["personalised"]["clients"][cid]["ce_mean"] == v["ce"]


def test_global_view_reuses_personalised_when_installs_are_identical(tmp_path, monkeypatch) -> None:
    """FedAvg-LoRA keeps nothing local: the global view installs the same bytes, so it is not re-evaluated."""
    from fednl.engine.simulator import Simulator

    run = _run(tmp_path, "fedavg", ["rounds=1", "method='fedavg'"])
    calls = []
    original = Simulator.evaluate_client
    monkeypatch.setattr(Simulator, "evaluate_client",
                        lambda self, *a, **k: calls.append(a[0]) or original(self, *a, **k))
    rec = evaluate_run(run, aggregation=False).to_json()
    assert calls == []  # no separate global pass (and no held-out clients here)
    assert rec["views"]["global"]["clients"] == rec["views"]["personalised"]["clients"]


def test_bad_run_dirs(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="config.resolved.toml does not exist"):
        evaluate_run(tmp_path)


def test_cli_evaluate(runs, tmp_path) -> None:
    from typer.testing import CliRunner

    from fednl.cli import app

    out = tmp_path / "e.json"
    res = CliRunner().invoke(app, ["evaluate", str(runs["r1"]), "--out", str(out), "--no-aggregation-drop"])
    assert res.exit_code == 0, res.output
    rec = json.loads(out.read_text())
    assert rec["aggregation_drop"]["clients"] == {} and rec["views"]["personalised"]["summary"]["n_clients"] == 2
    res = CliRunner().invoke(app, ["evaluate", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "config.resolved.toml does not exist" in res.output
