"""The small CPU configuration the robustness scripts share (``hostile_drill.py``, ``dp_cost.py``): a random tiny
Llama (byte tokenizer) on the embedded book cut into IID clients, 4 local steps per round, one thread."""

from __future__ import annotations


def tiny_stream_config(*, seed: int, rounds: int, clients: int, method: str = "fednl", extra: str = "") -> str:
    """The run config as TOML text; ``extra`` adds whole sections (e.g. ``"[screen]\\nnorm_k = 10\\n"``). FedNL
    runs with its default scope, ``"rules"``."""
    return f"""
seed = {seed}
rounds = {rounds}
[method]
name = "{method}"
[model]
source = "tiny"
tiny_hidden = 32
tiny_layers = 2
tiny_heads = 2
tiny_kv_heads = 1
tiny_intermediate = 64
[memory]
chunk_size = 32
[lora]
r = 4
alpha = 8.0
[task]
name = "stream"
doc_length = 96
parts_per_book = {clients}
max_train = 4
max_test = 2
bin_size = 32
[task.partition]
kind = "iid"
n_clients = {clients}
[train]
batch_size = 2
seq_len = 96
max_steps = 4
lr = 5e-2
[engine]
threads = 1
progress = false
{extra}"""
