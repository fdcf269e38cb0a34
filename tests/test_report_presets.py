"""The paper-* presets: valid, at the paper's settings (App. C.1), and the four ablation variants via --set."""

from __future__ import annotations

import pytest

from fednl.config import load_config, load_runs, preset_text

BASELINES = ["fednl", "fedavg", "fedprox", "fedssi", "fedala", "ffa_lora"]


@pytest.mark.parametrize("name", ["paper-mmlu5", "paper-niah7"])
def test_comparison_presets_run_every_method(name) -> None:
    for variant in (name, f"{name}-cpu"):
        runs = load_runs(variant)
        assert [r.method.name for r in runs] == BASELINES
        assert runs[0].method.options.scope == "rules"
        assert {r.model.source for r in runs} == ({"smollm2"} if variant.endswith("-cpu") else {"hf:Llama-3.2-1B"})


def test_paper_hyperparameters() -> None:
    for name in ("paper-mmlu5", "paper-mmlu5-cpu"):
        c = load_runs(name)[0]
        assert (c.lora.r, c.lora.alpha, c.train.lr, c.train.epochs) == (32, 64.0, 5e-5, 1)
    for name in ("paper-niah7", "paper-niah7-cpu", "paper-pg19-ablation", "paper-pg19-ablation-cpu"):
        c = load_runs(name)[0]
        assert (c.lora.r, c.lora.alpha, c.train.lr, c.train.epochs) == (16, 32.0, 3e-4, 1)
        assert c.lora.targets == ["q_proj", "k_proj", "v_proj"]
    niah = load_runs("paper-niah7")[0]
    assert niah.rounds == 2 and len(niah.task.templates) == 7 and niah.task.n_train == 750
    assert niah.task.depths == [0.10, 0.30, 0.50, 0.70]
    assert niah.train.seq_len > max(niah.task.long_test_lengths)


def test_ablation_variants() -> None:
    for name in ("paper-pg19-ablation", "paper-pg19-ablation-cpu"):
        text = preset_text(name)
        full = load_config(name)
        assert (full.memory.rule, full.memory.gate, full.lora.trainable) == ("delta", "learned", True)
        assert full.task.name == "stream"
        variants = {"memory.rule=hebbian": ("hebbian", "learned", True),
                    "memory.gate=fixed": ("delta", "fixed", True),
                    "lora.trainable=false": ("delta", "learned", False)}
        for override, expect in variants.items():
            assert f"--set {override}" in text  # documented in the preset itself
            c = load_config(name, [override])
            assert (c.memory.rule, c.memory.gate, c.lora.trainable) == expect
