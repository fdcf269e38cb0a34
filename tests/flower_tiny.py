"""The tiny run config shared by the Flower tests (tiny Llama, streaming text, a few clients, seconds per round)."""

from __future__ import annotations


def tiny_config(*, seed: int, rounds: int, method: str, n_clients: int = 2, parts_per_book: int = 2, extra: str = "") -> str:
    """A fednl TOML config; ``extra`` is appended (e.g. ``'wire_dtype = "bf16"'`` lands in ``[engine]``)."""
    return f"""
seed = {seed}
rounds = {rounds}
[method]
name = "{method}"
[model]
source = "tiny"
tiny_hidden = 16
tiny_layers = 2
tiny_heads = 2
tiny_kv_heads = 1
tiny_intermediate = 32
[memory]
chunk_size = 16
[lora]
r = 2
alpha = 4.0
[task]
name = "stream"
doc_length = 32
parts_per_book = {parts_per_book}
max_train = 2
max_test = 2
bin_size = 16
[task.partition]
kind = "iid"
n_clients = {n_clients}
[train]
batch_size = 2
seq_len = 32
max_steps = 1
lr = 1e-2
[engine]
threads = 1
{extra}"""
