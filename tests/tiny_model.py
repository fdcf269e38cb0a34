"""The tiny model of the tests' TOML run configs (a random 2-layer Llama, the memory conversion, rank-2 LoRA):
the ``[model]``, ``[memory]`` and ``[lora]`` tables, written once."""

from __future__ import annotations


def tiny_model_toml(*, hidden: int = 16, intermediate: int = 32, chunk_size: int = 16) -> str:
    """``[model]`` (``source = "tiny"``), ``[memory]`` and ``[lora]`` tables as TOML text."""
    return f"""[model]
source = "tiny"
tiny_hidden = {hidden}
tiny_layers = 2
tiny_heads = 2
tiny_kv_heads = 1
tiny_intermediate = {intermediate}
[memory]
chunk_size = {chunk_size}
[lora]
r = 2
alpha = 4.0
"""
