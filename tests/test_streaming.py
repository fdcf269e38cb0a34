"""StreamingLM: chunk-by-chunk parity with one full forward, bounded state, greedy generation, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fednl.models import LoraConfig, MemoryConfig, ModelConfig, StreamingLM, build_model, load_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


TINY64 = ModelConfig(dtype="float64")


def _ids(B=2, T=40, seed=0):
    return torch.randint(0, 257, (B, T), generator=torch.Generator().manual_seed(seed))


def _converted(window, **kw):
    m = build_model("titans", TINY64, MemoryConfig(attn_window=window, decay=True, gate_init=0.5, **kw),
                    LoraConfig(), seed=1)
    with torch.no_grad():  # non-trivial LoRA and beta so every path matters
        for n, p in m.named_parameters():
            if n.endswith("lora_B") or n.endswith("beta.weight"):
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(n)))
    return m


def assert_stream_matches_full_forward(model, ids, pieces=(7, 1, 13, 2, 17)) -> StreamingLM:
    """Feed ``ids`` in uneven pieces; the log-probabilities must equal one full forward's. Returns the stream."""
    full = F.log_softmax(model(ids).logits, dim=-1)
    lm = StreamingLM(model)
    out, s = [], 0
    for n in pieces:
        out.append(lm.feed(ids[:, s : s + n]))
        s += n
    torch.testing.assert_close(torch.cat(out, dim=1), full, rtol=1e-9, atol=1e-9)
    return lm


@pytest.mark.parametrize("window", [None, 1, 6])
def test_streaming_matches_full_forward(window):
    lm = assert_stream_matches_full_forward(_converted(window), _ids())
    assert lm.position == 40


@pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning")  # the current HF cache API only
def test_streaming_baseline_uses_the_hf_cache_and_matches():
    model = load_backbone(TINY64)[0]
    ids = _ids(T=30)
    full = F.log_softmax(model(ids).logits, dim=-1)
    lm = StreamingLM(model)
    assert not lm.converted
    out = torch.cat([lm.feed(ids[:, :11]), lm.feed(ids[:, 11:12]), lm.feed(ids[:, 12:])], dim=1)
    torch.testing.assert_close(out, full, rtol=1e-9, atol=1e-9)
    assert lm.state_nbytes() == 2 * 2 * 2 * 2 * 30 * 16 * 8  # layers * (k, v) * B * kv heads * T * D * 8 bytes


@pytest.mark.parametrize("sinks,write", [(0, "all"), (None, "all"), (3, "evicted")])
def test_window_bounds_the_carried_state(sinks, write):
    model = _converted(5, attn_sinks=sinks, write=write)
    n_sinks = 4 if sinks is None else sinks  # default: 4 sinks whenever a window is set
    lm = StreamingLM(model)
    sizes = []
    for i in range(12):
        lm.feed(_ids(T=9, seed=i))
        sizes.append(lm.state_nbytes())
        for st in lm.streams:
            assert st.k.shape == (2, 2, 4 + n_sinks, 16) and st.state.shape == (2, 4, 16, 16)
            assert st.k_pos.tolist() == list(range(n_sinks)) + list(range(lm.position - 4, lm.position))
            assert (st.pending is None) == (write == "all")
            if st.pending is not None:
                assert st.pending[0].shape == (2, 5, 4, 16)  # the last window's writes wait for eviction
    assert len(set(sizes)) == 1
    unbounded = StreamingLM(_converted(None))
    for i in range(3):
        unbounded.feed(_ids(T=9, seed=i))
    assert unbounded.streams[0].k.shape[2] == 27


def test_score_and_reset():
    model = _converted(4)
    ids = _ids(T=23)
    full = F.log_softmax(model(ids).logits, dim=-1)
    expected = full[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    lm = StreamingLM(model)
    torch.testing.assert_close(lm.score(ids, chunk_size=5), expected, rtol=1e-9, atol=1e-9)
    lm.reset()
    assert lm.position == 0 and lm.state_nbytes() == 0
    torch.testing.assert_close(lm.score(ids, chunk_size=23), expected, rtol=1e-9, atol=1e-9)
    model(ids)  # the model is usable for ordinary forwards between feeds (no stream left installed)
    assert all(layer.stream is None for layer in lm.layers)


def test_generate_is_greedy():
    model = _converted(3)
    prompt = _ids(T=6)
    new = StreamingLM(model).generate(prompt, 5)
    seq = prompt
    for _ in range(5):  # naive reference: full forward over the growing sequence each step
        nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(new, seq[:, 6:])
    assert StreamingLM(model).generate(prompt, 0).shape == (2, 0)
    first = int(new[0, 0])
    stopped = StreamingLM(model).generate(prompt[:1], 5, eos_id=first)
    assert stopped.tolist() == [[first]]


def test_hf_generate_on_a_converted_model_matches_streaming():
    """convert_to_titans turns HF caching off, so HF generate() recomputes the prefix and agrees with us."""
    model = _converted(3)
    prompt = _ids(B=1, T=6, seed=3)
    hf = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(hf[:, 6:], StreamingLM(model).generate(prompt, 5))


def test_streaming_errors():
    lm = StreamingLM(_converted(4))
    with pytest.raises(ValueError, match="integer tensor"):
        lm.feed(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="integer tensor"):
        lm.feed(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one token"):
        lm.feed(torch.zeros(2, 0, dtype=torch.long))
    lm.feed(_ids(T=3))
    with pytest.raises(ValueError, match="batch size changed"):
        lm.feed(_ids(B=1, T=3))
    with pytest.raises(ValueError, match="chunk_size"):
        lm.score(_ids(T=3), chunk_size=0)
