"""Adding an elastic axis is one Axis (plus its layer kind) and its layer code: nothing else.

A toy FFN-like layer kind (symbol ``T``, ``TOY_UNITS`` hidden units in two nesting groups) and its
axis are registered here, and only here; its layer code is the test's own :class:`ToyLayer`.
Validation, specs, ranking, permutation, slicing, counting and routing then work for it through
the library's unchanged modules.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from megatron_elastic.config import ModelConfig
from megatron_elastic.elastic import ElasticConfig, SubnetSpec
from megatron_elastic.elastic.architectures import choices_of, spec_from_choices
from megatron_elastic.elastic.axes import Axis, LayerKind, axis, registered
from megatron_elastic.elastic.budget import subnet_memory, subnet_param_count
from megatron_elastic.importance import ActivationStats, apply_ranking, rank_from_stats
from megatron_elastic.router import ElasticRouter, RouterConfig, fit_to_budgets

TOY_UNITS, GROUPS = 12, 2
TOY_LAYER = 6  # "M-*M-*" + "T"


def _permute_toy(sd, model, order, layer: int, blocks: int) -> None:
    """Units dealt round-robin over the groups (like FFN neurons over nesting blocks)."""
    size = len(order) // GROUPS
    order = [order[k * GROUPS + b] for b in range(GROUPS) for k in range(size)]
    p = f"decoder.layers.{layer}.toy."
    sd[p + "up"] = sd[p + "up"][order]
    sd[p + "down"] = sd[p + "down"][:, order]


TOY_AXIS = Axis(
    name="toy_units",
    kind="toy",
    full=lambda m: TOY_UNITS,
    label="toy units",
    groups=lambda m, e: GROUPS,
    unit="toy group",
    rank=lambda stat, m, options: (torch.argsort(stat, descending=True).tolist(), stat.tolist()),
    permute=_permute_toy,
)
TOY_KIND = LayerKind(
    "toy", "T", ("toy_units",), lambda m, hidden, s: 2 * hidden * s["toy_units"] + hidden
)


class ToyLayer(nn.Module):
    """The toy kind's layer code: a norm-free two-layer MLP that slices itself by the axis."""

    def __init__(self, hidden: int, generator: torch.Generator) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(hidden, generator=generator) + 0.5)
        self.up = nn.Parameter(torch.randn(TOY_UNITS, hidden, generator=generator))
        self.down = nn.Parameter(torch.randn(hidden, TOY_UNITS, generator=generator))

    def forward(self, x: torch.Tensor, model: ModelConfig, size: int) -> torch.Tensor:
        units = axis("toy_units").kept_units(model, size)
        return torch.relu((x * self.scale) @ self.up[units].T) @ self.down[:, units].T

    def masked(self, x: torch.Tensor, keep: list[int]) -> torch.Tensor:
        mask = torch.zeros(TOY_UNITS)
        mask[keep] = 1.0
        return (torch.relu((x * self.scale) @ self.up.T) * mask) @ self.down.T

    def sliced_params(self, model: ModelConfig, size: int) -> int:
        units = axis("toy_units").kept_units(model, size)
        return self.scale.numel() + self.up[units].numel() + self.down[:, units].numel()


@pytest.fixture
def toy(small_config):
    with registered(TOY_KIND, TOY_AXIS):
        yield dataclasses.replace(small_config, hybrid_pattern=small_config.hybrid_pattern + "T")


def test_the_toy_axis_is_unknown_outside_its_registration(small_config) -> None:
    with pytest.raises(ValueError, match="choices names \\['toy_units'\\]"):
        ElasticConfig(budgets={"full": 1.0}, choices={"toy_units": (4,)})
    with pytest.raises(ValueError, match="hybrid_pattern"):
        dataclasses.replace(small_config, hybrid_pattern="M-*T")


def test_validation_and_specs(toy) -> None:
    elastic = ElasticConfig(budgets={"full": 1.0}, choices={"toy_units": [8, 4, 8]})
    assert elastic.axis_choices(toy)["toy_units"] == (4, 8, 12)
    elastic.validate_for(toy)
    with pytest.raises(ValueError, match=r"toy_units choices \[5\].*kept per toy group"):
        ElasticConfig(budgets={"full": 1.0}, choices={"toy_units": (5,)}).validate_for(toy)
    spec = spec_from_choices(toy, elastic, {"toy_units": 4})
    assert spec.layers[TOY_LAYER].kind == "toy" and spec.layers[TOY_LAYER].size("toy_units") == 4
    assert spec.layers[0] == SubnetSpec.full(toy).layers[0]  # the other layers keep the parent's
    assert choices_of(toy, elastic, spec)["toy_units"] == 4
    assert spec.layers[TOY_LAYER].with_size("toy_units", 8).size("toy_units") == 8
    with pytest.raises(ValueError, match="a toy layer has no 'ffn' axis"):
        spec.layers[TOY_LAYER].with_size("ffn", 8)
    bad = SubnetSpec.heterogeneous(toy, toy_units=[5] * toy.num_layers)
    with pytest.raises(ValueError, match="layer 6: 5 toy units is not possible"):
        bad.validate(toy, elastic)


