"""FFA-LoRA (Sun et al., ICLR 2024): LoRA's ``A`` frozen at its shared random init; only ``B`` trained and averaged.

Every client builds the model from the same seed, so ``A`` is the same seeded Kaiming-uniform draw everywhere
(:func:`fednl.models.seeding.named_generator` depends only on the seed and the module name). ``A`` is removed from
the trained names — it keeps ``requires_grad=False``, is never sent and never changes. The server averages
``B`` with weights ``N_k``; because ``A`` is common, ``mean_k(B_k) A = mean_k(B_k A)`` exactly (no cross-term
"aggregation noise" as with FedAvg on both factors).

Traffic per adapted linear ``[out, in]`` at rank ``r``: ``out·r`` values instead of ``(in + out)·r`` —
exactly half for square layers (``q_proj``), less than half when ``out < in`` (GQA ``k_proj``/``v_proj``).
Trainable groups other than ``lora`` (if a model has any) keep FedAvg semantics.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import ClassVar

from pydantic import BaseModel

from fednl.strategies import register
from fednl.strategies.base import Strategy, StrategyError

LORA_A_SUFFIX = "lora_A"
LORA_B_SUFFIX = "lora_B"


def split_lora_names(names: Iterable[str]) -> tuple[set[str], set[str]]:
    """``(A names, B names)`` among ``names``: parameters whose last component is ``lora_A`` / ``lora_B``."""
    a_names, b_names = set(), set()
    for n in names:
        leaf = n.rsplit(".", 1)[-1]
        if leaf == LORA_A_SUFFIX:
            a_names.add(n)
        elif leaf == LORA_B_SUFFIX:
            b_names.add(n)
    return a_names, b_names


@register
class FFALoRA(Strategy):
    """Train and average LoRA ``B`` only; ``A`` stays frozen at its shared seeded initialisation."""

    name: ClassVar[str] = "ffa_lora"
    model_kind: ClassVar[str] = "lora"

    class Options(Strategy.Options):
        """``fraction_fit`` only (inherited)."""

    def __init__(self, options: BaseModel | None = None, *, groups: Mapping[str, set[str]]):
        super().__init__(options, groups=groups)
        a_names, b_names = split_lora_names(self._names({"lora"}))
        if not a_names or not b_names:
            raise StrategyError(
                f"FFA-LoRA needs LoRA A and B matrices (names ending in {LORA_A_SUFFIX!r}/{LORA_B_SUFFIX!r}) "
                f"in the 'lora' group; found {len(a_names)} A and {len(b_names)} B"
            )
        self._a_names = a_names

    def frozen_a_names(self) -> set[str]:
        """The LoRA ``A`` matrices this strategy keeps frozen."""
        return set(self._a_names)

    def trainable_names(self) -> set[str]:
        return super().trainable_names() - self.frozen_a_names()

    def shared_names(self) -> set[str]:
        return self._names(self.shared_groups()) - self.frozen_a_names()
