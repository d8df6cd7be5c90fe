"""Reorder the parent's weights so every nested prefix holds the most important components.

Works on the full (unsplit, TP=1) state dict with megatron-core names; shard it afterwards for any
TP size. Each permutation is exact (the model computes the same function): every axis's
:attr:`~megatron_elastic.elastic.axes.Axis.permute` moves its units together with everything that
reads or writes them (``builtin_axes`` has the hidden channels, FFN neurons, attention heads
within their query group, Mamba heads within their group and Mamba head channels).
"""

from __future__ import annotations

import torch

from megatron_elastic.config import ModelConfig
from megatron_elastic.elastic.axes import axes
from megatron_elastic.elastic.builtin_axes import block_interleave
from megatron_elastic.importance.scores import Ranking

__all__ = ["apply_ranking", "block_interleave"]

StateDict = dict[str, torch.Tensor]


def apply_ranking(
    sd: StateDict, model: ModelConfig, ranking: Ranking, *, ffn_nesting_blocks: int = 1
) -> StateDict:
    """A copy of the full state dict ``sd`` with every ranked axis put in importance order."""
    sd = {k: v.clone() for k, v in sd.items()}
    for axis in axes():
        if axis.permute is None:
            continue
        if not axis.per_layer:  # hidden: the one global order
            axis.permute(sd, model, ranking.hidden, -1, ffn_nesting_blocks)
            continue
        for j, order in sorted(ranking.orders.get(axis.name, {}).items()):
            axis.permute(sd, model, order, j, ffn_nesting_blocks)
    return sd
