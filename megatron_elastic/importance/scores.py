"""Importance scores and rankings per elastic axis (the formulas of
docs/background.md#importance-scores), and the iterative normalised-MSE layer ranking."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from megatron_elastic.config import ModelConfig
from megatron_elastic.elastic.axes import Order, axes
from megatron_elastic.importance.calibration import ActivationStats

__all__ = ["Ranking", "iterative_layer_ranking", "keep_attention_first", "rank_from_stats"]


@dataclass
class Ranking:
    """Most-important-first orders of every axis, and the scores they come from."""

    hidden: list[int]
    """Embedding channels."""
    orders: dict[str, dict[int, Order]]
    """Per-layer axis name -> layer -> order (a list of units, or per group a list of units
    local to the group: attention and Mamba heads)."""
    layers: list[int] | None
    """Layers, most important first (``None``: not ranked)."""
    scores: dict

    def to_json(self) -> dict:
        out: dict = {"hidden": self.hidden}
        for axis in axes():
            if axis.per_layer:
                out[axis.key] = {str(k): v for k, v in self.orders.get(axis.name, {}).items()}
        return {**out, "layer_ranking": self.layers, "scores": self.scores}


def rank_from_stats(
    model: ModelConfig,
    stats: ActivationStats,
    *,
    mamba_top_channels: int | None = None,
    moe_expert_nesting_blocks: int = 1,
) -> Ranking:
    """Width rankings from calibration statistics: embedding channels by the sum of |LN(X)| (all
    norms); every per-layer axis by its :attr:`~megatron_elastic.elastic.axes.Axis.rank` of its
    layers' statistics (``builtin_axes`` states each formula)."""
    options = {
        "mamba_top_channels": mamba_top_channels,
        "moe_expert_nesting_blocks": moe_expert_nesting_blocks,
    }
    ranking = Ranking(
        hidden=torch.argsort(stats.hidden, descending=True, stable=True).tolist(),
        orders={},
        layers=None,
        scores={"hidden": stats.hidden.tolist()},
    )
    kinds = model.layer_kinds()
    for axis in axes():
        if axis.rank is None or not axis.per_layer:
            continue
        orders, scores = ranking.orders.setdefault(axis.name, {}), {}
        for j, stat in stats.layers.items():
            if kinds[j] == axis.kind:
                orders[j], scores[str(j)] = axis.rank(stat, model, options)
        ranking.scores[axis.key] = scores
    return ranking


def iterative_layer_ranking(
    num_layers: int,
    logits_error: Callable[[Sequence[int]], float],
    *,
    kinds: Sequence[str] | None = None,
    min_attention_layers: int = 0,
) -> tuple[list[int], list[float]]:
    """Rank layers by normalised MSE of the logits, removing them one at a time.

    ``logits_error(removed)`` returns ``sum (M_full - M_removed)^2 / sum M_full^2`` over the
    calibration data with the layers in ``removed`` skipped. Each round drops the layer whose
    removal (on top of those already dropped) hurts least, then re-scores the rest
    (docs/background.md#importance-scores: iterative, not one-shot). Returns the layers
    most-important-first and, per dropped layer, the error at the moment it was dropped.

    ``min_attention_layers`` (with the layer ``kinds``): an attention layer is not dropped while
    it is one of the last ``min_attention_layers`` attention layers and other layers remain, so
    every prefix of the ranking at least that long keeps that many attention layers
    (``ElasticConfig.min_attention_layers``).
    """
    if min_attention_layers and kinds is None:
        raise ValueError("iterative_layer_ranking: min_attention_layers needs the layer kinds")
    removed: list[int] = []
    errors: list[float] = []
    remaining = list(range(num_layers))
    while len(remaining) > 1:
        candidates = _removable(remaining, kinds, min_attention_layers)
        trial = {j: logits_error([*removed, j]) for j in candidates}
        j = min(candidates, key=lambda k: (trial[k], k))
        removed.append(j)
        errors.append(trial[j])
        remaining.remove(j)
    order = remaining + removed[::-1]
    return order, errors


def _removable(remaining: list[int], kinds: Sequence[str] | None, keep: int) -> list[int]:
    """Layers the next round may drop: not the last ``keep`` attention layers while other
    layers remain."""
    if not keep or kinds is None:
        return remaining
    attention = [j for j in remaining if kinds[j] == "attention"]
    others = [j for j in remaining if kinds[j] != "attention"]
    if len(attention) <= keep and others:
        return others
    return remaining


def keep_attention_first(order: Sequence[int], kinds: Sequence[str], count: int) -> list[int]:
    """``order`` (most important first) with its first ``count`` attention layers moved to the
    front, the rest in their order: every prefix at least ``count`` long then keeps ``count``
    attention layers (for one-shot rankings, e.g. ModelOpt's; the iterative ranking honours the
    constraint while it removes layers)."""
    attention = [j for j in order if kinds[j] == "attention"][:count]
    return attention + [j for j in order if j not in attention]
