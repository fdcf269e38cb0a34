"""FedAvg-LoRA (McMahan et al. 2017, on LoRA adapters): the comparator every FedNL run is measured against.

The model is the plain backbone with LoRA adapters (``model_kind = "lora"``). Every trainable parameter
(LoRA A and B, and anything else the model leaves trainable) is sent down, trained locally, sent back and
averaged with weights ``N_k / sum_j N_j``. That is exactly the base class's behaviour; this file only names it.
"""

from __future__ import annotations

from typing import ClassVar

from fednl.strategies import register
from fednl.strategies.base import Strategy


@register
class FedAvg(Strategy):
    """FedAvg on every trainable group of a LoRA model, N_k-weighted (nothing stays local)."""

    name: ClassVar[str] = "fedavg"
    model_kind: ClassVar[str] = "lora"

    class Options(Strategy.Options):
        """``fraction_fit`` only (inherited)."""
