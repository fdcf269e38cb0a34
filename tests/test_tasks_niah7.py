"""NIAH-7: every gold answer is re-derived from the prompt text alone; lengths, depths, balance, determinism."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from fednl.data import ContextTooShort, Niah7Config, build_task, task_fingerprint
from fednl.data.paths import SHARED_ENV
from fednl.data.text import TokenCounter, load_books
from fednl.data.tasks.niah7 import auto_length
from fednl.models.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
NAME = r"[A-Z][a-z]+ [A-Z][a-z]+"
# template -> (needle regex with (key, value) groups, question regex with the key group)
KEYED = {
    "passkey": (rf"Officer ({NAME})'s security passkey is (\d{{7}})\.",
                rf"What is the security passkey of Officer ({NAME})\?"),
    "uuid": (r"Operational access code for device ([A-Z]{2}-\d{3}) is ([0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4})\.",
             r"What is the operational access code for device ([A-Z]{2}-\d{3})\?"),
    "name_date": (rf"Officer ({NAME}) filed the registration report on ([A-Z][a-z]+ \d{{1,2}}, \d{{4}})\.",
                  rf"On what date did Officer ({NAME}) file the registration report\?"),
    "phrase": (rf"Mission ({NAME})'s activation codeword is ([a-z]+-[a-z]+-\d{{2}})\.",
               rf"What is the activation codeword of Mission ({NAME})\?"),
    "mk_niah": (r"The ([a-z]+ [a-z]+) secret is (\d{4})\.", r"What is the ([a-z]+ [a-z]+) secret\?"),
    "mv_niah": (r"Codeword (\d+): (\d{5})\.", r"What is codeword (\d+)\?"),
}


def split_prompt(prompt: str) -> tuple[str, str, dict[str, str]]:
    """(context, question, {letter: option text}) parsed from the prompt text."""
    context, _, block = prompt.rpartition("\n\nQuestion: ")
    lines = block.split("\n")
    assert lines[-1] == "Answer:"
    options = {}
    for line in lines[1:-1]:
        letter, _, text = line.partition(". ")
        options[letter] = text
    return context, lines[0], options


def derive_gold(template: str, prompt: str, n_needles: int) -> str:
    """The gold option text computed from the haystack and question only."""
    context, question, _ = split_prompt(prompt)
    if template == "counter":
        base = re.findall(r"The counter state base is (\d+)\.", context)
        events = re.findall(r"Counter event: (increment|decrement) by (\d)\.", context)
        assert len(base) == 1 and len(events) == n_needles - 1
        assert context.index("The counter state base") < context.index("Counter event:")
        total = int(base[0]) + sum(int(k) if op == "increment" else -int(k) for op, k in events)
        assert re.fullmatch(r"What is the final counter state modulo 8\?", question)
        return str(total % 8)
    needle_re, question_re = KEYED[template]
    pairs = re.findall(needle_re, context)
    assert len(pairs) == n_needles, (template, pairs)
    table = dict(pairs)
    assert len(table) == n_needles, "keys must be distinct"
    key = re.fullmatch(question_re, question).group(1)
    return table[key]


@pytest.fixture(scope="module")
def quick():
    return build_task({"name": "niah7", "quickstart": True}, TOK, seed=3)


def test_every_gold_answer_rederived_from_context(quick):
    names = ["passkey", "uuid", "name_date", "phrase", "counter", "mk_niah", "mv_niah"]
    assert [c.name for c in quick.clients] == names
    n_checked = 0
    for client in quick.clients:
        for ex in client.train + client.test:
            n_needles = 5 if client.name == "counter" else 4
            gold = derive_gold(client.name, ex.prompt, n_needles)
            _, _, options = split_prompt(ex.prompt)
            assert list(options) == list(ex.choices) == ["A", "B", "C", "D"]
            assert len(set(options.values())) == 4, "options must be distinct"
            letters = [k for k, v in options.items() if v == gold]
            assert letters == [ex.answer], (ex.uid, gold, options)
            assert ex.meta["gold"] == gold and ex.meta["template"] == client.name
            n_checked += 1
    assert n_checked == 7 * (24 + 8)


def test_hard_negatives_come_from_the_same_haystack(quick):
    for client in quick.clients:
        if client.name == "counter":
            continue
        for ex in client.train[:8]:
            context, _, options = split_prompt(ex.prompt)
            needle_values = dict(re.findall(KEYED[client.name][0], context)).values()
            assert set(options.values()) <= set(needle_values)


def test_counter_distractors_are_valid_residues(quick):
    counter = quick.client("counter")
    for ex in counter.train + counter.test:
        _, _, options = split_prompt(ex.prompt)
        assert all(v in {str(i) for i in range(8)} for v in options.values())
        steps = ex.meta["facts"]["steps"]
        assert len(steps) == 4 and all(1 <= abs(s) <= 9 for s in steps)


def test_lengths_are_measured_with_the_tokenizer(quick):
    length = quick.info["train_lengths"][0]
    assert length == 1536  # quickstart "auto": 1,500 characters -> bytes, rounded up to 128
    for client in quick.clients:
        for ex in client.train + client.test:
            n = len(TOK.encode(ex.prompt))
            assert n == ex.meta["n_tokens"]
            assert length - 32 <= n <= length


def test_gold_letters_queries_and_lengths_balanced():
    task = build_task(
        {"name": "niah7", "templates": ["passkey", "counter"], "n_train": 12, "n_test": 6, "n_long_test": 2,
         "train_lengths": [1024, 2048], "test_lengths": [1024, 2048, 3072], "long_test_lengths": [4096]},
        TOK, seed=0,
    )
    passkey = task.client("passkey")
    assert Counter(ex.answer for ex in passkey.train) == {"A": 3, "B": 3, "C": 3, "D": 3}
    assert Counter(ex.meta["depth"] for ex in passkey.train) == {0.1: 3, 0.3: 3, 0.5: 3, 0.7: 3}
    assert Counter(ex.meta["context_length"] for ex in passkey.train) == {1024: 6, 2048: 6}
    short = [ex for ex in passkey.test if ex.meta["split"] == "test"]
    long = [ex for ex in passkey.test if ex.meta["split"] == "test_long"]
    assert Counter(ex.meta["context_length"] for ex in short) == {1024: 2, 2048: 2, 3072: 2}
    assert [ex.meta["context_length"] for ex in long] == [4096, 4096]
    assert long[0].uid == "niah7/passkey/test_long/00000"
    counter = task.client("counter")
    assert all(ex.meta["depth"] is None for ex in counter.train)
    assert counter.train[0].meta["depths"] == [1 / 14, 3 / 14, 5 / 14, 7 / 14, 9 / 14, 11 / 14, 13 / 14]


def test_needles_land_at_the_requested_depths():
    task = build_task(
        {"name": "niah7", "templates": ["mk_niah", "counter"], "n_train": 4, "n_test": 0, "n_long_test": 0,
         "train_lengths": [8192]}, TOK, seed=1,
    )
    for client in task.clients:
        for ex in client.train:
            realized, target = ex.meta["needle_depths"], ex.meta["depths"]
            assert realized == sorted(realized)
            assert max(abs(r - t) for r, t in zip(realized, target)) < 0.05, (realized, target)
            # the recorded token offsets point at the needle sentences
            ids, at = TOK.encode(ex.prompt), 0
            for start, needle in zip(ex.meta["needle_token_starts"], ex.meta["needles"]):
                assert TOK.decode(ids[start:]).startswith(" " + needle)
                at = ex.prompt.index(needle, at)
                assert len(TOK.encode(ex.prompt[: at - 1])) == start
                at += len(needle)


def test_same_seed_same_bytes_other_seed_differs():
    cfg = {"name": "niah7", "quickstart": True, "n_train": 4, "n_test": 2}
    a, b = build_task(cfg, TOK, 7), build_task(cfg, TOK, 7)
    assert task_fingerprint(a) == task_fingerprint(b)
    dump = lambda t: [json.dumps(r, sort_keys=True) for r in t.iter_records()]  # noqa: E731
    assert dump(a) == dump(b)
    assert task_fingerprint(build_task(cfg, TOK, 8)) != task_fingerprint(a)


def test_context_too_short_for_the_needles_is_a_clear_error():
    with pytest.raises(ContextTooShort, match=r"niah7 template 'passkey'.*context_length=200.*too short"):
        build_task({"name": "niah7", "templates": ["passkey"], "n_train": 1, "n_test": 0, "n_long_test": 0,
                    "train_lengths": [200]}, TOK, 0)
    # Room for the needles and question, but not for haystack between the four depths.
    first = build_task({"name": "niah7", "templates": ["passkey"], "n_train": 1, "n_test": 0, "n_long_test": 0,
                        "train_lengths": [1024]}, TOK, 0).clients[0].train[0]
    fixed = sum(len(n) + 1 for n in first.meta["needles"]) + len(first.prompt) - first.prompt.rindex("\n\nQuestion:")
    with pytest.raises(ContextTooShort, match="cannot separate 4 inserts"):
        build_task({"name": "niah7", "templates": ["passkey"], "n_train": 1, "n_test": 0, "n_long_test": 0,
                    "train_lengths": [fixed + 40]}, TOK, 0)


def test_default_haystack_is_embedded_and_never_reads_shared(monkeypatch, tmp_path):
    monkeypatch.setenv(SHARED_ENV, str(tmp_path / "nowhere"))
    task = build_task({"name": "niah7", "quickstart": True, "n_train": 2, "n_test": 1}, TOK, 0)
    assert task.info["haystack"] == ["chesterton-thursday"] and task.info["haystack_source"] == "embedded"


def test_haystack_folder_of_books(tmp_path):
    sentence = "The quiet river ran under the old stone bridge near the mill. "
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(f"[Book {name}]\n\n" + (sentence * 40 + "\n\n") * 8)
    task = build_task({"name": "niah7", "data_dir": str(tmp_path), "templates": ["phrase"], "n_train": 6,
                       "n_test": 0, "n_long_test": 0, "train_lengths": [1024]}, TOK, 0)
    assert task.info["haystack"] == ["a", "b"]
    for ex in task.clients[0].train:
        assert "Book a" not in ex.prompt  # the [title] line is dropped
        assert derive_gold("phrase", ex.prompt, 4) == ex.meta["gold"]


def test_auto_length_follows_the_tokenizer():
    books = load_books(None)

    class FourChars(ByteTokenizer):  # a sub-word-like tokenizer: one token per 4 characters
        def encode(self, text):
            return list(range((len(text) + 3) // 4))

    assert auto_length(books, TokenCounter(TOK)) == 1536
    assert auto_length(books, TokenCounter(FourChars())) == 384


def test_config_validation():
    with pytest.raises(ValueError, match="depths"):
        Niah7Config(depths=[0.3, 0.1, 0.5, 0.7])
    with pytest.raises(ValueError, match="depths"):
        Niah7Config(depths=[0.0, 0.3, 0.5, 0.7])
    with pytest.raises(ValueError, match="long_test_lengths"):
        Niah7Config(n_long_test=2, long_test_lengths=[])
    cfg = Niah7Config(quickstart=True, n_train=5)
    assert (cfg.n_train, cfg.n_test, cfg.train_lengths, cfg.n_long_test) == (5, 8, "auto", 0)
    assert Niah7Config().n_train == 750 and Niah7Config().train_lengths == [1024, 2048, 4096]


class PairTok(ByteTokenizer):
    """ceil(chars / 2) tokens: piece counts over-estimate the whole (exercises the exact-offset fallback)."""

    def encode(self, text):
        return list(range((len(text) + 1) // 2))


class JoinTok(ByteTokenizer):
    """One token per char plus one per ". ": joins create tokens pieces did not have (exercises trimming)."""

    def encode(self, text):
        return list(range(len(text) + text.count(". ")))


@pytest.mark.parametrize("tok", [PairTok(), JoinTok()], ids=["pair", "join"])
def test_non_additive_tokenizers_still_meet_the_length(tok):
    task = build_task({"name": "niah7", "templates": ["passkey", "counter"], "n_train": 6, "n_test": 0,
                       "n_long_test": 0, "train_lengths": [900]}, tok, 4)
    for client in task.clients:
        for ex in client.train:
            n = len(tok.encode(ex.prompt))
            assert n == ex.meta["n_tokens"] and 900 - 40 <= n <= 900
            assert derive_gold(client.name, ex.prompt, 7 if client.name == "counter" else 4) == ex.meta["gold"]
            at = 0
            for start, needle in zip(ex.meta["needle_token_starts"], ex.meta["needles"]):
                at = ex.prompt.index(needle, at)
                assert len(tok.encode(ex.prompt[: at - 1])) == start
                at += len(needle)


def test_books_too_short_for_the_context_are_skipped(tmp_path):
    (tmp_path / "long.txt").write_text("A plain sentence of filler text goes here. " * 400)
    (tmp_path / "short.txt").write_text("Too short to hold a context. " * 5)
    task = build_task({"name": "niah7", "data_dir": str(tmp_path), "templates": ["mk_niah"], "n_train": 8,
                       "n_test": 0, "n_long_test": 0, "train_lengths": [4096]}, TOK, 0)
    assert {ex.meta["book"] for ex in task.clients[0].train} == {"long"}
    with pytest.raises(ContextTooShort, match="'short' is shorter than the requested"):
        build_task({"name": "niah7", "data_dir": str(tmp_path / "short.txt"), "templates": ["mk_niah"],
                    "n_train": 1, "n_test": 0, "n_long_test": 0, "train_lengths": [4096]}, TOK, 0)
