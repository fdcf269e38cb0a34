"""NIAH-7: seven needle-template clients, four-choice questions in a natural-text haystack (paper Table 4).

Every example is ``haystack-with-needles + "\\n\\n" + Question/A-D/Answer:`` at a target context length in
tokens of the given tokenizer (the whole prompt counts). Four-needle templates put their needles at the depth
fractions ``cfg.depths`` of the haystack; the counter template spreads its base and events uniformly
(depths ``(i + 0.5) / n``). The gold letter, the queried needle and the context length are balanced over each
client's split and shuffled with the seed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from fednl.data.config import TaskConfigBase, apply_quickstart, unique
from fednl.data.prompts import LETTERS, balanced_positions, format_mc, letters, place_gold
from fednl.data.tasks import niah_templates as tpl
from fednl.data.tasks.base import NaturalTask, register_task, rng_for
from fednl.data.text import Book, ContextTooShort, TokenCounter, compose_context, depth_placer, load_books
from fednl.data.types import ClientData, Example

NIAH_TEMPLATES = ("passkey", "uuid", "name_date", "phrase", "counter", "mk_niah", "mv_niah")
NiahTemplate = Literal["passkey", "uuid", "name_date", "phrase", "counter", "mk_niah", "mv_niah"]
Lengths = list[PositiveInt] | Literal["auto"]

@register_task
class Niah7Config(TaskConfigBase):
    """Multi-needle NIAH, 7 template clients (FedNL paper Table 4) in a Gutenberg haystack."""

    name: Literal["niah7"] = "niah7"
    measures_tokens: ClassVar[bool] = True
    data_dir: Path | None = None
    """A ``.txt`` book or a folder of them (haystacks). Default: the embedded book (never the shared folder)."""
    templates: list[NiahTemplate] = Field(default_factory=lambda: list(NIAH_TEMPLATES), min_length=1)
    n_train: int = Field(750, ge=0)
    n_test: int = Field(15, ge=0)
    n_long_test: int = Field(10, ge=0)
    train_lengths: Lengths = Field(default_factory=lambda: [1024, 2048, 4096])
    test_lengths: Lengths = Field(default_factory=lambda: [1024, 2048, 4096])
    long_test_lengths: list[PositiveInt] = Field(default_factory=lambda: [8192, 16384])
    depths: list[float] = Field(default_factory=lambda: [0.10, 0.30, 0.50, 0.70], min_length=4)
    counter_events: int = Field(6, ge=1)
    bin_size: PositiveInt = 1024
    """Position bin (tokens) of ``fednl evaluate``'s CE-by-position over the test prompts (paper Fig. 5)."""
    quickstart: bool = False

    @model_validator(mode="before")
    @classmethod
    def _quickstart(cls, data: Any) -> Any:
        return apply_quickstart(
            data,
            {"n_train": 24, "n_test": 8, "n_long_test": 0, "train_lengths": "auto", "test_lengths": "auto",
             "long_test_lengths": [], "counter_events": 4, "bin_size": 64},
        )

    @field_validator("templates")
    @classmethod
    def _unique_templates(cls, templates: list[str]) -> list[str]:
        return unique(templates, "templates")

    @field_validator("depths")
    @classmethod
    def _depths_ok(cls, depths: list[float]) -> list[float]:
        if any(not 0.0 < d < 1.0 for d in depths) or sorted(set(depths)) != list(depths):
            raise ValueError(f"depths must be strictly increasing fractions in (0, 1), got {depths}")
        return depths

    @model_validator(mode="after")
    def _long_lengths(self) -> Niah7Config:
        if self.n_long_test and not self.long_test_lengths:
            raise ValueError("n_long_test > 0 needs long_test_lengths")
        return self

    def natural(self, tokenizer: Any, seed: int) -> NaturalTask:
        return build_niah7(self, tokenizer, seed)


AUTO_CHARS = 1500
N_OPTIONS = 4


