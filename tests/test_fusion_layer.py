"""AdapterFusion layer and config: fast path vs an independent per-adapter reference, init, schedule, errors."""

from __future__ import annotations

import pytest
import torch

from mtl.errors import MTLConfigError
from mtl.fusion import FusionConfig, FusionLayer, as_fusion_config

D = 16


def make_layer(preset: str = "dynamic", dropout: float = 0.0, seed: int = 0, **overrides) -> FusionLayer:
    """A layer with every parameter (Q/K biases included) randomised, so the tests see all terms."""
    torch.manual_seed(seed)
    layer = FusionLayer(D, FusionConfig(type=preset, **overrides), dropout)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.3)
    return layer


def inputs(n: int, seed: int = 1, shape: tuple[int, ...] = (3, 5)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, D, generator=g), torch.randn(n, *shape, D, generator=g),
            torch.randn(*shape, D, generator=g))


def reference(layer: FusionLayer, query, up, residual, temperature: float = 1.0):
    """AdapterHub's BertFusion written out per adapter: K u_n, V u_n with biases, plain softmax."""
    if layer.config.residual_before:
        up = up + residual
    q = query @ layer.query.weight.T + layer.query.bias
    scores = torch.stack([(q * (u @ layer.key.weight.T + layer.key.bias)).sum(-1) for u in up], dim=-1)
    scores = layer.dropout(scores)  # one call on the [..., N] scores, as the layer makes, so masks match
    probs = torch.softmax(scores / temperature, dim=-1)
    values = [u @ layer.value.weight.T if layer.value is not None else u for u in up]
    context = sum(probs[..., i:i + 1] * v for i, v in enumerate(values))
    if not layer.config.residual_before:
        context = context + residual
    return context, probs


