"""The seven NIAH-7 needle templates (FedNL paper Table 4).

Each generator draws one example's needle sentences, the question, the gold option text and three hard
negatives (the other needles' values of the same haystack; for the counter, wrong running states). Needle
sentences are listed in insertion order, i.e. at increasing depth.

=============  ======================================================================  ===========================
client         needle sentence                                                         question target
=============  ======================================================================  ===========================
passkey        ``Officer <name>'s security passkey is <7 digits>.``                     a named officer's passkey
uuid           ``Operational access code for device <AB-123> is <3 hex groups of 4>.`` a device's code
name_date      ``Officer <name> filed the registration report on <Month d, yyyy>.``     an officer's filing date
phrase         ``Mission <Adj Noun>'s activation codeword is <adj-noun-00>.``           a mission's codeword
counter        ``The counter state base is <n>.`` then ``Counter event: increment|      final state modulo 8
               decrement by <k>.``
mk_niah        ``The <key> secret is <4 digits>.`` for several keys                     the queried key's secret
mv_niah        ``Codeword <i>: <5 digits>.`` for i = 1, 2, ...                          the value at a rank
=============  ======================================================================  ===========================
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

FIRST_NAMES = (
    "Ada", "Bram", "Cora", "Dmitri", "Elsa", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Lionel", "Mira",
    "Nils", "Orla", "Piet", "Quinn", "Rosa", "Soren", "Talia", "Ulric", "Vera", "Wendel", "Xenia", "Yusuf", "Zora",
)
LAST_NAMES = (
    "Ashby", "Brandt", "Calloway", "Dunmore", "Everly", "Falk", "Garrow", "Holloway", "Ingram", "Jessup", "Kessler",
    "Lindqvist", "Marlow", "Norcross", "Okafor", "Pembrook", "Quarles", "Ravensworth", "Stroud", "Tolliver",
    "Underhill", "Vance", "Whitcombe", "Yarrow", "Zeller",
)
ADJECTIVES = (
    "amber", "silver", "crimson", "quiet", "northern", "hollow", "golden", "distant", "iron", "pale", "scarlet",
    "frozen", "hidden", "copper", "velvet", "wild",
)
NOUNS = (
    "heron", "lantern", "harbor", "falcon", "meadow", "glacier", "compass", "orchard", "anchor", "ember", "willow",
    "summit", "canyon", "beacon", "thistle", "river",
)
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November",
    "December",
)
HEX = "0123456789ABCDEF"
UPPER = "ABCDEFGHJKLMNPQRSTUVWXYZ"
COUNTER_MODULUS = 8


@dataclass
class Needles:
    """One example's needles and question. ``query_index`` is the needle holding the answer (None: counter)."""

    sentences: list[str]
    question: str
    gold: str
    distractors: list[str]
    query_index: int | None
    facts: dict = field(default_factory=dict)


