"""Architectures for named budgets before (or without) a trained router: explicit per-budget
choices from the recipe, or the homogeneous candidate combination closest to the budget."""

from __future__ import annotations

import itertools
from typing import Any

from megatron_elastic.config import ModelConfig
from megatron_elastic.elastic.budget import subnet_param_count, target_param_count
from megatron_elastic.elastic.config import AXES, ElasticConfig
from megatron_elastic.elastic.subnet import SubnetSpec

__all__ = ["spec_from_choices", "closest_homogeneous_spec", "budget_specs"]

_PER_LAYER = ("attention_heads", "mamba_heads", "mamba_head_dim", "ffn")


def spec_from_choices(
    model: ModelConfig, elastic: ElasticConfig, choices: dict[str, Any]
) -> SubnetSpec:
    """A spec from ``axis -> choice`` (a per-layer list for Mamba/attention/FFN axes when the
    config is heterogeneous). Every value must be one of the axis's candidates."""
    unknown = set(choices) - set(AXES)
    if unknown:
        raise ValueError(f"unknown axes {sorted(unknown)}; axes are {list(AXES)}")
    candidates = elastic.axis_choices(model)
    full = {axis: cands[-1] for axis, cands in candidates.items()}
    n = model.num_layers
    resolved: dict[str, Any] = {}
    for axis in AXES:
        value = choices.get(axis, full[axis])
        values = value if isinstance(value, list | tuple) else [value]
        if isinstance(value, list | tuple):
            if axis not in _PER_LAYER or not elastic.heterogeneous:
                raise ValueError(
                    f"axis {axis!r} got a per-layer list; only {list(_PER_LAYER)} take one, and "
                    "only with heterogeneous: true"
                )
            if len(values) != n:
                raise ValueError(f"axis {axis!r} needs {n} per-layer values, got {len(values)}")
        bad = [v for v in values if v not in candidates[axis]]
        if bad:
            raise ValueError(f"axis {axis!r}: {bad} not among its candidates {candidates[axis]}")
        resolved[axis] = list(values) if isinstance(value, list | tuple) else [value] * n
    spec = SubnetSpec.heterogeneous(
        model,
        hidden=resolved["hidden"][0],
        attention_heads=resolved["attention_heads"],
        mamba_heads=resolved["mamba_heads"],
        mamba_head_dim=resolved["mamba_head_dim"],
        ffn=resolved["ffn"],
    ).with_depth(resolved["depth"][0], elastic.layer_ranking)
    spec.validate(model, elastic)
    return spec


def closest_homogeneous_spec(
    model: ModelConfig, elastic: ElasticConfig, fraction: float
) -> SubnetSpec:
    """The homogeneous candidate combination whose parameter count is closest to ``fraction`` of
    the parent's (ties: the larger combination)."""
    target = target_param_count(model, fraction)
    candidates = elastic.axis_choices(model)
    best, best_key = None, None
    for combo in itertools.product(*(candidates[a] for a in AXES)):
        choice = dict(zip(AXES, combo, strict=True))
        spec = SubnetSpec.homogeneous(
            model,
            hidden=choice["hidden"],
            attention_heads=choice["attention_heads"],
            mamba_heads=choice["mamba_heads"],
            mamba_head_dim=choice["mamba_head_dim"],
            ffn=choice["ffn"],
            depth=choice["depth"],
            layer_ranking=elastic.layer_ranking,
        )
        params = subnet_param_count(model, spec)
        key = (abs(params - target), -params)
        if best_key is None or key < best_key:
            best, best_key = spec, key
    assert best is not None
    return best


def budget_specs(model: ModelConfig, elastic: ElasticConfig) -> dict[str, tuple[SubnetSpec, str]]:
    """Each budget's architecture and where it came from (``explicit`` or ``closest``)."""
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
            out[name] = (closest_homogeneous_spec(model, elastic, fraction), "closest")
    return out
