"""A tiny hand-made memory LM, its data and helpers, shared by the engine/client/resume tests.

The model is a miniature FedNL client: frozen embedding and head, a delta-rule memory (the reference op, so
gradients flow through the whole memory trajectory) whose key projection is the ``rule`` group, a scalar
``gate`` mixing it in, and one LoRA pair on the residual stream (``lora``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fednl.data.types import ClientData, Example, FederatedTask
from fednl.memory.reference import recurrent_reference
from fednl.models.tokenizer import ByteTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


class ToyMemoryLM(nn.Module):
    def __init__(self, vocab: int = 257, d: int = 16, r: int = 2, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Parameter(torch.randn(vocab, d, generator=g) * 0.5, requires_grad=False)
        self.head = nn.Parameter(torch.randn(vocab, d, generator=g) * 0.5, requires_grad=False)
        self.rule_k = nn.Parameter(torch.eye(d) + 0.1 * torch.randn(d, d, generator=g))
        self.rule_beta = nn.Parameter(torch.zeros(1))
        self.gate = nn.Parameter(torch.zeros(1))
        self.lora_A = nn.Parameter(torch.randn(r, d, generator=g) * 0.1)
        self.lora_B = nn.Parameter(torch.zeros(d, r))

    def groups(self) -> dict[str, set[str]]:
        return {"frozen": {"emb", "head"}, "rule": {"rule_k", "rule_beta"}, "gate": {"gate"},
                "lora": {"lora_A", "lora_B"}}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb[ids]  # [B, T, d]
        k = nn.functional.normalize(x @ self.rule_k.T, dim=-1)
        beta = torch.sigmoid(self.rule_beta).expand(*ids.shape, 1)  # [B, T, H=1]
        o, _ = recurrent_reference(k[:, :, None], k[:, :, None], x[:, :, None], beta, scale=1.0)
        h = x + torch.sigmoid(self.gate) * o[:, :, 0] + (x @ self.lora_A.T) @ self.lora_B.T
        return h @ self.head.T


def mc_example(uid: str, n: int, letter: str) -> Example:
    return Example(uid=uid, kind="mc", prompt=f"{n}?", choices=("A", "B"), answer=letter)  # short: T ~ 4


def toy_task(n_clients: int = 3, n_train: int = 4, n_test: int = 3) -> FederatedTask:
    """Client i answers "A" for even n and "B" for odd n (client 2 flips the rule: non-IID labels)."""
    clients = []
    for i in range(n_clients):
        def letter(n: int) -> str:
            base = "A" if n % 2 == 0 else "B"
            return base if i != 2 else ("B" if base == "A" else "A")

        train = [mc_example(f"c{i}/train/{j}", j + 10 * i, letter(j + 10 * i)) for j in range(n_train + i)]
        test = [mc_example(f"c{i}/test/{j}", 100 + j + 10 * i, letter(100 + j + 10 * i)) for j in range(n_test)]
        clients.append(ClientData(name=f"client{i}", train=train, test=test))
    return FederatedTask(name="toy", kind="mc", clients=clients, heldout=[], info={})


def tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


def test_toy_model_groups_partition_parameters() -> None:
    m = ToyMemoryLM()
    names = {n for n, _ in m.named_parameters()}
    groups = m.groups()
    assert set().union(*groups.values()) == names
    assert {n for n, p in m.named_parameters() if not p.requires_grad} == groups["frozen"]


def test_toy_model_gradient_flows_through_memory_into_rule() -> None:
    m = ToyMemoryLM()
    with torch.no_grad():
        m.gate.fill_(2.0)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    m(ids).sum().backward()
    assert m.rule_k.grad is not None and m.rule_k.grad.abs().sum() > 0
    assert m.rule_beta.grad is not None and m.rule_beta.grad.abs().sum() > 0
