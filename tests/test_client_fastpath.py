"""Parity of the LM-head-on-selected-positions fast path with the full-logits reference (values and gradients)."""

from __future__ import annotations

import os

import pytest
import torch

from fednl.client.trainer import _body_and_head, model_logits, selected_logits
from fednl.models.build import build_model
from fednl.models.config import LoraConfig, MemoryConfig, ModelConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TINY = ModelConfig(source="tiny", tiny_hidden=32, tiny_layers=2, tiny_heads=2, tiny_kv_heads=1, tiny_intermediate=64)


@pytest.mark.parametrize("kind", ["titans", "lora"])
def test_selected_logits_match_full_logits_values_and_grads(kind) -> None:
    torch.manual_seed(0)
    model = build_model(kind, TINY, MemoryConfig(chunk_size=8), LoraConfig(r=2, alpha=4.0), seed=3)
    with torch.no_grad():  # non-zero LoRA B so every trainable tensor gets a gradient
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    assert _body_and_head(model) is not None  # the fast path is taken
    ids = torch.randint(0, 256, (3, 21))
    rows, cols = torch.tensor([0, 1, 1, 2]), torch.tensor([20, 3, 17, 0])
    params = [p for p in model.parameters() if p.requires_grad]
    fast = selected_logits(model, ids, rows, cols)
    g_fast = torch.autograd.grad((fast * torch.linspace(-1, 1, fast.shape[-1])).sum(), params)
    ref = model_logits(model, ids)[rows, cols]
    g_ref = torch.autograd.grad((ref * torch.linspace(-1, 1, ref.shape[-1])).sum(), params)
    assert fast.shape == (4, 257)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_unknown_models_use_the_reference_path() -> None:
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.lm_head = torch.nn.Identity(), torch.nn.Identity()

        def forward(self, ids):
            return torch.nn.functional.one_hot(ids, 5).float() * 2.0

    net = Net()
    assert _body_and_head(net) is None  # soft-capped / scaled heads are never bypassed
    out = selected_logits(net, torch.tensor([[1, 4]]), torch.tensor([0]), torch.tensor([1]))
    assert out.tolist() == [[0.0, 0.0, 0.0, 0.0, 2.0]]