def auto_length(books: list[Book], counter: TokenCounter, chars: int = AUTO_CHARS) -> int:
    """Tokens of ``chars`` characters of the first book, rounded up to a multiple of 128 (quickstart size:
    384 for SmolLM2's tokenizer, 1536 for the byte tokenizer)."""
    return 128 * math.ceil(counter.count(books[0].text[:chars]) / 128)


def counter_depths(n: int) -> list[float]:
    """Uniformly spread depths for ``n`` counter needles."""
    return [(i + 0.5) / n for i in range(n)]


def _examples(
    cfg: Niah7Config, template: str, split: str, n: int, lengths: list[int], books: list[Book],
    counter: TokenCounter, seed: int,
) -> list[Example]:
    if n == 0:
        return []
    split_rng = rng_for("niah7", seed, template, split)
    golds = balanced_positions(n, N_OPTIONS, split_rng)
    keyed = template != "counter"
    depths = list(cfg.depths) if keyed else counter_depths(cfg.counter_events + 1)
    queries = balanced_positions(n, len(depths), split_rng) if keyed else [None] * n
    out = []
    for i in range(n):
        length = lengths[i % len(lengths)]
        rng = rng_for("niah7", seed, template, split, i)
        needles = tpl.KEYED[template](rng, len(depths), queries[i]) if keyed else tpl.counter(rng, cfg.counter_events)
        options = place_gold(needles.gold, needles.distractors, golds[i], rng)
        suffix = "\n\n" + format_mc(needles.question, options)
        try:
            composed = compose_context(
                books, counter, rng, total_tokens=length, inserts=needles.sentences, suffix=suffix,
                placer=depth_placer(depths),
            )
        except ContextTooShort as err:
            where = f"niah7 template {template!r} ({split} example {i}, context_length={length})"
            raise ContextTooShort(f"{where}: {err}") from None
        query_depth = depths[needles.query_index] if needles.query_index is not None else None
        meta = {
            "client": template,
            "template": template,
            "split": split,
            "context_length": length,
            "n_tokens": composed.n_tokens,
            "depths": depths,
            "depth": query_depth,
            "needle_depths": [round(t / composed.context_tokens, 4) for t in composed.insert_token_starts],
            "needle_token_starts": composed.insert_token_starts,
            "needles": needles.sentences,
            "facts": needles.facts,
            "question": needles.question,
            "options": options,
            "gold": needles.gold,
            "book": composed.book,
            "book_piece": composed.start_piece,
        }
        out.append(
            Example(
                uid=f"niah7/{template}/{split}/{i:05d}", kind="mc", prompt=composed.prompt,
                choices=letters(N_OPTIONS), answer=LETTERS[golds[i]], meta=meta,
            )
        )
    return out


def build_niah7(cfg: Niah7Config, tokenizer, seed: int) -> NaturalTask:
    books = load_books(cfg.data_dir)
    counter = TokenCounter(tokenizer)
    resolve = lambda lengths: [auto_length(books, counter)] if lengths == "auto" else list(lengths)  # noqa: E731
    train_lengths, test_lengths = resolve(cfg.train_lengths), resolve(cfg.test_lengths)
    clients = []
    for template in cfg.templates:
        train = _examples(cfg, template, "train", cfg.n_train, train_lengths, books, counter, seed)
        test = _examples(cfg, template, "test", cfg.n_test, test_lengths, books, counter, seed)
        long_lengths = list(cfg.long_test_lengths)
        test += _examples(cfg, template, "test_long", cfg.n_long_test, long_lengths, books, counter, seed)
        clients.append(ClientData(name=template, train=train, test=test))
    info = {
        "haystack": [b.name for b in books],
        "haystack_source": "embedded" if cfg.data_dir is None else str(cfg.data_dir),
        "train_lengths": train_lengths,
        "test_lengths": test_lengths,
        "long_test_lengths": list(cfg.long_test_lengths) if cfg.n_long_test else [],
    }
    return NaturalTask(kind="mc", label_key="template", clients=clients, info=info)
