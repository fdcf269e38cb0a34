"""Fed-Mamba (the FedNL paper's SSM baseline): FedAvg on a recurrent-state backbone with LoRA on its linears.

The strategy is FedAvg (every trainable tensor — the LoRA adapters — sent, trained and averaged with weights
``N_k / Σ N_j``); what differs is the model: kind ``"mamba"`` (:mod:`fednl.models.mamba`), a selective-SSM
backbone whose recurrent state plays the role the delta-rule memory plays in FedNL. Use
``model.source = "hf:<folder>"`` with a local Mamba checkpoint; on the ``tiny`` test source a tiny random Mamba
is built. No pretrained Mamba weights are available offline in this environment.
"""

from __future__ import annotations

from typing import ClassVar

import fednl.models.mamba  # noqa: F401  (registers the "mamba" model kind)
from fednl.strategies import register
from fednl.strategies.base import Strategy


@register
class FedMamba(Strategy):
    """FedAvg (N_k-weighted) on a Mamba backbone + LoRA."""

    name: ClassVar[str] = "fedmamba"
    model_kind: ClassVar[str] = "mamba"

    class Options(Strategy.Options):
        """``fraction_fit`` only (inherited)."""
