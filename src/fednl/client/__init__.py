"""Level 1: the client — local trainer (BPTT through the memory) and the per-client persisted state."""

from fednl.client.state import ClientState
from fednl.client.trainer import run_client_round

__all__ = ["ClientState", "run_client_round"]
