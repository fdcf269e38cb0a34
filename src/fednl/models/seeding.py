"""Deterministic per-module random generators (independent of the global RNG and of construction order)."""

from __future__ import annotations

import zlib

import torch


def named_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and a qualified module name (stable across runs and processes)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))