@pytest.mark.parametrize("preset", ["dynamic", "static"])
@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("train", [False, True])
def test_fast_matches_reference_and_naive(preset: str, n: int, train: bool) -> None:
    layer = make_layer(preset, dropout=0.3 if train else 0.0)
    layer.train(train)
    query, up, residual = inputs(n)
    results = []
    for compute in (lambda: reference(layer, query, up, residual, 1.7),
                    lambda: layer(query, up, residual, temperature=1.7, fast=True),
                    lambda: layer(query, up, residual, temperature=1.7, fast=False)):
        torch.manual_seed(123)
        results.append(compute())
    (ref_c, ref_p), (fast_c, fast_p), (naive_c, naive_p) = results
    assert fast_c.shape == (3, 5, D) and fast_p.shape == (3, 5, n)
    torch.testing.assert_close(fast_c, ref_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_p, ref_p, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(naive_c, ref_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(naive_p, ref_p, atol=1e-5, rtol=1e-5)
    if train and n > 1:
        torch.manual_seed(7)  # a different mask must change the result, else dropout was never applied
        assert not torch.allclose(layer(query, up, residual, temperature=1.7)[1], ref_p, atol=1e-4)


@pytest.mark.parametrize("train", [False, True])
def test_residual_before_matches_reference(train: bool) -> None:
    layer = make_layer("dynamic", dropout=0.2, residual_before=True)
    layer.train(train)
    query, up, residual = inputs(4)
    torch.manual_seed(5)
    ref_c, ref_p = reference(layer, query, up, residual)
    for fast in (True, False):
        torch.manual_seed(5)
        c, p = layer(query, up, residual, fast=fast)
        torch.testing.assert_close(c, ref_c, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(p, ref_p, atol=1e-5, rtol=1e-5)
    plain = make_layer("dynamic", dropout=0.2).eval()
    assert not torch.allclose(plain(query, up, residual)[0], layer.eval()(query, up, residual)[0], atol=1e-3)


def test_value_before_softmax_false_is_the_same_fusion() -> None:
    query, up, residual = inputs(3)
    a = make_layer("dynamic").eval()
    b = make_layer("dynamic", value_before_softmax=False).eval()
    torch.testing.assert_close(b(query, up, residual, fast=False)[0], a(query, up, residual, fast=False)[0])


@pytest.mark.parametrize("fast", [True, False])
def test_single_adapter_with_identity_value_is_adapter_plus_residual(fast: bool) -> None:
    layer = make_layer("dynamic").eval()
    with torch.no_grad():
        layer.value.weight.copy_(torch.eye(D))
    query, up, residual = inputs(1)
    context, probs = layer(query, up, residual, fast=fast)
    assert torch.equal(probs, torch.ones_like(probs))
    torch.testing.assert_close(context, up[0] + residual, atol=0, rtol=0)


@pytest.mark.parametrize("preset", ["dynamic", "static"])
def test_permuting_adapters_permutes_probs_only(preset: str) -> None:
    layer = make_layer(preset).eval()
    query, up, residual = inputs(5)
    perm = torch.tensor([3, 0, 4, 1, 2])
    c, p = layer(query, up, residual)
    c_perm, p_perm = layer(query, up[perm], residual)
    torch.testing.assert_close(c_perm, c, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(p_perm, p[..., perm], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(p[..., 0], p[..., 1])  # non-uniform, so the permutation check has teeth


def test_init_and_parameter_counts() -> None:
    torch.manual_seed(0)
    big = FusionLayer(256, FusionConfig(), 0.1)
    for linear in (big.query, big.key):
        assert torch.equal(linear.bias, torch.zeros(256))
        assert abs(linear.weight.std().item() - 0.02) < 0.001 and abs(linear.weight.mean().item()) < 0.001
    assert big.value.bias is None
    eye = torch.eye(256, dtype=torch.bool)
    assert torch.all(big.value.weight[eye] == 1.0)
    assert torch.all(big.value.weight[~eye] == torch.tensor(1e-6))
    assert big.dropout.p == 0.1
    plain = FusionLayer(256, FusionConfig(value_initialized=False), 0.0)
    assert abs(plain.value.weight.std().item() - 0.02) < 0.001
    dynamic, static = FusionLayer(8, FusionConfig("dynamic"), 0.0), FusionLayer(8, FusionConfig("static"), 0.0)
    assert sum(p.numel() for p in dynamic.parameters()) == 2 * (8 * 8 + 8) + 8 * 8
    assert sum(p.numel() for p in static.parameters()) == 2 * (8 * 8 + 8)
    assert not any(name.startswith("value") for name, _ in static.named_parameters())


def test_value_regularization() -> None:
    layer = FusionLayer(2, FusionConfig(), 0.0)
    with torch.no_grad():
        layer.value.weight.copy_(torch.tensor([[2.0, 0.5], [-1.0, 1.0]]))
    # (1-2)^2 + 0.5^2 + (-1)^2 + (1-1)^2 = 2.25
    assert layer.value_regularization().item() == pytest.approx(2.25)
    layer.value_regularization().backward()
    assert layer.value.weight.grad is not None
    static = FusionLayer(2, FusionConfig("static"), 0.0)
    zero = static.value_regularization()
    assert zero.shape == () and zero.item() == 0.0 and zero.device == static.query.weight.device


def test_temperature_schedule() -> None:
    cfg = FusionConfig(temperature=True, temperature_start=50.0, temperature_end=2.0, temperature_steps=100)
    assert cfg.temperature_at(0) == 50.0
    assert cfg.temperature_at(50) == pytest.approx(26.0)
    assert cfg.temperature_at(25) == pytest.approx(38.0)
    assert cfg.temperature_at(100) == pytest.approx(2.0)
    assert cfg.temperature_at(10_000) == pytest.approx(2.0)
    assert cfg.temperature_at(None) == 2.0
    off = FusionConfig(temperature_start=50.0, temperature_end=2.0)
    assert [off.temperature_at(s) for s in (0, 50, None)] == [1.0, 1.0, 1.0]


def test_presets_and_round_trip() -> None:
    dyn, sta = FusionConfig(), as_fusion_config("static")
    assert (dyn.value, dyn.value_initialized, dyn.regularization, dyn.temperature) == (True, True, True, False)
    assert (sta.value, sta.value_initialized, sta.regularization, sta.query, sta.key) == (False, False, False, True, True)
    cfg = FusionConfig(type="dynamic", temperature=True, dropout_prob=0.2, reg_weight=0.5, residual_before=True)
    data = cfg.to_dict()
    assert data["regularization"] is True and data["dropout_prob"] == 0.2
    assert FusionConfig.from_dict(data) == cfg and as_fusion_config(data) == cfg and as_fusion_config(cfg) is cfg


@pytest.mark.parametrize("kwargs, needle", [
    (dict(type="dense"), "fusion.type"),
    (dict(type="static", regularization=True), "fusion.regularization"),
    (dict(query=False), "fusion.query"),
    (dict(key=False), "not implemented"),
    (dict(dropout_prob=1.0), "fusion.dropout_prob"),
    (dict(reg_weight=-0.1), "fusion.reg_weight"),
    (dict(temperature_steps=0), "fusion.temperature_steps"),
    (dict(temperature_end=0.0), "fusion.temperature_end"),
])
def test_config_errors(kwargs: dict, needle: str) -> None:
    with pytest.raises(MTLConfigError, match=needle):
        FusionConfig(**kwargs)


def test_unknown_key_names_source_and_key() -> None:
    with pytest.raises(MTLConfigError, match=r"fusion\.json: unknown fusion keys \['temprature'\]") as err:
        FusionConfig.from_dict({"type": "dynamic", "temprature": True}, source="fusion.json")
    assert "\n" not in str(err.value) and "temperature" in str(err.value)


@pytest.mark.parametrize("training", [False, True])
def test_factored_path_equals_the_stacked_fast_path(training):
    torch.manual_seed(0)
    d, n, r = 16, 5, 4
    layer = FusionLayer(d, FusionConfig(), dropout_prob=0.3).train(training)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    query, residual = torch.randn(3, 7, d), torch.randn(3, 7, d)
    acts, weight, bias = torch.randn(3, 7, n, r).relu(), torch.randn(n, d, r), torch.randn(n, d)
    up = torch.einsum("ndr,...nr->n...d", weight, acts) + bias[:, None, None, :]
    torch.manual_seed(1)
    expected, probs = layer(query, up, residual, temperature=1.7)
    torch.manual_seed(1)
    got, got_probs = layer.forward_factored(query, acts, weight, bias, residual, temperature=1.7)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_probs, probs, rtol=1e-5, atol=1e-6)
