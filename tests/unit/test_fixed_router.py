"""Fixed architectures (``RouterConfig.fixed``): every budget runs the recipe's explicit
``budget_choices`` or the closest homogeneous combination, with a frozen router, no weights and
a zero budget loss; and ``choices_of``, the inverse of ``spec_from_choices``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megatron_elastic.elastic.architectures import (
    budget_specs,
    choices_of,
    closest_homogeneous_spec,
    spec_from_choices,
)
from megatron_elastic.elastic.budget import subnet_param_count
from megatron_elastic.elastic.config import load_elastic_recipe
from megatron_elastic.elastic.subnet import SubnetSpec
from megatron_elastic.router import ElasticRouter, RouterConfig, router_from_state, router_state

RECIPE = Path(__file__).parents[2] / "examples" / "tiny" / "elastic.yaml"
CHOICE_75 = {"hidden": 224, "attention_heads": 6, "mamba_heads": 6, "ffn": 512, "depth": 10}


@pytest.fixture(scope="module")
def recipe():
    return load_elastic_recipe(RECIPE)


def _fixed(model, elastic, **kw) -> ElasticRouter:
    return ElasticRouter(model, elastic, RouterConfig(anneal_steps=10, fixed=True, **kw))


def test_fixed_router_runs_the_closest_or_explicit_architecture_every_time(recipe) -> None:
    model, elastic = recipe
    elastic = dataclasses.replace(elastic, budget_choices={"75%": CHOICE_75})
    router = _fixed(model, elastic)
    assert not router.trainable
    assert all(not p.requires_grad for p in router.parameters())
    expected = {name: spec for name, (spec, _) in budget_specs(model, elastic).items()}
    assert expected["75%"] == spec_from_choices(model, elastic, CHOICE_75)
    assert expected["full"] == SubnetSpec.full(model)
    for name in elastic.budgets:
        for step in (0, 5, 100):
            noisy = router.decide(name, step, RouterConfig(anneal_steps=1).generator(step, 3))
            assert noisy.spec == expected[name]
            assert noisy.weights is None
            loss = router.budget_loss(noisy)
            assert loss.item() == 0.0 and not loss.requires_grad
        assert router.decide(name, 0, None, deterministic=True).spec == expected[name]
    # The closest homogeneous combination: no other one is nearer in parameters.
    half = expected["50%"]
    target = 0.5 * subnet_param_count(model, SubnetSpec.full(model))
    gap = abs(subnet_param_count(model, half) - target)
    assert gap / target < 0.03
    assert router.cost_ratio(half, "50%") == pytest.approx(subnet_param_count(model, half) / target)


def test_fixed_router_serves_fractions_with_the_closest_combination_in_its_own_cost(
    recipe,
) -> None:
    model, elastic = recipe
    for target in ("params", "memory"):
        router = _fixed(model, elastic, budget_target=target)
        spec = router.decide(0.6, 0, None, deterministic=True).spec
        assert spec == closest_homogeneous_spec(model, elastic, 0.6, cost=router.spec_cost)
        assert abs(router.target_ratio(0.6) - 1) < 0.05
        assert router.target_ratio(0.6, raw_argmax=True) == router.target_ratio(0.6)


def test_closest_homogeneous_spec_at_full_depth_prunes_width_only(recipe) -> None:
    model, elastic = recipe
    spec = closest_homogeneous_spec(model, elastic, 0.5, depth=model.num_layers)
    assert spec.depth == model.num_layers and spec != SubnetSpec.full(model)
    with pytest.raises(ValueError, match="depth 7 is not among"):
        closest_homogeneous_spec(model, elastic, 0.5, depth=7)


def test_fixed_router_survives_a_save_and_load(recipe, tiny_config) -> None:
    model, elastic = recipe
    elastic = dataclasses.replace(elastic, budget_choices={"75%": CHOICE_75})
    router = _fixed(model, elastic)
    loaded = router_from_state(model, router_state(router))
    assert loaded.config.fixed and not loaded.trainable
    for budget in (*elastic.budgets, 0.6, 0.85):
        got = loaded.decide(budget, 0, None, deterministic=True).spec
        assert got == router.decide(budget, 0, None, deterministic=True).spec


@pytest.mark.parametrize("heterogeneous", [False, True])
def test_choices_of_inverts_spec_from_choices_on_router_decisions(recipe, heterogeneous) -> None:
    model, elastic = recipe
    elastic = dataclasses.replace(elastic, heterogeneous=heterogeneous)
    router = ElasticRouter(model, elastic, RouterConfig(anneal_steps=10, target_tolerance=0))
    for step in range(6):  # random decisions: many architectures
        spec = router.decide(0.6, step, RouterConfig(anneal_steps=1).generator(step)).spec
        choices = choices_of(model, elastic, spec)
        assert spec_from_choices(model, elastic, choices) == spec
        fixed = _fixed(model, dataclasses.replace(elastic, budget_choices={"50%": choices}))
        assert fixed.decide("50%", 0, None, deterministic=True).spec == spec


def test_choices_of_refuses_what_a_homogeneous_config_cannot_express(recipe) -> None:
    model, elastic = recipe
    router = ElasticRouter(
        model, dataclasses.replace(elastic, heterogeneous=True), RouterConfig(anneal_steps=10)
    )
    mixed = None
    for step in range(20):
        spec = router.decide(0.6, step, RouterConfig(anneal_steps=1).generator(step)).spec
        if len({c.width for c in spec.layers if c.kind == "mlp"}) > 1:
            mixed = spec
            break
    assert mixed is not None
    with pytest.raises(ValueError, match="differs between layers"):
        choices_of(model, elastic, mixed)
    gappy = SubnetSpec.full(model)
    gappy = dataclasses.replace(
        gappy,
        layers=(dataclasses.replace(gappy.layers[0], active=False), *gappy.layers[1:]),
    )
    if elastic.layer_ranking is None or elastic.layer_ranking[-1] != 0:
        with pytest.raises(ValueError, match="layer ranking"):
            choices_of(model, elastic, gappy)


def test_fixed_router_has_no_gradient_path(recipe) -> None:
    model, elastic = recipe
    router = _fixed(model, elastic)
    decision = router.decide("50%", 3, torch.Generator().manual_seed(0))
    assert decision.weights is None
    assert not router.budget_loss(decision).requires_grad


def test_fixed_must_be_a_boolean() -> None:
    with pytest.raises(ValueError, match=r"RouterConfig\.fixed must be true or false, got 'yes'"):
        RouterConfig(anneal_steps=10, fixed="yes")
