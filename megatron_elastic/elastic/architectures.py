"""Architectures for named budgets before (or without) a trained router: explicit per-budget
choices from the recipe, or the homogeneous candidate combination closest to the budget."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from megatron_elastic.config import ModelConfig
from megatron_elastic.elastic.axes import axes
from megatron_elastic.elastic.budget import subnet_param_count
from megatron_elastic.elastic.config import ElasticConfig
from megatron_elastic.elastic.subnet import SubnetSpec

__all__ = ["spec_from_choices", "choices_of", "closest_homogeneous_spec", "budget_specs"]


def _names() -> list[str]:
    return [a.name for a in axes()]


def _per_layer() -> list[str]:
    return [a.name for a in axes() if a.per_layer]


def spec_from_choices(
    model: ModelConfig, elastic: ElasticConfig, choices: dict[str, Any]
) -> SubnetSpec:
    """A spec from ``axis -> choice`` (a per-layer list for Mamba/attention/FFN axes when the
    config is heterogeneous). Every value must be one of the axis's candidates."""
    unknown = set(choices) - set(_names())
    if unknown:
        raise ValueError(f"unknown axes {sorted(unknown)}; axes are {_names()}")
    candidates = elastic.axis_choices(model)
    full = {axis: cands[-1] for axis, cands in candidates.items()}
    n = model.num_layers
    resolved: dict[str, Any] = {}
    for axis in _names():
        value = choices.get(axis, full[axis])
        values = value if isinstance(value, list | tuple) else [value]
        if isinstance(value, list | tuple):
            if axis not in _per_layer() or not elastic.heterogeneous:
                raise ValueError(
                    f"axis {axis!r} got a per-layer list; only {_per_layer()} take one, and "
                    "only with heterogeneous: true"
                )
            if len(values) != n:
                raise ValueError(f"axis {axis!r} needs {n} per-layer values, got {len(values)}")
        bad = [v for v in values if v not in candidates[axis]]
        if bad:
            raise ValueError(f"axis {axis!r}: {bad} not among its candidates {candidates[axis]}")
        resolved[axis] = list(values) if isinstance(value, list | tuple) else [value] * n
    spec = SubnetSpec.heterogeneous(
        model, hidden=resolved["hidden"][0], **{a: resolved[a] for a in _per_layer()}
    ).with_depth(resolved["depth"][0], elastic.layer_ranking)
    spec.validate(model, elastic)
    return spec


def choices_of(model: ModelConfig, elastic: ElasticConfig, spec: SubnetSpec) -> dict[str, Any]:
    """``axis -> choice`` that :func:`spec_from_choices` turns back into ``spec`` (per-layer lists
    when the config is heterogeneous), e.g. to train a fixed architecture a router picked."""
    kinds = model.layer_kinds()
    candidates = elastic.axis_choices(model)
    choices: dict[str, Any] = {"hidden": spec.hidden, "depth": spec.depth}
    for a in axes():
        if not a.per_layer:
            continue
        axis, kind = a.name, a.kind
        # per layer; layers of other kinds hold the parent's size
        values = [c.size(axis) if c.kind == kind else a.full(model) for c in spec.layers]
        mine = [v for v, k in zip(values, kinds, strict=True) if k == kind]
        if not mine:
            choices[axis] = candidates[axis][-1]
        elif elastic.heterogeneous:
            full = candidates[axis][-1]
            choices[axis] = [v if k == kind else full for v, k in zip(values, kinds, strict=True)]
        elif len(set(mine)) == 1:
            choices[axis] = mine[0]
        else:
            raise ValueError(
                f"axis {axis!r} differs between layers ({mine}); a homogeneous elastic config "
                "takes one value per axis"
            )
    if spec_from_choices(model, elastic, choices) != spec:
        raise ValueError(
            "the spec's active layers are not the first ones of the elastic config's layer "
            "ranking; it has no budget_choices form"
        )
    return choices


def closest_homogeneous_spec(
    model: ModelConfig,
    elastic: ElasticConfig,
    fraction: float,
    *,
    cost: Callable[[SubnetSpec], float] | None = None,
    depth: int | None = None,
) -> SubnetSpec:
    """The homogeneous candidate combination whose cost is closest to ``fraction`` of the
    parent's (ties: the larger combination). ``cost``: a spec's cost (default: its parameter
    count); ``depth``: only combinations of this depth (the parent's: width-only pruning)."""
    cost = cost or (lambda spec: float(subnet_param_count(model, spec)))
    target = fraction * cost(SubnetSpec.full(model))
    candidates = elastic.axis_choices(model)
    if depth is not None:
        if depth not in candidates["depth"]:
            raise ValueError(f"depth {depth} is not among {candidates['depth']}")
        candidates = {**candidates, "depth": [depth]}
    best, best_key = None, None
    names = _names()
    for combo in itertools.product(*(candidates[a] for a in names)):
        choice = dict(zip(names, combo, strict=True))
        spec = SubnetSpec.homogeneous(model, layer_ranking=elastic.layer_ranking, **choice)
        value = cost(spec)
        key = (abs(value - target), -value)
        if best_key is None or key < best_key:
            best, best_key = spec, key
    assert best is not None
    return best


def budget_specs(
    model: ModelConfig,
    elastic: ElasticConfig,
    *,
    cost: Callable[[SubnetSpec], float] | None = None,
) -> dict[str, tuple[SubnetSpec, str]]:
    """Each budget's architecture and where it came from (``explicit``, ``parent`` or
    ``closest``: by ``cost``, default the parameter count)."""
    out = {}
    for name, fraction in elastic.budgets.items():
        if name in elastic.budget_choices:
            out[name] = (
                spec_from_choices(model, elastic, elastic.budget_choices[name]),
                "explicit",
            )
        elif fraction == 1.0:
            out[name] = (SubnetSpec.full(model), "parent")
        else:
            out[name] = (
                closest_homogeneous_spec(model, elastic, fraction, cost=cost),
                "closest",
            )
    return out
