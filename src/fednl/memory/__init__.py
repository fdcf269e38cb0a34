"""Level 2 of FedNL: the matrix memory updated per token (delta rule, gated delta rule, Hebbian ablation).

``delta_rule`` / ``hebbian`` run a whole sequence (``mode="chunk"``: chunkwise-parallel WY form, the default;
``mode="recurrent"``: the token-by-token specification in :mod:`fednl.memory.reference`); ``memory_step``
streams one token or a short chunk while carrying the state. On CUDA with fla installed the delta rule
dispatches to fla's Triton kernels (see :mod:`fednl.memory.fla_backend`).
"""

from fednl.memory.fla_backend import fla_available
from fednl.memory.ops import delta_rule, hebbian, memory_step
from fednl.memory.reference import recurrent_reference
from fednl.memory.testing import assert_close, rel_rms_error

__all__ = [
    "assert_close",
    "delta_rule",
    "fla_available",
    "hebbian",
    "memory_step",
    "recurrent_reference",
    "rel_rms_error",
]
