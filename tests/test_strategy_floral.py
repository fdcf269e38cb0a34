"""FLoRAL: p(k|c) aggregation by hand, C = 1 + fixed router ≡ FedAvg, private router, ScaledGD, model parity."""

from __future__ import annotations

import pytest
import torch

from fednl.models import LoRALinear, build_model, param_groups
from fednl.models.floral import FloralLinear, FloralRouter, floral_modules
from fednl.models.spec import ModelSpec
from fednl.strategies.base import ClientReply, Payload, StrategyError, weighted_mean
from fednl.strategies.floral import (
    ORACLE_MARGIN,
    PI_KEY,
    FLoRAL,
    floral_aggregate,
    routing_weights,
    scaled_gd_,
    scaled_gd_reference,
)
from test_strategy_harness import LORA, TINY, build_for, final_state, hand_ctx, run_sim

# ---------------------------------------------------------------------------------------------- aggregation
N = [1.0, 3.0]
PI = [[0.5, 0.5], [0.25, 0.75]]


def test_routing_weights_by_hand() -> None:
    # p(k) = [1/4, 3/4]; p(k,c) = [[1/8, 1/8], [3/16, 9/16]]; p(c) = [5/16, 11/16]
    w = routing_weights(N, PI)
    expected = torch.tensor([[0.4, 2 / 11], [0.6, 9 / 11]], dtype=torch.float64)
    assert torch.allclose(w, expected)
    assert torch.allclose(w.sum(0), torch.ones(2, dtype=torch.float64))


def test_adaptor_and_base_aggregation_by_hand() -> None:
    # Prepare: an adaptor tensor [C=2, 1] and a base tensor [1]
    sets = [{"ad": torch.tensor([[1.0], [2.0]]), "base": torch.tensor([0.0])},
            {"ad": torch.tensor([[3.0], [4.0]]), "base": torch.tensor([4.0])}]
    # Execute
    out = floral_aggregate(sets, N, PI, {"ad"}, previous={"ad": torch.zeros(2, 1), "base": torch.zeros(1)})
    # Assert: c0 = 0.4·1 + 0.6·3 = 2.2; c1 = 2/11·2 + 9/11·4 = 40/11; base = 1/4·0 + 3/4·4 = 3
    assert torch.allclose(out["ad"], torch.tensor([[2.2], [40 / 11]]))
    assert torch.allclose(out["base"], torch.tensor([3.0]))


def test_an_adaptor_nobody_routes_to_keeps_its_value() -> None:
    sets = [{"ad": torch.tensor([[1.0], [2.0]])}, {"ad": torch.tensor([[3.0], [4.0]])}]
    out = floral_aggregate(sets, N, [[1.0, 0.0], [1.0, 0.0]], {"ad"}, previous={"ad": torch.tensor([[0.0], [7.0]])})
    assert torch.allclose(out["ad"], torch.tensor([[2.5], [7.0]]))  # c0: 1/4·1 + 3/4·3; c1: nobody → previous


def test_c1_aggregation_is_the_fedavg_mean() -> None:
    g = torch.Generator().manual_seed(0)
    sets = [{"ad": torch.randn(1, 3, 2, generator=g), "b": torch.randn(4, generator=g)} for _ in range(3)]
    n = [2.0, 5.0, 1.0]
    out = floral_aggregate(sets, n, [[1.0]] * 3, {"ad"}, previous=sets[0])
    ref = weighted_mean(sets, n)
    assert all(torch.allclose(out[k], ref[k], atol=1e-7) for k in ref)


# ---------------------------------------------------------------------------------------------- model
def floral_layer(C: int, seed: int = 0) -> tuple[FloralLinear, FloralRouter]:
    base = torch.nn.Linear(5, 3)
    router = FloralRouter(C)
    layer = FloralLinear(base, r=2, alpha=4.0, router=router, seed=seed, name="blk.q_proj")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
        layer.lora_bias.copy_(torch.randn(layer.lora_bias.shape, generator=g))
    return layer, router


def test_floral_linear_fast_path_matches_reference_values_and_gradients() -> None:
    # Prepare
    layer, _ = floral_layer(3)
    x = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(2), requires_grad=True)
    p = torch.tensor([0.2, 0.5, 0.3], requires_grad=True)
    # Execute
    fast = layer.adaptor_out(x, p)
    ref = layer.adaptor_out_reference(x, p)
    w = torch.randn_like(fast)
    g_fast = torch.autograd.grad((fast * w).sum(), [x, p, layer.lora_A, layer.lora_B, layer.lora_bias])
    g_ref = torch.autograd.grad((ref * w).sum(), [x, p, layer.lora_A, layer.lora_B, layer.lora_bias])
    # Assert
    assert torch.allclose(fast, ref, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_fast, g_ref))