def test_counting_equals_the_sliced_layer(toy) -> None:
    layer = ToyLayer(toy.hidden_size, torch.Generator().manual_seed(0))
    full, small = SubnetSpec.full(toy), SubnetSpec.homogeneous(toy, toy_units=4)
    saved = subnet_param_count(toy, full) - subnet_param_count(toy, small)
    assert saved == layer.sliced_params(toy, TOY_UNITS) - layer.sliced_params(toy, 4) > 0
    # a stateless kind adds weights to deployment memory and nothing to the caches
    big, little = (subnet_memory(toy, s, seq_length=64) for s in (full, small))
    assert big.weights - little.weights == 2 * saved
    assert (big.kv_cache, big.mamba_state) == (little.kv_cache, little.mamba_state)


def test_ranking_permutation_and_slicing(toy) -> None:
    g = torch.Generator().manual_seed(1)
    layer = ToyLayer(toy.hidden_size, g)
    x = torch.randn(5, toy.hidden_size, generator=g)
    scores = torch.rand(TOY_UNITS, generator=g)
    stats = ActivationStats(hidden=torch.ones(toy.hidden_size), layers={TOY_LAYER: scores})
    ranking = rank_from_stats(toy, stats)
    order = ranking.orders["toy_units"][TOY_LAYER]
    assert order == torch.argsort(scores, descending=True).tolist()
    assert ranking.to_json()["toy_units"] == {str(TOY_LAYER): order}

    prefix = f"decoder.layers.{TOY_LAYER}.toy."
    sd = {prefix + "up": layer.up.detach(), prefix + "down": layer.down.detach()}
    permuted = apply_ranking(sd, toy, ranking)
    ranked = ToyLayer(toy.hidden_size, g)
    with torch.no_grad():
        ranked.scale.copy_(layer.scale)
        ranked.up.copy_(permuted[prefix + "up"])
        ranked.down.copy_(permuted[prefix + "down"])
    with torch.no_grad():
        # the permutation is exact: the full layer computes the same function
        torch.testing.assert_close(ranked(x, toy, TOY_UNITS), layer(x, toy, TOY_UNITS))
        # slice == mask: 4 units keep the 4 top-ranked units of the original layer
        torch.testing.assert_close(ranked(x, toy, 4), layer.masked(x, order[:4]))
        assert not torch.allclose(ranked(x, toy, 4), layer(x, toy, 4))  # ranking mattered


def test_routing(toy) -> None:
    """A router grows an MLP for the toy axis, samples it, and its budget loss trains it: the
    budget whose target is the toy layer at 4 units gets exactly that architecture."""
    elastic = ElasticConfig(budgets={"full": 1.0, "small": 0.5}, choices={"toy_units": (4, 8)})
    small = SubnetSpec.homogeneous(toy, toy_units=4)
    fraction = subnet_param_count(toy, small) / subnet_param_count(toy, SubnetSpec.full(toy))
    elastic = dataclasses.replace(elastic, budgets={"full": 1.0, "small": fraction})
    router = ElasticRouter(toy, elastic, RouterConfig(anneal_steps=20, seed=3))
    assert "toy_units" in router.axes and len(router.choices["toy_units"]) == 3
    decision = router.decide("small", 0, torch.Generator().manual_seed(0))
    assert decision.spec.layers[TOY_LAYER].size("toy_units") in (4, 8, 12)
    assert "toy_units" in decision.sizes[TOY_LAYER]
    router.budget_loss(decision).backward()
    assert router.routers["toy_units"][2].weight.grad.abs().sum() > 0
    fit_to_budgets(router, 60)
    chosen = router.decide("small", 60, None, deterministic=True).spec
    assert chosen.layers[TOY_LAYER].size("toy_units") == 4
    assert router.decide("full", 60, None, deterministic=True).spec == SubnetSpec.full(toy)
