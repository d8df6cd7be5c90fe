"""What a router decides for one budget and micro-batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_elastic.elastic.model import SubnetWeights
from megatron_elastic.elastic.subnet import SubnetSpec

__all__ = ["RouterDecision", "weights_to"]


@dataclass(frozen=True)
class RouterDecision:
    """One budget's sub-network for one micro-batch, with what the budget loss needs."""

    spec: SubnetSpec
    """The sub-network to run (``model.set_subnet(spec, weights)``)."""
    weights: SubnetWeights | None
    """Router weights riding on the forward pass; ``None`` for deterministic decisions."""
    fraction: float
    """The budget's target fraction of the parent."""
    hidden: torch.Tensor
    """E[embedding width] under ``probs`` (0-dim; differentiable)."""
    sizes: tuple[dict[str, torch.Tensor], ...]
    """Per layer: E[size] of every axis of its kind (``{"mamba_heads": ..., ...}``)."""
    keep: tuple[torch.Tensor, ...]
    """Per layer: probability that the depth choice keeps it."""
    indices: dict[str, tuple[int, ...]]
    """Per axis: the candidate index run, one per decision (per layer of that kind when
    heterogeneous), for logging."""
    probs: dict[str, torch.Tensor]
    """Per axis: (decisions, candidates) relaxed-sample probabilities the expected sizes and soft
    weights use (one-hot when deterministic)."""


def weights_to(weights: SubnetWeights, device: torch.device | str) -> SubnetWeights:
    """``weights`` with every tensor on ``device`` (autograd follows the copy)."""

    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device, non_blocking=True)

    return SubnetWeights(
        hidden=move(weights.hidden),
        layers=tuple(move(t) for t in weights.layers),
        gates=tuple(move(t) for t in weights.gates),
    )
