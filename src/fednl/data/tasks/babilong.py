"""BABILong-style long-context QA: bAbI facts scattered, in order, through book text.

bAbI format (Weston et al. 2015): numbered lines, numbering restarts at 1 for each story; statements are
``N text``; questions are ``N question<TAB>answer<TAB>supporting line ids``. A sample is one question with every
statement of its story that comes before it. The statements are inserted as sentences at seeded random places
(order kept) into a window of book text, so the prompt ``context + "\\n\\nQuestion: q\\nAnswer:"`` has the target
token length. One client per bAbI task (``qa1`` ... ``qa20``); train samples come from ``*_train.txt``, test
samples from ``*_test.txt``, drawn in seeded random order; a sample whose facts and question alone do not fit
in its example's context length is passed over (counted in ``info["skipped_too_long"]``). ``kind="qa"``:
scored by exact match against the gold answer (e.g. ``bathroom``, ``apple,football`` for lists).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, PositiveInt, field_validator

from fednl.data.config import TaskConfigBase, unique
from fednl.data.io import DataFileError, read_text
from fednl.data.paths import shared_subdir
from fednl.data.prompts import format_qa
from fednl.data.tasks.base import NaturalTask, register_task, rng_for
from fednl.data.text import ContextTooShort, TokenCounter, compose_context, load_books, ordered_random_placer
from fednl.data.types import ClientData, Example

@register_task
class BabilongConfig(TaskConfigBase):
    """BABILong-style: bAbI facts scattered in order through book text; one client per bAbI task."""

    name: Literal["babilong"] = "babilong"
    measures_tokens: ClassVar[bool] = True
    data_dir: Path | None = None
    """The bAbI ``en`` folder (``qa1_*_train.txt`` ...). Default: the shared ``babi-en`` folder when present."""
    haystack_dir: Path | None = None
    """A ``.txt`` book or a folder of them. Default: the embedded book."""
    tasks: list[Annotated[int, Field(ge=1, le=20)]] = Field(default_factory=lambda: list(range(1, 21)), min_length=1)
    n_train: int = Field(100, ge=0)
    n_test: int = Field(20, ge=0)
    train_lengths: list[PositiveInt] = Field(default_factory=lambda: [1024])
    test_lengths: list[PositiveInt] = Field(default_factory=lambda: [1024, 4096])

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, tasks: list[int]) -> list[int]:
        return unique(tasks, "tasks")

    def natural(self, tokenizer: Any, seed: int) -> NaturalTask:
        return build_babilong(self, tokenizer, seed)



@dataclass(frozen=True)
class BabiSample:
    facts: tuple[str, ...]
    question: str
    answer: str
    supports: tuple[int, ...]  # indices into ``facts``
    source: str  # "file:line" of the question


def parse_babi(path: str | Path) -> list[BabiSample]:
    """Every question of a bAbI file with the statements of its story before it."""
    path = Path(path)
    samples: list[BabiSample] = []
    story: dict[int, int] = {}  # line id -> index in facts
    facts: list[str] = []
    prev_id = 0
    for line_no, raw in enumerate(read_text(path).split("\n"), start=1):
        if not raw.strip():
            continue
        head, _, rest = raw.partition(" ")
        if not head.isdigit() or not rest.strip():
            raise DataFileError(path, line_no, f"expected '<number> <text>', got {raw[:60]!r}")
        line_id = int(head)
        if line_id == 1:
            story, facts = {}, []
        elif line_id != prev_id + 1:
            raise DataFileError(
                path, line_no, f"line number {line_id} does not follow {prev_id} (stories restart at 1)"
            )
        prev_id = line_id
        if "\t" not in rest:
            story[line_id] = len(facts)
            facts.append(rest.strip())
            continue
        parts = rest.split("\t")
        if len(parts) != 3 or not parts[0].strip() or not parts[1].strip():
            raise DataFileError(path, line_no, "a question line needs 'question<TAB>answer<TAB>supporting ids'")
        ids = parts[2].split()
        if not ids or not all(i.isdigit() for i in ids):
            raise DataFileError(path, line_no, f"supporting ids must be line numbers, got {parts[2]!r}")
        unknown = [int(i) for i in ids if int(i) not in story]
        if unknown:
            raise DataFileError(path, line_no, f"supporting line(s) {unknown} are not statements of this story")
        samples.append(
            BabiSample(
                facts=tuple(facts), question=parts[0].strip(), answer=parts[1].strip(),
                supports=tuple(story[int(i)] for i in ids), source=f"{path.name}:{line_no}",
            )
        )
    if not samples:
        raise DataFileError(path, None, "no questions found")
    return samples


def _draw(
    samples: list[BabiSample], n: int, lengths: list[int], counter: TokenCounter, rng, file: str
) -> tuple[list[int], int]:
    """Indices of ``n`` samples in seeded random order, example ``i`` taking the next sample whose facts and
    question fit in ``lengths[i % len(lengths)]`` tokens; returns them and the number of samples passed over."""
    fact_tokens: dict[str, int] = {}

    def needed(s: BabiSample) -> int:
        for f in s.facts:
            if f not in fact_tokens:
                fact_tokens[f] = counter.count(" " + f)
        return sum(fact_tokens[f] for f in s.facts) + counter.count("\n\n" + format_qa(s.question))

    order = rng.sample(range(len(samples)), len(samples))
    chosen: list[int] = []
    skipped = 0
    for k in order:
        if len(chosen) == n:
            break
        if needed(samples[k]) < lengths[len(chosen) % len(lengths)]:
            chosen.append(k)
        else:
            skipped += 1
    if len(chosen) < n:
        raise ValueError(
            f"babilong {file}: only {len(chosen)} of the {n} requested samples have facts and question that fit in "
            f"context lengths {lengths} ({skipped} are longer); use longer contexts or fewer samples"
        )
    return chosen, skipped


def babi_file(folder: Path, task: int, split: str) -> Path:
    matches = sorted(folder.glob(f"qa{task}_*_{split}.txt"))
    if len(matches) != 1:
        raise FileNotFoundError(f"expected one bAbI file qa{task}_*_{split}.txt in {folder}, found {len(matches)}")
    return matches[0]


def build_babilong(cfg: BabilongConfig, tokenizer, seed: int) -> NaturalTask:
    folder = cfg.data_dir or shared_subdir("babi-en")
    if folder is None:
        raise FileNotFoundError("bAbI data not found: set task.data_dir to the bAbI 'en' folder (qa1_*_train.txt ...)")
    books = load_books(cfg.haystack_dir)
    counter = TokenCounter(tokenizer)
    clients = []
    skipped_total: dict[str, int] = {}
    for task in cfg.tasks:
        name = f"qa{task}"
        splits: dict[str, list[Example]] = {}
        for split, n, lengths in (("train", cfg.n_train, cfg.train_lengths), ("test", cfg.n_test, cfg.test_lengths)):
            path = babi_file(Path(folder), task, split)
            samples = parse_babi(path)
            if n > len(samples):
                raise ValueError(f"babilong {name}: asked for {n} {split} samples, {path.name} has {len(samples)}")
            chosen, skipped = _draw(samples, n, lengths, counter, rng_for("babilong", seed, task, split), path.name)
            skipped_total[f"{name}/{split}"] = skipped
            out = []
            for i, k in enumerate(chosen):
                s = samples[k]
                length = lengths[i % len(lengths)]
                rng = rng_for("babilong", seed, task, split, i)
                try:
                    composed = compose_context(
                        books, counter, rng, total_tokens=length, inserts=s.facts,
                        suffix="\n\n" + format_qa(s.question), placer=ordered_random_placer(len(s.facts)),
                    )
                except ContextTooShort as err:
                    raise ContextTooShort(f"babilong {s.source} ({len(s.facts)} facts): {err}") from None
                meta = {
                    "client": name, "task": name, "task_name": path.stem.split("_", 1)[1].rsplit("_", 1)[0],
                    "split": split, "source": s.source, "context_length": length, "n_tokens": composed.n_tokens,
                    "facts": list(s.facts), "supports": list(s.supports), "question": s.question,
                    "fact_depths": [round(t / composed.context_tokens, 4) for t in composed.insert_token_starts],
                    "book": composed.book, "book_piece": composed.start_piece,
                }
                out.append(Example(uid=f"babilong/{name}/{split}/{i:05d}", kind="qa", prompt=composed.prompt,
                                   answer=s.answer, meta=meta))
            splits[split] = out
        clients.append(ClientData(name=name, train=splits["train"], test=splits["test"]))
    info = {"haystack": [b.name for b in books], "tasks": [f"qa{t}" for t in cfg.tasks],
            "skipped_too_long": skipped_total}
    return NaturalTask(kind="qa", label_key="task", clients=clients, info=info)
