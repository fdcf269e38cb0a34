"""Hand-written LoRA: zero-B identity, fast vs merged parity (values and gradients), seeding, injection."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from fednl.models import LoRALinear, LoraConfig, ModelConfig, inject_lora, load_backbone, lora_modules
from fednl.models.config import LLAMA_LINEARS

pytestmark = pytest.mark.usefixtures("one_thread")


def _linear(i=12, o=7, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(i, o, bias=bias).double()


def test_zero_B_is_identity_and_scale_is_alpha_over_r():
    base = _linear()
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    ref = base(x)
    lora = LoRALinear(copy.deepcopy(base), r=4, alpha=8.0)
    assert lora.scale == 2.0 and lora.lora_A.shape == (4, 12) and lora.lora_B.shape == (7, 4)
    assert torch.equal(lora(x), ref)
    assert lora.lora_A.abs().max() <= 1 / math.sqrt(12) and lora.lora_A.abs().max() > 0
    with torch.no_grad():
        lora.lora_B.fill_(0.5)
    expected = ref + 2.0 * (x @ lora.lora_A.T @ lora.lora_B.T)  # by hand: s (x A^T) B^T
    torch.testing.assert_close(lora(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_fast_path_matches_merged_reference_values_and_grads(bias):
    lora = LoRALinear(_linear(bias=bias), r=3, alpha=5.0, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lora.lora_B.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 7, dtype=torch.float64)
    fast, ref = lora(x), lora.merged_forward(x)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    g_fast = torch.autograd.grad((fast * w).sum(), (x, lora.lora_A, lora.lora_B))
    g_ref = torch.autograd.grad((ref * w).sum(), (x, lora.lora_A, lora.lora_B))
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradients_flow_only_to_A_and_B():
    base = _linear()
    lora = LoRALinear(base, r=2, alpha=2.0)
    assert lora.weight is base.weight and not lora.weight.requires_grad and not lora.bias.requires_grad
    x = torch.randn(6, 12, dtype=torch.float64)
    lora(x).pow(2).sum().backward()
    assert lora.weight.grad is None and lora.bias.grad is None
    assert lora.lora_B.grad.abs().sum() > 0
    assert torch.equal(lora.lora_A.grad, torch.zeros_like(lora.lora_A))  # B = 0: dL/dA = s B^T (...) = 0
    with torch.no_grad():
        lora.lora_B.fill_(0.1)
    lora.zero_grad()
    lora(x).pow(2).sum().backward()
    assert lora.lora_A.grad.abs().sum() > 0 and lora.lora_B.grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRALinear(_linear(), r=0, alpha=1.0)
    with pytest.raises(ValueError, match="wraps an nn.Linear"):
        LoRALinear(nn.Conv1d(2, 2, 1), r=1, alpha=1.0)
    for bad in ({"r": 0}, {"alpha": 0}, {"targets": []}, {"targets": "some"}, {"targets": ["q_proj", "q_proj"]},
                {"rank": 4}):
        with pytest.raises(ValidationError):
            LoraConfig(**bad)
    assert LoraConfig(targets="all").target_names() == LLAMA_LINEARS
    assert LoraConfig().target_names() == ("q_proj", "k_proj", "v_proj")


def _tiny():
    return copy.deepcopy(load_backbone(ModelConfig())[0])


def test_inject_default_and_all_targets():
    m = _tiny()
    names = inject_lora(m, r=4, alpha=8)
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj")]
    m2 = _tiny()
    assert len(inject_lora(m2, "all", r=4, alpha=8)) == 2 * 7
    assert set(n.rsplit(".", 1)[1] for n in lora_modules(m2)) == set(LLAMA_LINEARS)
    params = dict(m2.named_parameters())
    assert "model.layers.0.mlp.down_proj.weight" in params  # the base weight keeps its HF name
    assert params["model.layers.0.mlp.down_proj.lora_A"].shape == (4, 128)


def test_injected_model_unchanged_and_only_lora_gets_grads():
    base = load_backbone(ModelConfig())[0]
    ids = torch.randint(0, 257, (2, 10), generator=torch.Generator().manual_seed(0))
    ref = base(ids).logits
    m = _tiny()
    inject_lora(m, "all", r=4, alpha=8)
    out = m(ids).logits
    assert torch.equal(out, ref)
    out.sum().backward()
    for n, p in m.named_parameters():
        if "lora_" in n:
            assert p.requires_grad and p.grad is not None, n
        else:
            assert not p.requires_grad and p.grad is None, n


def test_seeding():
    a, b, c = _tiny(), _tiny(), _tiny()
    inject_lora(a, ["q_proj", "v_proj"], r=4, alpha=8, seed=3)
    inject_lora(b, "all", r=4, alpha=8, seed=3)  # other targets too: A of q_proj is unchanged
    inject_lora(c, ["q_proj"], r=4, alpha=8, seed=4)
    qa = a.model.layers[1].self_attn.q_proj.lora_A
    assert torch.equal(qa, b.model.layers[1].self_attn.q_proj.lora_A)
    assert not torch.equal(qa, c.model.layers[1].self_attn.q_proj.lora_A)
    assert not torch.equal(qa, a.model.layers[0].self_attn.q_proj.lora_A)  # per-module draws differ


def test_injection_errors_and_frozen_adapters():
    m = _tiny()
    with pytest.raises(ValueError, match=r"\['x_proj'\] match no nn.Linear"):
        inject_lora(m, ["q_proj", "x_proj"])
    m = _tiny()
    inject_lora(m, ["q_proj"])
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(m, ["q_proj"])
    with pytest.raises(ValueError, match="'all' or a list"):
        inject_lora(_tiny(), "q_proj")
    frozen = _tiny()
    inject_lora(frozen, ["v_proj"], trainable=False)
    assert all(not p.requires_grad for p in frozen.parameters())


def test_factory_hook_for_other_adapter_kinds():
    seen = []

    class Doubled(LoRALinear):
        def forward(self, x):
            return 2 * super().forward(x)

    def factory(linear, name):
        seen.append(name)
        return Doubled(linear, r=2, alpha=2.0)

    m = _tiny()
    inject_lora(m, ["o_proj"], factory=factory)
    assert seen == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert isinstance(m.model.layers[0].self_attn.o_proj, Doubled)
