"""Elastic model invariants: full budget == base model (bitwise), slice == mask, and counted
parameters == physically sliced parameters."""

from __future__ import annotations

import pytest
import torch

from megatron_elastic.elastic import ElasticConfig, SubnetSpec, SubnetWeights, build_elastic_model
from megatron_elastic.model import build_hybrid_model
from megatron_elastic.training.lm_step import position_ids_like

ELASTIC = ElasticConfig(budgets={"full": 1.0, "half": 0.5}, ffn_nesting_blocks=2)


@pytest.fixture(scope="module")
def models(pgs, small_config):
    base = build_hybrid_model(small_config, pgs)
    elastic = build_elastic_model(small_config, ELASTIC, pgs)
    elastic.load_state_dict(base.state_dict())
    with torch.no_grad():  # non-trivial norms and skip terms so every parameter matters
        for name, p in base.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", ".D")):
                p.uniform_(0.5, 1.5)
        elastic.load_state_dict(base.state_dict())
    return base, elastic


def _batch(cfg, seed=0, b=2, s=37):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _run(model, tokens, labels):
    model.zero_grad(set_to_none=True)
    loss = model(tokens, position_ids_like(tokens), None, labels=labels)
    loss.float().mean().backward()
    grads = {
        n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()
    }
    logits = model(tokens, position_ids_like(tokens), None).detach()
    return logits, loss.detach(), grads


@pytest.mark.parametrize("mode", ["slice", "mask"])
def test_full_budget_is_base_model_bitwise(models, small_config, mode) -> None:
    base, elastic = models
    tokens, labels = _batch(small_config)
    elastic.set_subnet(SubnetSpec.full(small_config), mode=mode)
    ref = _run(base, tokens, labels)
    out = _run(elastic, tokens, labels)
    assert torch.equal(ref[0], out[0]) and torch.equal(ref[1], out[1])
    for name, g in ref[2].items():
        assert torch.equal(g, out[2][name]), name
    elastic.set_subnet(None)


def _specs(cfg):
    n = cfg.num_layers
    kinds = cfg.layer_kinds()
    return {
        "hidden_only": SubnetSpec.homogeneous(cfg, hidden=40),
        "homogeneous": SubnetSpec.homogeneous(
            cfg, hidden=48, attention_heads=2, mamba_heads=2, mamba_head_dim=10, ffn=64
        ),
        "homogeneous_skip": SubnetSpec.homogeneous(
            cfg,
            hidden=56,
            attention_heads=2,
            mamba_heads=4,
            mamba_head_dim=12,
            ffn=96,
            depth=4,
            layer_ranking=[0, 2, 4, 1, 3, 5],
        ),
        "heterogeneous": SubnetSpec.heterogeneous(
            cfg,
            hidden=52,
            attention_heads=[2 if i % 2 else 4 for i in range(n)],
            mamba_heads=[2, 4, 2, 4, 2, 4][:n],
            mamba_head_dim=[16, 8, 5, 16, 11, 3][:n],
            ffn=[32, 128, 64, 96, 2, 128][:n],
            active=[k != "mlp" or i != 4 for i, k in enumerate(kinds)],
        ),
    }


@pytest.mark.parametrize(
    "name", ["hidden_only", "homogeneous", "homogeneous_skip", "heterogeneous"]
)
def test_slice_equals_mask(models, small_config, name) -> None:
    _, elastic = models
    spec = _specs(small_config)[name]
    tokens, labels = _batch(small_config, seed=1)
    results = {}
    for mode in ("slice", "mask"):
        elastic.set_subnet(spec, mode=mode)
        results[mode] = _run(elastic, tokens, labels)
    elastic.set_subnet(None)
    (ls, loss_s, gs), (lm, loss_m, gm) = results["slice"], results["mask"]
    assert (ls - lm).abs().max().item() <= 1e-5
    assert abs(loss_s.mean().item() - loss_m.mean().item()) <= 1e-5
    touched = 0
    for param, g in gs.items():
        other = gm[param]
        if g is None or other is None:  # only the parameters of skipped layers get no gradient
            assert g is None and other is None, param
            layer = int(param.split(".")[2])
            assert not spec.layers[layer].active, param
            continue
        assert (g - other).abs().max().item() <= 1e-5, param
        touched += 1
    assert touched > 10


def test_subnet_differs_from_parent(models, small_config) -> None:
    base, elastic = models
    tokens, _ = _batch(small_config, seed=2)
    elastic.set_subnet(_specs(small_config)["homogeneous"], mode="slice")
    small = elastic(tokens, position_ids_like(tokens), None).detach()
    elastic.set_subnet(None)
    full = base(tokens, position_ids_like(tokens), None).detach()
    assert (small - full).abs().max().item() > 1e-3


@pytest.mark.parametrize("mode", ["slice", "mask"])
def test_router_weights_reach_every_axis(models, small_config, mode) -> None:
    _, elastic = models
    spec = _specs(small_config)["heterogeneous"]
    widths = [
        c.width * c.head_dim if c.kind == "mamba" else c.width for c in spec.layers
    ]  # units per layer
    weights = SubnetWeights(
        hidden=torch.ones(spec.hidden, requires_grad=True),
        layers=tuple(torch.ones(w, requires_grad=True) for w in widths),
        gates=tuple(torch.ones((), requires_grad=True) for _ in spec.layers),
    )
    tokens, labels = _batch(small_config, seed=3)
    elastic.set_subnet(spec, mode=mode)
    plain = elastic(tokens, position_ids_like(tokens), None).detach()
    elastic.set_subnet(spec, weights, mode=mode)
    out = elastic(tokens, position_ids_like(tokens), None, labels=labels)
    out.mean().backward()
    with_weights = elastic(tokens, position_ids_like(tokens), None).detach()
    elastic.set_subnet(None)
    assert torch.allclose(plain, with_weights, atol=1e-6)  # weights of 1.0 change no value
    assert weights.hidden.grad.abs().sum() > 0
    for c, w, g in zip(spec.layers, weights.layers, weights.gates, strict=True):
        if c.active:
            assert w.grad is not None and w.grad.abs().sum() > 0
            assert g.grad is not None and g.grad.abs() > 0


@pytest.mark.parametrize("mode", ["slice", "mask"])
def test_elastic_code_path_at_full_width_matches_base(models, small_config, mode) -> None:
    """With router weights present the elastic layers run even at the full budget (as in
    training); they must compute what megatron's layers compute."""
    base, elastic = models
    tokens, labels = _batch(small_config, seed=4)
    elastic.set_subnet(
        SubnetSpec.full(small_config), SubnetWeights(hidden=torch.ones(())), mode=mode
    )
    ref, out = _run(base, tokens, labels), _run(elastic, tokens, labels)
    elastic.set_subnet(None)
    assert (ref[0] - out[0]).abs().max().item() <= 1e-5
    for name, g in ref[2].items():
        assert (g - out[2][name]).abs().max().item() <= 1e-5, name
