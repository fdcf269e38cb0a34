"""Local-only training: every client trains its own memory rule (and LoRA), and nothing is aggregated.

The twin of FedNL that removes only federation: the same model kind (the Titans conversion), the same trainable
groups and the same local training; the server sends and receives nothing, so each client's parameters are its own
and persist in its ``ClientState``. A held-out client, never trained, is evaluated with the initial parameters:
local-only training has no rule to give a newcomer.
"""

from __future__ import annotations

from typing import ClassVar

from fednl.strategies import register
from fednl.strategies.base import Strategy


@register
class LocalOnly(Strategy):
    """No aggregation: every trained group stays on its client (zero bytes on the wire)."""

    name: ClassVar[str] = "local"
    model_kind: ClassVar[str] = "titans"
    private_mean: ClassVar[bool] = False  # nothing is shared: there is no aggregate to protect

    class Options(Strategy.Options):
        """``fraction_fit`` only (inherited)."""

    def shared_groups(self) -> set[str]:
        return set()
