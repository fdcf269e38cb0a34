"""Rule files: save -> load -> install bit-exactly, every check of install_rule, named (packaged) rules, and
`fednl rule export / list / show` on a real tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from fednl.cli import app
from fednl.models import LoraConfig, MemoryConfig, ModelConfig, build_model
from fednl.models import rules as rules_mod
from fednl.models.groups import param_groups
from fednl.models.rules import (
    RULE_GROUPS,
    UnknownRule,
    install_rule,
    list_rules,
    load_rule,
    rule_names,
    save_rule,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ModelConfig(source="tiny", tiny_hidden=32, tiny_layers=2, tiny_heads=2, tiny_kv_heads=1,
                   tiny_intermediate=64)
# every rule-group module at once: key beta, decay, a per-token (query) gate; a non-default design
DESIGN = MemoryConfig(attn_window=16, decay=True, gate_source="query", write="evicted", mix="residual")
LORA = LoraConfig(r=2, alpha=4.0)


def _model(memory: MemoryConfig = DESIGN, seed: int = 0, model_cfg: ModelConfig = TINY) -> torch.nn.Module:
    return build_model("titans", model_cfg, memory, LORA, seed=seed)


def _perturbed(seed: int = 0) -> torch.nn.Module:
    """A model whose rule and gate tensors are random (so no value equals its initial one)."""
    model = _model(seed=seed)
    g = torch.Generator().manual_seed(123 + seed)
    names = {n for grp in RULE_GROUPS for n in rule_names(model)[grp]}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in names:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return model


@pytest.fixture(scope="module")
def rule_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rule") / "r.safetensors"
    save_rule(_perturbed(), path, model_source="tiny", provenance={"run": "r1", "rounds": 3, "ce": [4.5, 4.25]})
    return path


def test_round_trip_is_bit_exact(rule_file: Path) -> None:
    src = _perturbed()
    rule = load_rule(rule_file)
    assert rule.model_source == "tiny" and rule.model_config == TINY and rule.memory_config == DESIGN
    assert rule.provenance == {"run": "r1", "rounds": 3, "ce": [4.5, 4.25]}
    groups = param_groups(src)
    assert rule.groups == {g: sorted(groups[g]) for g in RULE_GROUPS} and rule.groups["gate"]
    assert set(rule.tensors) == groups["rule"] | groups["gate"]
    dst = _model(seed=7)  # another seed: different decay draws and LoRA A
    before = {n: p.detach().clone() for n, p in dst.named_parameters()}
    install_rule(dst, rule)
    src_p = dict(src.named_parameters())
    for n, p in dst.named_parameters():
        if n in rule.tensors:
            assert torch.equal(p, src_p[n]) and p.dtype == src_p[n].dtype, n
        else:
            assert torch.equal(p, before[n]), n  # nothing outside the rule is touched
    # and the installed rule computes what the original did (LoRA B = 0 in both: the rule is all that differs)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dst(input_ids=ids).logits, src(input_ids=ids).logits, rtol=0, atol=0)


def test_runtime_fields_may_differ(rule_file: Path) -> None:
    model = _model(DESIGN.model_copy(update={"attn_window": 8, "attn_sinks": 0, "chunk_size": 4, "mode": "recurrent"}))
    install_rule(model, load_rule(rule_file))  # window, sinks and how the op runs are not part of the rule


def test_install_checks(rule_file: Path) -> None:
    model = _model()
    fresh = {n: p.detach().clone() for n, p in model.named_parameters()}
    rule = load_rule(rule_file)
    name = sorted(rule.tensors)[0]
    missing = load_rule(rule_file)
    del missing.tensors[name]
    with pytest.raises(ValueError, match=rf"missing 1 tensors the model needs: {name}"):
        install_rule(model, missing)
    extra = load_rule(rule_file)
    extra.tensors["model.layers.9.self_attn.beta.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"1 tensors the model does not have: model\.layers\.9"):
        install_rule(model, extra)
    shaped = load_rule(rule_file)
    shaped.tensors[name] = torch.zeros(*shaped.tensors[name].shape, 2)
    with pytest.raises(ValueError, match="shape mismatch"):
        install_rule(model, shaped)
    other = load_rule(rule_file)
    other.model_source = "smollm2"
    with pytest.raises(ValueError, match="trained for backbone 'smollm2', but the model is 'tiny'"):
        install_rule(model, other)
    with pytest.raises(ValueError, match=r"another memory design .*mix: 'residual' vs 'convex'"):
        install_rule(_model(DESIGN.model_copy(update={"mix": "convex"})), rule)
    with pytest.raises(ValueError, match="not a converted"):
        install_rule(build_model("lora", TINY, None, LORA), rule)
    # a failed install writes nothing
    assert all(torch.equal(p, fresh[n]) for n, p in model.named_parameters())
    assert not torch.equal(dict(model.named_parameters())[name], rule.tensors[name])


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rule(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a tensor file at all")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        load_rule(junk)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a fednl rule"):
        load_rule(plain)
    future = tmp_path / "future.safetensors"
    save_file({"x": torch.zeros(2)}, str(future), metadata={"fednl_rule": json.dumps({
        "format": 99, "model_source": "tiny", "model": {}, "memory": {}, "groups": {"rule": ["x"]}})})
    with pytest.raises(ValueError, match="rule format 99"):
        load_rule(future)
    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(2)}, str(bad), metadata={"fednl_rule": "{"})
    with pytest.raises(ValueError, match="malformed 'fednl_rule' metadata"):
        load_rule(bad)
    with pytest.raises(UnknownRule, match="no packaged rule named 'no-such-rule'"):
        load_rule("no-such-rule")
    with pytest.raises(ValueError, match="not JSON-able|JSON-able"):
        save_rule(_model(), tmp_path / "x.safetensors", provenance={"f": object()})


def test_named_rules(rule_file: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(rules_mod, "rules_dir", lambda: tmp_path / "rules")
    assert list_rules() == []
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "my-rule.safetensors").write_bytes(rule_file.read_bytes())
    (tmp_path / "rules" / "notes.txt").write_text("not a rule")
    assert list_rules() == ["my-rule"]
    rule = load_rule("my-rule")
    assert rule.origin == "my-rule" and rule.provenance["run"] == "r1"
    runner = CliRunner()
    res = runner.invoke(app, ["rule", "list"])
    assert res.exit_code == 0 and res.stdout.startswith("my-rule  backbone tiny,") and "write=evicted" in res.stdout
    res = runner.invoke(app, ["rule", "show", "my-rule"])
    shown = json.loads(res.stdout)
    assert shown["model_source"] == "tiny" and shown["memory"]["mix"] == "residual"
    assert shown["parameters"] == rule.n_params
    res = runner.invoke(app, ["rule", "show", "other"])
    assert res.exit_code == 2 and "no packaged rule named 'other' exists (packaged rules: my-rule)" in res.stderr


# ------------------------------------------------------------------ export from a finished run
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from fednl.config import load_config
    from fednl.experiment import run_config

    cfg = load_config("tiny", ["rounds=1", "task={name='stream', quickstart=true, max_train=2, max_test=1}",
                               "train.seq_len=128", "memory.chunk_size=32", "memory.attn_window=32"])
    out = tmp_path_factory.mktemp("run") / "fednl-tiny"
    run_config(cfg, out, log=lambda s: None)
    return out


def test_export_from_a_run(run_dir: Path, tmp_path: Path) -> None:
    from fednl.engine.runstate import load_checkpoint

    out = tmp_path / "exported.safetensors"
    res = CliRunner().invoke(app, ["rule", "export", str(run_dir), "--out", str(out), "--note", "tag='first'",
                                   "--note", "extra.ce=4.5"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(f"wrote {out}: backbone tiny")
    rule = load_rule(out)
    state = load_checkpoint(run_dir / "checkpoint")
    assert rule.tensors and set(rule.tensors) <= set(state.global_params)
    for n, t in rule.tensors.items():
        assert torch.equal(t, state.global_params[n]), n
    assert rule.memory_config.attn_window == 32 and rule.model_config.tiny_hidden == 32
    p = rule.provenance
    assert p["run"] == "fednl-tiny" and p["rounds"] == 1 and p["method"] == "fednl" and p["seed"] == 0
    assert p["options"]["scope"] == "rules" and p["task"] == "stream" and "ce" in p["results"]
    assert p["tag"] == "first" and p["extra"] == {"ce": 4.5}
    # the exported rule installs into a freshly built model of the run's design (the global view)
    from fednl.config import RESOLVED_NAME, load_runs

    cfg = load_runs(str(run_dir / RESOLVED_NAME))[0]
    install_rule(build_model("titans", cfg.model, cfg.memory, cfg.lora, seed=5), rule)


def test_export_errors(run_dir: Path, tmp_path: Path) -> None:
    from fednl.config import load_config, save_resolved

    runner = CliRunner()
    res = runner.invoke(app, ["rule", "export", str(tmp_path), "--out", str(tmp_path / "x.safetensors")])
    assert res.exit_code == 2 and "config.resolved.toml does not exist" in res.stderr
    fedavg = tmp_path / "fedavg"
    fedavg.mkdir()
    save_resolved(load_config("tiny", ["method='fedavg'"]), fedavg)
    (fedavg / "checkpoint").mkdir()
    res = runner.invoke(app, ["rule", "export", str(fedavg), "--out", str(tmp_path / "x.safetensors")])
    assert res.exit_code == 2 and "method 'fedavg' trains a 'lora' model, which has no memory rule" in res.stderr
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    save_resolved(load_config("tiny"), fresh)
    res = runner.invoke(app, ["rule", "export", str(fresh), "--out", str(tmp_path / "x.safetensors")])
    assert res.exit_code == 2 and "never finished a round" in res.stderr
    assert not (tmp_path / "x.safetensors").exists()