def _distinct(rng: random.Random, n: int, draw: Callable[[random.Random], str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = draw(rng)
        if v not in out:
            out.append(v)
    return out


def _name(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def _keyed(
    rng: random.Random,
    n: int,
    query: int,
    key: Callable[[random.Random], str],
    value: Callable[[random.Random], str],
    sentence: Callable[[str, str], str],
    question: Callable[[str], str],
) -> Needles:
    keys = _distinct(rng, n, key)
    values = _distinct(rng, n, value)
    return Needles(
        sentences=[sentence(k, v) for k, v in zip(keys, values)],
        question=question(keys[query]),
        gold=values[query],
        distractors=rng.sample([v for i, v in enumerate(values) if i != query], 3),
        query_index=query,
        facts={"keys": keys, "values": values, "query": keys[query]},
    )


def passkey(rng: random.Random, n: int, query: int) -> Needles:
    return _keyed(
        rng, n, query, _name, lambda r: str(r.randint(1_000_000, 9_999_999)),
        lambda k, v: f"Officer {k}'s security passkey is {v}.",
        lambda k: f"What is the security passkey of Officer {k}?",
    )


def uuid(rng: random.Random, n: int, query: int) -> Needles:
    return _keyed(
        rng, n, query,
        lambda r: f"{r.choice(UPPER)}{r.choice(UPPER)}-{r.randint(100, 999)}",
        lambda r: "-".join("".join(r.choice(HEX) for _ in range(4)) for _ in range(3)),
        lambda k, v: f"Operational access code for device {k} is {v}.",
        lambda k: f"What is the operational access code for device {k}?",
    )


def name_date(rng: random.Random, n: int, query: int) -> Needles:
    return _keyed(
        rng, n, query, _name,
        lambda r: f"{r.choice(MONTHS)} {r.randint(1, 28)}, {r.randint(1950, 2024)}",
        lambda k, v: f"Officer {k} filed the registration report on {v}.",
        lambda k: f"On what date did Officer {k} file the registration report?",
    )


def phrase(rng: random.Random, n: int, query: int) -> Needles:
    return _keyed(
        rng, n, query,
        lambda r: f"{r.choice(ADJECTIVES).capitalize()} {r.choice(NOUNS).capitalize()}",
        lambda r: f"{r.choice(ADJECTIVES)}-{r.choice(NOUNS)}-{r.randint(10, 99)}",
        lambda k, v: f"Mission {k}'s activation codeword is {v}.",
        lambda k: f"What is the activation codeword of Mission {k}?",
    )


def mk_niah(rng: random.Random, n: int, query: int) -> Needles:
    return _keyed(
        rng, n, query, lambda r: f"{r.choice(ADJECTIVES)} {r.choice(NOUNS)}", lambda r: str(r.randint(1000, 9999)),
        lambda k, v: f"The {k} secret is {v}.",
        lambda k: f"What is the {k} secret?",
    )


def mv_niah(rng: random.Random, n: int, query: int) -> Needles:
    values = _distinct(rng, n, lambda r: str(r.randint(10_000, 99_999)))
    rank = query + 1
    return Needles(
        sentences=[f"Codeword {i + 1}: {v}." for i, v in enumerate(values)],
        question=f"What is codeword {rank}?",
        gold=values[query],
        distractors=rng.sample([v for i, v in enumerate(values) if i != query], 3),
        query_index=query,
        facts={"values": values, "query": rank},
    )


def counter(rng: random.Random, n_events: int) -> Needles:
    """Base state then ``n_events`` increments/decrements; the answer is the final state modulo 8."""
    base = rng.randint(0, 99)
    steps = [rng.choice((-1, 1)) * rng.randint(1, 9) for _ in range(n_events)]
    sentences = [f"The counter state base is {base}."]
    sentences += [f"Counter event: {'increment' if s > 0 else 'decrement'} by {abs(s)}." for s in steps]
    final = (base + sum(steps)) % COUNTER_MODULUS
    # Hard negatives: states before the last event(s), the base alone, and the sum with every sign ignored.
    candidates = [(base + sum(steps[:t])) % COUNTER_MODULUS for t in range(n_events - 1, -1, -1)]
    candidates.append((base + sum(abs(s) for s in steps)) % COUNTER_MODULUS)
    wrong: list[str] = []
    for c in candidates:
        if c != final and str(c) not in wrong:
            wrong.append(str(c))
    pool = [str(v) for v in range(COUNTER_MODULUS) if v != final and str(v) not in wrong]
    rng.shuffle(pool)
    wrong = (wrong[:3] + pool)[:3]
    return Needles(
        sentences=sentences,
        question=f"What is the final counter state modulo {COUNTER_MODULUS}?",
        gold=str(final),
        distractors=wrong,
        query_index=None,
        facts={"base": base, "steps": steps, "final_mod": final},
    )


KEYED = {"passkey": passkey, "uuid": uuid, "name_date": name_date, "phrase": phrase, "mk_niah": mk_niah,
         "mv_niah": mv_niah}
