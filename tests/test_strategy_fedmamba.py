"""Fed-Mamba: FedAvg on a Mamba backbone with LoRA — tiny random stand-in, a local HF Mamba folder, target
translation, refusal of a pretrained non-Mamba backbone, and one simulated round."""

from __future__ import annotations

import pytest
import torch

from fednl.models import LoraConfig, ModelConfig, build_model, param_groups
from fednl.models.loading import load_backbone
from fednl.models.mamba import MAMBA_LINEARS, build_mamba, is_mamba, mamba_targets, tiny_mamba_like
from fednl.strategies.base import ClientReply, Payload
from fednl.strategies.fedmamba import FedMamba
from test_strategy_harness import LORA, TINY, build_for, final_state, run_sim

AVAILABLE = set(MAMBA_LINEARS)


def test_target_translation() -> None:
    assert mamba_targets(["q_proj", "k_proj", "v_proj"], AVAILABLE) == ("in_proj",)
    assert mamba_targets(["q_proj", "o_proj", "up_proj"], AVAILABLE) == ("in_proj", "out_proj")
    assert mamba_targets("all", AVAILABLE) == MAMBA_LINEARS
    assert mamba_targets(["x_proj", "dt_proj"], AVAILABLE) == ("x_proj", "dt_proj")
    with pytest.raises(ValueError, match="select no linear"):
        mamba_targets(["gate_proj", "down_proj"], AVAILABLE)
    with pytest.raises(ValueError, match="neither a Mamba linear"):
        mamba_targets(["conv1d"], AVAILABLE)


def test_tiny_stand_in_matches_the_backbone_shapes() -> None:
    model, strat = build_for("fedmamba")
    assert is_mamba(model) and model.config.hidden_size == TINY.tiny_hidden
    assert model.config.num_hidden_layers == TINY.tiny_layers
    assert model.get_input_embeddings().weight.shape[0] == TINY.tiny_vocab
    lora = strat.groups["lora"]
    assert lora == {f"backbone.layers.{i}.mixer.in_proj.lora_{m}" for i in range(2) for m in "AB"}
    assert strat.shared_names() == lora and strat.trainable_names() == lora
    with torch.no_grad():
        logits = model(torch.randint(0, TINY.tiny_vocab, (2, 8))).logits
    assert logits.shape == (2, 8, TINY.tiny_vocab) and torch.isfinite(logits).all()


def test_a_local_hf_mamba_folder_is_used_as_is(tmp_path) -> None:
    backbone, _ = load_backbone(TINY)
    mamba = tiny_mamba_like(backbone, seed=7)
    mamba.save_pretrained(str(tmp_path / "mamba"))
    cfg = ModelConfig(source=f"hf:{tmp_path / 'mamba'}", tokenizer="byte")
    model = build_model("mamba", cfg, None, LoraConfig(targets="all", r=2, alpha=4.0), 0)
    groups = param_groups(model)
    assert {n.split(".")[-2] for n in groups["lora"]} == set(MAMBA_LINEARS)
    ref = dict(mamba.named_parameters())
    live = dict(model.named_parameters())
    assert torch.equal(live["backbone.layers.0.mixer.in_proj.weight"], ref["backbone.layers.0.mixer.in_proj.weight"])


def test_a_pretrained_non_mamba_backbone_is_refused() -> None:
    backbone, _ = load_backbone(TINY)
    fake = __import__("copy").deepcopy(backbone)
    fake.config._name_or_path = "/somewhere/SmolLM2-135M"
    with pytest.raises(ValueError, match="needs a Mamba checkpoint"):
        build_mamba(fake, None, LORA, 0)


def test_aggregation_is_fedavg_by_hand() -> None:
    strat = FedMamba(groups={"frozen": set(), "lora": {"x.lora_B"}})
    new = strat.aggregate_train(1, [ClientReply("a", Payload({"x.lora_B": torch.tensor([2.0])}), 3),
                                    ClientReply("b", Payload({"x.lora_B": torch.tensor([6.0])}), 1)],
                                {"x.lora_B": torch.zeros(1)})
    assert torch.allclose(new["x.lora_B"], torch.tensor([3.0]))  # 3/4·2 + 1/4·6


def test_one_round_through_the_simulator(tmp_path) -> None:
    model, strat = build_for("fedmamba")
    run_sim(model, strat, tmp_path, rounds=1, max_steps=1)
    glob = final_state(tmp_path).global_params
    assert set(glob) == strat.shared_names()
    assert any(glob[n].abs().sum() > 0 for n in glob if n.endswith("lora_B"))