def test_c1_floral_layer_is_lora_plus_bias() -> None:
    base = torch.nn.Linear(5, 3)
    lora = LoRALinear(torch.nn.Linear(5, 3), 2, 4.0, generator=__import__("fednl.models.seeding", fromlist=["x"])
                      .named_generator(0, "blk.q_proj"))
    with torch.no_grad():
        lora.weight.copy_(base.weight), lora.bias.copy_(base.bias)
    layer = FloralLinear(base, 2, 4.0, FloralRouter(1), seed=0, name="blk.q_proj")
    assert torch.equal(layer.lora_A[0], lora.lora_A)  # adaptor 0 draws A exactly like plain LoRA
    with torch.no_grad():
        lora.lora_B.fill_(0.3), layer.lora_B.fill_(0.3)
    x = torch.randn(4, 5)
    layer.eval()
    assert torch.allclose(layer(x), lora(x), atol=1e-6)


def test_router_noise_only_in_training_and_min_prob_clamp() -> None:
    router = FloralRouter(4)
    router.eval()
    assert torch.allclose(router.probs(), torch.full((4,), 0.25))
    with torch.no_grad():
        router.weight.copy_(torch.tensor([ORACLE_MARGIN, 0.0, 0.0, 0.0]))
    router.reset()
    assert torch.equal(router.probs(), torch.tensor([1.0, 0.01, 0.01, 0.01]))  # clamped, not renormalised
    router.train()
    with torch.no_grad():
        router.weight.zero_()
    router.reset()
    p = router.probs()
    assert not torch.allclose(p, torch.full((4,), 0.25)) and abs(float(p.detach().sum()) - 1.0) < 1e-6
    assert router.probs() is p  # one draw per forward pass, shared by every layer


def test_model_spec_carries_the_adaptor_count() -> None:
    spec = FLoRAL.model_spec(FLoRAL.Options(n_adaptors=3))
    assert spec == ModelSpec(kind="floral", params={"n_adaptors": 3}) and spec.label == "floral(n_adaptors=3)"
    model = build_model(spec, TINY, None, LORA, 0)
    assert model.fednl_kind == "floral" and model.fednl_model_spec == spec
    assert all(m.n_adaptors == 3 for m in floral_modules(model).values())
    groups = param_groups(model)
    assert groups["router"] == {"floral_router.weight"}


# ---------------------------------------------------------------------------------------------- ScaledGD
def test_scaled_gd_by_hand_and_against_the_reference() -> None:
    a = torch.tensor([[2.0]], requires_grad=True)
    b = torch.tensor([[3.0]], requires_grad=True)
    a.grad, b.grad = torch.tensor([[9.0]]), torch.tensor([[4.0]])
    scaled_gd_(a, b, eps=0.0)
    assert torch.allclose(a.grad, torch.tensor([[1.0]])) and torch.allclose(b.grad, torch.tensor([[1.0]]))  # 9/3², 4/2²
    g = torch.Generator().manual_seed(3)
    A = torch.randn(2, 3, 6, generator=g, dtype=torch.float64).requires_grad_()  # [C, r, in]
    B = torch.randn(2, 5, 3, generator=g, dtype=torch.float64).requires_grad_()  # [C, out, r]
    gA = torch.randn(A.shape, generator=g, dtype=torch.float64)
    gB = torch.randn(B.shape, generator=g, dtype=torch.float64)
    A.grad, B.grad = gA.clone(), gB.clone()
    scaled_gd_(A, B, eps=1e-5)
    for c in range(2):
        ra, rb = scaled_gd_reference(gA[c], gB[c], A[c].detach(), B[c].detach(), 1e-5)
        assert torch.allclose(A.grad[c], ra, atol=1e-8) and torch.allclose(B.grad[c], rb, atol=1e-8)


# ---------------------------------------------------------------------------------------------- client hooks
def test_router_sgd_step_and_cleared_gradient() -> None:
    groups = {"frozen": set(), "router": {"floral_router.weight"}, "lora": {"m.lora_A"}}
    strat = FLoRAL(FLoRAL.Options(n_adaptors=2, router_lr=0.1, precondition=False), groups=groups)
    ctx = hand_ctx({"floral_router.weight": torch.zeros(2), "m.lora_A": torch.zeros(2, 1, 1)}, groups=groups)
    ctx.params["floral_router.weight"].grad = torch.tensor([0.5, -0.5], dtype=torch.float64)
    strat.client_after_backward(ctx)
    assert torch.allclose(ctx.params["floral_router.weight"].detach(), torch.tensor([-0.05, 0.05], dtype=torch.float64))
    assert ctx.params["floral_router.weight"].grad is None
    reply = strat.client_reply(ctx)
    assert "floral_router.weight" not in reply.tensors
    pi = [reply.meta[f"{PI_KEY}{c}"] for c in range(2)]
    assert pi == pytest.approx(torch.softmax(torch.tensor([-0.05, 0.05], dtype=torch.float64), 0).tolist())


