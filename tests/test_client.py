"""Level 1 client: ClientState persistence, batching/loss masks, and run_client_round's behaviour."""

from __future__ import annotations

import math

import pytest
import torch

from fednl.client.batching import IGNORE, choice_tokens, collate, encode_example
from fednl.client.state import ClientState
from fednl.client.trainer import run_client_round, task_loss
from fednl.config import TrainConfig
from fednl.data.types import Example
from fednl.strategies.base import Payload
from fednl.strategies.fednl import FedNL
from test_engine_toy import ToyMemoryLM, mc_example, tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TOK = tokenizer()


# ---------------------------------------------------------------------------------------------- state
def test_client_state_roundtrip_and_nbytes(tmp_path) -> None:
    st = ClientState("c0", {"param/a": torch.arange(6.0).reshape(2, 3), "opt/step/a": torch.tensor(3.0)},
                     {"rounds_trained": 2, "note": "x"})
    assert st.nbytes() == 6 * 4 + 4
    st.save(tmp_path / "c0")
    back = ClientState.load(tmp_path / "c0")
    assert back.cid == "c0" and back.info == st.info
    assert set(back.tensors) == set(st.tensors) and all(torch.equal(back.tensors[k], st.tensors[k]) for k in st.tensors)
    assert back.local_params().keys() == {"a"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c0.json", "c0.safetensors"]  # no temp files left


def test_client_state_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="client state file missing"):
        ClientState.load(tmp_path / "nobody")
    ClientState("c", {"param/x": torch.ones(3)}).save(tmp_path / "c")
    (tmp_path / "c.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable safetensors"):
        ClientState.load(tmp_path / "c")


