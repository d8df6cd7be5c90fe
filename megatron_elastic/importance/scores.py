"""Importance scores and rankings per elastic axis (the formulas of FACTS.md §1), and the
iterative normalised-MSE layer ranking."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from megatron_elastic.config import ModelConfig
from megatron_elastic.importance.calibration import ActivationStats

__all__ = [
    "Ranking",
    "iterative_layer_ranking",
    "keep_attention_first",
    "rank_from_stats",
    "rank_within_groups",
]


def rank_within_groups(scores: torch.Tensor, num_groups: int) -> list[list[int]]:
    """For (units,) scores laid out group-major, each group's units from most to least important
    (indices local to the group)."""
    per_group = scores.view(num_groups, -1)
    return [torch.argsort(g, descending=True, stable=True).tolist() for g in per_group]


@dataclass
class Ranking:
    """Most-important-first orders of every axis, and the scores they come from."""

    hidden: list[int]
    ffn: dict[int, list[int]]
    mamba_channels: dict[int, list[int]]
    """Per Mamba layer: head channels (the same order for every head)."""
    mamba_heads: dict[int, list[list[int]]]
    """Per Mamba layer, per group: heads (local to the group)."""
    attention_heads: dict[int, list[list[int]]]
    """Per attention layer, per query group: query heads (local to the group)."""
    layers: list[int] | None
    scores: dict

    def to_json(self) -> dict:
        return {
            "hidden": self.hidden,
            "ffn": {str(k): v for k, v in self.ffn.items()},
            "mamba_channels": {str(k): v for k, v in self.mamba_channels.items()},
            "mamba_heads": {str(k): v for k, v in self.mamba_heads.items()},
            "attention_heads": {str(k): v for k, v in self.attention_heads.items()},
            "layer_ranking": self.layers,
            "scores": self.scores,
        }


def rank_from_stats(
    model: ModelConfig, stats: ActivationStats, *, mamba_top_channels: int | None = None
) -> Ranking:
    """Width rankings from calibration statistics.

    - embedding channel: sum of |LN(X)| (all norms);
    - FFN neuron: sum of |X W1^T|;
    - Mamba head channel: L2 over tokens of ``s = LN(X) W_x^T``, summed over heads; a Mamba head:
      L2 of ``s`` over the ``mamba_top_channels`` best channels (default: all), ranked in its group;
    - attention head: L2 of its output over tokens, ranked within its query group.
    """
    top = mamba_top_channels or model.mamba_head_dim
    ranking = Ranking(
        hidden=torch.argsort(stats.hidden, descending=True, stable=True).tolist(),
        ffn={},
        mamba_channels={},
        mamba_heads={},
        attention_heads={},
        layers=None,
        scores={
            "hidden": stats.hidden.tolist(),
            "ffn": {},
            "mamba_channels": {},
            "mamba_heads": {},
            "attention_heads": {},
        },
    )
    for j, s in stats.ffn.items():
        ranking.ffn[j] = torch.argsort(s, descending=True, stable=True).tolist()
        ranking.scores["ffn"][str(j)] = s.tolist()
    for j, sq in stats.mamba_x.items():
        l2 = sq.sqrt()  # (heads, head_dim)
        channel_scores = l2.sum(0)
        channels = torch.argsort(channel_scores, descending=True, stable=True)
        head_scores = sq[:, channels[:top]].sum(1).sqrt()
        ranking.mamba_channels[j] = channels.tolist()
        ranking.mamba_heads[j] = rank_within_groups(head_scores, model.mamba_num_groups)
        ranking.scores["mamba_channels"][str(j)] = channel_scores.tolist()
        ranking.scores["mamba_heads"][str(j)] = head_scores.tolist()
    for j, sq in stats.attention.items():
        head_scores = sq.sqrt()
        ranking.attention_heads[j] = rank_within_groups(head_scores, model.num_query_groups)
        ranking.scores["attention_heads"][str(j)] = head_scores.tolist()
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
    removal (on top of those already dropped) hurts least, then re-scores the rest (FACTS.md §1:
    iterative, not one-shot). Returns the layers most-important-first and, per dropped layer, the
    error at the moment it was dropped.

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
