"""Tokenizers that follow the project's tokenizer protocol.

Protocol (see ``docs/ARCHITECTURE.md``): ``encode(text) -> list[int]`` without BOS/EOS, ``decode(ids) -> str``,
``vocab_size: int`` and ``eos_id: int``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0..255) plus an end-of-sequence token (id 256). Dependency-free."""

    vocab_size: int = 257
    eos_id: int = 256

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"ByteTokenizer.encode expects a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                continue
            if not 0 <= i < 256:
                raise ValueError(f"ByteTokenizer.decode: id {i} is outside the vocabulary [0, {self.vocab_size})")
            out.append(i)
        return out.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eos_id=256)"


class HFTokenizer:
    """Thin wrapper around a ``transformers`` tokenizer: encodes without adding BOS/EOS."""

    def __init__(self, hf_tokenizer: Any):
        eos = getattr(hf_tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError(f"tokenizer {type(hf_tokenizer).__name__} has no eos_token_id")
        self.hf = hf_tokenizer
        self.eos_id: int = int(eos)
        self.vocab_size: int = len(hf_tokenizer)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"HFTokenizer.encode expects a str, got {type(text).__name__}")
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self.hf).__name__}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"
