"""``ElasticConfig.min_attention_layers``: the layer ranking keeps attention layers in every prefix,
depth choices that would drop them are refused, and the router's sub-networks honour it."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest

from megatron_elastic.elastic.config import ElasticConfig, load_elastic_recipe
from megatron_elastic.importance.scores import iterative_layer_ranking, keep_attention_first
from megatron_elastic.router import ElasticRouter, RouterConfig, router_from_state, router_state

RECIPE = Path(__file__).parents[2] / "examples" / "tiny" / "elastic.yaml"


@pytest.fixture(scope="module")
def recipe():
    return load_elastic_recipe(RECIPE)


def _attention_last(model) -> tuple[int, ...]:
    kinds = model.layer_kinds()
    return tuple(sorted(range(model.num_layers), key=lambda j: (kinds[j] == "attention", j)))


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_bad_values_are_refused(value) -> None:
    with pytest.raises(ValueError, match="min_attention_layers must be an integer >= 0"):
        ElasticConfig(budgets={"full": 1.0}, min_attention_layers=value)


def test_more_than_the_parent_has_is_refused(recipe) -> None:
    model, elastic = recipe
    assert model.layer_kinds().count("attention") == 2
    with pytest.raises(ValueError, match="the parent has 2 attention layers; use min_attention"):
        dataclasses.replace(elastic, min_attention_layers=3).validate_for(model)


def test_a_ranking_that_drops_attention_is_refused_unless_allowed(recipe) -> None:
    model, elastic = recipe
    ranked = dataclasses.replace(elastic, layer_ranking=_attention_last(model))
    assert ranked.min_attention_layers == 1  # the default
    with pytest.raises(ValueError, match="depth choice 8 keeps 0 attention layer"):
        ranked.validate_for(model)
    with pytest.raises(ValueError, match="depth choice 8 keeps 0 attention"):
        ElasticRouter(model, ranked, RouterConfig(anneal_steps=10))
    dataclasses.replace(ranked, min_attention_layers=0).validate_for(model)


def _fake_error(kinds):
    """Removing an attention layer costs nothing, any other layer costs its index + 1: an
    unconstrained ranking puts every attention layer last."""

    def error(removed) -> float:
        return float(sum(0 if kinds[j] == "attention" else j + 1 for j in removed))

    return error


@pytest.mark.parametrize("count", [0, 1, 2])
def test_iterative_ranking_keeps_attention_in_every_prefix(recipe, count) -> None:
    model, _ = recipe
    kinds = model.layer_kinds()
    order, errors = iterative_layer_ranking(
        model.num_layers, _fake_error(kinds), kinds=kinds, min_attention_layers=count
    )
    assert sorted(order) == list(range(model.num_layers)) and len(errors) == model.num_layers - 1
    attention = [j for j, k in enumerate(kinds) if k == "attention"]
    if count == 0:
        assert set(order[-len(attention) :]) == set(attention)  # least important, as measured
    for d in range(count, model.num_layers + 1):
        assert sum(kinds[j] == "attention" for j in order[:d]) >= count, (d, order)
    # The other layers keep their measured order: higher index = more important here.
    others = [j for j in order if kinds[j] != "attention"]
    assert others == sorted(others, reverse=True)


def test_keep_attention_first_promotes_the_best_attention_layers(recipe) -> None:
    model, _ = recipe
    kinds = model.layer_kinds()
    order = list(_attention_last(model))
    assert keep_attention_first(order, kinds, 0) == order
    promoted = keep_attention_first(order, kinds, 1)
    first_attention = next(j for j in order if kinds[j] == "attention")
    assert promoted == [first_attention] + [j for j in order if j != first_attention]
    with pytest.raises(ValueError, match="needs the layer kinds"):
        iterative_layer_ranking(3, lambda removed: 0.0, min_attention_layers=1)


def test_every_router_choice_keeps_attention(recipe) -> None:
    model, elastic = recipe
    kinds = model.layer_kinds()
    order = keep_attention_first(_attention_last(model), kinds, 1)
    ranked = dataclasses.replace(elastic, layer_ranking=tuple(order), heterogeneous=True)
    router = ElasticRouter(model, ranked, RouterConfig(anneal_steps=10))
    seen_depths = set()
    for step, name in itertools.product(range(30), router.encoding.names):
        spec = router.decide(name, step, router.config.generator(step, 0)).spec
        seen_depths.add(spec.depth)
        assert any(c.active and c.kind == "attention" for c in spec.layers), spec
    assert seen_depths == set(router.choices["depth"])  # the shallowest depths were drawn too


def test_routers_saved_before_the_constraint_still_load(recipe) -> None:
    model, elastic = recipe
    loose = dataclasses.replace(
        elastic, layer_ranking=_attention_last(model), min_attention_layers=0
    )
    state = router_state(ElasticRouter(model, loose, RouterConfig(anneal_steps=10)))
    del state["elastic_config"]["min_attention_layers"]  # what an older checkpoint holds
    restored = router_from_state(model, state)
    assert restored.elastic_config.min_attention_layers == 0
    assert restored.decide("50%", 0, None, deterministic=True).spec is not None
