"""FedNL (Federated Nested Learning): the server aggregates the *rules* that build the memory, not the memory.

Levels (FedNL paper, Algorithm 1):
  * Level 2, per token: the delta-rule state ``S_t`` adapts to the context; it starts at zero for every
    sequence and never leaves the device (nothing of it is a parameter, so nothing of it is sent).
  * Level 1, per batch: the client trains the rule parameters (memory projections / step size / decay),
    the Memory-as-Gate mixing and its LoRA adapters by back-propagating through the memory trajectory.
  * Level 0, per round: the server averages the shared parameters with weights ``N_k / N`` (Alg. 1, line 25).

What is shared is a configuration choice, ``Options.scope``, because the paper is inconsistent:
  * §2.2 and Algorithm 1 define the meta-parameters θ as "LoRA + gating" and broadcast/average all of θ
    → ``scope = "rules+lora"``: groups ``rule``, ``gate`` and ``lora`` cross the wire.
  * §3.5 counts only "~32,768 effective memory-rule parameters" per round against 11.3M LoRA parameters
    for FedAvg (the ~350x claim), i.e. the LoRA adapters are *not* exchanged
    → ``scope = "rules"`` (default): only the ``rule`` and ``gate`` groups cross the wire; each client's LoRA
    stays on the client, trained every round and persisted in its ``ClientState`` (a personal adapter).

Any other non-frozen group a model conversion adds is trained and kept local under both scopes.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from fednl.strategies import register
from fednl.strategies.base import Strategy

RULE_GROUPS: frozenset[str] = frozenset({"rule", "gate"})


@register
class FedNL(Strategy):
    """Aggregate the memory rules (``rule`` + ``gate``), N_k-weighted; LoRA local unless ``scope='rules+lora'``."""

    name: ClassVar[str] = "fednl"
    model_kind: ClassVar[str] = "titans"

    class Options(Strategy.Options):
        scope: Literal["rules", "rules+lora"] = "rules"

    def shared_groups(self) -> set[str]:
        shared = set(RULE_GROUPS)
        if self.options.scope == "rules+lora":
            shared.add("lora")
        return shared