def test_oracle_router_is_one_hot_and_fixed() -> None:
    groups = {"frozen": set(), "router": {"floral_router.weight"}, "lora": {"m.lora_A"}}
    strat = FLoRAL(FLoRAL.Options(n_adaptors=3, oracle_router=True), groups=groups)
    strat.sample(1, ["a", "b", "c", "d"], __import__("random").Random(0))
    payload = strat.configure_train(1, "d", {"m.lora_A": torch.zeros(3, 1, 1)})
    ctx = hand_ctx({"floral_router.weight": torch.zeros(3), "m.lora_A": torch.zeros(3, 1, 1)}, groups=groups)
    strat.client_receive(ctx, payload)
    router = ctx.params["floral_router.weight"]
    assert torch.equal(torch.softmax(router.detach(), 0), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))  # 3 mod 3
    router.grad = torch.ones(3, dtype=torch.float64)
    strat.client_after_backward(ctx)
    assert router.grad is None and float(router.detach()[0]) == ORACLE_MARGIN


def test_bad_replies_are_rejected() -> None:
    groups = {"frozen": set(), "router": {"r.weight"}, "lora": {"ad"}}
    strat = FLoRAL(FLoRAL.Options(n_adaptors=2), groups=groups)
    glob = {"ad": torch.zeros(2, 1)}
    with pytest.raises(StrategyError, match="lacks its mixture weights"):
        strat.aggregate_train(1, [ClientReply("c", Payload({"ad": torch.zeros(2, 1)}), 1)], glob)
    bad_pi = {f"{PI_KEY}0": 0.9, f"{PI_KEY}1": 0.5}
    with pytest.raises(StrategyError, match="not a probability vector"):
        strat.aggregate_train(1, [ClientReply("c", Payload({"ad": torch.zeros(2, 1)}, bad_pi), 1)], glob)
    nan = Payload({"ad": torch.tensor([[float("nan")], [0.0]])}, {f"{PI_KEY}0": 0.5, f"{PI_KEY}1": 0.5})
    with pytest.raises(StrategyError, match="NaN"):
        strat.aggregate_train(1, [ClientReply("c", nan, 1)], glob)
    with pytest.raises(StrategyError, match="exactly one router"):
        FLoRAL(groups={"frozen": set(), "lora": {"ad"}, "router": set()})


# ---------------------------------------------------------------------------------------------- end to end
def test_c1_fixed_router_is_fedavg_on_base_plus_lora(tmp_path) -> None:
    # Prepare: the same C = 1 FLoRAL model under FLoRAL (fixed router, no preconditioning) and under FedAvg
    opts = FLoRAL.Options(n_adaptors=1, train_router=False, precondition=False)
    m_fl, s_fl = build_for("floral", opts)
    m_avg, s_avg = build_for("fedavg", kind=ModelSpec(kind="floral", params={"n_adaptors": 1}))
    # Execute (no gradient clipping: FedAvg's global norm would include the router's zero gradient, which
    # changes the float32 reduction order and so the last bit of the clip factor)
    run_sim(m_fl, s_fl, tmp_path / "floral", grad_clip=0.0)
    run_sim(m_avg, s_avg, tmp_path / "avg", grad_clip=0.0)
    # Assert: the adaptor tensors agree (FedAvg also ships the router, which C = 1 leaves at zero)
    g_fl, g_avg = final_state(tmp_path / "floral").global_params, final_state(tmp_path / "avg").global_params
    assert set(g_fl) == set(g_avg) - {"floral_router.weight"}
    assert all(torch.equal(g_fl[n], g_avg[n]) for n in g_fl)
    assert any(g_fl[n].abs().sum() > 0 for n in g_fl if n.endswith("lora_B"))


def test_router_never_crosses_the_wire_and_stays_per_client(tmp_path) -> None:
    model, strat = build_for("floral", FLoRAL.Options(n_adaptors=2))
    run_sim(model, strat, tmp_path, rounds=2)
    st = final_state(tmp_path)
    assert "floral_router.weight" not in st.global_params
    assert {e.group for e in st.ledger.entries} == {"lora"}
    routers = [cs.local_params()["floral_router.weight"] for cs in st.clients.values()]
    assert all(r.shape == (2,) for r in routers) and not torch.equal(routers[0], routers[1])


def test_router_pass_starts_at_the_embedding_even_through_the_body_and_after_deepcopy() -> None:
    # The trainer may call the body (model.model) and apply the head itself; a deep copy must keep working.
    model = __import__("copy").deepcopy(build_model(ModelSpec(kind="floral", params={"n_adaptors": 2}), TINY, None, LORA, 0))
    model.train()
    x = torch.randint(0, TINY.tiny_vocab, (2, 6))
    for _ in range(2):  # a stale cached mixture would make the second backward fail
        model.model(x).last_hidden_state.sum().backward()
        model(x).logits.sum().backward()
    assert model.floral_router.weight.grad is not None
