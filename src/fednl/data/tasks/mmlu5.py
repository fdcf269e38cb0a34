"""MMLU-5: five domain clients with the FedNL paper's subject lists (Table 3).

Each client pools the rows of its subjects from the configured splits (default: ``test`` of ``cais_hf_csv``),
shuffles them with the seed and splits them:

* ``holdout_first`` (default): ``n_test = min(max_test, round(n * test_fraction))`` rows are held out for test;
  the first ``max_train`` of the remaining rows are the training set.
* ``proportional``: the pool is split ``test_fraction`` : rest first, then each side is capped.

With ``test_fraction = 1/6`` both rules give the paper's 2000/200 for Law/Ethics, Humanities and
Medical/Psychology and exactly 915/183 for Math/CS (1,098 rows); STEM's listed subjects hold only 2,055 rows, so
it gets 1855/200 (``holdout_first``) or 1713/200 (``proportional``) — see docs/DATA.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PositiveInt, field_validator

from fednl.data.config import TaskConfigBase, unique
from fednl.data.paths import shared_subdir
from fednl.data.prompts import LETTERS, format_mc, letters
from fednl.data.tasks.base import NaturalTask, register_task, rng_for
from fednl.data.tasks.mmlu_io import MmluRow, detect_layout, read_csv_split, read_hf_split
from fednl.data.types import ClientData, Example

@register_task
class Mmlu5Config(TaskConfigBase):
    """Non-IID MMLU, 5 domain clients (FedNL paper Table 3); see docs/DATA.md for the subject mapping."""

    name: Literal["mmlu5"] = "mmlu5"
    data_dir: Path | None = None
    """MMLU folder holding ``cais_hf_csv/`` or ``hendrycks_original/``, one of those folders, or a HF
    ``datasets`` copy saved with ``save_to_disk``. Default: the shared data folder when present."""
    layout: Literal["auto", "cais_hf_csv", "hendrycks_original", "hf"] = "auto"
    pool: list[Literal["test", "dev", "val"]] = Field(default_factory=lambda: ["test"], min_length=1)
    test_fraction: float = Field(1 / 6, gt=0, lt=1)
    max_train: PositiveInt = 2000
    max_test: PositiveInt = 200
    split_rule: Literal["holdout_first", "proportional"] = "holdout_first"
    separator: Literal["newline", "space"] = "newline"

    @field_validator("pool")
    @classmethod
    def _unique_pool(cls, pool: list[str]) -> list[str]:
        return unique(pool, "pool")

    def natural(self, tokenizer: Any, seed: int) -> NaturalTask:
        return build_mmlu5(self, tokenizer, seed)


# client -> [(the paper's name, [MMLU subjects])]: the paper's loose names mapped onto the 57 subjects.
DOMAIN_MAP: dict[str, list[tuple[str, list[str]]]] = {
    "law_ethics": [
        ("professional law", ["professional_law"]),
        ("moral scenarios", ["moral_scenarios"]),
        ("moral disputes", ["moral_disputes"]),
        ("logical fallacies", ["logical_fallacies"]),
        ("formal logic", ["formal_logic"]),
        ("international law", ["international_law"]),
        ("jurisprudence", ["jurisprudence"]),
        ("business ethics", ["business_ethics"]),
    ],
    "humanities": [
        ("miscellaneous", ["miscellaneous"]),
        ("history", ["high_school_european_history", "high_school_us_history", "high_school_world_history",
                     "prehistory"]),
        ("politics", ["high_school_government_and_politics", "us_foreign_policy"]),
        ("economics", ["econometrics", "high_school_macroeconomics", "high_school_microeconomics"]),
        ("geography", ["high_school_geography"]),
        ("sociology", ["sociology"]),
        ("philosophy", ["philosophy"]),
        ("religion", ["world_religions"]),
        ("management", ["management"]),
        ("marketing", ["marketing"]),
        ("public relations", ["public_relations"]),
        ("security studies", ["security_studies"]),
        ("global facts", ["global_facts"]),
    ],
    "stem": [
        ("elementary mathematics", ["elementary_mathematics"]),
        ("biology", ["college_biology", "high_school_biology"]),
        ("chemistry", ["college_chemistry", "high_school_chemistry"]),
        ("physics", ["college_physics", "high_school_physics", "conceptual_physics"]),
        ("astronomy", ["astronomy"]),
        ("anatomy", ["anatomy"]),
        ("electrical engineering", ["electrical_engineering"]),
    ],
    "math_cs": [
        ("high-school mathematics", ["high_school_mathematics"]),
        ("high-school statistics", ["high_school_statistics"]),
        ("machine learning", ["machine_learning"]),
        ("college mathematics", ["college_mathematics"]),
        ("high-school CS", ["high_school_computer_science"]),
        ("college CS", ["college_computer_science"]),
        ("computer security", ["computer_security"]),
        ("abstract algebra", ["abstract_algebra"]),
    ],
    "medical_psychology": [
        ("professional psychology", ["professional_psychology"]),
        ("high-school psychology", ["high_school_psychology"]),
        ("virology", ["virology"]),
        ("nutrition", ["nutrition"]),
        ("professional medicine", ["professional_medicine"]),
        ("clinical knowledge", ["clinical_knowledge"]),
        ("human aging", ["human_aging"]),
        ("college medicine", ["college_medicine"]),
        ("human sexuality", ["human_sexuality"]),
        ("medical genetics", ["medical_genetics"]),
    ],
}
DOMAINS: dict[str, list[str]] = {d: [s for _, subs in entries for s in subs] for d, entries in DOMAIN_MAP.items()}
PAPER_NAMES = {"law_ethics": "Law/Ethics", "humanities": "Humanities", "stem": "STEM", "math_cs": "Math/CS",
               "medical_psychology": "Medical/Psychology"}
PAPER_COUNTS = {"law_ethics": (2000, 200), "humanities": (2000, 200), "stem": (2000, 200), "math_cs": (915, 183),
                "medical_psychology": (2000, 200)}
UNASSIGNED = ("professional_accounting",)  # the one MMLU subject none of the paper's lists names


def split_pool(n: int, cfg: Mmlu5Config) -> tuple[int, int, int]:
    """``(n_test, train_start, n_train)`` for a shuffled pool of ``n`` rows: test is ``pool[:n_test]`` and train
    is ``pool[train_start : train_start + n_train]``."""
    raw_test = round(n * cfg.test_fraction)
    if cfg.split_rule == "holdout_first":
        n_test = min(cfg.max_test, raw_test)
        return n_test, n_test, min(cfg.max_train, n - n_test)
    return min(cfg.max_test, raw_test), raw_test, min(cfg.max_train, n - raw_test)


def _example(row: MmluRow, domain: str, split: str, i: int, separator: str) -> Example:
    return Example(
        uid=f"mmlu5/{domain}/{split}/{i:05d}",
        kind="mc",
        prompt=format_mc(row.question, row.choices, separator),
        choices=letters(4),
        answer=LETTERS[row.answer],
        meta={"client": domain, "domain": domain, "subject": row.subject, "split": split, "source": row.source},
    )


def build_mmlu5(cfg: Mmlu5Config, tokenizer, seed: int) -> NaturalTask:
    del tokenizer  # prompts are short; nothing is measured in tokens
    data_dir = cfg.data_dir or shared_subdir("mmlu")
    if data_dir is None:
        raise FileNotFoundError(
            "MMLU data not found: set task.data_dir to a folder with cais_hf_csv/ or hendrycks_original/ "
            "(or a HF datasets copy saved with save_to_disk)"
        )
    layout, root = detect_layout(data_dir, cfg.layout)
    clients, counts, pools = [], {}, {}
    for domain, subjects in DOMAINS.items():
        rows: list[MmluRow] = []
        for split in cfg.pool:
            if layout == "hf":
                rows += read_hf_split(root, split, subjects)
            else:
                rows += read_csv_split(layout, root, split, subjects)
        rng_for("mmlu5", seed, domain).shuffle(rows)
        n_test, train_start, n_train = split_pool(len(rows), cfg)
        test = [_example(r, domain, "test", i, cfg.separator) for i, r in enumerate(rows[:n_test])]
        train_rows = rows[train_start : train_start + n_train]
        train = [_example(r, domain, "train", i, cfg.separator) for i, r in enumerate(train_rows)]
        clients.append(ClientData(name=domain, train=train, test=test))
        pools[domain] = len(rows)
        counts[domain] = {"train": len(train), "test": len(test), "paper": list(PAPER_COUNTS[domain])}
    info = {
        "layout": layout,
        "pool_splits": list(cfg.pool),
        "pool_sizes": pools,
        "counts_vs_paper": counts,
        "paper_names": PAPER_NAMES,
        "unassigned_subjects": list(UNASSIGNED),
    }
    return NaturalTask(kind="mc", label_key="subject", clients=clients, info=info)
