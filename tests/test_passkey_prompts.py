"""Passkey prompts (``fednl bench passkey``): the key's place at a given depth, and the cache condition."""

from __future__ import annotations

import pytest
import torch

from fednl.bench.passkey import INTRO, QUESTION, digit_accuracy, prompts
from fednl.eval.memory import condition
from fednl.models import LoraConfig, MemoryConfig, ModelConfig, build_model
from fednl.models.loading import load_backbone
from fednl.models.titans import titans_layers

TINY = ModelConfig(source="tiny")


def test_depth_places_the_filler_before_the_key():
    tok = load_backbone(TINY)[1]
    (k0, ids0), = prompts(tok, n=1, filler=200, seed=3)
    (k1, ids1), = prompts(tok, n=1, filler=200, seed=3, depth=0.5)
    assert k0 == k1
    intro = tok.encode(INTRO.format(key=k0) + " ")
    assert ids0[: len(intro)] == intro and ids0[-len(tok.encode(QUESTION)):] == tok.encode(QUESTION)
    assert ids1[:100] == ids0[len(intro): len(intro) + 100]  # the first half of the same filler comes first
    assert tok.decode(ids1).count(k0) == 2 and len(ids1) == len(ids0) + 1  # + the space before the intro
    with pytest.raises(ValueError, match="depth"):
        prompts(tok, n=1, filler=10, seed=0, depth=1.0)


def test_digit_accuracy():
    assert digit_accuracy("12345", " 12345.") == 1.0
    assert digit_accuracy("12345", " the key is 12399") == 0.6
    assert digit_accuracy("12345", "none") == 0.0


def test_cache_condition_keeps_the_cache_and_the_baselines_drop_it():
    m = build_model("titans", TINY, MemoryConfig(attn_window=8, write="evicted", cache=4), LoraConfig(), seed=0)
    layers = titans_layers(m)
    with condition(m, "cache"):
        assert all(layer.cache_size == 4 and layer.gate_override == 0.0 for layer in layers)
    for name in ("window", "full"):
        with condition(m, name):
            assert all(layer.cache_size == 0 for layer in layers)
    assert all(layer.cache_size == 4 and layer.gate_override is None for layer in layers)
    plain = build_model("titans", TINY, MemoryConfig(attn_window=8), LoraConfig(), seed=0)
    with pytest.raises(ValueError, match="sparse cache"):
        with condition(plain, "cache"):
            pass
    x = torch.randint(0, 200, (1, 40))
    with torch.no_grad(), condition(m, "window"):
        a = m(x).logits
    with torch.no_grad(), condition(plain, "window"):
        b = plain(x).logits
    torch.testing.assert_close(a, b)


def test_equal_budget_twins_are_the_wider_window_and_the_extra_sinks():
    m = build_model("titans", TINY, MemoryConfig(attn_window=8, attn_sinks=2, write="evicted", cache=5), LoraConfig(),
                    seed=0)
    x = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    for name, design in (("wider", {"attn_window": 13, "attn_sinks": 2}), ("more_sinks", {"attn_window": 8,
                                                                                         "attn_sinks": 7})):
        twin = build_model("titans", TINY, MemoryConfig(**design, gate_override=0.0), LoraConfig(), seed=0)
        with torch.no_grad(), condition(m, name):
            a = m(x).logits
        with torch.no_grad():
            b = twin(x).logits
        torch.testing.assert_close(a, b)
    assert [(layer.window, layer.sinks, layer.cache_size) for layer in titans_layers(m)][0] == (8, 2, 5)


def test_bench_run_reports_every_condition(tmp_path, capsys):
    import json

    from fednl.bench.passkey import run
    from fednl.models.rules import save_rule

    net = build_model("titans", TINY, MemoryConfig(attn_window=8, write="evicted"), LoraConfig(r=1), seed=0)
    rule = save_rule(net, tmp_path / "r.safetensors")
    res = run(rule=str(rule), model="tiny", window=8, sinks=2, n=2, filler=30, threads=1, cache=4, depth=0.5,
              json_out=True)
    assert json.loads(capsys.readouterr().out) == res
    assert list(res["conditions"]) == ["memory", "cache", "random_cache", "wider", "more_sinks", "window", "full"]
    assert (res["window"], res["sinks"], res["cache"], res["depth"]) == (8, 2, 4, 0.5)
    assert all(0.0 <= c["digit_accuracy"] <= 1.0 for c in res["conditions"].values())
    with pytest.raises(ValueError, match="cache needs write"):
        run(rule="none", model="tiny", n=1, filler=10, threads=1, cache=4)


def test_memory_eval_cli_with_a_cache(tmp_path):
    import json

    from typer.testing import CliRunner

    from fednl.cli import app

    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", "memory-tiny", "--out", str(out)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["memory-eval", str(out), "--max-examples", "1", "--cache", "8", "--cache-every",
                                   "4", "--conditions", "memory,cache,wider,window"])
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "memory_eval-heldout-cache8.json").read_text())
    assert rec["cache"] == 8 and set(rec["pooled"]) >= {"memory", "cache", "wider", "window"}
    assert "full" not in rec["pooled"] and "cache" in res.output
    inside = [rec["pooled"][c]["ranges"][0]["ce"] for c in ("cache", "wider", "window")]
    assert inside[0] == pytest.approx(inside[2], abs=1e-6)  # nothing is evicted inside the window: no cache there
    bad = CliRunner().invoke(app, ["memory-eval", str(out), "--conditions", "cache"])
    assert bad.exit_code != 0 and "sparse cache" in bad.output