# ---------------------------------------------------------------------------------------------- batching
class WordTok:
    """A tokenizer where ' A' / ' B' are single tokens (like SmolLM2's BPE)."""

    vocab_size, eos_id = 10, 0
    table = {" A": 1, " B": 2, "q": 3, "Answer:": 4, "x": 5}

    def encode(self, text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            for piece, tid in sorted(self.table.items(), key=lambda kv: -len(kv[0])):
                if text.startswith(piece, i):
                    out.append(tid)
                    i += len(piece)
                    break
            else:
                i += 1  # ignore unknown characters
        return out

    def decode(self, ids) -> str:
        inv = {v: k for k, v in self.table.items()}
        return "".join(inv.get(int(i), "") for i in ids)


def test_choice_tokens_single_token_or_separator() -> None:
    assert choice_tokens(WordTok(), ("A", "B")) == ([], [1, 2])
    assert choice_tokens(TOK, ("A", "B", "C")) == ([32], [65, 66, 67])  # byte tokenizer: space, then letter
    with pytest.raises(ValueError, match="distinct single tokens"):
        choice_tokens(TOK, ("AA", "B"))


def test_mc_sequence_and_loss_mask_only_on_answer_letter() -> None:
    ex = Example("u", "mc", "q Answer:", ("A", "B"), "B")
    enc = encode_example(ex, TOK, seq_len=64)
    prompt = list(b"q Answer:") + [32]
    assert list(enc.ids) == prompt + [66] and enc.n_prompt == len(prompt) and enc.gold == 1
    b = collate([enc, encode_example(Example("v", "mc", "Answer:", ("A", "B"), "A"), TOK, 64)], TOK.eos_id)
    # row 0: inputs = ids[:-1]; the only target is 'B' (66) at the last prompt position
    assert b.input_ids[0].tolist() == prompt
    assert b.targets[0].tolist() == [IGNORE] * (len(prompt) - 1) + [66]
    assert int(b.last_prompt[0]) == len(prompt) - 1
    # row 1 is shorter: right-padded with eos, padding ignored
    n1 = len(b"Answer: ")
    assert b.input_ids[1, n1:].tolist() == [TOK.eos_id] * (len(prompt) - n1)
    assert b.targets[1].tolist() == [IGNORE] * (n1 - 1) + [65] + [IGNORE] * (len(prompt) - n1)
    assert b.num_target_tokens == 2


def test_mc_with_single_token_letters_and_left_truncation() -> None:
    ex = Example("u", "mc", "x" * 10 + "qAnswer:", ("A", "B"), "A")
    enc = encode_example(ex, WordTok(), seq_len=4)  # 12 prompt tokens + 1 answer > 5 tokens: keep the last 4 prompt tokens
    assert list(enc.ids) == [5, 5, 3, 4, 1] and enc.truncated and enc.n_prompt == 4


def test_qa_and_text_sequences() -> None:
    qa = encode_example(Example("q", "qa", "code is", answer="42"), TOK, seq_len=64)
    assert list(qa.ids) == list(b"code is 42") and qa.loss_from == len(b"code is")  # space inserted
    qa2 = encode_example(Example("q", "qa", "code: ", answer="42"), TOK, seq_len=64)
    assert list(qa2.ids) == list(b"code: 42")  # prompt already ends in whitespace
    text = encode_example(Example("t", "text", "abcdefgh"), TOK, seq_len=4)
    assert list(text.ids) == list(b"abcde") and text.truncated and text.loss_from == 1  # right-truncated
    b = collate([text], TOK.eos_id)
    assert b.targets[0].tolist() == list(b"bcde")  # full next-token loss
    with pytest.raises(ValueError, match="leaves no room"):
        encode_example(Example("q", "qa", "p", answer="x" * 10), TOK, seq_len=4)


def test_task_loss_is_cross_entropy_on_answer_token_only() -> None:
    model = ToyMemoryLM()
    encs = [encode_example(mc_example(f"u{i}", i, "AB"[i % 2]), TOK, 64) for i in range(3)]
    batch = collate(encs, TOK.eos_id)
    logits = model(batch.input_ids)
    manual = []
    for b, e in enumerate(encs):
        pos = e.n_prompt - 1
        manual.append(-torch.log_softmax(logits[b, pos], -1)[e.ids[-1]])
    assert torch.allclose(task_loss(model, batch), torch.stack(manual).mean(), atol=1e-6)


# ---------------------------------------------------------------------------------------------- the round
def cfg(**kw) -> TrainConfig:
    base = dict(batch_size=2, seq_len=32, lr=0.05, grad_clip=0.0)
    return TrainConfig(**{**base, **kw})


def setup(scope: str = "rules"):
    model = ToyMemoryLM()
    strat = FedNL(FedNL.Options(scope=scope), groups=model.groups())
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    glob = strat.init_server(live)
    initial = {n: live[n].clone() for n in strat.local_names()}
    with torch.no_grad():
        model.gate.fill_(1.0)
    return model, strat, glob, initial


def train(model, strat, glob, initial, state, examples, seed=0, rnd=1, **kw):
    return run_client_round(model, strat, state.cid, Payload(dict(glob)), state, examples, TOK, cfg(**kw), rnd,
                            torch.Generator().manual_seed(seed), initial_local=initial)


EXAMPLES = [mc_example(f"u{i}", i, "AB"[i % 2]) for i in range(5)]


def test_round_trains_only_trainable_and_replies_shared_names() -> None:
    model, strat, glob, initial = setup()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    st = ClientState("c0")
    rep = train(model, strat, glob, initial, st, EXAMPLES, epochs=2)
    assert set(rep.payload.tensors) == {"rule_k", "rule_beta", "gate"}
    assert rep.num_examples == 5 and rep.metrics["steps"] == 6  # 2 epochs x ceil(5 / 2)
    assert math.isfinite(rep.metrics["train_loss"]) and rep.metrics["train_tokens"] == 10
    after = dict(model.named_parameters())
    for n in ("emb", "head"):
        assert torch.equal(after[n], before[n])
    for n in ("rule_k", "rule_beta", "lora_A", "lora_B"):
        assert not torch.equal(after[n], before[n]), n
    # the payload's gate (0.0) was installed over the live 1.0 before training
    assert abs(float(rep.payload.tensors["gate"]) - 0.0) < 0.5
    # LoRA stays local: persisted in the client state, never in the reply
    assert set(st.local_params()) == {"lora_A", "lora_B"}
    assert torch.equal(st.local_params()["lora_B"], after["lora_B"].detach())
    assert st.info == {"rounds_trained": 1, "last_round": 1, "steps_trained": 6}


def test_clients_sharing_one_model_do_not_leak_local_params() -> None:
    # B trained after A on the shared model == B trained alone on a fresh model
    model, strat, glob, initial = setup()
    train(model, strat, glob, initial, ClientState("A"), EXAMPLES[:3], seed=1)
    st_b = ClientState("B")
    rep_b = train(model, strat, glob, initial, st_b, EXAMPLES[2:], seed=2)
    model2, strat2, glob2, initial2 = setup()
    st_b2 = ClientState("B")
    rep_b2 = train(model2, strat2, glob2, initial2, st_b2, EXAMPLES[2:], seed=2)
    for n in rep_b.payload.tensors:
        assert torch.equal(rep_b.payload.tensors[n], rep_b2.payload.tensors[n])
    for n in st_b.tensors:
        assert torch.equal(st_b.tensors[n], st_b2.tensors[n])


def test_second_round_starts_from_persisted_local_params() -> None:
    model, strat, glob, initial = setup()
    st = ClientState("c")
    train(model, strat, glob, initial, st, EXAMPLES, max_steps=1)
    saved = {k: v.clone() for k, v in st.local_params().items()}
    with torch.no_grad():  # another client scribbles over the shared model
        model.lora_B.fill_(123.0)
    train(model, strat, glob, initial, st, EXAMPLES, max_steps=1, lr=1e-12, optimizer="sgd", rnd=2)
    assert torch.allclose(st.local_params()["lora_B"], saved["lora_B"], atol=1e-9)


def test_seeded_shuffling_is_deterministic() -> None:
    outs = []
    for seed in (5, 5, 6):
        model, strat, glob, initial = setup()
        outs.append(train(model, strat, glob, initial, ClientState("c"), EXAMPLES, seed=seed, max_steps=2))
    a, b, c = (o.payload.tensors["rule_k"] for o in outs)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_grad_clip_bounds_the_update() -> None:
    model, strat, glob, initial = setup("rules+lora")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    start.update(glob)
    train(model, strat, glob, initial, ClientState("c"), EXAMPLES[:2], max_steps=1, optimizer="sgd", lr=1.0,
          grad_clip=1e-3)
    delta = torch.cat([(p.detach() - start[n]).flatten() for n, p in model.named_parameters() if p.requires_grad])
    assert 0 < float(delta.norm()) <= 1e-3 * (1 + 1e-4)


def test_persisted_optimizer_continues_adam_moments() -> None:
    one = [EXAMPLES[0]]
    # two rounds x one step with persisted moments, the server echoing the client's own values ...
    model, strat, glob, initial = setup("rules+lora")
    st = ClientState("c")
    rep = train(model, strat, glob, initial, st, one, max_steps=1, persist_optimizer=True, weight_decay=0.01)
    assert {k.split("/")[1] for k in st.tensors if k.startswith("opt/")} == {"step", "exp_avg", "exp_avg_sq"}
    rep = train(model, strat, rep.payload.tensors, initial, st, one, max_steps=1, persist_optimizer=True,
                weight_decay=0.01, rnd=2)
    # ... equals one round of two steps
    model2, strat2, glob2, initial2 = setup("rules+lora")
    rep2 = train(model2, strat2, glob2, initial2, ClientState("c"), one, max_steps=2, weight_decay=0.01)
    for n in rep.payload.tensors:
        assert torch.allclose(rep.payload.tensors[n], rep2.payload.tensors[n], atol=1e-7), n


def test_round_errors() -> None:
    model, strat, glob, initial = setup()
    with pytest.raises(ValueError, match="no training examples"):
        train(model, strat, glob, initial, ClientState("c"), [])
    with pytest.raises(ValueError, match="no persisted or initial value"):
        run_client_round(model, strat, "c", Payload(dict(glob)), ClientState("c"), EXAMPLES, TOK, cfg(), 1,
                         torch.Generator().manual_seed(0))
