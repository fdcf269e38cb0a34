"""RunConfig: TOML + presets + --set overrides, errors that name the key path, and the TOML writer."""

from __future__ import annotations

import math
import tomllib

import pytest

from fednl.config import (
    ConfigError, RunConfig, apply_override, list_presets, load_config, load_runs, parse_value, preset_names,
    save_resolved, to_toml, validate_config,
)

BASE = """
seed = 1
rounds = 2
[method]
name = "fednl"
scope = "rules"
[model]
source = "tiny"
[task]
name = "niah7"
quickstart = true
[train]
lr = 1e-3
"""


@pytest.fixture()
def cfg_file(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text(BASE)
    return p


def err(path, *overrides) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(str(path), list(overrides))
    return str(exc.value)


def test_loads_and_validates_sections(cfg_file) -> None:
    c = load_config(str(cfg_file))
    assert c.seed == 1 and c.rounds == 2 and c.method.name == "fednl" and c.method.options.scope == "rules"
    assert c.model.source == "tiny" and c.task.name == "niah7" and c.train.lr == 1e-3
    assert c.engine.wire_dtype == "fp32" and c.train.optimizer == "adamw"


@pytest.mark.parametrize("override,expected", [
    ("train.lr=-1", "train.lr: Input should be greater than 0"),
    ("rounds=-3", "rounds: Input should be greater than or equal to 1"),
    ("colour=1", "colour: Extra inputs are not permitted"),
    ("train.lrr=1", "train.lrr: Extra inputs are not permitted"),
    ("method.scope=everything", "method.scope: Input should be 'rules' or 'rules+lora'"),
    ("method.lr=1", "method.lr: Extra inputs are not permitted"),
    ("method.name=nosuch", "method.name: unknown method 'nosuch'"),
    ("engine.wire_dtype=fp8", "engine.wire_dtype: Input should be 'fp32', 'fp16' or 'bf16'"),
    ("engine.device=tpu", "engine.device: expected 'cpu', 'cuda', 'cuda:N' or 'auto'"),
    ("train.lr=inf", "train.lr: must be a finite number"),
    ("lora.r=0", "lora.r: Input should be greater than or equal to 1"),
    ("task.data_dir='/no/such/haystack'", "task.data_dir: path does not exist: /no/such/haystack"),
])
def test_errors_name_the_key_path(cfg_file, override, expected) -> None:
    assert expected in err(cfg_file, override)


def test_missing_jsonl_path_is_named(tmp_path) -> None:
    p = tmp_path / "j.toml"
    p.write_text(BASE.replace('name = "niah7"\nquickstart = true', 'name = "jsonl"\npath = "no/such/file.jsonl"'))
    assert "task.path: path does not exist: no/such/file.jsonl" in err(p)


def test_missing_sections_and_files(tmp_path) -> None:
    p = tmp_path / "m.toml"
    p.write_text("rounds = 2\n[task]\nname = \"niah7\"\n")
    assert "method: Field required" in err(p)
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(str(tmp_path / "absent.toml"))
    with pytest.raises(FileNotFoundError, match="neither a config file nor a preset; presets: .*tiny"):
        load_config("no-such-preset")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 2")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(str(bad))


def test_parse_value_toml_literals_with_string_fallback() -> None:
    assert parse_value("3") == 3 and parse_value("1e-4") == 1e-4 and parse_value("true") is True
    assert parse_value('["q_proj", "v_proj"]') == ["q_proj", "v_proj"]
    assert parse_value('"x y"') == "x y" and parse_value("rules+lora") == "rules+lora"
    assert parse_value("cuda:0") == "cuda:0"


def test_override_mechanics() -> None:
    d: dict = {"train": {"lr": 1.0}, "rounds": 2}
    apply_override(d, "train.batch_size=8")
    apply_override(d, "engine.wire_dtype=bf16")
    assert d["train"] == {"lr": 1.0, "batch_size": 8} and d["engine"] == {"wire_dtype": "bf16"}
    with pytest.raises(ConfigError, match="rounds is a value, not a table"):
        apply_override(d, "rounds.x=1")
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_override(d, "rounds")
    with pytest.raises(ConfigError, match="malformed key"):
        apply_override(d, "train..lr=1")


def test_method_switch_keeps_only_options_the_new_strategy_has(cfg_file) -> None:
    c = load_config(str(cfg_file), ["method.fraction_fit=0.5", "method=fedavg"])
    assert c.method.name == "fedavg" and c.method.options.fraction_fit == 0.5
    assert not hasattr(c.method.options, "scope")


def test_method_name_switch_on_a_preset_explains_itself() -> None:
    # the tiny preset's FedNL has scope = "rules"; switching by method.name carries over only what FedAvg has
    c = load_config("tiny", ["method.name=fedavg"])
    assert c.method.name == "fedavg" and not hasattr(c.method.options, "scope")
    assert load_config("tiny", ["method.name=fedavg", "method.fraction_fit=0.5"]).method.options.fraction_fit == 0.5
    # an option the user did write for a method that lacks it: the message says which options the method takes
    with pytest.raises(ConfigError, match=r"method\.scope: Extra inputs are not permitted \(method 'fedavg' takes "
                                          r"\[[^]]*'fraction_fit'[^]]*\]\)"):
        load_config("tiny", ["method.name=fedavg", "method.scope=rules"])
    with pytest.raises(ConfigError, match="method.name: expected a method name"):
        load_config("tiny", ["method.name=3"])


def test_suite_of_methods_and_picking_one(tmp_path) -> None:
    p = tmp_path / "s.toml"
    p.write_text(BASE.replace('[method]\nname = "fednl"\nscope = "rules"', '[[method]]\nname = "fednl"\n[[method]]\nname = "fedavg"'))
    runs = load_runs(str(p), ["rounds=3", "method.scope=rules+lora"])
    assert [r.method.name for r in runs] == ["fednl", "fedavg"] and all(r.rounds == 3 for r in runs)
    assert runs[0].method.options.scope == "rules+lora"  # applied only where the option exists
    assert [r.method.name for r in load_runs(str(p), ["method=fedavg"])] == ["fedavg"]
    with pytest.raises(ConfigError, match=r"this config runs \['fednl', 'fedavg'\]; pick one"):
        load_runs(str(p), ["method=fedprox"])
    with pytest.raises(ConfigError, match="no method of this config has an option 'nope'"):
        load_runs(str(p), ["method.nope=1"])
    assert [r.method.name for r in load_runs(str(p), ["method.name=fednl"])] == ["fednl"]
    with pytest.raises(ConfigError, match="describes 2 runs"):
        load_config(str(p))


def test_presets_are_listed_described_and_valid() -> None:
    names = preset_names()
    assert {"tiny", "quickstart"} <= set(names)
    descs = dict(list_presets())
    assert all(descs[n] and "\n" not in descs[n] for n in names)
    for n in names:
        runs = load_runs(n)
        assert runs and all(isinstance(r, RunConfig) for r in runs)
    assert [r.method.name for r in load_runs("quickstart-niah")] == ["fednl", "fedavg"]
    assert [r.method.name for r in load_runs("quickstart-niah", ["method=fednl", "rounds=1", "seed=7"])] == ["fednl"]
    tiny = load_config("tiny", ["rounds=5", "seed=9"])
    assert tiny.rounds == 5 and tiny.seed == 9 and tiny.model.source == "tiny"


def test_resolved_toml_roundtrip(tmp_path, cfg_file) -> None:
    c = load_config(str(cfg_file), ['description="quote \\" back\\\\slash\ttab"', "train.weight_decay=1e-05",
                                    'lora.targets=["q_proj", "o_proj"]', "engine.eval_batch_size=3"])
    path = save_resolved(c, tmp_path)
    assert path.name == "config.resolved.toml"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # atomic: no temp left
    back = load_config(str(path))
    assert back == c and back.to_dict() == c.to_dict()
    assert back.description == 'quote " back\\slash\ttab'


def test_resolved_suite_roundtrip(tmp_path) -> None:
    runs = load_runs("quickstart-niah")
    path = save_resolved(runs, tmp_path)
    assert load_runs(str(path)) == runs


def test_toml_writer_values() -> None:
    text = to_toml({"a": 1, "b": 1e-05, "c": float("inf"), "d": None, "e": [1, 2], "t": {"x": "y", "n": {"m": True}},
                    "arr": [{"k": 1}, {"k": 2}], "weird key": "v", "f": 2.0})
    data = tomllib.loads(text)
    assert data == {"a": 1, "b": 1e-05, "c": math.inf, "e": [1, 2], "t": {"x": "y", "n": {"m": True}},
                    "arr": [{"k": 1}, {"k": 2}], "weird key": "v", "f": 2.0}
    assert isinstance(data["f"], float)


def test_validate_config_rejects_method_lists() -> None:
    with pytest.raises(ConfigError, match="lists several methods"):
        validate_config({"method": [{"name": "fednl"}], "task": {"name": "niah7"}})
