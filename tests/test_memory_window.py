"""Window + sinks and the memory design switches: masks, evicted writes, gates, mixing, attention transfer.

Hand-computed expectations where the maths is small (masks, the delayed write schedule) and parity between a full
forward and a stream fed in uneven pieces for every design.
"""

from __future__ import annotations

import pytest
import torch

from fednl.models import LoraConfig, MemoryConfig, ModelConfig, build_model
from fednl.models.attention import band_mask
from fednl.models.groups import param_groups
from fednl.models.titans import attention_transfer, set_gate_override, set_memory_zero, titans_layers, transfer_loss
from test_streaming import assert_stream_matches_full_forward

pytestmark = pytest.mark.usefixtures("one_thread")

TINY64 = ModelConfig(dtype="float64")


def _ids(B=2, T=40, seed=0):
    return torch.randint(0, 257, (B, T), generator=torch.Generator().manual_seed(seed))


def _model(**kw):
    cfg = {"attn_window": 6, "decay": True, "gate_init": 0.5, **kw}
    m = build_model("titans", TINY64, MemoryConfig(**cfg), LoraConfig(), seed=1)
    with torch.no_grad():  # non-trivial LoRA, beta and gate weights so every path matters
        for n, p in m.named_parameters():
            if n.endswith(("lora_B", "beta.weight", "token_gate.weight")):
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(n)))
    return m


def test_band_mask_with_sinks_by_hand():
    pos = torch.arange(6)
    m = band_mask(pos, pos, window=2, sinks=1).int().tolist()
    assert m == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 0, 0],
        [1, 0, 0, 1, 1, 0],
        [1, 0, 0, 0, 1, 1],
    ]
    assert torch.equal(band_mask(pos, pos, None, sinks=3), band_mask(pos, pos, None))


def test_sinks_default_and_validation():
    assert MemoryConfig(attn_window=64).sinks == 4
    assert MemoryConfig(attn_window=64, attn_sinks=0).sinks == 0
    assert MemoryConfig().sinks == 0
    with pytest.raises(ValueError, match="attn_sinks needs attn_window"):
        MemoryConfig(attn_sinks=2)
    with pytest.raises(ValueError, match="evicted"):
        MemoryConfig(write="evicted")
    with pytest.raises(ValueError, match="gate = 'learned'"):
        MemoryConfig(gate="fixed", gate_source="query")


DESIGNS = [
    {},
    {"attn_sinks": 0},
    {"write": "evicted"},
    {"write": "evicted", "mix": "residual", "gate_source": "query"},
    {"write": "evicted", "mix": "convex", "gate_source": "query", "decay_source": "const", "scale": 1.0},
    {"write": "evicted", "mix": "convex", "gate_source": "query", "decay_source": "key"},
    {"write": "evicted", "mix": "residual", "gate_source": "input", "attn_sinks": 2, "decay": False},
    {"mix": "residual", "gate_source": "query", "attn_window": None},
]


@pytest.mark.parametrize("design", DESIGNS)
def test_stream_matches_full_forward_for_every_design(design):
    assert_stream_matches_full_forward(_model(**design), _ids())


def test_evicted_memory_is_silent_inside_the_window_and_carries_beyond():
    """With write='evicted' the memory is empty for the first W positions, so those outputs equal the memory-off
    model's exactly; beyond W they differ (the memory carries the evicted tokens)."""
    model = _model(write="evicted", mix="residual", gate_source="query", attn_sinks=2)
    ids = _ids(T=30)
    with torch.no_grad():
        on = model(ids).logits
        set_memory_zero(model, True)
        off = model(ids).logits
        set_memory_zero(model, False)
    W = 6
    torch.testing.assert_close(on[:, :W], off[:, :W], rtol=0, atol=0)
    # the first token written (position 2, after the 2 sinks) is written at step 2 + W
    torch.testing.assert_close(on[:, : 2 + W], off[:, : 2 + W], rtol=0, atol=0)
    assert (on[:, 2 + W :] - off[:, 2 + W :]).abs().amax() > 1e-6


@pytest.mark.parametrize("mix", ["convex", "residual"])
def test_evicted_memory_costs_nothing_while_it_is_empty(mix):
    """Before position W + sinks nothing has been evicted: every mix leaves the softmax path exactly as it is."""
    model = _model(write="evicted", mix=mix, gate_source="query", attn_sinks=2)
    ids = _ids(T=30)
    with torch.no_grad():
        on = model(ids).logits
        set_gate_override(model, 0.0)
        off = model(ids).logits
    torch.testing.assert_close(on[:, : 6 + 2], off[:, : 6 + 2], rtol=0, atol=0)
    assert (on[:, 6 + 2 :] - off[:, 6 + 2 :]).abs().amax() > 1e-6


def test_residual_mix_with_gate_zero_or_zeroed_memory_is_the_softmax_path():
    model = _model(write="evicted", mix="residual", gate_source="query")
    ids = _ids(T=25)
    with torch.no_grad():
        set_gate_override(model, 0.0)
        a = model(ids).logits
        set_gate_override(model, None)
        set_memory_zero(model, True)
        b = model(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_token_gate_groups_and_shapes():
    model = _model(gate_source="query")
    groups = param_groups(model)
    gate = sorted(groups["gate"])
    assert gate and all(".token_gate." in n for n in gate)
    layer = titans_layers(model)[0]
    assert layer.token_gate.weight.shape == (layer.num_heads, layer.head_dim)
    model_in = _model(gate_source="input")
    layer = titans_layers(model_in)[0]
    assert layer.token_gate.weight.shape == (layer.num_heads, layer.hidden_size)


def test_attention_transfer_teacher_passes_on_and_loss_is_zero_for_full_attention_with_gate_zero():
    """Without a window and with gate 0 the hybrid output is the teacher's: every layer's loss is exactly 0 and the
    logits are the unconverted model's."""
    model = _model(attn_window=None)
    ids = _ids(T=20)
    set_gate_override(model, 0.0)
    with torch.no_grad():
        plain = model(ids).logits
    with attention_transfer(model) as layers:
        out = model(ids).logits
        loss = transfer_loss(layers)
    assert loss.item() == 0.0
    torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)
    assert all(layer.transfer is False and layer.transfer_loss is None for layer in layers)


def test_attention_transfer_trains_only_memory_parameters():
    model = _model(write="evicted", mix="residual", gate_source="query")
    for n, p in model.named_parameters():
        p.requires_grad_(".beta." in n or ".decay." in n or ".token_gate." in n)
    ids = _ids(T=24)
    with attention_transfer(model) as layers:
        model(ids)
        loss = transfer_loss(layers)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert loss.item() > 0
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".token_gate." in n)
    with pytest.raises(RuntimeError, match="no attention-transfer loss"):
        transfer_loss(titans_layers(model))


def test_lifting_the_window_of_an_evicted_memory_streams_like_full_attention():
    """The "full" evaluation condition lifts the window; an evicted-write memory then never receives a token, so a
    stream (as the passkey benchmark runs it) equals the full-attention forward."""
    from fednl.eval.memory import condition

    model = _model(write="evicted", mix="convex", gate_source="query")
    ids = _ids(T=30)
    with condition(model, "full"):
        assert_stream_matches_full_forward(model, ids, pieces=(11, 19))
    for layer in titans_layers(model):
        layer.window = None  # without the gate override too: the memory stays empty
    with torch.no_grad():
        on = model(ids).logits
        set_gate_override(model, 0.0)
        off = model(ids).logits
    torch.testing.assert_close(on, off, rtol=0, atol=0)
