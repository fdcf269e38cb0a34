"""fednl — Federated Nested Learning and its sibling personalisation methods for language models.

Levels (the FedNL paper's naming):
  * Level 2 — ``fednl.memory``: the per-token delta-rule memory (test-time adaptation).
  * Level 1 — ``fednl.client``: local training of the rule (LoRA, gates, beta/decay) through the memory.
  * Level 0 — ``fednl.strategies`` + ``fednl.engine``: server aggregation of the rule parameters.
"""

__version__ = "0.1.0"
