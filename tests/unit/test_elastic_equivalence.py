"""Elastic model invariants: full budget == base model (bitwise), slice == mask, and counted
parameters == physically sliced parameters."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_elastic.elastic import ElasticConfig, SubnetSpec, SubnetWeights, build_elastic_model
from megatron_elastic.model import build_hybrid_model
from megatron_elastic.platform import seed_model_parallel_rng
from megatron_elastic.training.lm_step import position_ids_like

ELASTIC = ElasticConfig(budgets={"full": 1.0, "half": 0.5}, ffn_nesting_blocks=2)
# slice vs mask, relative to each reference tensor's max |value|. Measured worst over the specs
# below and 8 weight draws (torch seeds 0-7): logits and loss 3.4e-7, model gradients 7.5e-6.
VALUE_TOL, GRAD_TOL = 1e-6, 2e-5
GRAD_FLOOR = 1e-8
"""Absolute slack on a gradient that is a sum of cancelling terms: a router weight's gradient
(a depth gate's is sum(dL/dh * (f(x) - x)) over all tokens) can come to 1e-5..1e-4 from terms
near 1e-3; measured |diff| up to 4.7e-9 on such a scalar (4.4e-5 of itself: the rounding of the
terms, not of the result). Every other router gradient: 2e-6 relative."""


@pytest.fixture(scope="module")
def models(pgs, small_config):
    # the same draw whichever tests ran before (the bounds were measured): the default stream and
    # megatron's named model-parallel streams, which parameter initialisation also draws from
    seed_model_parallel_rng(0, tp_rank=0)
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


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| relative to the reference's scale (max |want|)."""
    return (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return (got - want).abs().max().item() <= GRAD_TOL * want.abs().max().item() + GRAD_FLOOR


def _router_like_weights(spec: SubnetSpec, seed: int | None) -> SubnetWeights:
    """Leaf tensors shaped as the router's soft weights (``router._soft_weights``): one per
    active embedding channel, per active head / Mamba channel (head-major) / FFN neuron of every
    active layer, and a depth gate per active layer; ``None`` for skipped layers. All 1.0 with
    ``seed=None`` (the values of a hard decision), else uniform in [0.5, 1.5]."""
    g = None if seed is None else torch.Generator().manual_seed(seed)

    def leaf(*shape: int) -> torch.Tensor:
        t = torch.ones(shape) if g is None else torch.rand(shape, generator=g) + 0.5
        return t.requires_grad_()

    units = [c.width * c.head_dim if c.kind == "mamba" else c.width for c in spec.layers]
    return SubnetWeights(
        hidden=leaf(spec.hidden),
        layers=tuple(
            leaf(u) if c.active else None for c, u in zip(spec.layers, units, strict=True)
        ),
        gates=tuple(leaf() if c.active else None for c in spec.layers),
    )


def _router_grads(weights: SubnetWeights) -> list[torch.Tensor | None]:
    leaves = [weights.hidden, *weights.layers, *weights.gates]
    return [None if t is None else t.grad.clone() for t in leaves]


def test_full_spec_without_router_weights_runs_megatrons_forward(models, small_config) -> None:
    """What evaluation and export deploy at the full budget: megatron's own forward (the elastic
    layers step aside), hence the parent bit for bit. The invariant through the elastic code
    path itself is the next two tests."""
    base, elastic = models
    tokens, labels = _batch(small_config)
    elastic.set_subnet(SubnetSpec.full(small_config))
    assert elastic.subnet is None and elastic.decoder.run_layers is None
    ref, out = _run(base, tokens, labels), _run(elastic, tokens, labels)
    assert torch.equal(ref[0], out[0]) and torch.equal(ref[1], out[1])
    for name, g in ref[2].items():
        assert torch.equal(g, out[2][name]), name


@pytest.fixture(scope="module")
def attention_free(pgs, small_config):
    """small_config without attention layers (pattern M-M-): Mamba, MLP and norms only, where
    the elastic layers do the parent's arithmetic exactly."""
    cfg = dataclasses.replace(small_config, hybrid_pattern="M-M-")
    elastic_cfg = dataclasses.replace(ELASTIC, min_attention_layers=0)
    # the same draw whichever tests ran before (the bounds were measured): the default stream and
    # megatron's named model-parallel streams, which parameter initialisation also draws from
    seed_model_parallel_rng(0, tp_rank=0)
    base = build_hybrid_model(cfg, pgs)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", ".D")):
                p.uniform_(0.5, 1.5)
    elastic = build_elastic_model(cfg, elastic_cfg, pgs)
    elastic.load_state_dict(base.state_dict())
    return cfg, base, elastic


def _assert_full_budget_elastic_path_matches(base, elastic, cfg, mode: str):
    """The full spec with router weights of 1.0 and depth gates (the elastic layers run) against
    the base model: logits and loss bit for bit; every gradient bit for bit in slice mode, within
    5e-6 relative in mask mode (its Mamba forward sums gradients in another order). Returns the
    router weights used."""
    tokens, labels = _batch(cfg, seed=4)
    spec = SubnetSpec.full(cfg)
    weights = _router_like_weights(spec, seed=None)
    elastic.set_subnet(spec, weights, mode=mode)
    assert elastic.subnet is not None  # the elastic layers run
    ref, out = _run(base, tokens, labels), _run(elastic, tokens, labels)
    elastic.set_subnet(None)
    assert torch.equal(ref[0], out[0]) and torch.equal(ref[1], out[1])
    for name, g in ref[2].items():
        if mode == "slice":
            assert torch.equal(g, out[2][name]), name
        else:
            assert _rel(out[2][name], g) <= 5e-6, (name, _rel(out[2][name], g))
    return weights


@pytest.mark.parametrize("mode", ["slice", "mask"])
def test_invariant_full_budget_elastic_path_is_base_model_bitwise(attention_free, mode) -> None:
    """Invariant 1 through the elastic layers (as in training: router weights of 1.0 on every
    unit and a depth gate on every layer), on a parent whose layer kinds the elastic code
    computes with the parent's own arithmetic: logits, loss and, in slice mode, every gradient
    bit for bit. Mask mode runs its own Mamba forward (masks after the conv), bitwise in value;
    autograd sums the gradients of in_proj, conv1d and dt_bias in another order there: worst
    2.5e-6 relative over 12 weight draws (dt_bias, a sum over tokens), bound 5e-6. Slice mode
    was bitwise in all 12."""
    cfg, base, elastic = attention_free
    weights = _assert_full_budget_elastic_path_matches(base, elastic, cfg, mode)
    assert all(g is not None and g.abs().sum() > 0 for g in _router_grads(weights))


@pytest.mark.parametrize("mode", ["slice", "mask"])
def test_invariant_full_budget_elastic_path_matches_base_with_attention(
    models, small_config, mode
) -> None:
    """Invariant 1 through the elastic layers on the parent with attention (as in training:
    router weights of 1.0 on every unit and a depth gate on every layer). The base model's core
    attention (CausalCoreAttention) and the elastic attention both call the same causal SDPA,
    so logits and loss match bit for bit and, in slice mode, every gradient; in mask mode the
    Mamba layers' gradients differ in summation order (measured 3.3e-8 relative, in_proj and
    dt_bias), bound 5e-6 as in the attention-free test. (Before, the base ran megatron's local
    DotProductAttention, explicit scores: 3.5e-7 logits, 1.5e-6 gradients.)
    """
    base, elastic = models
    _assert_full_budget_elastic_path_matches(base, elastic, small_config, mode)


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
def test_invariant_slice_equals_mask(models, small_config, name) -> None:
    """Invariant 3 as training runs it: per-unit router weights (not 1.0) on every axis and a
    depth gate on every active layer. Outputs, loss, every model gradient and every router
    weight's gradient agree; only the parameters of skipped layers get no gradient."""
    _, elastic = models
    spec = _specs(small_config)[name]
    tokens, labels = _batch(small_config, seed=1)
    results, router = {}, {}
    for mode in ("slice", "mask"):
        weights = _router_like_weights(spec, seed=7)
        elastic.set_subnet(spec, weights, mode=mode)
        results[mode] = _run(elastic, tokens, labels)
        router[mode] = _router_grads(weights)
    elastic.set_subnet(None)
    (ls, loss_s, gs), (lm, loss_m, gm) = results["slice"], results["mask"]
    assert _rel(ls, lm) <= VALUE_TOL, _rel(ls, lm)
    assert _rel(loss_s, loss_m) <= VALUE_TOL
    touched = 0
    for param, g in gs.items():
        other = gm[param]
        if g is None or other is None:  # only the parameters of skipped layers get no gradient
            assert g is None and other is None, param
            layer = int(param.split(".")[2])
            assert not spec.layers[layer].active, param
            continue
        assert _close(g, other), (param, _rel(g, other))
        touched += 1
    assert touched > 10
    for i, (a, b) in enumerate(zip(router["slice"], router["mask"], strict=True)):
        assert (a is None) == (b is None), i
        if a is not None:
            assert b.abs().max() > 0 and _close(a, b), (i, _rel(a, b))


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
    weights = _router_like_weights(spec, seed=None)
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
